// The whole text-to-image pipeline on the bundled tiny model against diffusers'
// StableDiffusionPipeline (tools/make_pipeline_fixtures.py): same prompts, negative prompt,
// seed(s), sampler, steps, guidance and size -> the same float images (output_type="np").
//
// Tolerance: 1e-5 absolute on images in [0, 1] (about 1/400 of one uint8 level). Both sides
// run the same ATen CPU kernels in fp32; what can differ is reduction order inside
// convolutions/attention with another thread count, which the UNet/VAE parity tests bound at
// ~1e-7 relative per forward. The measured maximum is printed by each test (docs/sampling.md).

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "pipeline_support.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/util/json.h"

using namespace sdtrain;
using namespace sdtrain::pipeline;

namespace {

constexpr double kTolerance = 1e-5;

const nlohmann::json& cases() {
  static const auto json = read_json_file(sdtrain::testing::fixture("pipeline/pipeline_cases.json"), ExitCode::input_data);
  return json;
}

torch::Tensor reference(const std::string& name) {
  io::SafetensorsFile file(sdtrain::testing::fixture("pipeline/pipeline.safetensors"));
  return file.tensor(name).clone();
}

GenerationOptions options_of(const nlohmann::json& c) {
  GenerationOptions options;
  options.prompts = {c.at("prompt").get<std::string>()};
  options.negative_prompt = c.at("negative_prompt").get<std::string>();
  options.steps = c.at("steps").get<int64_t>();
  options.guidance_scale = c.at("guidance_scale").get<double>();
  options.scheduler = c.at("scheduler").get<std::string>();
  options.width = c.at("width").get<int64_t>();
  options.height = c.at("height").get<int64_t>();
  options.num_images = c.at("num_images").get<int64_t>();
  options.batch_size = options.num_images;
  if (c.at("seeds").is_array()) {
    for (const auto& seed : c.at("seeds")) options.generators.push_back(at::detail::createCPUGenerator(seed.get<uint64_t>()));
  } else {
    options.seed = c.at("seeds").get<int64_t>();
  }
  return options;
}

double max_abs(const torch::Tensor& a, const torch::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  if (a.sizes() != b.sizes()) return INFINITY;
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

class PipelineParity : public ::testing::TestWithParam<std::string> {};

TEST_P(PipelineParity, FloatImagesMatchStableDiffusionPipeline) {
  const std::string name = GetParam();
  ASSERT_TRUE(cases().contains(name)) << sdtrain::testing::kRegeneratePipelineFixtures;
  const torch::Tensor expected = reference(name);
  const torch::Tensor actual = sdtrain::testing::demo_pipeline().generate_float(options_of(cases().at(name)));
  const double d = max_abs(actual, expected);
  std::cout << "[ measured ] " << name << ": max |ours - diffusers| = " << d << "\n";
  RecordProperty("max_abs", std::to_string(d));
  EXPECT_GT(expected.std().item<double>(), 0.01) << "degenerate reference image";
  EXPECT_LE(d, kTolerance) << name;
}

INSTANTIATE_TEST_SUITE_P(Cases, PipelineParity,
                         ::testing::Values("pndm_negative", "euler_a", "dpm_karras_no_guidance",
                                           "ddim_per_image_generators"));

// The compute settings `generate --fused-group-norm-silu --channels-last` and class images pass:
// the UNet is converted, and the images are still diffusers' within the parity tolerance above
// (measured 1.4e-6 on the build machine: the fused formulas and oneDNN's NHWC convolutions add
// in other orders than torch's NCHW path).
TEST(Pipeline, FusedAndChannelsLastSettingsGiveDiffusersImages) {
  PipelineSettings settings;
  settings.fused_group_norm_silu = true;
  settings.channels_last = true;
  auto sd = StableDiffusionPipeline::from_folder(sdtrain::testing::demo_model(), settings);
  const torch::Tensor weight = sd.unet()->conv_in->weight;
  EXPECT_TRUE(models::is_channels_last(weight));
  const torch::Tensor actual = sd.generate_float(options_of(cases().at("pndm_negative")));
  const double d = max_abs(actual, reference("pndm_negative"));
  std::cout << "[ measured ] fused + channels-last: max |ours - diffusers| = " << d << "\n";
  EXPECT_LE(d, kTolerance);
}

TEST(Pipeline, BatchAfterBatchFromOneGeneratorEqualsOneCall) {
  // Deterministic samplers draw nothing between batches, so two batches of one image from one
  // seeded generator equal diffusers' single call with num_images_per_prompt=2.
  auto options = options_of(cases().at("pndm_negative"));
  options.batch_size = 1;
  const torch::Tensor actual = sdtrain::testing::demo_pipeline().generate_float(options);
  EXPECT_LE(max_abs(actual, reference("pndm_negative")), kTolerance);
}

// Validation decodes one image at a time (decode_batch_size 1) while its UNet steps keep the
// batch: the images are still diffusers' within the parity tolerance (each image's decode reads
// only its own latents; what may differ is the convolutions' reduction order at batch 1).
TEST(Pipeline, DecodingOneImageAtATimeGivesTheBatchesImages) {
  for (const char* name : {"pndm_negative", "ddim_per_image_generators"}) {
    auto options = options_of(cases().at(name));
    options.decode_batch_size = 1;
    const torch::Tensor actual = sdtrain::testing::demo_pipeline().generate_float(options);
    EXPECT_LE(max_abs(actual, reference(name)), kTolerance) << name;
  }
}

TEST(Pipeline, ReportsEveryStepAndTimesEachBatchOnce) {
  // Three images in batches of two, three steps: the reports run 1, 2, 3 per batch, and only
  // each batch's last one (sent after its decode) carries its seconds, which
  // `generate`'s log and tools/benchmark_sampling.py use.
  auto options = options_of(cases().at("pndm_negative"));
  options.num_images = 3;
  options.batch_size = 2;
  options.steps = 3;
  options.scheduler = "euler";  // three model calls for three steps (PNDM's warm-up adds one)
  std::vector<GenerationProgress> reports;
  options.progress = [&](const GenerationProgress& p) { reports.push_back(p); };
  sdtrain::testing::demo_pipeline().generate_float(options);
  ASSERT_EQ(reports.size(), 6u);
  for (size_t i = 0; i < reports.size(); ++i) {
    const GenerationProgress& p = reports[i];
    EXPECT_EQ(p.step, static_cast<int64_t>(i % 3) + 1);
    EXPECT_EQ(p.steps, 3);
    EXPECT_EQ(p.images_done, i < 3 ? 0 : 2);
    EXPECT_EQ(p.batch_images, i < 3 ? 2 : 1);
    if (p.step == p.steps) {
      EXPECT_GT(p.batch_seconds, 0.0);
    } else {
      EXPECT_EQ(p.batch_seconds, 0.0);
    }
  }
}

TEST(Pipeline, Uint8ImagesRoundLikeNumpyToPil) {
  const torch::Tensor images = torch::tensor({0.0f, 0.5f / 255, 1.5f / 255, 2.5f / 255, 0.99999f, 1.0f}).reshape({1, 1, 2, 3});
  const auto out = StableDiffusionPipeline::to_images(images);
  ASSERT_EQ(out.size(), 1u);
  // (x * 255).round(): ties to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2).
  const std::vector<uint8_t> expected = {0, 0, 2, 2, 255, 255};
  EXPECT_EQ(out[0].rgb, expected);
}

TEST(Pipeline, RestoresEachModuleTrainingMode) {
  auto pipeline = StableDiffusionPipeline::from_folder(sdtrain::testing::demo_model(), PipelineSettings{});
  // The trainer's state: the UNet training, the others frozen in eval mode.
  auto unet = models::load_unet(io::ModelFolder(sdtrain::testing::demo_model()), models::LoadOptions{});
  auto vae = models::load_vae(io::ModelFolder(sdtrain::testing::demo_model()), models::LoadOptions{});
  auto text = models::load_text_encoder(io::ModelFolder(sdtrain::testing::demo_model()), models::LoadOptions{});
  unet->train();
  vae->eval();
  text->eval();
  StableDiffusionPipeline shared(text::CLIPTokenizer::from_folder(sdtrain::testing::demo_model() / "tokenizer"), text,
                                 unet, vae, pipeline.scheduler_config(), PipelineSettings{});
  GenerationOptions options;
  options.prompts = {"a robot"};
  options.steps = 2;
  options.width = options.height = 32;
  const auto images = shared.generate(options);
  ASSERT_EQ(images.size(), 1u);
  EXPECT_EQ(images[0].width, 32);
  EXPECT_TRUE(unet->is_training());
  EXPECT_FALSE(vae->is_training());
  EXPECT_FALSE(text->is_training());
  EXPECT_TRUE(torch::GradMode::is_enabled()) << "grad mode must be restored";
}

TEST(Pipeline, InvalidOptionsAreConfigErrors) {
  auto& pipeline = sdtrain::testing::demo_pipeline();
  GenerationOptions options;
  options.prompts = {"a robot"};
  options.steps = 0;
  EXPECT_THROW(pipeline.generate(options), ConfigError);
  options.steps = 2;
  options.width = 30;
  EXPECT_THROW(pipeline.generate(options), ConfigError);
  options.width = 32;
  options.scheduler = "nope";
  EXPECT_THROW(pipeline.generate(options), ConfigError);
  options.scheduler = "";
  options.decode_batch_size = -1;
  EXPECT_THROW(pipeline.generate(options), ConfigError);
  options.decode_batch_size = 0;
  options.prompts = {};
  EXPECT_THROW(pipeline.generate(options), ConfigError);
}

TEST(Pipeline, MissingModelFolderIsAModelError) {
  sdtrain::testing::expect_model_error(
      [] { StableDiffusionPipeline::from_folder(sdtrain::testing::scratch_dir() / "none", PipelineSettings{}); },
      {"none"});
}

}  // namespace
