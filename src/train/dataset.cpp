#include "sdtrain/train/dataset.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <stdexcept>

#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace sdtrain::train {
namespace fs = std::filesystem;
namespace {

void check_image_tensor(const torch::Tensor& image, int64_t size, const char* what) {
  if (image.dim() != 3 || image.size(1) < size || image.size(2) < size) {
    throw std::invalid_argument(std::string(what) +
                                ": expected [C, H, W] with H, W >= " + std::to_string(size));
  }
}

// splitmix64's finaliser: nearby (seed, epoch) pairs give unrelated generator seeds.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Resized images of `paths`, with one message per unreadable file and one warning per image
// that has to grow, logged too when `log_warnings`.
std::vector<torch::Tensor> load_resized(const std::vector<fs::path>& paths, int64_t resolution,
                                        std::vector<std::string>& failures,
                                        std::vector<std::string>& warnings, bool log_warnings) {
  std::vector<torch::Tensor> images;
  for (const auto& path : paths) {
    io::Image image;
    try {
      image = io::read_image(path);
    } catch (const InputDataError& e) {
      failures.push_back(e.what());
      continue;
    }
    if (std::min(image.width, image.height) < resolution) {
      warnings.push_back(path.filename().string() + " is " + std::to_string(image.width) + "x" +
                         std::to_string(image.height) + ", smaller than resolution " +
                         std::to_string(resolution) + "; it is upscaled");
      if (log_warnings) log::warn(warnings.back());
    }
    images.push_back(resize_shorter_side(image_to_tensor(image), resolution));
  }
  return images;
}

}  // namespace

ImageSize resized_size(int64_t width, int64_t height, int64_t resolution) {
  int64_t shorter = std::min(width, height), longer = std::max(width, height);
  // Python's int(r * long / short): a correctly rounded division, then truncation.
  auto new_longer =
      static_cast<int64_t>(static_cast<double>(resolution * longer) / static_cast<double>(shorter));
  if (width <= height) return {resolution, new_longer};
  return {new_longer, resolution};
}

torch::Tensor image_to_tensor(const io::Image& image) {
  auto hwc = torch::from_blob(const_cast<uint8_t*>(image.rgb.data()),
                              {image.height, image.width, 3}, torch::kUInt8);
  return hwc.permute({2, 0, 1}).contiguous();  // [3, H, W], a copy that owns its memory
}

torch::Tensor resize_shorter_side(const torch::Tensor& image, int64_t resolution) {
  check_image_tensor(image, 1, "resize_shorter_side");
  if (image.scalar_type() != torch::kUInt8)
    throw std::invalid_argument("resize_shorter_side: expected uint8 pixels");
  ImageSize size = resized_size(image.size(2), image.size(1), resolution);
  if (size.width == image.size(2) && size.height == image.size(1))
    return image;  // torchvision skips it too
  // The uint8 kernel, not the float one: on 8-bit input it rounds between its horizontal and
  // vertical passes as PIL does, and so agrees with PIL on all but a few pixels, where the
  // float kernel differs by one level on 5-20% of them (see the test).
  auto batch = image.unsqueeze(0).contiguous();  // [1, 3, H, W]
  return at::_upsample_bilinear2d_aa(batch, {size.height, size.width}, /*align_corners=*/false)
      .squeeze(0);
}

int64_t center_crop_offset(int64_t extent, int64_t size) {
  int64_t margin = extent - size;
  int64_t half = margin / 2;
  if (margin % 2 == 0) return half;
  return half % 2 == 0 ? half : half + 1;  // x.5 rounds to the even neighbour, as Python's round
}

torch::Tensor center_crop(const torch::Tensor& image, int64_t size) {
  check_image_tensor(image, size, "center_crop");
  int64_t top = center_crop_offset(image.size(1), size);
  int64_t left = center_crop_offset(image.size(2), size);
  return image.slice(1, top, top + size).slice(2, left, left + size);
}

