// Device helpers shared by the kernels of kernels/cuda (included by .cu files only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moeserve::cuda {

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether p is a multiple of `bytes` (for vector loads and stores; null is aligned).
__host__ __device__ inline bool IsAligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Element loads and stores in float32, for the two element types the kernels read.
__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The router's sigmoid, written to give the CPU reference's float result: the CPU computes
// 1.0f / (1.0f + expf(-x)) with glibc's expf, which is correctly rounded except on rare inputs.
// Here exp runs in double and is rounded once to float, which equals glibc's expf except on about
// 2.5e-4 of inputs in [-20, 20] (measured over every float there), where the two differ by one
// ulp. The add and divide are IEEE float operations as on the CPU (no contraction, no fast
// division). Routing decisions of the two can differ only where two candidates' scores are
// within one ulp of each other and one of them is such an input.
__device__ __forceinline__ float RouterSigmoid(float logit) {
  const float e = static_cast<float>(exp(-static_cast<double>(logit)));
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats; blockDim.x is a
// multiple of 32. Contains __syncthreads: call from every thread.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = WarpSum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : 0.0f;
  return WarpSum(v);
}

// Exclusive prefix sum over the block in thread order; `*total` gets the block's sum. `scratch`
// holds >= 32 ints; blockDim.x is a multiple of 32. Contains __syncthreads: call from every
// thread.
__device__ __forceinline__ int BlockExclusiveScan(int value, int* scratch, int* total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int v = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += v;
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  int warp_prefix = 0, sum = 0;
  for (int w = 0; w < num_warps; ++w) {
    const int t = scratch[w];
    if (w < warp) warp_prefix += t;
    sum += t;
  }
  *total = sum;
  return warp_prefix + inclusive - value;
}

// A float's bits mapped to an unsigned key with the same order (+0 and -0 equal, as floats
// compare), for radix selection.
__device__ __forceinline__ uint32_t OrderedKey(float x) {
  const uint32_t bits = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace moeserve::cuda
