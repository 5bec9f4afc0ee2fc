// The routed experts of one MoE layer over a routing plan, on the CPU:
//   out[t] += sum over the plan's (t, e, w) of w * W2_e · swiglu(W13_e · x[t])
// Experts run in parallel (one thread per expert at a time, dynamic schedule); each expert gathers
// its tokens, runs its two GEMMs and SwiGLU; the combine then adds each token's expert outputs in
// ascending expert order, so a token's result is bit-identical whatever else is in the batch.
#pragma once

#include <cstdint>

#include "kernels/routing_plan.h"
#include "kernels/tensor.h"

namespace moeserve::cpu {

struct MoeExpertsArgs {
  const float* x = nullptr;  // [num_tokens, hidden_size]
  const RoutingPlan* plan = nullptr;
  const HostTensor* w13 = nullptr;  // [num_experts, 2 * expert_width, hidden_size] (gate; up)
  const HostTensor* w2 = nullptr;   // [num_experts, hidden_size, expert_width]
  float* out = nullptr;             // [num_tokens, hidden_size], accumulated into
};
void MoeExperts(const MoeExpertsArgs& args);

}  // namespace moeserve::cpu
