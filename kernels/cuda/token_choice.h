// Token-choice routing on the GPU: the LLaDA2 gate of kernels/cpu/token_choice.h, for up to 1024
// experts, by one of two kernels with the same results:
// - warp per token (any shape): lane l holds experts [8 l, 8 l + 8) of 256; every selection step
//   is a warp-wide maximum.
// - group per lane (num_experts = 8 x 16 or 8 x 32, 8 groups or none, topk <= 8; LLaDA2): four
//   tokens a warp, eight lanes a token, each lane one group; group scores and local top-k lists
//   are lane-local, only the merge crosses lanes. About twice the tokens per second at 16K
//   tokens, but a quarter of the warps, so it is chosen from kGroupPerLaneMinRows rows on.
//
// Per token: s = sigmoid(logits) (RouterSigmoid in device_util.cuh, the CPU's float formula),
// c = s + expert_bias; group score = sum of the group's top-2 c; the topk_group best groups are
// kept and every expert of the other groups gets c = 0.0 (the reference's masked_fill, so a
// masked expert can still win against negative scores); the topk experts by c, ties to the lower
// expert (and group) index, in descending c; weights = their s, divided by (sum + 1e-20) when
// norm_topk_prob and topk > 1, times routed_scaling_factor, with the CPU's operation order.
// Decisions therefore equal the CPU's on the same logits (see RouterSigmoid for the one caveat).
//
// Limits: num_experts <= 1024, n_group <= 32 and divides num_experts, topk <= 32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cpu/token_choice.h"

namespace moeserve::cuda {

struct TokenChoiceArgs {
  const float* logits = nullptr;       // [num_logit_rows, num_experts]
  const float* expert_bias = nullptr;  // [num_experts], or null for no bias
  // [num_rows]: the logit rows to route (a batch's token-choice rows), or null: rows
  // [0, num_rows).
  const int32_t* rows = nullptr;
  int64_t num_rows = 0;
  int32_t* topk_idx = nullptr;   // [num_rows, topk], entry i for rows[i]
  float* topk_weight = nullptr;  // [num_rows, topk]
};
enum class TokenChoiceKernel { kAuto, kWarpPerToken, kGroupPerLane };
inline constexpr int64_t kGroupPerLaneMinRows = 4096;

// Whether the group-per-lane kernel handles these parameters and pointers.
bool GroupPerLaneFits(const cpu::TokenChoiceParams& params, const TokenChoiceArgs& args);
absl::Status TokenChoiceRoute(const cpu::TokenChoiceParams& params, const TokenChoiceArgs& args,
                              cudaStream_t stream);
// With the kernel named (tests); kGroupPerLane where it does not fit is INVALID_ARGUMENT.
absl::Status TokenChoiceRoute(const cpu::TokenChoiceParams& params, const TokenChoiceArgs& args,
                              TokenChoiceKernel kernel, cudaStream_t stream);

}  // namespace moeserve::cuda
