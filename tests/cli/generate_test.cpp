// `sdtrain generate` as users meet it: files and names, PNG text metadata, the grid, agreement
// with diffusers' uint8 output, and the exit codes of bad arguments (README "Exit codes").

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>

#include "sdtrain/io/image.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/atomic_file.h"
#include "test_support.h"

namespace fs = std::filesystem;
using sdtrain::testing::run_command;

namespace {

using Result = sdtrain::testing::CommandResult;

Result generate(const std::string& args) { return sdtrain::testing::run_sdtrain("generate " + args); }

std::string demo_model() { return (sdtrain::testing::source_dir() / "configs" / "demo" / "model").string(); }

bool has_text(const fs::path& png, const std::string& keyword, const std::string& value) {
  return sdtrain::read_file(png).find(keyword + std::string(1, '\0') + value) != std::string::npos;
}

TEST(Generate, WritesNamedImagesWithParametersAndAGrid) {
  const auto out = sdtrain::testing::scratch_dir() / "out";
  auto r = generate("--model " + demo_model() +
                    " --prompt 'a robot' --negative-prompt 'blurry' --steps 2 --width 32 --height 48 --num-images 3"
                    " --batch-size 2 --seed 9 --scheduler euler --device cpu --grid --out " + out.string());
  ASSERT_EQ(r.code, 0) << r.output;
  for (const std::string name : {"s9-0000.png", "s9-0001.png", "s9-0002.png", "grid-s9.png"}) {
    EXPECT_TRUE(fs::exists(out / name)) << name << "\n" << r.output;
  }
  const auto image = sdtrain::io::read_image(out / "s9-0001.png");
  EXPECT_EQ(image.width, 32);
  EXPECT_EQ(image.height, 48);
  const auto grid = sdtrain::io::read_image(out / "grid-s9.png");
  EXPECT_EQ(grid.width, 64);  // 2 columns x 2 rows for 3 images
  EXPECT_EQ(grid.height, 96);
  EXPECT_EQ(std::vector<uint8_t>(grid.pixel(32, 0), grid.pixel(32, 0) + 3),
            std::vector<uint8_t>(image.pixel(0, 0), image.pixel(0, 0) + 3));
  const auto first = out / "s9-0000.png";
  EXPECT_TRUE(has_text(first, "prompt", "a robot"));
  EXPECT_TRUE(has_text(first, "negative_prompt", "blurry"));
  EXPECT_TRUE(has_text(first, "steps", "2"));
  EXPECT_TRUE(has_text(first, "scheduler", "euler"));
  EXPECT_TRUE(has_text(first, "seed", "9"));
  EXPECT_TRUE(has_text(first, "guidance_scale", "7.5"));
  EXPECT_TRUE(has_text(first, "dtype", "fp32"));
}

TEST(Generate, PngPixelsEqualDiffusersRoundedOutput) {
  // The pndm_negative case of tools/make_pipeline_fixtures.py, through the command line.
  const auto out = sdtrain::testing::scratch_dir() / "out";
  auto r = generate("--model " + demo_model() +
                    " --prompt 'a photo of sks robot' --negative-prompt 'blurry, dark' --steps 10 --guidance-scale 7.5"
                    " --width 64 --height 64 --num-images 2 --batch-size 1 --seed 3 --device cpu --out " + out.string());
  ASSERT_EQ(r.code, 0) << r.output;
  sdtrain::io::SafetensorsFile file(sdtrain::testing::fixture("pipeline/pipeline.safetensors"));
  const torch::Tensor expected = (file.tensor("pndm_negative") * 255).round().to(torch::kUInt8);  // [2, 64, 64, 3]
  for (int i = 0; i < 2; ++i) {
    const auto image = sdtrain::io::read_image(out / ("s3-000" + std::to_string(i) + ".png"));
    const torch::Tensor actual = torch::from_blob(const_cast<uint8_t*>(image.rgb.data()), {64, 64, 3}, torch::kUInt8);
    const int64_t worst = (actual.to(torch::kInt) - expected[i].to(torch::kInt)).abs().max().item<int64_t>();
    // Equal, except that a value within fp32 round-off of a rounding boundary may land one level off.
    EXPECT_LE(worst, 1) << "image " << i;
    EXPECT_GT((actual == expected[i]).to(torch::kFloat).mean().item<double>(), 0.999) << "image " << i;
  }
}

// --attention-backend (compute.attention_backend, models/attention_backend.h): the log names
// the kernel that ran each kind of attention, the UNet's, the VAE's and the text encoder's
// (causal); with math the CPU's flash kernel runs none of them. The images of math and of
// torch's choice (flash on the CPU) agree as in Generate.PngPixelsEqualDiffusersRoundedOutput:
// fp32 rounding may move a value across a rounding boundary, one level at most.
TEST(Generate, AttentionBackendReachesEveryAttentionAndIsReported) {
  const auto dir = sdtrain::testing::scratch_dir();
  std::vector<sdtrain::io::Image> images;
  for (const std::string backend : {"math", "auto"}) {
    const auto r = generate("--model " + demo_model() +
                            " --prompt 'a robot' --steps 3 --width 32"
                            " --height 32 --seed 4 --device cpu --attention-backend " +
                            backend + " --out " + (dir / backend).string());
    ASSERT_EQ(r.code, 0) << r.output;
    const size_t at = r.output.find("attention kernels: ");
    ASSERT_NE(at, std::string::npos) << r.output;
    const std::string line = r.output.substr(at, r.output.find('\n', at) - at);
    const std::string ran = backend == "math" ? "math for" : "flash for";
    const std::string not_ran = backend == "math" ? "flash" : "math";
    EXPECT_NE(line.find(ran), std::string::npos) << line;
    EXPECT_NE(line.find("causal"), std::string::npos) << line;
    EXPECT_EQ(line.find(not_ran), std::string::npos) << line;
    images.push_back(sdtrain::io::read_image(dir / backend / "s4-0000.png"));
  }
  ASSERT_EQ(images[0].rgb.size(), images[1].rgb.size());
  for (size_t i = 0; i < images[0].rgb.size(); ++i)
    ASSERT_LE(std::abs(int(images[0].rgb[i]) - int(images[1].rgb[i])), 1) << "byte " << i;
}

TEST(Generate, BadArgumentsGiveTheDocumentedExitCodes) {
  const auto dir = sdtrain::testing::scratch_dir();
  const std::string base = "--prompt x --steps 2 --width 32 --height 32 --device cpu ";
  auto r = generate(base + "--model " + demo_model() + " --scheduler lms --out " + (dir / "a").string());
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("dpm++2m_karras"), std::string::npos) << r.output;  // lists the valid names

