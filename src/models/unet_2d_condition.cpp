#include "sdtrain/models/unet_2d_condition.h"

#include <algorithm>

#include "config_reader.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/models/uninitialised.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"

namespace sdtrain::models {

namespace {

const std::vector<std::string> kDownBlocks = {"CrossAttnDownBlock2D", "DownBlock2D"};
const std::vector<std::string> kUpBlocks = {"CrossAttnUpBlock2D", "UpBlock2D"};

bool contains(const std::vector<std::string>& list, const std::string& value) {
  return std::find(list.begin(), list.end(), value) != list.end();
}

}  // namespace

namespace {

void read_block_types(detail::ConfigReader& r, const nlohmann::json& json,
                      UNet2DConditionConfig& c) {
  c.down_block_types = r.string_list("down_block_types", c.down_block_types);
  c.up_block_types = r.string_list("up_block_types", c.up_block_types);
  const std::size_t n = c.down_block_types.size();
  for (const auto& type : c.down_block_types) {
    if (!contains(kDownBlocks, type)) {
      r.fail("down_block_types", json.value("down_block_types", nlohmann::json(c.down_block_types)),
             type + " is not implemented (CrossAttnDownBlock2D, DownBlock2D are)");
    }
  }
  for (const auto& type : c.up_block_types) {
    if (!contains(kUpBlocks, type)) {
      r.fail("up_block_types", json.value("up_block_types", nlohmann::json(c.up_block_types)),
             type + " is not implemented (CrossAttnUpBlock2D, UpBlock2D are)");
    }
  }
  if (c.up_block_types.size() != n) {
    r.fail("up_block_types", json.value("up_block_types", nlohmann::json(c.up_block_types)),
           "needs as many entries as down_block_types");
  }
  if (const auto* v = r.find("mid_block_type")) {
    if (!v->is_string() || v->get<std::string>() != "UNetMidBlock2DCrossAttn") {
      r.fail("mid_block_type", *v, "supported: UNetMidBlock2DCrossAttn");
    }
  }
}

void read_block_sizes(detail::ConfigReader& r, const nlohmann::json& json,
                      UNet2DConditionConfig& c) {
  const std::size_t n = c.down_block_types.size();
  c.block_out_channels = r.int_list("block_out_channels", c.block_out_channels, 0);
  if (c.block_out_channels.size() != n) {
    r.fail("block_out_channels",
           json.value("block_out_channels", nlohmann::json(c.block_out_channels)),
           "needs one entry per down block");
  }
  c.layers_per_block = r.int_list("layers_per_block", {2}, n);
  c.downsample_padding = r.integer("downsample_padding", c.downsample_padding);
  c.mid_block_scale_factor = r.number("mid_block_scale_factor", c.mid_block_scale_factor);
  if (const auto* v = r.find("norm_num_groups"); v && !v->is_number_integer()) {
    r.fail("norm_num_groups", *v, "a UNet without conv_norm_out (null) is not implemented");
  }
  c.norm_num_groups = r.integer("norm_num_groups", c.norm_num_groups);
  c.norm_eps = r.number("norm_eps", c.norm_eps);
  c.cross_attention_dim = r.int_list("cross_attention_dim", {1280}, n);
  if (const auto* v = r.find("transformer_layers_per_block"); v && v->is_array()) {
    for (const auto& item : *v) {
      if (!item.is_number_integer())
        r.fail("transformer_layers_per_block", *v,
               "nested lists (asymmetric UNets) are not implemented");
    }
  }
  c.transformer_layers_per_block = r.int_list("transformer_layers_per_block", {1}, n);
  r.require_null("reverse_transformer_layers_per_block", "asymmetric UNets are not implemented");
  // The head-count quirk (diffusers #2011): heads come from attention_head_dim and
  // diffusers itself refuses num_attention_heads.
  r.require_null(
      "num_attention_heads",
      "diffusers reads the head count from attention_head_dim and rejects num_attention_heads");
  if (const auto* v = r.find("attention_head_dim"); v && v->is_null()) {
    r.fail("attention_head_dim", *v, "the number of heads is required");
  }
  c.num_attention_heads = r.int_list("attention_head_dim", {8}, n);
  c.use_linear_projection = r.boolean("use_linear_projection", c.use_linear_projection);
  // SD 1.5's re-saved config has "upcast_attention": null, which diffusers treats as false.
  c.upcast_attention = r.boolean("upcast_attention", c.upcast_attention, /*null_is_false=*/true);
  c.resnet_out_scale_factor = r.number("resnet_out_scale_factor", c.resnet_out_scale_factor);
  c.conv_in_kernel = r.integer("conv_in_kernel", c.conv_in_kernel);
  c.conv_out_kernel = r.integer("conv_out_kernel", c.conv_out_kernel);
}

// Features of other UNet2DConditionModel users (SDXL, Kandinsky, LCM, unCLIP, GLIGEN, ...).
void refuse_unimplemented_features(detail::ConfigReader& r) {
  r.require_value("act_fn", "silu", "only SiLU is implemented");
  r.require_value("dropout", 0.0, "dropout is not implemented (SD trains with 0)");
  if (const auto* v = r.find("only_cross_attention")) {
    bool any = v->is_boolean() ? v->get<bool>() : true;
    if (v->is_array()) {
      any = false;
      for (const auto& item : *v) any = any || !item.is_boolean() || item.get<bool>();
    }
    if (any) r.fail("only_cross_attention", *v, "only self+cross attention blocks are implemented");
  }
  r.require_value("mid_block_only_cross_attention", false,
                  "only self+cross attention blocks are implemented", true);
  r.require_value("dual_cross_attention", false, "dual cross attention is not implemented");
  r.require_null("class_embed_type", "class embeddings are not implemented");
  r.require_null("num_class_embeds", "class embeddings are not implemented");
  r.require_value("class_embeddings_concat", false, "class embeddings are not implemented");
  r.require_null("projection_class_embeddings_input_dim", "class embeddings are not implemented");
  r.require_null("addition_embed_type",
                 "addition embeddings (SDXL, Kandinsky) are not implemented");
  r.require_null("addition_time_embed_dim", "addition embeddings (SDXL) are not implemented");
  r.ignore("addition_embed_type_num_heads");  // only read with an addition embedding
  r.require_null("encoder_hid_dim", "encoder_hid_proj is not implemented");
  r.require_null("encoder_hid_dim_type", "encoder_hid_proj is not implemented");
  r.require_null("time_cond_proj_dim",
                 "timestep conditioning projections (LCM) are not implemented");
  r.require_value("time_embedding_type", "positional",
                  "only the sinusoidal (positional) timestep embedding is implemented");
  r.require_null(
      "time_embedding_dim",
      "only the default time embedding width (4 x block_out_channels[0]) is implemented");
  r.require_null("time_embedding_act_fn",
                 "an activation after the time embedding is not implemented");
  r.require_null("timestep_post_act",
                 "an activation inside the time embedding MLP is not implemented");
  r.require_value("resnet_time_scale_shift", "default",
                  "only the additive (\"default\") time embedding is implemented");
  r.require_value("resnet_skip_time_act", false,
                  "resnets always apply SiLU to the time embedding here");
  r.require_value("attention_type", "default", "gated (GLIGEN) attention is not implemented");
  r.require_null("cross_attention_norm", "cross-attention normalisation is not implemented");
}

// Shape consistency (what diffusers' _check_config and the block constructors assume).
void check_shapes(detail::ConfigReader& r, const nlohmann::json& json,
                  const UNet2DConditionConfig& c) {
  const std::size_t n = c.down_block_types.size();
  for (std::size_t i = 0; i < n; ++i) {
    const int64_t ch = c.block_out_channels[i];
    if (ch <= 0 || ch % c.norm_num_groups != 0) {
      r.fail("block_out_channels", json.value("block_out_channels", nlohmann::json()),
             "each entry must be a multiple of norm_num_groups");
    }
    if (c.num_attention_heads[i] <= 0 || ch % c.num_attention_heads[i] != 0) {
      r.fail("attention_head_dim", json.value("attention_head_dim", nlohmann::json()),
             "each block's channel count must be a multiple of its head count");
    }
    if (c.layers_per_block[i] <= 0 || c.transformer_layers_per_block[i] <= 0 ||
        c.cross_attention_dim[i] <= 0) {
      r.fail("layers_per_block", json.value("layers_per_block", nlohmann::json()),
             "counts and widths must be positive");
    }
  }
  if (c.conv_in_kernel % 2 == 0) r.fail("conv_in_kernel", c.conv_in_kernel, "must be odd");
  if (c.conv_out_kernel % 2 == 0) r.fail("conv_out_kernel", c.conv_out_kernel, "must be odd");
}

}  // namespace

UNet2DConditionConfig UNet2DConditionConfig::from_json(const nlohmann::json& json,
                                                       const std::string& source) {
  detail::ConfigReader r(json, source);
  UNet2DConditionConfig c;

  if (const auto* v = r.find("sample_size"); v && !v->is_null()) {
    if (!v->is_number_integer()) r.fail("sample_size", *v, "expected an integer");
    c.sample_size = v->get<int64_t>();
  }
  c.in_channels = r.integer("in_channels", c.in_channels);
  c.out_channels = r.integer("out_channels", c.out_channels);
  c.center_input_sample = r.boolean("center_input_sample", c.center_input_sample);
  c.flip_sin_to_cos = r.boolean("flip_sin_to_cos", c.flip_sin_to_cos);
  c.freq_shift = r.number("freq_shift", c.freq_shift);

  read_block_types(r, json, c);
  read_block_sizes(r, json, c);
  refuse_unimplemented_features(r);
  check_shapes(r, json, c);
  r.warn_unknown_keys();
  return c;
}

UNet2DConditionConfig UNet2DConditionConfig::from_file(const std::filesystem::path& path) {
  return from_json(read_json_file(path, ExitCode::model), path.string());
}

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNet2DConditionConfig& config)
    : config_(config) {
  const auto& c = config_;
  const auto n = c.block_out_channels.size();
  const int64_t temb = c.time_embed_dim();

  conv_in = register_module(
      "conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.in_channels, c.block_out_channels[0],
                                                            c.conv_in_kernel)
                                       .padding((c.conv_in_kernel - 1) / 2)));
  time_proj = register_module("time_proj", Timesteps(TimestepsOptions(c.block_out_channels[0])
                                                         .flip_sin_to_cos(c.flip_sin_to_cos)
                                                         .downscale_freq_shift(c.freq_shift)));
  time_embedding =
      register_module("time_embedding", TimestepEmbedding(c.block_out_channels[0], temb));

  auto block_options = [&](int64_t in, int64_t out, std::size_t i) {
    return UNetBlockOptions(in, out)
        .temb_channels(temb)
        .resnet_eps(c.norm_eps)
        .resnet_groups(c.norm_num_groups)
        .output_scale_factor(c.resnet_out_scale_factor)
        .downsample_padding(c.downsample_padding)
        .use_linear_projection(c.use_linear_projection)
        .upcast_attention(c.upcast_attention)
        .num_attention_heads(c.num_attention_heads[i])
        .cross_attention_dim(c.cross_attention_dim[i])
        .transformer_layers_per_block(c.transformer_layers_per_block[i]);
  };

  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t output_channel = c.block_out_channels[0];
  for (std::size_t i = 0; i < n; ++i) {
    const int64_t input_channel = output_channel;
    output_channel = c.block_out_channels[i];
    auto o = block_options(input_channel, output_channel, i)
                 .num_layers(c.layers_per_block[i])
                 .add_downsample(i + 1 != n);
    DownEntry entry;
    if (c.down_block_types[i] == "CrossAttnDownBlock2D") {
      entry.cross_attn = CrossAttnDownBlock2D(o);
      down_blocks->push_back(entry.cross_attn);
    } else {
      entry.plain = DownBlock2D(o);
      down_blocks->push_back(entry.plain);
    }
    down_list.push_back(entry);
  }

  mid_block = register_module(
      "mid_block", UNetMidBlock2DCrossAttn(block_options(c.block_out_channels.back(),
                                                         c.block_out_channels.back(), n - 1)
                                               .num_layers(1)
                                               .output_scale_factor(c.mid_block_scale_factor)));

  // Up path: per-block lists reversed; resnets per block = layers_per_block + 1 (one more than
  // down, for the downsampler's skip).
  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  output_channel = c.block_out_channels.back();
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t r = n - 1 - i;  // index into the (unreversed) per-block lists
    const int64_t prev_output_channel = output_channel;
    output_channel = c.block_out_channels[r];
    const int64_t input_channel = c.block_out_channels[r == 0 ? 0 : r - 1];
    auto o = block_options(input_channel, output_channel, r)
                 .prev_output_channel(prev_output_channel)
                 .num_layers(c.layers_per_block[r] + 1)
                 .add_upsample(i + 1 != n);
    UpEntry entry;
    if (c.up_block_types[i] == "CrossAttnUpBlock2D") {
      entry.cross_attn = CrossAttnUpBlock2D(o);
      up_blocks->push_back(entry.cross_attn);
    } else {
      entry.plain = UpBlock2D(o);
      up_blocks->push_back(entry.plain);
    }
    up_list.push_back(entry);
  }

  conv_norm_out = register_module(
      "conv_norm_out",
      GroupNormSiLU(
          torch::nn::GroupNormOptions(c.norm_num_groups, c.block_out_channels[0]).eps(c.norm_eps)));
  conv_out = register_module(
      "conv_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.block_out_channels[0],
                                                             c.out_channels, c.conv_out_kernel)
                                        .padding((c.conv_out_kernel - 1) / 2)));
}

