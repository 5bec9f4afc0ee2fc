// Per-request routing: options, the routing of one MoE layer for a batch of sequences of mixed
// modes into one expert-centric plan, and the load statistics of that routing.
//
// Token-choice (the default, as the model was trained): each token takes its top-k experts
// (kernels/cpu/token_choice.h). Expert-choice: within a routing scope of T tokens, each expert
// takes its top-C tokens by sigmoid score, C = clamp(ceil(capacity_factor * T * topk /
// num_experts), 1, T); a token may get several experts or none (then only the shared expert and
// the residual carry it). Scopes: `request` (default): one block of one sequence (a denoising
// block, or each block of a prefill chunk), so a request's output depends neither on what else is
// batched nor on how the scheduler chunked it; `batch`: all batch-scope expert-choice tokens of
// the forward together (a load-balancing study mode). The expert kernels see only the resulting
// plan, never the mode.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/routing_plan.h"
#include "model/config.h"

namespace moeserve {

enum class RoutingMode { kTokenChoice, kExpertChoice };
enum class RoutingScope { kRequest, kBatch };
// How expert-choice weights a (token, expert) pair.
enum class ExpertChoiceWeighting {
  kRenormalized,  // s / (sum of s over the experts that took the token) * routed_scaling_factor
  kRaw,           // s * routed_scaling_factor
};
inline constexpr int kNumRoutingModes = 2;

struct RoutingOptions {
  RoutingMode mode = RoutingMode::kTokenChoice;
  double capacity_factor = 1.25;  // expert-choice only; finite, in (0, 64]
  RoutingScope scope = RoutingScope::kRequest;
  ExpertChoiceWeighting weighting = ExpertChoiceWeighting::kRenormalized;
};

inline constexpr double kMaxCapacityFactor = 64.0;

// Errors name the option ("capacity_factor = nan: must be finite and in (0, 64]").
absl::Status ValidateRoutingOptions(const RoutingOptions& options);
absl::StatusOr<RoutingMode> ParseRoutingMode(
    absl::string_view text);  // token_choice | expert_choice
absl::StatusOr<RoutingScope> ParseRoutingScope(absl::string_view text);  // request | batch
absl::StatusOr<ExpertChoiceWeighting> ParseExpertChoiceWeighting(
    absl::string_view text);  // renormalized | raw
const char* RoutingModeName(RoutingMode mode);
const char* RoutingScopeName(RoutingScope scope);
const char* ExpertChoiceWeightingName(ExpertChoiceWeighting weighting);

// Expert-choice capacity of a scope of `num_tokens` tokens (0 for an empty scope).
int64_t ExpertChoiceCapacity(double capacity_factor, int64_t num_tokens, int64_t topk,
                             int64_t num_experts);

// Load of one MoE layer for the tokens of one routing mode: counts only, cheap to accumulate.
struct RoutingLoad {
  int64_t num_tokens = 0;                  // tokens routed in this mode
  int64_t num_assignments = 0;             // (token, expert) pairs
  int64_t dropped_tokens = 0;              // tokens that got no routed expert
  std::vector<int64_t> tokens_per_expert;  // [num_experts]
  std::vector<int64_t> experts_per_token;  // [num_experts + 1]: tokens with j routed experts
  int64_t topk = 0;                        // the model's top-k, for the effective capacity factor

  void Resize(int64_t num_experts, int64_t model_topk);
  void Add(const RoutingLoad& other);
  // max / mean of tokens_per_expert (0 when no tokens).
  double MaxOverMean() const;
  // Coefficient of variation (population std / mean) of tokens_per_expert.
  double CoefficientOfVariation() const;
  // Assignments per token over the model's top-k: 1.0 when every token gets topk experts on
  // average (token-choice always; expert-choice at capacity factor 1 without clamping).
  double EffectiveCapacityFactor() const;
};

// One MoE layer's load, per routing mode (indexed by RoutingMode).
struct LayerLoad {
  RoutingLoad by_mode[kNumRoutingModes];
};

// A sequence's rows in the packed batch and its routing options.
struct SequenceRouting {
  int64_t first_row = 0;
  int64_t num_tokens = 0;
  RoutingOptions options;
  // Request scopes are the sequence's blocks: its rows split where the absolute position (start_pos
  // + i) is a multiple of scope_block, so that routing does not depend on how a scheduler cut the
  // sequence into chunks. 0: the sequence's rows in this forward are one scope.
  int64_t start_pos = 0;
  int64_t scope_block = 0;
};

// The routing of one MoE layer for one forward.
struct LayerRouting {
  RoutingPlan plan;
  LayerLoad load;
  // Per sequence (same order as the input): dropped tokens and experts-per-token histogram.
  std::vector<int64_t> sequence_dropped;                         // [num_sequences]
  std::vector<std::vector<int64_t>> sequence_experts_per_token;  // [num_sequences][num_experts + 1]
  // Token-choice selections (trace only), [num_tokens, topk]; rows of expert-choice tokens are -1 /
  // 0.
  std::vector<int32_t> topk_idx;
  std::vector<float> topk_weight;
};

// The routing scopes of one forward, the same for every MoE layer of it: the rows token-choice
// routes, and every expert-choice scope (request scope: one block of one sequence; batch scope:
// all batch-scope sequences of one (capacity factor, weighting)) with its rows, ascending.
struct ExpertChoiceScope {
  ExpertChoiceWeighting weighting = ExpertChoiceWeighting::kRenormalized;
  int64_t capacity = 0;       // ExpertChoiceCapacity of the scope's rows
  std::vector<int32_t> rows;  // ascending
};
struct ForwardScopes {
  std::vector<int32_t> token_choice_rows;        // ascending
  std::vector<ExpertChoiceScope> expert_choice;  // scopes with at least one row
  std::vector<int8_t> row_mode;                  // [num_tokens]: RoutingMode of each row
};
ForwardScopes FormRoutingScopes(const ModelConfig& config, int64_t num_tokens,
                                std::span<const SequenceRouting> sequences);

// Fills out->load and the per-sequence statistics from what a router produced:
// tokens_per_expert_by_mode [kNumRoutingModes][num_experts] and row_experts [num_tokens] (routed
// experts of each row). Shared by the CPU and GPU paths so that both count alike.
void FillRoutingStats(const ModelConfig& config, std::span<const SequenceRouting> sequences,
                      std::span<const int8_t> row_mode,
                      std::span<const int32_t> tokens_per_expert_by_mode,
                      std::span<const int32_t> row_experts, LayerRouting* out);

// Routes one MoE layer. `logits`: [num_tokens, num_experts] fp32 router logits of every packed
// row; `expert_bias`: [num_experts]. Options must have been validated.
LayerRouting RouteMoeLayer(const ModelConfig& config, const float* logits, const float* expert_bias,
                           int64_t num_tokens, std::span<const SequenceRouting> sequences);

}  // namespace moeserve
