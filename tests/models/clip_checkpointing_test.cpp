// Gradient checkpointing of the text encoder (per encoder layer): the same gradients as the
// plain backward, for every parameter, on the bundled tiny SD 2.x-shaped text encoder.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/clip_text_model.h"
#include "test_support.h"

using namespace sdtrain;

namespace {

std::map<std::string, torch::Tensor> gradients(bool checkpointing) {
  io::ModelFolder folder(sdtrain::testing::source_dir() / "configs" / "demo" / "model");
  auto model = models::load_text_encoder(folder, {});
  model->set_gradient_checkpointing(checkpointing);
  auto ids = torch::tensor({{1512, 320, 1125, 539, 1513, 0, 0, 0}, {1512, 7, 9, 1513, 0, 0, 0, 0}}, torch::kLong);
  auto out = model->forward(ids);  // [2, 8, 32]
  auto weights = torch::linspace(-1, 1, out.numel()).reshape(out.sizes());
  (out * weights).sum().backward();
  std::map<std::string, torch::Tensor> grads;
  for (const auto& p : model->named_parameters()) grads[p.key()] = p.value().grad().clone();
  return grads;
}

}  // namespace

TEST(CLIPTextModelCheckpointing, SameGradientsAsPlainBackward) {
  auto plain = gradients(false);
  auto recomputed = gradients(true);
  ASSERT_EQ(plain.size(), recomputed.size());
  for (const auto& [name, grad] : plain) {
    ASSERT_TRUE(recomputed.at(name).defined()) << name << " got no gradient with checkpointing";
    // The recomputation runs the same kernels on the same inputs: only summation order in the
    // autograd engine may differ, so 1e-6 of the gradient's scale (floored) is ample.
    double scale = std::max(grad.abs().max().item<double>(), 1e-3);
    EXPECT_LE((grad - recomputed.at(name)).abs().max().item<double>(), 1e-6 * scale) << name;
  }
}