void UNet2DConditionModelImpl::set_gradient_checkpointing(bool enabled) {
  gradient_checkpointing_ = enabled;
  for (auto& e : down_list) {
    if (e.cross_attn) e.cross_attn->set_gradient_checkpointing(enabled);
    if (e.plain) e.plain->set_gradient_checkpointing(enabled);
  }
  mid_block->set_gradient_checkpointing(enabled);
  for (auto& e : up_list) {
    if (e.cross_attn) e.cross_attn->set_gradient_checkpointing(enabled);
    if (e.plain) e.plain->set_gradient_checkpointing(enabled);
  }
}

torch::Tensor UNet2DConditionModelImpl::forward(const torch::Tensor& sample,
                                                const torch::Tensor& timestep,
                                                const torch::Tensor& encoder_hidden_states) {
  TORCH_CHECK(sample.dim() == 4, "UNet2DConditionModel: sample must be [B, C, H, W], got ",
              sample.sizes());
  TORCH_CHECK(timestep.dim() <= 1, "UNet2DConditionModel: timestep must be a scalar or [B], got ",
              timestep.sizes());
  const int64_t B = sample.size(0);

  // 1. Time: [B] (scalar broadcast) -> sinusoidal fp32 [B, C0] -> model dtype -> MLP [B, 4*C0].
  torch::Tensor timesteps = timestep.dim() == 0 ? timestep.reshape({1}) : timestep;
  timesteps = timesteps.to(sample.device()).expand({B});
  torch::Tensor emb = time_embedding(time_proj(timesteps).to(sample.scalar_type()));

  // 2. Down path, collecting the skips: conv_in's output, then each block's.
  torch::Tensor h = config_.center_input_sample ? sample * 2.0 - 1.0 : sample;
  h = conv_in(h);  // [B, C0, H, W]
  std::vector<torch::Tensor> skips{h};
  for (auto& entry : down_list) {
    DownBlockOutput out =
        entry.cross_attn ? entry.cross_attn(h, emb, encoder_hidden_states) : entry.plain(h, emb);
    h = out.hidden;
    skips.insert(skips.end(), out.res_samples.begin(), out.res_samples.end());
  }

  // 3. Mid.
  h = mid_block(h, emb, encoder_hidden_states);

  // 4. Up path. When H or W is not a multiple of 2^(number of upsamplers), nearest x2 would not
  // land on the skip's size, so each upsampler is given the size of the next skip (as diffusers).
  const int64_t up_factor = int64_t{1} << (up_list.size() - 1);
  const bool forward_upsample_size =
      sample.size(2) % up_factor != 0 || sample.size(3) % up_factor != 0;
  for (std::size_t i = 0; i < up_list.size(); ++i) {
    const bool is_final = i + 1 == up_list.size();
    const std::size_t consumed = (up_list[i].cross_attn ? up_list[i].cross_attn->resnet_list.size()
                                                        : up_list[i].plain->resnet_list.size());
    std::optional<std::vector<int64_t>> upsample_size;
    if (!is_final && forward_upsample_size) {
      TORCH_CHECK(skips.size() > consumed, "UNet2DConditionModel: skip connections exhausted");
      upsample_size = skips[skips.size() - consumed - 1].sizes().slice(2).vec();
    }
    h = up_list[i].cross_attn
            ? up_list[i].cross_attn(h, skips, emb, encoder_hidden_states, upsample_size)
            : up_list[i].plain(h, skips, emb, upsample_size);
  }

  // 5. Out.
  h = conv_norm_out(h);
  return conv_out(h);  // [B, out_channels, H, W]
}

UNet2DConditionModel load_unet(const std::filesystem::path& component_dir,
                               const LoadOptions& options, const std::string& variant) {
  const auto config = UNet2DConditionConfig::from_file(component_dir / "config.json");
  auto unet = build_uninitialised([&] { return UNet2DConditionModel(config); });
  load_state_dict(*unet, io::find_weight_files(component_dir, "diffusion_pytorch_model", variant),
                  options);
  return unet;
}

UNet2DConditionModel load_unet(const io::ModelFolder& folder, const LoadOptions& options,
                               const std::string& variant) {
  folder.require("unet");
  const auto config =
      UNet2DConditionConfig::from_json(folder.config("unet"), folder.config_path("unet").string());
  auto unet = build_uninitialised([&] { return UNet2DConditionModel(config); });
  load_component_weights(*unet, folder, "unet", options, variant);
  return unet;
}

}  // namespace sdtrain::models
