#pragma once
// Text for the errors that say which tensors do not fit: a shape as "[320, 4, 3, 3]" and a list
// of problems shown up to a limit. Shared by the weight loader (state_dict.cpp), LoRA files and
// single files, so every "does not fit" message reads the same.

#include <torch/torch.h>

#include <string>
#include <vector>

namespace sdtrain::models {

std::string describe_shape(c10::IntArrayRef shape);

// "\n  <title> (<n>):\n    item\n    ..." with at most `shown` items and "... and N more";
// "" when there are none.
std::string list_block(const std::string& title, const std::vector<std::string>& items,
                       std::size_t shown = 25);

}  // namespace sdtrain::models
