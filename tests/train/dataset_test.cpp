// The DreamBooth dataset: preprocessing against what diffusers' DreamBoothDataset makes of the
// same photos with PIL and torchvision's rules (tests/fixtures/dataset/preprocess.safetensors,
// written by tools/make_dataset_fixtures.py), and the length, pairing, order and randomness rules.
//
// Resize tolerance: PIL resamples in fixed point with an 8-bit image between its horizontal and
// vertical passes; ATen's uint8 kernel follows the same scheme with other weight precision.
// Measured on the fixtures (same decoded pixels in): 184 of 150984 values (0.12%) differ, by one
// level (1/255 after ToTensor); the worst case, 91x72 from 112x88, has 0.6% differing. Bounds:
// max |ours - PIL| <= 2 levels (a sweep of upscales measured 2 on rare pixels at 4.5x), at most
// 1% of a case's values and 0.5% of all values differing: a wrong filter or a half-pixel grid
// shift changes most values. For comparison, ATen's float kernel rounded to uint8 differs by one
// level on 5-20% of values. Crop and normalisation are compared exactly.
//
// JPEG photos decode differently in stb_image and libjpeg (up to a few levels on a few percent of
// values, see tests/io); the fixture carries PIL's decoded pixels so that the resize is measured
// alone, and the end-to-end difference is printed for the record.

#include "sdtrain/train/dataset.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <numeric>
#include <set>

#include "sdtrain/io/image.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

using namespace sdtrain;
using namespace sdtrain::train;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kMaxLevels = 2;                   // see the file comment
constexpr double kMaxDifferingFraction = 0.01;      // per case
constexpr double kMaxDifferingFractionAll = 0.005;  // over all cases

const char* kRegenerate =
    "regenerate it with\n  ~/.cache/sdtrain/venv/bin/python tools/make_dataset_fixtures.py";

std::map<std::string, torch::Tensor> read_fixture() {
  auto path = sdtrain::testing::fixture("dataset/preprocess.safetensors");
  EXPECT_TRUE(fs::exists(path)) << path << " is missing; " << kRegenerate;
  io::SafetensorsFile file(path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& entry : file.tensors()) out.emplace(entry.name, file.tensor(entry.name).clone());
  return out;
}

fs::path demo_photo(const std::string& name) {
  return sdtrain::testing::source_dir() / "configs/demo/instance" / name;
}

fs::path source_photo(const std::string& stem) {
  if (stem == "rgb8") return sdtrain::testing::fixture("images/rgb8.png");
  for (const auto& name : {".png", ".jpg"}) {
    if (fs::exists(demo_photo(stem + name))) return demo_photo(stem + name);
  }
  ADD_FAILURE() << "no photo for fixture " << stem;
  return {};
}

std::vector<fs::path> demo_photos() {
  return {demo_photo("robot0.png"), demo_photo("robot1.jpg"), demo_photo("robot2.png"),
          demo_photo("robot3.jpg")};
}

// Valid 24x16 / 16x24 images of the image-decoding fixtures, as a stand-in class folder.
std::vector<fs::path> class_photos() {
  std::vector<fs::path> paths;
  for (const char* name :
       {"rgb8.png", "baseline.jpg", "gray8.png", "palette.png", "exif6.jpg", "rgba.png"}) {
    paths.push_back(sdtrain::testing::fixture(std::string("images/") + name));
  }
  return paths;
}

// "<kind>.<stem>.<resolution>" -> {stem, resolution}
std::pair<std::string, int64_t> parse_key(const std::string& key) {
  auto first = key.find('.'), last = key.rfind('.');
  return {key.substr(first + 1, last - first - 1), std::stoll(key.substr(last + 1))};
}

torch::Tensor hwc(const torch::Tensor& chw) { return chw.permute({1, 2, 0}); }