torch::Tensor random_crop(const torch::Tensor& image, int64_t size, at::Generator& generator) {
  check_image_tensor(image, size, "random_crop");
  int64_t height = image.size(1), width = image.size(2);
  if (height == size && width == size) return image;
  int64_t top = at::randint(0, height - size + 1, {1}, generator).item<int64_t>();
  int64_t left = at::randint(0, width - size + 1, {1}, generator).item<int64_t>();
  return image.slice(1, top, top + size).slice(2, left, left + size);
}

torch::Tensor random_horizontal_flip(const torch::Tensor& image, at::Generator& generator) {
  if (at::rand({1}, generator).item<float>() < 0.5f) return image.flip({-1});
  return image;
}

torch::Tensor to_model_input(const torch::Tensor& image) {
  return image.to(torch::kFloat32).div(255).sub(0.5).div(0.5).contiguous();
}

PreprocessOptions preprocess_options(const TrainConfig& config) {
  return PreprocessOptions{config.data.resolution, config.data.center_crop,
                           config.data.random_flip};
}

torch::Tensor augment(const torch::Tensor& resized, const PreprocessOptions& options,
                      at::Generator& generator) {
  torch::Tensor crop = options.center_crop ? center_crop(resized, options.resolution)
                                           : random_crop(resized, options.resolution, generator);
  if (options.random_flip) crop = random_horizontal_flip(crop, generator);
  return to_model_input(crop);
}

torch::Tensor preprocess_image(const io::Image& image, const PreprocessOptions& options,
                               at::Generator& generator) {
  return augment(resize_shorter_side(image_to_tensor(image), options.resolution), options,
                 generator);
}

DreamBoothDataset::DreamBoothDataset(const std::vector<fs::path>& instance_images,
                                     const std::vector<fs::path>& class_images,
                                     PreprocessOptions options)
    : options_(options) {
  if (instance_images.empty()) throw InputDataError("no instance images to train on");
  std::vector<std::string> failures;
  // The run's plan has already warned about small instance photos, before anything loaded
  // (plan.cpp); class images are first read here.
  instance_ = load_resized(instance_images, options_.resolution, failures, warnings_, false);
  class_ = load_resized(class_images, options_.resolution, failures, warnings_, true);
  if (!failures.empty()) {
    std::string message = std::to_string(failures.size()) + " of " +
                          std::to_string(instance_images.size() + class_images.size()) +
                          " training images cannot be read:";
    for (const auto& failure : failures) message += "\n  " + failure;
    throw InputDataError(message);
  }
}

int64_t DreamBoothDataset::size() const {
  return std::max(num_instance_images(), num_class_images());
}

std::vector<int64_t> DreamBoothDataset::epoch_order(uint64_t seed, int64_t epoch) const {
  auto generator =
      at::make_generator<at::CPUGeneratorImpl>(mix(mix(seed) + static_cast<uint64_t>(epoch)));
  torch::Tensor order = torch::randperm(size(), generator, torch::kInt64);
  return std::vector<int64_t>(order.data_ptr<int64_t>(), order.data_ptr<int64_t>() + order.numel());
}

torch::Tensor DreamBoothDataset::batch(const std::vector<int64_t>& indices,
                                       at::Generator& generator) const {
  std::vector<torch::Tensor> instance, prior;
  for (int64_t index : indices) {
    if (index < 0 || index >= size()) {
      throw std::out_of_range("DreamBoothDataset: sample " + std::to_string(index) + " of " +
                              std::to_string(size()));
    }
    instance.push_back(augment(instance_[index % num_instance_images()], options_, generator));
    if (with_prior_preservation())
      prior.push_back(augment(class_[index % num_class_images()], options_, generator));
  }
  instance.insert(instance.end(), prior.begin(), prior.end());
  return torch::stack(instance);  // [B (+B), 3, R, R]
}

}  // namespace sdtrain::train
