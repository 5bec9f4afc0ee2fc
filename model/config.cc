#include "model/config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace moeserve {
namespace {

using Json = nlohmann::json;

absl::Status KeyError(absl::string_view key, const Json& value, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("config.json: key \"", key, "\" = ", value.dump(), ": ", why));
}

// Reads an integer key into *out. Absent (or null) keeps the default unless `required`.
absl::Status ReadInt(const Json& j, absl::string_view key, bool required, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required)
      return absl::InvalidArgumentError(absl::StrCat("config.json: missing key \"", key, "\""));
    return absl::OkStatus();
  }
  if (it->is_number_integer() || it->is_number_unsigned()) {
    *out = it->get<int64_t>();
    return absl::OkStatus();
  }
  // Some writers emit whole numbers as floats (2048.0); accept those, nothing fractional.
  if (it->is_number_float()) {
    const double v = it->get<double>();
    if (std::isfinite(v) && v == std::floor(v) && std::abs(v) < 9e15) {
      *out = static_cast<int64_t>(v);
      return absl::OkStatus();
    }
  }
  return KeyError(key, *it, "expected an integer");
}

absl::Status ReadDouble(const Json& j, absl::string_view key, bool required, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required)
      return absl::InvalidArgumentError(absl::StrCat("config.json: missing key \"", key, "\""));
    return absl::OkStatus();
  }
  if (!it->is_number()) return KeyError(key, *it, "expected a number");
  *out = it->get<double>();
  if (!std::isfinite(*out)) return KeyError(key, *it, "must be finite");
  return absl::OkStatus();
}

