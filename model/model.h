// The LLaDA2 MoE model on the CPU: one forward over the packed tokens of many sequences.
//
// Per layer: RMSNorm -> Q/K/V projections -> per-head QK RMSNorm -> partial RoPE -> grouped-query
// attention over each sequence's cached K/V plus its chunk (block-causal) -> output projection ->
// residual; RMSNorm -> dense SwiGLU MLP (layers < first_k_dense_replace) or the MoE block (router,
// routing plan, routed experts, shared expert) -> residual. Final RMSNorm and lm_head only for the
// rows asked for. Float32 math over BF16/F32 weights.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/routing.h"
#include "model/weights.h"

namespace moeserve {

// One sequence's chunk of tokens in a forward.
struct SequenceInput {
  std::span<const int32_t> token_ids;  // [num_tokens]
  // The sequence's cache (required). The chunk sits at positions [cache->length(), +num_tokens)
  // and attends to the committed positions plus itself.
  KvCache* cache = nullptr;
  // Attention block size: a query sees keys of its own and earlier blocks (block-causal, blocks
  // aligned to absolute positions). 0: every key of the chunk and the cache (bidirectional).
  int64_t block_length = 0;
  // How many leading tokens of the chunk keep their K/V in the cache (advance cache->length()):
  // all of a prefill chunk, none of a denoising step, and a finished block's refresh folded into
  // the next block's first step (both in one chunk: block-causal attention makes that exact).
  int64_t commit_tokens = 0;
  // Rows of the chunk (indices into token_ids) whose logits are wanted.
  std::vector<int32_t> logit_rows;
  // How this sequence's tokens reach the experts.
  RoutingOptions routing;
};

// What routing did to one sequence in one forward, per MoE layer (indexed by layer; empty entries
// for dense layers).
struct SequenceRoutingStats {
  std::vector<int64_t> dropped_tokens;  // [num_layers]: tokens with no routed expert
  std::vector<std::vector<int64_t>> experts_per_token;  // [num_layers][num_experts + 1]: histogram
};

// What a forward computed inside, for checking against references. Token rows are in packed
// order (the batch's sequences one after another).
struct ForwardTrace {
  // [num_layers + 1] x [num_tokens, hidden_size]: the input of each layer, then the final norm's
  // output.
  std::vector<std::vector<float>> hidden_in;
  // Indexed by layer; empty for dense layers.
  std::vector<std::vector<float>> router_logits;  // [num_tokens, num_experts]
  std::vector<std::vector<int32_t>> topk_idx;     // [num_tokens, topk], token-choice selections
  std::vector<std::vector<float>> topk_weight;    // [num_tokens, topk]
  std::vector<RoutingPlan> plans;                 // the routing plan of each MoE layer
};

struct ForwardOutput {
  // [num_logit_rows, vocab_size]: the batch's logit rows, sequence by sequence, in the order asked.
  std::vector<float> logits;
  // [num_layers]: load of each MoE layer by routing mode (empty entries for dense layers).
  std::vector<LayerLoad> layer_load;
  // [batch size]: per-sequence routing statistics.
  std::vector<SequenceRoutingStats> sequences;
};

class Model {
 public:
  // Loads config.json and the safetensors weights of a Hugging Face checkpoint directory.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir);
  static std::unique_ptr<Model> FromWeights(ModelConfig config, ModelWeights weights);

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }

  // Runs the batch. Checks every input first (token ids in range, positions within
  // max_position_embeddings, logit rows in range, one chunk per cache) and fails before computing
  // anything. Thread-compatible: concurrent calls need distinct caches.
  absl::StatusOr<ForwardOutput> Forward(std::span<SequenceInput> batch,
                                        ForwardTrace* trace = nullptr) const;

 private:
  Model(ModelConfig config, ModelWeights weights);

  ModelConfig config_;
  ModelWeights weights_;
};

}  // namespace moeserve
