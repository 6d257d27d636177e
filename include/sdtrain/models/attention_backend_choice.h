#pragma once
// The choices of compute.attention_backend and `generate --attention-backend`, apart from
// models/attention_backend.h so that the training config stays free of torch's headers.

#include <string>
#include <utility>
#include <vector>

namespace sdtrain::models {

// automatic: torch's order, unchanged (models/attention_backend.h).
enum class AttentionBackend { automatic, flash, efficient, cudnn, math };

// "auto", "flash", "efficient", "cudnn", "math": the names of the config and the CLI.
const std::vector<std::pair<std::string, AttentionBackend>>& attention_backend_names();
std::string attention_backend_name(AttentionBackend backend);

}  // namespace sdtrain::models
