#include "sdtrain/train/train_config.h"

#include <gtest/gtest.h>

#include <fstream>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

using namespace sdtrain;
using namespace sdtrain::train;

namespace {

std::filesystem::path write_config(const std::string& json) {
  auto path = sdtrain::testing::scratch_dir() / "config.json";
  std::ofstream(path) << json;
  return path;
}

const std::string kMinimal = R"("pretrained_model_name_or_path": "model", "instance_data_dir": "photos")";

std::string config_error(const std::string& json, const std::vector<std::string>& overrides = {}) {
  try {
    load_train_config(write_config(json), overrides);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::usage) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "accepted: " << json;
  return "";
}

}  // namespace

TEST(TrainConfig, DefaultsFollowJumpStartForSD21Base) {
  auto config = load_train_config(write_config("{" + kMinimal + "}"), {});
  // SageMaker JumpStart's retrieve_default for stable-diffusion-v2-1-base (docs/configuration.md).
  EXPECT_EQ(config.length.epochs, 20);
  EXPECT_FALSE(config.length.max_steps.has_value());
  EXPECT_EQ(config.length.train_batch_size, 1);
  EXPECT_FALSE(config.class_images.with_prior_preservation);
  EXPECT_EQ(config.class_images.num_class_images, 100);
  EXPECT_DOUBLE_EQ(config.optimizer.learning_rate, 2e-6);
  EXPECT_DOUBLE_EQ(config.class_images.prior_loss_weight, 1.0);
  EXPECT_FALSE(config.data.center_crop);
  EXPECT_EQ(config.optimizer.lr_scheduler, "constant");
  EXPECT_DOUBLE_EQ(config.optimizer.adam_weight_decay, 0.01);
  EXPECT_DOUBLE_EQ(config.optimizer.adam_beta1, 0.9);
  EXPECT_DOUBLE_EQ(config.optimizer.adam_beta2, 0.999);
  EXPECT_DOUBLE_EQ(config.optimizer.adam_epsilon, 1e-8);
  EXPECT_EQ(config.length.gradient_accumulation_steps, 1);
  EXPECT_DOUBLE_EQ(config.optimizer.max_grad_norm, 1.0);
  EXPECT_EQ(config.seed, 0);
}

TEST(TrainConfig, PathsInTheFileAreRelativeToTheFile) {
  auto path = write_config("{" + kMinimal + "}");
  auto config = load_train_config(path, {});
  EXPECT_EQ(config.pretrained_model_name_or_path, (path.parent_path() / "model").string());
}

TEST(TrainConfig, AliasesAndSageMakerStrings) {
  auto config = load_train_config(
      write_config("{" + kMinimal + R"(, "max_train_steps": "400", "num_train_epochs": 3, "batch_size": "2",
                   "with_prior_preservation": "True", "learning_rate": "5e-6", "snr_gamma": "None"})"),
      {});
  EXPECT_EQ(config.length.max_steps, 400);
  EXPECT_EQ(config.length.epochs, 3);
  EXPECT_EQ(config.length.train_batch_size, 2);
  EXPECT_TRUE(config.class_images.with_prior_preservation);
  EXPECT_DOUBLE_EQ(config.optimizer.learning_rate, 5e-6);
  EXPECT_FALSE(config.loss.snr_gamma.has_value());
}

TEST(TrainConfig, OverridesWin) {
  auto config = load_train_config(write_config("{" + kMinimal + R"(, "max_steps": 10})"),
                                  {"max_steps=800", "instance_prompt=a photo of sks dog", "validation_prompts=[\"a\",\"b\"]"});
  EXPECT_EQ(config.length.max_steps, 800);
  EXPECT_EQ(config.data.instance_prompt, "a photo of sks dog");
  EXPECT_EQ(config.outputs.validation_prompts, (std::vector<std::string>{"a", "b"}));
}

TEST(TrainConfig, UnknownKeySuggestsTheNearestName) {
  std::string message = config_error("{" + kMinimal + R"(, "learning_rat": 1e-6})");
  EXPECT_NE(message.find("unknown key \"learning_rat\""), std::string::npos) << message;
  EXPECT_NE(message.find("did you mean \"learning_rate\""), std::string::npos) << message;
  EXPECT_NE(message.find("config.json"), std::string::npos) << message;
  EXPECT_NE(config_error("{" + kMinimal + R"(, "use_8bit_adm": true})").find("\"use_8bit_adam\""), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + "}", {"max_step=3"}).find("\"max_steps\""), std::string::npos);
}

TEST(TrainConfig, WrongTypesNameTheKey) {
  EXPECT_NE(config_error("{" + kMinimal + R"(, "max_steps": "many"})").find("\"max_steps\": expected an integer"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "center_crop": "yes"})").find("\"center_crop\": expected true or false"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "learning_rate": [1]})").find("\"learning_rate\": expected a number"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "resolution": 512.5})").find("\"resolution\": expected an integer"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "instance_prompt": 3})").find("\"instance_prompt\": expected a string"), std::string::npos);
}

TEST(TrainConfig, OutOfRangeValuesNameTheKey) {
  EXPECT_NE(config_error("{" + kMinimal + R"(, "learning_rate": 0})").find("\"learning_rate\": must be greater than 0"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "adam_beta2": 1.0})").find("\"adam_beta2\": must be in [0, 1)"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "gradient_accumulation_steps": 0})").find("at least 1"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "mixed_precision": "fp8"})").find("must be one of \"no\", \"fp16\", \"bf16\""), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "lr_scheduler": "cosine_annealing"})").find("\"lr_scheduler\""), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "resolution": 500})").find("multiple of 8"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "device": "tpu"})").find("\"device\""), std::string::npos);
}

