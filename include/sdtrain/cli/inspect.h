#pragma once
// `sdtrain inspect PATH`: what a safetensors file, a diffusers model folder or one component
// folder holds (components, config summaries, tensor counts, dtypes, parameter totals), read
// from headers only, so that it is instant even for full-size models.

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace sdtrain::cli {

nlohmann::ordered_json inspect(const std::filesystem::path& path);
std::string format_inspection(const nlohmann::ordered_json& inspection);

}  // namespace sdtrain::cli