// uint8 [3, H, W] of the photo as PIL decodes it: the fixture's pixels for JPEGs (stb_image and
// libjpeg decode them slightly differently, which the io tests cover), ours for lossless PNGs.
torch::Tensor pil_source(const std::map<std::string, torch::Tensor>& fixture,
                         const std::string& stem) {
  auto found = fixture.find("source." + stem);
  if (found != fixture.end()) return found->second.permute({2, 0, 1}).contiguous();
  return image_to_tensor(io::read_image(source_photo(stem)));
}

at::Generator make_generator(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

// An image whose pixels spell their own coordinates: R = row, G = column.
torch::Tensor coordinate_image(int64_t height, int64_t width) {
  auto rows = torch::arange(height, torch::kInt64).view({height, 1}).expand({height, width});
  auto cols = torch::arange(width, torch::kInt64).view({1, width}).expand({height, width});
  return torch::stack({rows, cols, torch::zeros({height, width}, torch::kInt64)}).to(torch::kUInt8);
}

}  // namespace

TEST(DatasetPreprocess, ResizedSizeFollowsTorchvision) {
  EXPECT_EQ(resized_size(112, 88, 64).width, 81);  // 64 * 112 / 88 = 81.45
  EXPECT_EQ(resized_size(112, 88, 64).height, 64);
  EXPECT_EQ(resized_size(88, 112, 72).height, 91);  // 91.6 truncated, not rounded
  EXPECT_EQ(resized_size(333, 517, 512).height, 794);
  EXPECT_EQ(resized_size(4032, 3024, 512).width, 682);
  EXPECT_EQ(resized_size(96, 96, 104).width, 104);  // smaller images grow
  for (const auto& [key, tensor] : read_fixture()) {
    if (key.rfind("resized.", 0) != 0) continue;
    auto [stem, resolution] = parse_key(key);
    auto image = io::read_image(source_photo(stem));
    auto size = resized_size(image.width, image.height, resolution);
    EXPECT_EQ(size.height, tensor.size(0)) << key;
    EXPECT_EQ(size.width, tensor.size(1)) << key;
  }
}

TEST(DatasetPreprocess, ResizeMatchesPILBilinear) {
  auto fixture = read_fixture();
  int64_t differing_total = 0, values_total = 0, cases = 0;
  for (const auto& [key, expected] : fixture) {
    if (key.rfind("resized.", 0) != 0) continue;
    auto [stem, resolution] = parse_key(key);
    torch::Tensor actual = hwc(resize_shorter_side(pil_source(fixture, stem), resolution));
    ASSERT_EQ(actual.sizes(), expected.sizes()) << key;
    auto diff = (actual.to(torch::kInt32) - expected.to(torch::kInt32)).abs();
    int64_t max_levels = diff.max().item<int64_t>();
    int64_t differing = diff.gt(0).sum().item<int64_t>();
    std::cout << "[ measured ] " << key << ": max |ours - PIL| = " << max_levels << " levels, "
              << differing << " of " << diff.numel() << " values differ\n";
    EXPECT_LE(max_levels, kMaxLevels) << key << "; " << kRegenerate;
    EXPECT_LE(differing, kMaxDifferingFraction * static_cast<double>(diff.numel())) << key;
    differing_total += differing;
    values_total += diff.numel();
    ++cases;
  }
  EXPECT_GE(cases, 10) << "fixture lacks resize cases; " << kRegenerate;
  std::cout << "[ measured ] all resize cases: " << differing_total << " of " << values_total
            << " values differ from PIL\n";
  EXPECT_LE(differing_total, kMaxDifferingFractionAll * static_cast<double>(values_total));
}

