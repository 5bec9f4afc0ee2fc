// One block per row (x may alias out_f32: no __restrict__ there): the block sums squares (float32,
// warp shuffles then shared memory), then every thread scales its elements. The row is read twice;
// the second read hits L1/L2.
#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/rms_norm.h"

namespace moeserve::cuda {
namespace {

template <typename W>
__global__ void RmsNormKernel(const float* x, int64_t dim, const W* __restrict__ weight, float eps,
                              float* out_f32, __nv_bfloat16* __restrict__ out_bf16) {
  __shared__ float scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum_sq += xr[i] * xr[i];
  sum_sq = BlockSum(sum_sq, scratch);
  const float scale = 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float y = ToFloat(weight[i]) * (xr[i] * scale);
    if (out_f32 != nullptr) out_f32[row * dim + i] = y;
    if (out_bf16 != nullptr) out_bf16[row * dim + i] = __float2bfloat16_rn(y);
  }
}

}  // namespace

absl::Status RmsNorm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.num_rows < 0 || a.dim <= 0) {
    return absl::InvalidArgumentError("rms_norm: num_rows must be >= 0 and dim > 0");
  }
  if (a.out_f32 == nullptr && a.out_bf16 == nullptr) {
    return absl::InvalidArgumentError("rms_norm: neither out_f32 nor out_bf16 is set");
  }
  if (a.num_rows == 0) return absl::OkStatus();
  // A warp per 128 elements, at most 8 warps: 128 threads for a head, 256 for a hidden row.
  const int threads = static_cast<int>(std::clamp<int64_t>(CeilDiv(a.dim, 128) * 32, 32, 256));
  switch (a.weight_dtype) {
    case DType::kF32:
      RmsNormKernel<<<a.num_rows, threads, 0, stream>>>(
          a.x, a.dim, static_cast<const float*>(a.weight), a.eps, a.out_f32, a.out_bf16);
      break;
    case DType::kBF16:
      RmsNormKernel<<<a.num_rows, threads, 0, stream>>>(
          a.x, a.dim, static_cast<const __nv_bfloat16*>(a.weight), a.eps, a.out_f32, a.out_bf16);
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