TEST(TrainConfig, NonFiniteNumbersHugeResolutionsAndNonUtf8TextAreErrors) {
  EXPECT_NE(config_error("{" + kMinimal + "}", {"learning_rate=Infinity"}).find("\"learning_rate\": expected a finite number"),
            std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + "}", {"prior_loss_weight=nan"}).find("\"prior_loss_weight\""), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "learning_rate": 1e999})").find("number overflow"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "resolution": 20000})").find("between 8 and 4096"), std::string::npos);
  const std::string message = config_error("{" + kMinimal + "}", {"output_dir=out\xff\xfe"});
  EXPECT_NE(message.find("\"output_dir\": is not valid UTF-8: \"out\\xff\\xfe\""), std::string::npos) << message;
}

TEST(TrainConfig, ContradictionsAreErrors) {
  EXPECT_NE(config_error("{" + kMinimal + R"(, "use_8bit_adam": true, "optimizer": "adamw"})").find("contradicts"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "cache_latents": true, "random_flip": true, "center_crop": true})").find("random_flip"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "cache_latents": true})").find("center_crop"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "max_steps": 5, "max_train_steps": 6})").find("same setting"), std::string::npos);
}

TEST(TrainConfig, RequiredKeysAndMalformedFiles) {
  EXPECT_NE(config_error(R"({"instance_data_dir": "x"})").find("pretrained_model_name_or_path"), std::string::npos);
  EXPECT_NE(config_error("{ not json").find("not valid JSON"), std::string::npos);
  EXPECT_NE(config_error("[1, 2]").find("must be a JSON object"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + "}", {"novalue"}).find("expected key=value"), std::string::npos);
}

TEST(TrainConfig, Use8bitAdamSelectsTheOptimizer) {
  auto config = load_train_config(write_config("{" + kMinimal + R"(, "use_8bit_adam": true})"), {});
  EXPECT_EQ(config.resolved_optimizer(), "adamw8bit");
  EXPECT_EQ(config.optimizer.name, "adamw8bit");
  auto both = load_train_config(write_config("{" + kMinimal + R"(, "use_8bit_adam": true, "optimizer": "adamw8bit"})"), {});
  EXPECT_EQ(both.resolved_optimizer(), "adamw8bit");
}

TEST(TrainConfig, LoRAKeysDefaultAsDiffusersAndAreCheckedOnce) {
  auto config = load_train_config(write_config("{" + kMinimal + R"(, "train_mode": "lora"})"), {});
  EXPECT_EQ(config.lora.train_mode, TrainMode::lora);
  EXPECT_EQ(config.lora.lora_rank, 4);
  EXPECT_DOUBLE_EQ(config.lora.alpha(), 4.0);  // null alpha: the rank
  EXPECT_DOUBLE_EQ(config.optimizer.learning_rate, 5e-4);  // train_dreambooth_lora.py's default
  EXPECT_EQ(config.lora.lora_unet_targets, (std::vector<std::string>{"to_q", "to_k", "to_v", "to_out.0"}));
  EXPECT_EQ(config.lora.lora_formats, (std::vector<std::string>{"diffusers"}));
  auto given = load_train_config(
      write_config("{" + kMinimal + R"(, "train_mode": "lora", "learning_rate": 1e-4, "lora_rank": "16", "lora_alpha": 8})"), {});
  EXPECT_DOUBLE_EQ(given.optimizer.learning_rate, 1e-4);
  EXPECT_EQ(given.lora.lora_rank, 16);
  EXPECT_DOUBLE_EQ(given.lora.alpha(), 8.0);
  EXPECT_DOUBLE_EQ(load_train_config(write_config("{" + kMinimal + "}"), {}).optimizer.learning_rate, 2e-6);
}

TEST(TrainConfig, LoRAMistakesAreErrorsNamingTheKey) {
  // A lora_* key in a full run would do nothing.
  EXPECT_NE(config_error("{" + kMinimal + R"(, "lora_rank": 8})").find("train_mode"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + "}", {"lora_rank=8"}).find("\"lora_rank\" applies to LoRA"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "train_mode": "lora", "lora_unet_targets": ["to_q", "attn"]})").find("item 1"),
            std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "train_mode": "lora", "lora_unet_targets": []})").find("at least one"),
            std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "train_mode": "lora", "lora_formats": ["kohya", "kohya"]})").find("twice"),
            std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "train_mode": "lora", "lora_rank": 0})").find("lora_rank"), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal + R"(, "train_mode": "partial"})").find("\"full\", \"lora\""), std::string::npos);
  EXPECT_NE(config_error("{" + kMinimal +
                         R"(, "train_mode": "lora", "lora_dropout": 0.1, "gradient_checkpointing": true})")
                .find("lora_dropout"),
            std::string::npos);
}

TEST(TrainConfig, ResolvedConfigRoundTripsThroughJson) {
  auto config = load_train_config(write_config("{" + kMinimal + R"(, "max_steps": 7, "snr_gamma": 5.0})"), {});
  auto dir = sdtrain::testing::scratch_dir();
  write_file_atomically(dir / "train_config.json", config.to_json().dump(2));
  auto again = load_train_config(dir / "train_config.json", {});
  EXPECT_EQ(again.to_json(), config.to_json());
}

TEST(TrainConfig, EveryKeyIsDocumented) {
  std::string docs = read_file(sdtrain::testing::source_dir() / "docs" / "configuration.md");
  for (const auto& key : config_keys()) {
    EXPECT_NE(docs.find("`" + key.name + "`"), std::string::npos) << key.name << " is missing from docs/configuration.md";
    for (const auto& alias : key.aliases) EXPECT_NE(docs.find("`" + alias + "`"), std::string::npos) << alias;
  }
}
