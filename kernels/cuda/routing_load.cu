// One block per expert counts its assignments by the mode of their rows (a block-wide sum of
// per-thread counts, no atomics on global memory: deterministic); a grid-stride loop turns the
// token-major CSR index into per-row expert counts.
#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/routing_load.h"

namespace moeserve::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void ExpertLoadKernel(const int32_t* __restrict__ expert_offsets,
                                 const int32_t* __restrict__ token_idx,
                                 const int8_t* __restrict__ row_mode, int64_t num_experts,
                                 int32_t* __restrict__ by_mode) {
  const int64_t e = blockIdx.x;
  int32_t count[kMaxLoadModes] = {0, 0};
  for (int32_t a = expert_offsets[e] + threadIdx.x; a < expert_offsets[e + 1]; a += kThreads) {
    const int8_t m = row_mode[token_idx[a]];
    count[0] += m == 0;
    count[1] += m == 1;
  }
  __shared__ int32_t warp_sums[kMaxLoadModes][kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int m = 0; m < kMaxLoadModes; ++m) {
    const int32_t s = __reduce_add_sync(kFullMask, count[m]);
    if (lane == 0) warp_sums[m][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x < kMaxLoadModes) {
    int32_t total = 0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) total += warp_sums[threadIdx.x][w];
    by_mode[threadIdx.x * num_experts + e] = total;
  }
}

__global__ void RowExpertsKernel(const int32_t* __restrict__ token_offsets, int64_t num_tokens,
                                 int32_t* __restrict__ row_experts) {
  for (int64_t t = blockIdx.x * int64_t{kThreads} + threadIdx.x; t < num_tokens;
       t += int64_t{gridDim.x} * kThreads) {
    row_experts[t] = token_offsets[t + 1] - token_offsets[t];
  }
}

}  // namespace

absl::Status RoutingLoadCounts(const RoutingLoadArgs& a, cudaStream_t stream) {
  if (a.plan.num_tokens < 0 || a.plan.num_experts <= 0 || a.plan.num_experts > INT32_MAX) {
    return absl::InvalidArgumentError("routing_load: need num_tokens >= 0 and num_experts >= 1");
  }
  ExpertLoadKernel<<<a.plan.num_experts, kThreads, 0, stream>>>(
      a.plan.expert_offsets, a.plan.token_idx, a.row_mode, a.plan.num_experts,
      a.tokens_per_expert_by_mode);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (a.plan.num_tokens > 0) {
    const int64_t blocks = std::min<int64_t>(CeilDiv(a.plan.num_tokens, kThreads), 1024);
    RowExpertsKernel<<<blocks, kThreads, 0, stream>>>(a.plan.token_offsets, a.plan.num_tokens,
                                                      a.row_experts);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
