#pragma once
// The DreamBooth training data, as diffusers' train_dreambooth.py DreamBoothDataset prepares
// it: each photo's shorter side resized to `resolution` (torchvision Resize with PIL's bilinear
// filter), a center or random square crop, optionally a random horizontal flip (diffusers'
// text-to-image scripts' --random_flip), then float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5)).
//
// Randomness comes only from generators the caller passes: the crop and flip draws from the
// trainer's data generator (whose state a checkpoint saves), the epoch order from (seed, epoch)
// alone. A resumed run therefore sees the same order and, with the restored generator, the
// same crops as an uninterrupted one.

#include <ATen/core/Generator.h>
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "sdtrain/io/image.h"
#include "sdtrain/train/train_config.h"

namespace sdtrain::train {

struct ImageSize {
  int64_t width = 0;
  int64_t height = 0;
};

// torchvision's Resize(int) size: the shorter side becomes `resolution`, the longer side
// int(resolution * long / short), truncated. Images smaller than `resolution` grow.
ImageSize resized_size(int64_t width, int64_t height, int64_t resolution);

// uint8 [3, H, W] (channels first) of an 8-bit RGB image.
torch::Tensor image_to_tensor(const io::Image& image);

// uint8 [3, H, W] -> uint8 [3, h, w] with resized_size(W, H, resolution): antialiased bilinear
// resampling as PIL's Image.resize(BILINEAR), which torchvision applies to PIL images. ATen's
// uint8 kernel does PIL's separable fixed-point passes; tests/train/dataset_test.cpp records
// how closely it matches PIL.
torch::Tensor resize_shorter_side(const torch::Tensor& image, int64_t resolution);

// torchvision CenterCrop's offset: int(round((extent - size) / 2.0)), Python's round (half to
// even: a margin of 17 gives 8, 19 gives 10).
int64_t center_crop_offset(int64_t extent, int64_t size);

// [C, H, W] -> [C, size, size]; needs H, W >= size (resize_shorter_side guarantees it).
torch::Tensor center_crop(const torch::Tensor& image, int64_t size);
// torchvision RandomCrop: top, then left, uniform from `generator` (no draw when the image is
// already size x size).
torch::Tensor random_crop(const torch::Tensor& image, int64_t size, at::Generator& generator);
// torchvision RandomHorizontalFlip(0.5): flips when a uniform draw is below 0.5.
torch::Tensor random_horizontal_flip(const torch::Tensor& image, at::Generator& generator);
// uint8 [3, H, W] -> float32 [3, H, W] in [-1, 1]: (x / 255 - 0.5) / 0.5 in float32, as
// ToTensor then Normalize([0.5], [0.5]).
torch::Tensor to_model_input(const torch::Tensor& image);

struct PreprocessOptions {
  int64_t resolution = 512;
  bool center_crop = false;  // false: random crop, diffusers' default
  bool random_flip = false;
};
PreprocessOptions preprocess_options(const TrainConfig& config);

// Crop, flip and normalise an image already resized with resize_shorter_side: float32
// [3, resolution, resolution]. Draws from `generator` in torchvision's order (crop, then flip).
torch::Tensor augment(const torch::Tensor& resized, const PreprocessOptions& options,
                      at::Generator& generator);
// The whole pipeline from a decoded image.
torch::Tensor preprocess_image(const io::Image& image, const PreprocessOptions& options,
                               at::Generator& generator);

class DreamBoothDataset {
 public:
  // Decodes every image (EXIF orientation applied) and resizes it once; the crop and flip are
  // drawn per use. No class images: no prior preservation. Throws InputDataError listing every
  // file that cannot be read, or when there are no instance images. Warns once per image that
  // is smaller than the resolution (it is upscaled); warnings() keeps those lines.
  DreamBoothDataset(const std::vector<std::filesystem::path>& instance_images,
                    const std::vector<std::filesystem::path>& class_images,
                    PreprocessOptions options);

  // Samples per epoch: max(instance, class images) with prior preservation, else the instance
  // images (diffusers' __len__). Sample i pairs instance i % n_instance with class i % n_class.
  int64_t size() const;
  int64_t num_instance_images() const { return static_cast<int64_t>(instance_.size()); }
  int64_t num_class_images() const { return static_cast<int64_t>(class_.size()); }
  bool with_prior_preservation() const { return !class_.empty(); }
  const PreprocessOptions& options() const { return options_; }
  const std::vector<std::string>& warnings() const { return warnings_; }
  // Photo i / class image i after the resize (uint8 [3, h, w]), before crop and flip: what
  // cache_latents encodes once.
  const torch::Tensor& resized_instance(int64_t i) const {
    return instance_.at(static_cast<size_t>(i));
  }
  const torch::Tensor& resized_class(int64_t i) const { return class_.at(static_cast<size_t>(i)); }

  // The sample order of epoch `epoch` (0-based): a permutation of [0, size()) from a CPU
  // generator seeded by mixing `seed` and `epoch`, so it depends on nothing else (diffusers
  // shuffles with the global generator, which a resumed run cannot reproduce).
  std::vector<int64_t> epoch_order(uint64_t seed, int64_t epoch) const;

  // The pixels of the samples `indices`: float32 [B, 3, R, R], or [2B, 3, R, R] with prior
  // preservation, instance samples first, then their class samples (diffusers' collate_fn).
  // Draws per sample in diffusers' __getitem__ order: the instance image, then its class image.
  torch::Tensor batch(const std::vector<int64_t>& indices, at::Generator& generator) const;

 private:
  PreprocessOptions options_;
  std::vector<torch::Tensor> instance_;  // uint8 [3, h, w], shorter side = resolution
  std::vector<torch::Tensor> class_;
  std::vector<std::string> warnings_;
};

}  // namespace sdtrain::train
