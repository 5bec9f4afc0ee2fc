// Token-choice routing as LLaDA2 was trained (the upstream modeling code's MoE gate), on the CPU.
//
// Per token, from fp32 router logits [num_experts]:
//   s = sigmoid(logits); c = s + expert_bias (bias steers selection only)
//   groups: num_experts / n_group consecutive experts each; group score = sum of its top-2 c
//   keep the topk_group best groups; experts of other groups get choice score 0.0 (exactly the
//   reference's masked_fill(..., 0.0), not -inf: with negative biases a masked expert can win,
//   as it does upstream)
//   take the topk experts by c; weight = s of each, divided by (sum + 1e-20) when norm_topk_prob,
//   times routed_scaling_factor.
// Ties go to the lower expert (and group) index. Output order: descending choice score.
#pragma once

#include <cstdint>

namespace moeserve::cpu {

struct TokenChoiceParams {
  int64_t num_experts = 0;
  int64_t topk = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};

struct TokenChoiceArgs {
  const float* logits = nullptr;       // [num_tokens, num_experts]
  const float* expert_bias = nullptr;  // [num_experts], or null for no bias
  int64_t num_tokens = 0;
  int32_t* topk_idx = nullptr;   // [num_tokens, topk]
  float* topk_weight = nullptr;  // [num_tokens, topk]
};
void TokenChoiceRoute(const TokenChoiceParams& params, const TokenChoiceArgs& args);

}  // namespace moeserve::cpu
