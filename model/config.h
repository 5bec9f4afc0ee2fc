// LLaDA2 model hyperparameters: what a checkpoint's config.json says about the network.
// Serving parameters (budgets, routing defaults, decoding) live elsewhere.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moeserve {

struct ModelConfig {
  std::string model_type = "llada2_moe";
  int64_t vocab_size = 0;               // rows of the embedding and lm_head
  int64_t hidden_size = 0;              // residual stream width
  int64_t num_hidden_layers = 0;        // decoder layers
  int64_t num_attention_heads = 0;      // query heads
  int64_t num_key_value_heads = 0;      // K/V heads (grouped-query attention)
  int64_t head_dim = 0;                 // per head; default hidden_size / num_attention_heads
  int64_t rotary_dim = 0;               // leading dims of a head that RoPE rotates (even)
  double rope_theta = 10000.0;          // RoPE base
  double rms_norm_eps = 1e-6;           // RMSNorm epsilon
  int64_t max_position_embeddings = 0;  // longest sequence the model was trained for (tokens)
  int64_t intermediate_size = 0;        // dense SwiGLU MLP width (layers < first_k_dense_replace)
  int64_t first_k_dense_replace = 0;    // layers [0, k) are dense, the rest MoE
  int64_t num_experts = 0;              // routed experts per MoE layer
  int64_t num_experts_per_tok = 0;      // top-k of token-choice routing
  int64_t moe_intermediate_size = 0;    // one routed expert's SwiGLU width
  int64_t num_shared_experts = 0;       // always-on experts, fused: width = this * moe_intermediate
  int64_t n_group = 1;                  // expert groups for group-limited routing
  int64_t topk_group = 1;               // groups kept per token
  double routed_scaling_factor = 1.0;   // multiplies routed expert weights
  bool norm_topk_prob = true;           // renormalize the top-k weights to sum 1
  bool moe_router_enable_expert_bias = true;  // checkpoint has mlp.gate.expert_bias
  bool tie_word_embeddings = false;           // lm_head shares the embedding matrix
  int64_t pad_token_id = -1;                  // informational; -1 when absent

  bool IsMoeLayer(int64_t layer) const { return layer >= first_k_dense_replace; }
  int64_t num_moe_layers() const { return num_hidden_layers - first_k_dense_replace; }
  int64_t shared_expert_width() const { return num_shared_experts * moe_intermediate_size; }
  int64_t q_size() const { return num_attention_heads * head_dim; }
  int64_t kv_size() const { return num_key_value_heads * head_dim; }
};

// Parses the text of a Hugging Face config.json of model_type llada2_moe. Keys the model does not
// use are ignored; every used key is type-checked and the result is validated. Errors name the key
// and the value.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text);
// Reads and parses `path` (a config.json file).
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);
// Checks the relations between fields (see the .cc for the list). ParseModelConfig calls it.
absl::Status ValidateModelConfig(const ModelConfig& config);
// The config as a Hugging Face config.json (the keys ParseModelConfig reads, plus model_type and
// architectures), so that written checkpoints load in other tools too.
std::string ModelConfigToJson(const ModelConfig& config);

// A small LLaDA2-architecture config for the built-in random-weight demo model.
ModelConfig DemoModelConfig();

}  // namespace moeserve