TEST(DatasetPreprocess, ReportsJpegDecodePlusResizeAgainstPIL) {
  // For the record only (no bound here): our decoder + resize against PIL's, on the JPEG photos.
  auto fixture = read_fixture();
  for (const auto& [key, expected] : fixture) {
    if (key.rfind("resized.", 0) != 0) continue;
    auto [stem, resolution] = parse_key(key);
    if (!fixture.count("source." + stem)) continue;
    auto ours =
        hwc(resize_shorter_side(image_to_tensor(io::read_image(source_photo(stem))), resolution));
    auto diff = (ours.to(torch::kInt32) - expected.to(torch::kInt32)).abs();
    std::cout << "[ measured ] " << key << " decoded by stb_image: max "
              << diff.max().item<int64_t>() << " levels, " << diff.gt(0).sum().item<int64_t>()
              << " of " << diff.numel() << " values differ\n";
  }
}

TEST(DatasetPreprocess, CenterCropRoundsAsTorchvision) {
  auto fixture = read_fixture();
  auto offsets = fixture.at("center_offsets");  // Python's int(round(margin / 2.0))
  for (int64_t margin = 0; margin < offsets.numel(); ++margin) {
    EXPECT_EQ(center_crop_offset(margin + 40, 40), offsets[margin].item<int64_t>())
        << "margin " << margin;
  }
  int crops = 0;
  for (const auto& [key, expected] : fixture) {
    if (key.rfind("center_crop.", 0) != 0) continue;
    auto [stem, resolution] = parse_key(key);
    // From PIL's resized image, so that the crop itself is compared exactly.
    torch::Tensor resized =
        fixture.at("resized." + stem + "." + std::to_string(resolution)).permute({2, 0, 1});
    EXPECT_TRUE(torch::equal(hwc(center_crop(resized, resolution)), expected)) << key;
    ++crops;
  }
  EXPECT_GE(crops, 4);
}

TEST(DatasetPreprocess, NormalisationIsToTensorThenNormalize) {
  auto fixture = read_fixture();
  torch::Tensor crop = fixture.at("center_crop.rgb8.40").permute({2, 0, 1});
  EXPECT_TRUE(torch::equal(to_model_input(crop), fixture.at("normalized.rgb8.40")));

  auto levels = torch::tensor({0, 1, 127, 128, 254, 255}, torch::kUInt8).view({3, 1, 2});
  auto x = to_model_input(levels);
  EXPECT_EQ(x.scalar_type(), torch::kFloat32);
  EXPECT_EQ(x.min().item<float>(), -1.0f);
  EXPECT_EQ(x.max().item<float>(), 1.0f);
  EXPECT_NEAR(x.flatten()[3].item<float>(), 128.0 / 255 * 2 - 1, 1e-7);
}

TEST(DatasetPreprocess, RandomCropDrawsTopThenLeftUniformly) {
  auto image = coordinate_image(10, 12);
  auto generator = make_generator(7);
  auto mirror = make_generator(7);
  std::set<std::pair<int64_t, int64_t>> seen;
  for (int i = 0; i < 400; ++i) {
    torch::Tensor crop = random_crop(image, 8, generator);
    ASSERT_EQ(crop.sizes(), (std::vector<int64_t>{3, 8, 8}));
    int64_t top = crop[0][0][0].item<int64_t>(), left = crop[1][0][0].item<int64_t>();
    // torchvision's RandomCrop.get_params: randint(0, h - size + 1), then randint(0, w - size + 1).
    EXPECT_EQ(top, at::randint(0, 3, {1}, mirror).item<int64_t>());
    EXPECT_EQ(left, at::randint(0, 5, {1}, mirror).item<int64_t>());
    EXPECT_TRUE(torch::equal(crop, image.slice(1, top, top + 8).slice(2, left, left + 8)));
    seen.insert({top, left});
  }
  EXPECT_EQ(seen.size(), 15u);  // every offset occurs
  // An image of exactly the crop size draws nothing, as torchvision.
  auto before = generator.get_state();
  EXPECT_TRUE(torch::equal(random_crop(image.slice(1, 0, 8).slice(2, 0, 8), 8, generator),
                           image.slice(1, 0, 8).slice(2, 0, 8)));
  EXPECT_TRUE(torch::equal(generator.get_state(), before));
}

