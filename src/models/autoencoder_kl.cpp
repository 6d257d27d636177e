#include "sdtrain/models/autoencoder_kl.h"

#include "config_reader.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/models/uninitialised.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"

namespace sdtrain::models {

AutoencoderKLConfig AutoencoderKLConfig::from_json(const nlohmann::json& json, const std::string& source) {
  detail::ConfigReader r(json, source);
  AutoencoderKLConfig c;
  c.in_channels = r.integer("in_channels", c.in_channels);
  c.out_channels = r.integer("out_channels", c.out_channels);
  c.block_out_channels = r.int_list("block_out_channels", c.block_out_channels, 0);
  const std::size_t n = c.block_out_channels.size();
  const auto down = r.string_list("down_block_types", {"DownEncoderBlock2D"});
  const auto up = r.string_list("up_block_types", {"UpDecoderBlock2D"});
  for (const auto& type : down) {
    if (type != "DownEncoderBlock2D") r.fail("down_block_types", json.value("down_block_types", nlohmann::json(down)), type + " is not implemented (DownEncoderBlock2D is)");
  }
  for (const auto& type : up) {
    if (type != "UpDecoderBlock2D") r.fail("up_block_types", json.value("up_block_types", nlohmann::json(up)), type + " is not implemented (UpDecoderBlock2D is)");
  }
  if (down.size() != n) r.fail("down_block_types", json.value("down_block_types", nlohmann::json(down)), "needs one entry per block_out_channels entry");
  if (up.size() != n) r.fail("up_block_types", json.value("up_block_types", nlohmann::json(up)), "needs one entry per block_out_channels entry");
  c.layers_per_block = r.integer("layers_per_block", c.layers_per_block);
  c.latent_channels = r.integer("latent_channels", c.latent_channels);
  c.norm_num_groups = r.integer("norm_num_groups", c.norm_num_groups);
  if (const auto* v = r.find("sample_size")) {
    if (v->is_number_integer()) {
      c.sample_size = v->get<int64_t>();
    } else if (v->is_null() || v->is_array()) {
      c.sample_size.reset();  // only diffusers' tiling reads it
    } else {
      r.fail("sample_size", *v, "expected an integer");
    }
  }
  c.scaling_factor = r.number("scaling_factor", c.scaling_factor);
  if (const auto* v = r.find("shift_factor"); v && !v->is_null()) {
    if (!v->is_number()) r.fail("shift_factor", *v, "expected a number");
    c.shift_factor = v->get<double>();
  }
  c.force_upcast = r.boolean("force_upcast", c.force_upcast);
  c.use_quant_conv = r.boolean("use_quant_conv", c.use_quant_conv);
  c.use_post_quant_conv = r.boolean("use_post_quant_conv", c.use_post_quant_conv);
  c.mid_block_add_attention = r.boolean("mid_block_add_attention", c.mid_block_add_attention);
  r.require_value("act_fn", "silu", "only SiLU is implemented");
  r.require_null("latents_mean", "per-channel latent statistics are not implemented");
  r.require_null("latents_std", "per-channel latent statistics are not implemented");

  for (int64_t ch : c.block_out_channels) {
    if (ch <= 0 || ch % c.norm_num_groups != 0) {
      r.fail("block_out_channels", json.value("block_out_channels", nlohmann::json()), "each entry must be a multiple of norm_num_groups");
    }
  }
  if (c.layers_per_block <= 0 || c.latent_channels <= 0) {
    r.fail("layers_per_block", c.layers_per_block, "layers_per_block and latent_channels must be positive");
  }
  r.warn_unknown_keys();
  return c;
}

AutoencoderKLConfig AutoencoderKLConfig::from_file(const std::filesystem::path& path) {
  return from_json(read_json_file(path, ExitCode::model), path.string());
}

AutoencoderKLImpl::AutoencoderKLImpl(const AutoencoderKLConfig& config) : config_(config) {
  const auto& c = config_;
  encoder = register_module("encoder", Encoder(VAECoderOptions()
                                                   .in_channels(c.in_channels)
                                                   .out_channels(c.latent_channels)
                                                   .block_out_channels(c.block_out_channels)
                                                   .layers_per_block(c.layers_per_block)
                                                   .norm_num_groups(c.norm_num_groups)
                                                   .mid_block_add_attention(c.mid_block_add_attention)));
  decoder = register_module("decoder", Decoder(VAECoderOptions()
                                                   .in_channels(c.latent_channels)
                                                   .out_channels(c.out_channels)
                                                   .block_out_channels(c.block_out_channels)
                                                   .layers_per_block(c.layers_per_block)
                                                   .norm_num_groups(c.norm_num_groups)
                                                   .mid_block_add_attention(c.mid_block_add_attention)));
  if (c.use_quant_conv) {
    quant_conv = register_module("quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2 * c.latent_channels, 2 * c.latent_channels, 1)));
  }
  if (c.use_post_quant_conv) {
    post_quant_conv = register_module("post_quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.latent_channels, c.latent_channels, 1)));
  }
}

DiagonalGaussianDistribution AutoencoderKLImpl::encode(const torch::Tensor& x) {
  torch::Tensor moments = encoder(x);  // [B, 2*latent, h, w]
  if (quant_conv) moments = quant_conv(moments);
  return DiagonalGaussianDistribution(moments);
}

torch::Tensor AutoencoderKLImpl::decode(const torch::Tensor& z) {
  torch::Tensor h = post_quant_conv ? post_quant_conv(z) : z;
  return decoder(h);
}

torch::Tensor AutoencoderKLImpl::forward(const torch::Tensor& x, bool sample_posterior,
                                         std::optional<at::Generator> generator) {
  DiagonalGaussianDistribution posterior = encode(x);
  return decode(sample_posterior ? posterior.sample(generator) : posterior.mode());
}

std::optional<std::string> vae_key_mapper(const std::string& key) {
  // <prefix>.attentions.<i>.<old>.<weight|bias>  ->  <prefix>.attentions.<i>.<new>.<weight|bias>
  static const std::pair<const char*, const char*> kRenames[] = {
      {".query.", ".to_q."}, {".key.", ".to_k."}, {".value.", ".to_v."}, {".proj_attn.", ".to_out.0."}};
  if (key.find(".attentions.") == std::string::npos) return key;
  for (const auto& [from, to] : kRenames) {
    const auto pos = key.rfind(from);
    if (pos != std::string::npos) return key.substr(0, pos) + to + key.substr(pos + std::char_traits<char>::length(from));
  }
  return key;
}

AutoencoderKL load_vae(const std::filesystem::path& component_dir, const LoadOptions& options, const std::string& variant) {
  const auto config = AutoencoderKLConfig::from_file(component_dir / "config.json");
  auto vae = build_uninitialised([&] { return AutoencoderKL(config); });
  load_state_dict(*vae, io::find_weight_files(component_dir, "diffusion_pytorch_model", variant), options, vae_key_mapper);
  return vae;
}

AutoencoderKL load_vae(const io::ModelFolder& folder, const LoadOptions& options, const std::string& variant) {
  folder.require("vae");
  const auto config =
      AutoencoderKLConfig::from_json(folder.config("vae"), folder.config_path("vae").string());
  auto vae = build_uninitialised([&] { return AutoencoderKL(config); });
  load_component_weights(*vae, folder, "vae", options, variant, vae_key_mapper);
  return vae;
}

}  // namespace sdtrain::models