absl::Status ReadBool(const Json& j, absl::string_view key, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return KeyError(key, *it, "expected true or false");
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status RequirePositive(absl::string_view key, int64_t value) {
  if (value <= 0) return KeyError(key, Json(value), "must be positive");
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateModelConfig(const ModelConfig& c) {
  if (c.model_type != "llada2_moe") {
    return KeyError("model_type", Json(c.model_type), "only \"llada2_moe\" is supported");
  }
  RETURN_IF_ERROR(RequirePositive("vocab_size", c.vocab_size));
  RETURN_IF_ERROR(RequirePositive("hidden_size", c.hidden_size));
  RETURN_IF_ERROR(RequirePositive("num_hidden_layers", c.num_hidden_layers));
  RETURN_IF_ERROR(RequirePositive("num_attention_heads", c.num_attention_heads));
  RETURN_IF_ERROR(RequirePositive("num_key_value_heads", c.num_key_value_heads));
  RETURN_IF_ERROR(RequirePositive("head_dim", c.head_dim));
  RETURN_IF_ERROR(RequirePositive("max_position_embeddings", c.max_position_embeddings));
  if (c.vocab_size > (int64_t{1} << 31) - 1) {
    return KeyError("vocab_size", Json(c.vocab_size), "must fit in int32 token ids");
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return KeyError("num_key_value_heads", Json(c.num_key_value_heads),
                    absl::StrCat("must divide num_attention_heads (", c.num_attention_heads, ")"));
  }
  if (c.rotary_dim < 0 || c.rotary_dim > c.head_dim || c.rotary_dim % 2 != 0) {
    return KeyError("rotary_dim", Json(c.rotary_dim),
                    absl::StrCat("must be even and within [0, head_dim = ", c.head_dim, "]"));
  }
  if (!(c.rope_theta > 0)) return KeyError("rope_theta", Json(c.rope_theta), "must be positive");
  if (!(c.rms_norm_eps > 0) || c.rms_norm_eps >= 1) {
    return KeyError("rms_norm_eps", Json(c.rms_norm_eps), "must be in (0, 1)");
  }
  if (c.first_k_dense_replace < 0 || c.first_k_dense_replace > c.num_hidden_layers) {
    return KeyError(
        "first_k_dense_replace", Json(c.first_k_dense_replace),
        absl::StrCat("must be within [0, num_hidden_layers = ", c.num_hidden_layers, "]"));
  }
  if (c.first_k_dense_replace > 0)
    RETURN_IF_ERROR(RequirePositive("intermediate_size", c.intermediate_size));
  if (c.num_moe_layers() == 0) return absl::OkStatus();

  RETURN_IF_ERROR(RequirePositive("num_experts", c.num_experts));
  RETURN_IF_ERROR(RequirePositive("num_experts_per_tok", c.num_experts_per_tok));
  RETURN_IF_ERROR(RequirePositive("moe_intermediate_size", c.moe_intermediate_size));
  RETURN_IF_ERROR(RequirePositive("n_group", c.n_group));
  RETURN_IF_ERROR(RequirePositive("topk_group", c.topk_group));
  if (c.num_shared_experts < 0) {
    return KeyError("num_shared_experts", Json(c.num_shared_experts), "must not be negative");
  }
  if (c.num_experts % c.n_group != 0) {
    return KeyError("n_group", Json(c.n_group),
                    absl::StrCat("must divide num_experts (", c.num_experts, ")"));
  }
  if (c.topk_group > c.n_group) {
    return KeyError("topk_group", Json(c.topk_group),
                    absl::StrCat("must be <= n_group (", c.n_group, ")"));
  }
  const int64_t kept_experts = c.topk_group * (c.num_experts / c.n_group);
  if (c.num_experts_per_tok > kept_experts) {
    return KeyError("num_experts_per_tok", Json(c.num_experts_per_tok),
                    absl::StrCat("must be <= the experts in the kept groups (topk_group * "
                                 "num_experts / n_group = ",
                                 kept_experts, ")"));
  }
  if (!(c.routed_scaling_factor > 0)) {
    return KeyError("routed_scaling_factor", Json(c.routed_scaling_factor), "must be positive");
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text) {
  Json j;
  try {
    j = Json::parse(json_text);
  } catch (const Json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("config.json is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return absl::InvalidArgumentError("config.json: expected a JSON object");

  ModelConfig c;
  auto type = j.find("model_type");
  if (type == j.end() || !type->is_string()) {
    return absl::InvalidArgumentError("config.json: missing string key \"model_type\"");
  }
  c.model_type = type->get<std::string>();
  if (c.model_type != "llada2_moe") {
    return KeyError("model_type", *type, "only \"llada2_moe\" is supported");
  }
  RETURN_IF_ERROR(ReadInt(j, "vocab_size", true, &c.vocab_size));
  RETURN_IF_ERROR(ReadInt(j, "hidden_size", true, &c.hidden_size));
  RETURN_IF_ERROR(ReadInt(j, "num_hidden_layers", true, &c.num_hidden_layers));
  RETURN_IF_ERROR(ReadInt(j, "num_attention_heads", true, &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(ReadInt(j, "num_key_value_heads", false, &c.num_key_value_heads));
  if (c.num_attention_heads > 0) c.head_dim = c.hidden_size / c.num_attention_heads;
  RETURN_IF_ERROR(ReadInt(j, "head_dim", false, &c.head_dim));
  RETURN_IF_ERROR(ReadInt(j, "max_position_embeddings", true, &c.max_position_embeddings));
  RETURN_IF_ERROR(ReadInt(j, "intermediate_size", false, &c.intermediate_size));
  RETURN_IF_ERROR(ReadInt(j, "first_k_dense_replace", false, &c.first_k_dense_replace));
  RETURN_IF_ERROR(ReadInt(j, "num_experts", true, &c.num_experts));
  RETURN_IF_ERROR(ReadInt(j, "num_experts_per_tok", true, &c.num_experts_per_tok));
  RETURN_IF_ERROR(ReadInt(j, "moe_intermediate_size", true, &c.moe_intermediate_size));
  RETURN_IF_ERROR(ReadInt(j, "num_shared_experts", false, &c.num_shared_experts));
  RETURN_IF_ERROR(ReadInt(j, "n_group", false, &c.n_group));
  RETURN_IF_ERROR(ReadInt(j, "topk_group", false, &c.topk_group));
  RETURN_IF_ERROR(ReadInt(j, "pad_token_id", false, &c.pad_token_id));
  RETURN_IF_ERROR(ReadDouble(j, "rms_norm_eps", false, &c.rms_norm_eps));
  RETURN_IF_ERROR(ReadDouble(j, "routed_scaling_factor", false, &c.routed_scaling_factor));
  RETURN_IF_ERROR(ReadBool(j, "norm_topk_prob", &c.norm_topk_prob));
  RETURN_IF_ERROR(ReadBool(j, "moe_router_enable_expert_bias", &c.moe_router_enable_expert_bias));
  RETURN_IF_ERROR(ReadBool(j, "tie_word_embeddings", &c.tie_word_embeddings));

  // rope_theta: top level, or inside rope_parameters (newer transformers writes both).
  auto rope_params = j.find("rope_parameters");
  if (rope_params != j.end() && rope_params->is_object()) {
    RETURN_IF_ERROR(ReadDouble(*rope_params, "rope_theta", false, &c.rope_theta));
    auto rope_type = rope_params->find("rope_type");
    if (rope_type != rope_params->end() && *rope_type != "default") {
      return KeyError("rope_parameters.rope_type", *rope_type,
                      "only \"default\" RoPE is supported");
    }
  }
  RETURN_IF_ERROR(ReadDouble(j, "rope_theta", false, &c.rope_theta));
  auto rope_scaling = j.find("rope_scaling");
  if (rope_scaling != j.end() && !rope_scaling->is_null()) {
    return KeyError("rope_scaling", *rope_scaling, "RoPE scaling is not supported");
  }

  // Rotary dims: rotary_dim if given, else partial_rotary_factor * head_dim, else all of head_dim.
  c.rotary_dim = c.head_dim;
  double partial = 1.0;
  RETURN_IF_ERROR(ReadDouble(j, "partial_rotary_factor", false, &partial));
  if (!(partial > 0 && partial <= 1)) {
    return KeyError("partial_rotary_factor", Json(partial), "must be in (0, 1]");
  }
  c.rotary_dim = static_cast<int64_t>(std::llround(partial * static_cast<double>(c.head_dim)));
  RETURN_IF_ERROR(ReadInt(j, "rotary_dim", false, &c.rotary_dim));

  // Features of the Ling family that LLaDA2 does not use: refuse rather than compute wrongly.
  for (const char* key : {"use_qkv_bias", "use_bias"}) {
    bool value = false;
    RETURN_IF_ERROR(ReadBool(j, key, &value));
    if (value) return KeyError(key, Json(true), "biases are not supported (LLaDA2 has none)");
  }
  auto score = j.find("score_function");
  if (score != j.end() && !score->is_null() && *score != "sigmoid") {
    return KeyError("score_function", *score, "only \"sigmoid\" routing scores are supported");
  }
  auto act = j.find("hidden_act");
  if (act != j.end() && !act->is_null() && *act != "silu") {
    return KeyError("hidden_act", *act, "only \"silu\" is supported");
  }
  RETURN_IF_ERROR(ValidateModelConfig(c));
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  auto config = ParseModelConfig(text.str());
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  Json j = {
      {"architectures", {"LLaDA2MoeModelLM"}},
      {"model_type", c.model_type},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"rotary_dim", c.rotary_dim},
      {"partial_rotary_factor",
       static_cast<double>(c.rotary_dim) / static_cast<double>(c.head_dim)},
      {"rope_theta", c.rope_theta},
      {"rms_norm_eps", c.rms_norm_eps},
      {"max_position_embeddings", c.max_position_embeddings},
      {"intermediate_size", c.intermediate_size},
      {"first_k_dense_replace", c.first_k_dense_replace},
      {"num_experts", c.num_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"num_shared_experts", c.num_shared_experts},
      {"n_group", c.n_group},
      {"topk_group", c.topk_group},
      {"routed_scaling_factor", c.routed_scaling_factor},
      {"norm_topk_prob", c.norm_topk_prob},
      {"moe_router_enable_expert_bias", c.moe_router_enable_expert_bias},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"score_function", "sigmoid"},
      {"hidden_act", "silu"},
      {"router_dtype", "fp32"},
      {"use_bias", false},
      {"use_qkv_bias", false},
      {"torch_dtype", "bfloat16"},
  };
  if (c.pad_token_id >= 0) j["pad_token_id"] = c.pad_token_id;
  return j.dump(2);
}

ModelConfig DemoModelConfig() {
  ModelConfig c;
  c.vocab_size = 320;  // 256 bytes + special tokens (the demo tokenizer's), padded
  c.hidden_size = 128;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 32;
  c.rotary_dim = 16;
  c.rope_theta = 600000.0;
  c.rms_norm_eps = 1e-6;
  c.max_position_embeddings = 4096;
  c.intermediate_size = 256;
  c.first_k_dense_replace = 1;
  c.num_experts = 32;
  c.num_experts_per_tok = 4;
  c.moe_intermediate_size = 64;
  c.num_shared_experts = 1;
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 2.5;
  return c;
}

}  // namespace moeserve
