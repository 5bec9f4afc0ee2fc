// A block per (token, group of up to kMaxWarps heads), one warp per head (a one-block forward's
// 32 rows: Q's 16 heads in 4 blocks a token; with one block a token and 2 heads a warp the 40
// launches took 198 us, ncu). The block first tabulates cos/sin of the token's angles in shared
// memory; each warp then loads a head, normalizes it (warp-shuffle sum of
// squares), stages it in shared memory so that either half of a pair can be read, and writes the
// rotated head back. Rotation arithmetic uses explicit round-to-nearest operations so that the
// compiler does not contract it into FMAs, which the CPU reference does not use.
#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/qk_norm_rope.h"

namespace moeserve::cuda {
namespace {

constexpr int kMaxHalf = 256;
constexpr int kMaxWarps = 4;

struct InvFreq {
  float v[kMaxHalf];
};

template <typename W>
__global__ void QkNormRopeKernel(float* __restrict__ x, const int32_t* __restrict__ positions,
                                 int num_heads, int head_dim, int half, const InvFreq inv_freq,
                                 const W* __restrict__ weight, float eps) {
  extern __shared__ float smem[];
  float* cos_v = smem;             // [half]
  float* sin_v = smem + half;      // [half]
  float* heads = smem + 2 * half;  // [warps, head_dim]
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t token = blockIdx.x;
  const int h = blockIdx.y * (blockDim.x / kWarpSize) + warp;
  const float pos = static_cast<float>(positions[token]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(pos, inv_freq.v[i]);
    cos_v[i] = static_cast<float>(cos(static_cast<double>(angle)));
    sin_v[i] = static_cast<float>(sin(static_cast<double>(angle)));
  }
  __syncthreads();
  float* buf = heads + warp * head_dim;
  if (h < num_heads) {
    float* v = x + (token * num_heads + h) * head_dim;
    float scale = 1.0f;
    if (weight != nullptr) {
      float sum_sq = 0.0f;
      for (int i = lane; i < head_dim; i += kWarpSize) sum_sq += v[i] * v[i];
      sum_sq = WarpSum(sum_sq);
      scale = 1.0f / sqrtf(sum_sq / static_cast<float>(head_dim) + eps);
    }
    for (int i = lane; i < head_dim; i += kWarpSize) {
      buf[i] = weight != nullptr ? ToFloat(weight[i]) * (v[i] * scale) : v[i];
    }
    __syncwarp();
    for (int i = lane; i < head_dim; i += kWarpSize) {
      float y = buf[i];
      if (i < half) {
        y = __fsub_rn(__fmul_rn(buf[i], cos_v[i]), __fmul_rn(buf[i + half], sin_v[i]));
      } else if (i < 2 * half) {
        const int j = i - half;
        y = __fadd_rn(__fmul_rn(buf[i], cos_v[j]), __fmul_rn(buf[j], sin_v[j]));
      }
      v[i] = y;
    }
  }
}

}  // namespace

absl::Status QkNormRope(const QkNormRopeArgs& a, cudaStream_t stream) {
  if (a.num_tokens < 0 || a.num_heads <= 0 || a.head_dim <= 0 || a.head_dim > 1024) {
    return absl::InvalidArgumentError(
        "qk_norm_rope: need num_tokens >= 0, num_heads > 0, head_dim in [1, 1024]");
  }
  if (a.rotary_dim < 0 || a.rotary_dim % 2 != 0 || a.rotary_dim > a.head_dim ||
      a.rotary_dim / 2 > kMaxHalf) {
    return absl::InvalidArgumentError(
        "qk_norm_rope: rotary_dim must be even, <= head_dim and <= 512");
  }
  if (a.num_tokens == 0) return absl::OkStatus();
  const int half = static_cast<int>(a.rotary_dim / 2);
  // The CPU reference's expression (kernels/cpu/rope.cc), evaluated by the same host powf.
  InvFreq inv_freq{};
  for (int i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(a.rotary_dim);
    inv_freq.v[i] = 1.0f / std::pow(a.theta, exponent);
  }
  const int warps = static_cast<int>(std::min<int64_t>(a.num_heads, kMaxWarps));
  const size_t smem = (2 * half + warps * a.head_dim) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(a.num_tokens),
                  static_cast<unsigned>((a.num_heads + warps - 1) / warps));
  switch (a.norm_weight_dtype) {
    case DType::kF32:
      QkNormRopeKernel<<<grid, warps * kWarpSize, smem, stream>>>(
          a.x, a.positions, static_cast<int>(a.num_heads), static_cast<int>(a.head_dim), half,
          inv_freq, static_cast<const float*>(a.norm_weight), a.eps);
      break;
    case DType::kBF16:
      QkNormRopeKernel<<<grid, warps * kWarpSize, smem, stream>>>(
          a.x, a.positions, static_cast<int>(a.num_heads), static_cast<int>(a.head_dim), half,
          inv_freq, static_cast<const __nv_bfloat16*>(a.norm_weight), a.eps);
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