  r = generate("--prompt x --steps 0 --model " + demo_model() + " --out " + (dir / "b").string());
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("--steps"), std::string::npos) << r.output;

  r = generate(base + "--model " + (dir / "no-such-model").string() + " --out " + (dir / "c").string());
  EXPECT_EQ(r.code, 3) << r.output;
  EXPECT_NE(r.output.find("no-such-model"), std::string::npos) << r.output;

  fs::copy(demo_model(), dir / "model", fs::copy_options::recursive);
  fs::remove_all(dir / "model" / "scheduler");
  r = generate(base + "--model " + (dir / "model").string() + " --out " + (dir / "d").string());
  EXPECT_EQ(r.code, 3) << r.output;
  EXPECT_NE(r.output.find("scheduler"), std::string::npos) << r.output;

  std::ofstream(dir / "file") << "x";
  r = generate(base + "--model " + demo_model() + " --out " + (dir / "file" / "images").string());
  EXPECT_EQ(r.code, 5) << r.output;

  r = generate(base + "--model " + demo_model() + " --dtype fp16 --out " + (dir / "e").string());
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_EQ(generate("--prompt x").code, 1);  // --model is required

  for (const std::string bad :
       {"--guidance-scale inf", "--guidance-scale nan", "--width 0", "--height 0",
        "--decode-batch-size -1", "--attention-backend xformers"}) {
    r = generate("--prompt x --steps 2 --device cpu --model " + demo_model() + " " + bad + " --out " +
                 (dir / "f").string());
    EXPECT_EQ(r.code, 1) << bad << "\n" << r.output;
    EXPECT_FALSE(fs::exists(dir / "f" / "s0-0000.png")) << bad;
  }
}

}  // namespace