TEST(DatasetPreprocess, FlipMirrorsColumnsHalfTheTime) {
  auto image = coordinate_image(4, 6);
  auto generator = make_generator(3);
  int flips = 0;
  for (int i = 0; i < 1000; ++i) {
    torch::Tensor out = random_horizontal_flip(image, generator);
    bool flipped = !torch::equal(out, image);
    if (flipped) EXPECT_TRUE(torch::equal(out, image.flip({2})));
    flips += flipped;
  }
  EXPECT_GT(flips, 450);  // fixed seed: deterministic, and far from 0 or 1000
  EXPECT_LT(flips, 550);

  // Center crop without flip draws nothing; with flip, one draw per image.
  PreprocessOptions options{8, /*center_crop=*/true, /*random_flip=*/false};
  auto generator2 = make_generator(5);
  auto state = generator2.get_state();
  augment(coordinate_image(8, 10), options, generator2);
  EXPECT_TRUE(torch::equal(generator2.get_state(), state));
  options.random_flip = true;
  augment(coordinate_image(8, 10), options, generator2);
  EXPECT_FALSE(torch::equal(generator2.get_state(), state));
}

TEST(DatasetPreprocess, PreprocessImageGivesTheModelInput) {
  auto image = io::read_image(demo_photo("robot1.jpg"));  // 112x88
  auto generator = make_generator(1);
  torch::Tensor x = preprocess_image(image, {64, false, true}, generator);
  EXPECT_EQ(x.sizes(), (std::vector<int64_t>{3, 64, 64}));
  EXPECT_EQ(x.scalar_type(), torch::kFloat32);
  EXPECT_GE(x.min().item<float>(), -1.0f);
  EXPECT_LE(x.max().item<float>(), 1.0f);
  // The random crop is a window of the resized image (maybe mirrored).
  torch::Tensor resized =
      to_model_input(resize_shorter_side(image_to_tensor(image), 64));  // [3, 64, 81]
  bool found = false;
  for (int64_t left = 0; left <= 17 && !found; ++left) {
    auto window = resized.slice(2, left, left + 64);
    found = torch::equal(x, window) || torch::equal(x, window.flip({2}));
  }
  EXPECT_TRUE(found);
}

TEST(DreamBoothDataset, LengthAndPairingFollowDiffusers) {
  PreprocessOptions options{16, /*center_crop=*/true, /*random_flip=*/false};
  DreamBoothDataset with_prior(demo_photos(), class_photos(), options);
  EXPECT_TRUE(with_prior.with_prior_preservation());
  EXPECT_EQ(with_prior.size(), 6);  // max(4 instance, 6 class)
  auto generator = make_generator(0);
  torch::Tensor batch = with_prior.batch({5, 2}, generator);
  ASSERT_EQ(batch.sizes(), (std::vector<int64_t>{4, 3, 16, 16}));
  auto expect_sample = [&](int64_t row, const fs::path& path) {
    torch::Tensor expected = preprocess_image(io::read_image(path), options, generator);
    EXPECT_TRUE(torch::equal(batch[row], expected))
        << "row " << row << " should be " << path.filename();
  };
  // Instance samples first, then their class samples: sample i = (instance i % 4, class i % 6).
  expect_sample(0, demo_photos()[1]);
  expect_sample(1, demo_photos()[2]);
  expect_sample(2, class_photos()[5]);
  expect_sample(3, class_photos()[2]);

  DreamBoothDataset more_instances(demo_photos(), {class_photos()[0], class_photos()[1]}, options);
  EXPECT_EQ(more_instances.size(), 4);
  DreamBoothDataset instance_only(demo_photos(), {}, options);
  EXPECT_FALSE(instance_only.with_prior_preservation());
  EXPECT_EQ(instance_only.size(), 4);
  EXPECT_EQ(instance_only.batch({3, 0, 1}, generator).sizes(),
            (std::vector<int64_t>{3, 3, 16, 16}));
  EXPECT_THROW(instance_only.batch({4}, generator), std::out_of_range);
}

