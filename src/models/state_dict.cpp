#include "sdtrain/models/state_dict.h"

#include <functional>
#include <map>
#include <sstream>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/describe.h"
#include "sdtrain/util/error.h"

namespace sdtrain::models {
namespace {

struct Source {
  std::size_t file = 0;  // index into the opened files
  std::string checkpoint_key;
};

// The module's parameters and buffers by key: the tensors themselves (set_data on one changes
// the module's), where state_dict() gives detached aliases.
std::map<std::string, torch::Tensor> targets_of(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> targets;
  for (const auto& item : module.named_parameters(true)) targets.emplace(item.key(), item.value());
  for (const auto& item : module.named_buffers(true)) targets.emplace(item.key(), item.value());
  return targets;
}

// One copy per target, from the tensor `source_of` its key names. Module::to would also cast
// integer buffers; only floating tensors take options.dtype.
std::vector<TensorCopy> copies_of(
    const std::map<std::string, torch::Tensor>& targets, const LoadOptions& options,
    const std::function<torch::Tensor(const std::string&)>& source_of) {
  // Each copy keeps its own handle on source_of: the copies may outlive this call's argument.
  std::vector<TensorCopy> copies;
  copies.reserve(targets.size());
  for (const auto& [key, target] : targets) {
    const auto dtype = target.is_floating_point() ? options.dtype : target.scalar_type();
    copies.push_back({[source_of, key = key] { return source_of(key); }, target,
                      torch::TensorOptions().device(options.device).dtype(dtype)});
  }
  return copies;
}

std::optional<Staging> staging_of(const LoadOptions& options) {
  if (options.staged.value_or(staged_by_default(options.device))) return options.staging;
  return std::nullopt;
}

}  // namespace

std::vector<std::pair<std::string, torch::Tensor>> state_dict(
    const torch::nn::Module& module, std::optional<c10::ScalarType> dtype) {
  std::vector<std::pair<std::string, torch::Tensor>> entries;
  auto add = [&](const std::string& key, const torch::Tensor& value) {
    entries.emplace_back(key, dtype && value.is_floating_point() ? value.detach().to(*dtype) : value.detach());
  };
  for (const auto& item : module.named_parameters(true)) add(item.key(), item.value());
  for (const auto& item : module.named_buffers(true)) add(item.key(), item.value());
  return entries;
}

int64_t parameter_count(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters(true)) total += p.numel();
  return total;
}

void load_state_dict(torch::nn::Module& module, const io::WeightFiles& weights,
                     const LoadOptions& options, const KeyMapper& map_key) {
  std::vector<io::SafetensorsFile> files;
  files.reserve(weights.files.size());
  for (const auto& path : weights.files) files.emplace_back(path);

  std::map<std::string, Source> sources;  // module key -> where it lives
  std::vector<std::string> unexpected, duplicated, wrong;
  for (std::size_t f = 0; f < files.size(); ++f) {
    for (const auto& entry : files[f].tensors()) {
      std::optional<std::string> key = map_key ? map_key(entry.name) : std::optional(entry.name);
      if (!key) continue;
      if (!sources.emplace(*key, Source{f, entry.name}).second) duplicated.push_back(entry.name);
    }
  }

  const std::map<std::string, torch::Tensor> targets = targets_of(module);
  std::vector<std::string> missing;
  for (const auto& [key, target] : targets) {
    auto it = sources.find(key);
    if (it == sources.end()) {
      missing.push_back(key + " " + describe_shape(target.sizes()));
      continue;
    }
    const io::TensorEntry& entry = *files[it->second.file].find(it->second.checkpoint_key);
    if (c10::IntArrayRef(entry.shape) != target.sizes()) {
      wrong.push_back(key + ": expected " + describe_shape(target.sizes()) + ", found " +
                      describe_shape(entry.shape) + " in " + files[it->second.file].path().filename().string());
    } else if (target.is_floating_point() != c10::isFloatingType(io::to_scalar_type(entry.dtype))) {
      wrong.push_back(key + ": expected a " + std::string(target.is_floating_point() ? "floating" : "integer") +
                      " tensor, found " + std::string(io::dtype_name(entry.dtype)));
    }
  }
  for (const auto& [key, source] : sources) {
    if (!targets.count(key)) unexpected.push_back(source.checkpoint_key);
  }

  if (!missing.empty() || !unexpected.empty() || !wrong.empty() || !duplicated.empty()) {
    std::string where = weights.index ? weights.index->string() : weights.files.front().string();
    throw ModelError(where + ": weights do not match the model built from its config.json" +
                     list_block("missing tensors", missing) + list_block("unexpected tensors", unexpected) +
                     list_block("wrong shape or dtype", wrong) +
                     list_block("tensors given twice", duplicated) +
                     "\n  (is config.json from the same model as the weights?)");
  }

  copy_into_targets(copies_of(targets, options,
                              [&](const std::string& key) {
                                const Source& source = sources.at(key);
                                return files[source.file].tensor(source.checkpoint_key);
                              }),
                    staging_of(options));
}

void assign_state_dict(torch::nn::Module& module, const io::NamedTensors& tensors,
                       const LoadOptions& options) {
  std::map<std::string, torch::Tensor> given(tensors.begin(), tensors.end());
  const std::map<std::string, torch::Tensor> targets = targets_of(module);
  if (given.size() != tensors.size() || given.size() != targets.size())
    throw std::logic_error("assign_state_dict: the tensors do not name the module's keys once each");
  copy_into_targets(copies_of(targets, options,
                              [&](const std::string& key) {
                                auto it = given.find(key);
                                if (it == given.end())
                                  throw std::logic_error("assign_state_dict: no tensor for " + key);
                                return it->second;
                              }),
                    staging_of(options));
}

int64_t to_channels_last(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  int64_t count = 0;
  const auto convert = [&](torch::Tensor& tensor) {
    if (tensor.dim() != 4) return;
    tensor.set_data(tensor.contiguous(torch::MemoryFormat::ChannelsLast));
    ++count;
  };
  for (auto& item : module.named_parameters(/*recurse=*/true)) convert(item.value());
  for (auto& item : module.named_buffers(/*recurse=*/true)) convert(item.value());
  return count;
}

bool is_channels_last(const torch::Tensor& tensor) {
  return tensor.dim() == 4 && !tensor.is_contiguous() &&
         tensor.is_contiguous(torch::MemoryFormat::ChannelsLast);
}

torch::Tensor in_layout_of(const torch::Tensor& value, const torch::Tensor& target) {
  return is_channels_last(target) ? value.contiguous(torch::MemoryFormat::ChannelsLast) : value;
}

std::string describe_shape(c10::IntArrayRef shape) {
  std::ostringstream out;
  out << shape;
  return out.str();
}

std::string list_block(const std::string& title, const std::vector<std::string>& items, std::size_t shown) {
  if (items.empty()) return "";
  std::string text = "\n  " + title + " (" + std::to_string(items.size()) + "):";
  for (std::size_t i = 0; i < items.size() && i < shown; ++i) text += "\n    " + items[i];
  if (items.size() > shown) text += "\n    ... and " + std::to_string(items.size() - shown) + " more";
  return text;
}

}  // namespace sdtrain::models
