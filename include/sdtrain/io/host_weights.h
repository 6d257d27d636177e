#pragma once
// A base model's weights kept in host memory after their first read from disk, so that a
// subjects run (docs/scaling.md) reads the 5 GB base once and builds each subject's models
// from this copy. Held by io::ModelFolder::keep_weights_in_host_memory; filled and read by
// models::load_component_weights, from one thread per component (models/load_components.h).

#include <map>
#include <mutex>
#include <string>

#include "sdtrain/io/safetensors.h"

namespace sdtrain::io {

class HostWeights {
 public:
  // A component's tensors in float32 on the CPU, by module key; null before its first read.
  // `key` is the component's name and the weight variant ("unet", "unet/fp16").
  const NamedTensors* find(const std::string& key) const {
    std::lock_guard lock(mutex_);
    const auto it = kept_.find(key);
    return it == kept_.end() ? nullptr : &it->second;
  }
  // A kept component stays where it is while others are added (std::map's nodes do not move).
  const NamedTensors& keep(const std::string& key, NamedTensors tensors) {
    std::lock_guard lock(mutex_);
    return kept_[key] = std::move(tensors);
  }

 private:
  mutable std::mutex mutex_;
  std::map<std::string, NamedTensors> kept_;
};

}  // namespace sdtrain::io