TEST(DreamBoothDataset, EpochOrderDependsOnlyOnSeedAndEpoch) {
  PreprocessOptions options{16, true, false};
  DreamBoothDataset a(demo_photos(), class_photos(), options);
  torch::manual_seed(123);  // the global generator plays no part
  auto order = a.epoch_order(42, 3);
  DreamBoothDataset b(demo_photos(), class_photos(), options);
  torch::manual_seed(456);
  EXPECT_EQ(b.epoch_order(42, 3), order);
  auto sorted = order;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> all(6);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(sorted, all);  // a permutation of every sample
  // Other epochs and seeds give other orders (6! = 720 orders: a clash would be a 1/720 chance,
  // and these fixed values were checked to differ).
  EXPECT_NE(a.epoch_order(42, 4), order);
  EXPECT_NE(a.epoch_order(43, 3), order);
}

TEST(DreamBoothDataset, GeneratorStateReproducesTheAugmentation) {
  PreprocessOptions options{64, /*center_crop=*/false, /*random_flip=*/true};
  DreamBoothDataset dataset(demo_photos(), {}, options);
  auto generator = make_generator(9);
  dataset.batch({0, 1}, generator);
  auto saved = generator.get_state();  // what a checkpoint keeps
  torch::Tensor next = dataset.batch({2, 3}, generator);

  auto resumed = make_generator(1);
  resumed.set_state(saved);
  EXPECT_TRUE(torch::equal(dataset.batch({2, 3}, resumed), next));
  auto other = make_generator(10);
  other.set_state(saved);
  other.set_current_seed(11);
  EXPECT_FALSE(torch::equal(dataset.batch({2, 3}, other), next));
}

TEST(DreamBoothDataset, WarnsOnceForImagesSmallerThanTheResolution) {
  // robot1.jpg and robot2.png have a shorter side of 88 pixels, robot0/robot3 of 96.
  ::testing::internal::CaptureStderr();
  DreamBoothDataset dataset(demo_photos(), demo_photos(), {90, true, false});
  // The run's plan logged the instance photos' warnings already: only the class images' are
  // logged here, while warnings() keeps all four.
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(std::count(log.begin(), log.end(), '\n'), 2) << log;
  ASSERT_EQ(dataset.warnings().size(), 4u);
  EXPECT_NE(dataset.warnings()[0].find("robot1.jpg is 112x88, smaller than resolution 90"),
            std::string::npos)
      << dataset.warnings()[0];
  EXPECT_NE(dataset.warnings()[1].find("robot2.png"), std::string::npos) << dataset.warnings()[1];
  auto generator = make_generator(0);
  // Instance rows then class rows (prior preservation's batch).
  EXPECT_EQ(dataset.batch({0, 1, 2, 3}, generator).sizes(), (std::vector<int64_t>{8, 3, 90, 90}));
  dataset.batch({1, 2}, generator);
  EXPECT_EQ(dataset.warnings().size(), 4u);  // loading warned; using the images does not
}

TEST(DreamBoothDataset, UnreadableImagesAreAllNamedInOneError) {
  auto instances = demo_photos();
  instances.push_back(sdtrain::testing::fixture("images/broken_empty.png"));
  std::vector<fs::path> classes = {sdtrain::testing::fixture("images/broken_garbage.png"),
                                   class_photos()[0]};
  try {
    DreamBoothDataset dataset(instances, classes, {16, true, false});
    ADD_FAILURE() << "broken images were accepted";
  } catch (const InputDataError& e) {
    std::string message = e.what();
    EXPECT_EQ(e.code(), ExitCode::input_data);
    EXPECT_NE(message.find("2 of 7"), std::string::npos) << message;
    EXPECT_NE(message.find("broken_empty.png"), std::string::npos) << message;
    EXPECT_NE(message.find("broken_garbage.png"), std::string::npos) << message;
  }
  EXPECT_THROW(DreamBoothDataset({}, {}, {16, true, false}), InputDataError);
}
