#pragma once
// The precision names of the configuration, as one enum parsed once (train_config.h): the
// mixed precision of training ("no", "fp16", "bf16", accelerate's names) and the dtype of the
// exported model ("fp32", "fp16").

#include <string>

namespace sdtrain::train {

enum class Precision { fp32, fp16, bf16 };

// "no" / "fp32" -> fp32, "fp16", "bf16". Throws ConfigError for anything else.
Precision parse_precision(const std::string& name);
// accelerate's name: "no" for fp32, else "fp16" / "bf16".
const char* to_string(Precision precision);

}  // namespace sdtrain::train
