// Moving tokens to and from expert order on the GPU: the gather that builds the permuted
// activations of a routing plan (also the gather of lm_head rows), and the combine that adds the
// weighted expert outputs back, as kernels/cpu/moe.h and model/model.cc do on the CPU.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/routing_plan.h"
#include "kernels/tensor.h"

namespace moeserve::cuda {

// out[i] = x[rows[i]] for i < num_rows; rows of row_size elements of dtype.
struct GatherRowsArgs {
  DType dtype = DType::kF32;
  const void* x = nullptr;  // [*, row_size]
  int64_t row_size = 0;
  const int32_t* rows = nullptr;  // [num_rows], e.g. a plan's token_idx
  int64_t num_rows = 0;
  void* out = nullptr;  // [num_rows, row_size]
};
absl::Status GatherRows(const GatherRowsArgs& args, cudaStream_t stream);

// For every token t of the plan:
//   out[t] = residual[t] + (shared[t] + sum over t's assignments a, ascending expert, of
//            weight[a] * expert_out[a])
// with the CPU's operation order (the mixture starts at 0 + shared, adds w * y one expert at a
// time, then is added to the residual; products and sums rounded separately, never fused), so
// given the same expert outputs the result is bit-identical to the CPU's. residual and shared may
// be null (treated as absent); out may alias residual.
struct CombineArgs {
  DeviceRoutingPlan plan;
  DType expert_out_dtype = DType::kF32;
  const void* expert_out = nullptr;   // [plan.num_assignments, hidden_size]
  const float* shared_out = nullptr;  // [plan.num_tokens, hidden_size], or null
  const float* residual = nullptr;    // [plan.num_tokens, hidden_size], or null
  float* out = nullptr;               // [plan.num_tokens, hidden_size]
  int64_t hidden_size = 0;
};
absl::Status Combine(const CombineArgs& args, cudaStream_t stream);

}  // namespace moeserve::cuda
