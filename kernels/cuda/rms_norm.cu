// One block per row (x may alias out_f32: no __restrict__ there): the block sums squares (float32,
// warp shuffles then shared memory), then every thread scales its elements. Rows of up to 4096
// elements in 16-byte pieces (the model's hidden and head rows) stay in registers between the two
// steps, at most 4 pieces a thread, all loads issued at once; other rows are read twice (the
// second read hits L1/L2).
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

constexpr int kMaxPieces = 4;  // float4 pieces of a row per thread in RmsNormVec4Kernel
constexpr int kMaxThreads = 256;

__device__ __forceinline__ float4 Weight4(const float* w, int64_t i) {
  return *reinterpret_cast<const float4*>(w + i);
}
__device__ __forceinline__ float4 Weight4(const __nv_bfloat16* w, int64_t i) {
  const uint2 raw = *reinterpret_cast<const uint2*>(w + i);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

template <typename W>
__global__ void RmsNormVec4Kernel(const float* x, int64_t dim, const W* __restrict__ weight,
                                  float eps, float* out_f32, __nv_bfloat16* __restrict__ out_bf16) {
  __shared__ float scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const int pieces = static_cast<int>(dim / 4);
  const float4* xr = reinterpret_cast<const float4*>(x + row * dim);
  float4 v[kMaxPieces];
  float sum_sq = 0.0f;
#pragma unroll
  for (int p = 0; p < kMaxPieces; ++p) {
    const int i = threadIdx.x + p * blockDim.x;
    v[p] = i < pieces ? xr[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
#pragma unroll
  for (int p = 0; p < kMaxPieces; ++p)
    sum_sq += v[p].x * v[p].x + v[p].y * v[p].y + v[p].z * v[p].z + v[p].w * v[p].w;
  sum_sq = BlockSum(sum_sq, scratch);
  const float scale = 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
#pragma unroll
  for (int p = 0; p < kMaxPieces; ++p) {
    const int i = threadIdx.x + p * blockDim.x;
    if (i >= pieces) break;
    const float4 w = Weight4(weight, 4 * int64_t{i});
    const float4 y = make_float4(w.x * (v[p].x * scale), w.y * (v[p].y * scale),
                                 w.z * (v[p].z * scale), w.w * (v[p].w * scale));
    if (out_f32 != nullptr) reinterpret_cast<float4*>(out_f32 + row * dim)[i] = y;
    if (out_bf16 != nullptr) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(y.x, y.y),
                           hi = __floats2bfloat162_rn(y.z, y.w);
      uint2 packed;
      packed.x = *reinterpret_cast<const uint32_t*>(&lo);
      packed.y = *reinterpret_cast<const uint32_t*>(&hi);
      reinterpret_cast<uint2*>(out_bf16 + row * dim)[i] = packed;
    }
  }
}

template <typename W>
void LaunchRows(const RmsNormArgs& a, const W* weight, bool vec4, cudaStream_t stream) {
  if (vec4) {
    // Two pieces a thread where the row allows (a warp per 256 elements, at most 8 warps).
    const int threads = static_cast<int>(
        std::clamp<int64_t>(CeilDiv(a.dim / 4, 2 * kWarpSize) * kWarpSize, kWarpSize, kMaxThreads));
    RmsNormVec4Kernel<<<a.num_rows, threads, 0, stream>>>(a.x, a.dim, weight, a.eps, a.out_f32,
                                                          a.out_bf16);
  } else {
    // A warp per 128 elements, at most 8 warps: 128 threads for a head, 256 for a hidden row.
    const int threads = static_cast<int>(std::clamp<int64_t>(CeilDiv(a.dim, 128) * 32, 32, 256));
    RmsNormKernel<<<a.num_rows, threads, 0, stream>>>(a.x, a.dim, weight, a.eps, a.out_f32,
                                                      a.out_bf16);
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
  const bool vec4 = a.dim % 4 == 0 && a.dim <= 4 * kMaxPieces * kMaxThreads && IsAligned(a.x, 16) &&
                    IsAligned(a.weight, a.weight_dtype == DType::kF32 ? 16 : 8) &&
                    IsAligned(a.out_f32, 16) && IsAligned(a.out_bf16, 8);
  switch (a.weight_dtype) {
    case DType::kF32:
      LaunchRows(a, static_cast<const float*>(a.weight), vec4, stream);
      break;
    case DType::kBF16:
      LaunchRows(a, static_cast<const __nv_bfloat16*>(a.weight), vec4, stream);
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
