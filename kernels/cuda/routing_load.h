// Load statistics of a device routing plan, counted on the device so that a forward copies back
// a few counters per MoE layer instead of the plan: per routing mode the tokens each expert took,
// and per token how many experts it got (the experts-per-token histogram and the dropped tokens
// follow from that on the host, model/routing.h's FillRoutingStats).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/routing_plan.h"

namespace moeserve::cuda {

inline constexpr int kMaxLoadModes = 2;

struct RoutingLoadArgs {
  DeviceRoutingPlan plan;
  const int8_t* row_mode = nullptr;  // [plan.num_tokens]: mode of each row, in [0, kMaxLoadModes)
  // [kMaxLoadModes, plan.num_experts]: tokens expert e took from rows of mode m (overwritten).
  int32_t* tokens_per_expert_by_mode = nullptr;
  int32_t* row_experts = nullptr;  // [plan.num_tokens]: routed experts of each row
};
absl::Status RoutingLoadCounts(const RoutingLoadArgs& args, cudaStream_t stream);

}  // namespace moeserve::cuda
