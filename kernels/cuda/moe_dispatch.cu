// Gather: one block per output row, 16-byte copies when the row size allows. Combine: one block
// per token; its assignment list (ascending expert) comes from the plan's token-major index, and
// every thread walks it for its own hidden dimensions, so the summation order is fixed.
#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/moe_dispatch.h"

namespace moeserve::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void GatherRowsKernel(const char* __restrict__ x, int64_t row_bytes,
                                 const int32_t* __restrict__ rows, char* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const char* src = x + rows[i] * row_bytes;
  char* dst = out + i * row_bytes;
  if (row_bytes % 16 == 0) {
    for (int64_t b = threadIdx.x * 16; b < row_bytes; b += blockDim.x * 16) {
      *reinterpret_cast<uint4*>(dst + b) = *reinterpret_cast<const uint4*>(src + b);
    }
  } else {
    for (int64_t b = threadIdx.x; b < row_bytes; b += blockDim.x) dst[b] = src[b];
  }
}

// kVec consecutive dimensions per thread (16- or 32-byte loads when kVec is 8); the order of the
// operations on each dimension is the same for every kVec.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T, int kVec>
__global__ void CombineKernel(const int32_t* __restrict__ token_offsets,
                              const int32_t* __restrict__ token_assignments,
                              const float* __restrict__ weight, const T* __restrict__ expert_out,
                              const float* __restrict__ shared_out, const float* residual,
                              float* out, int64_t hidden) {
  const int64_t t = blockIdx.x;
  const int32_t begin = token_offsets[t], end = token_offsets[t + 1];
  for (int64_t d = threadIdx.x * kVec; d < hidden; d += blockDim.x * kVec) {
    float mix[kVec];
    if (shared_out != nullptr) {
      const Vec<float, kVec> s =
          *reinterpret_cast<const Vec<float, kVec>*>(shared_out + t * hidden + d);
#pragma unroll
      for (int i = 0; i < kVec; ++i) mix[i] = __fadd_rn(0.0f, s.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) mix[i] = 0.0f;
    }
    for (int32_t j = begin; j < end; ++j) {
      const int64_t a = token_assignments[j];
      const float w = weight[a];
      const Vec<T, kVec> y = *reinterpret_cast<const Vec<T, kVec>*>(expert_out + a * hidden + d);
#pragma unroll
      for (int i = 0; i < kVec; ++i) mix[i] = __fadd_rn(mix[i], __fmul_rn(w, ToFloat(y.v[i])));
    }
    Vec<float, kVec> o;
    if (residual != nullptr) {
      const Vec<float, kVec> r =
          *reinterpret_cast<const Vec<float, kVec>*>(residual + t * hidden + d);
#pragma unroll
      for (int i = 0; i < kVec; ++i) o.v[i] = __fadd_rn(r.v[i], mix[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) o.v[i] = mix[i];
    }
    *reinterpret_cast<Vec<float, kVec>*>(out + t * hidden + d) = o;
  }
}

template <typename T>
void LaunchCombine(const CombineArgs& a, cudaStream_t stream) {
  const auto* y = static_cast<const T*>(a.expert_out);
  const bool aligned = [&] {
    for (const void* p : {a.expert_out, static_cast<const void*>(a.shared_out),
                          static_cast<const void*>(a.residual), static_cast<const void*>(a.out)}) {
      if (!IsAligned(p, 32)) return false;
    }
    return true;
  }();
  if (a.hidden_size % 8 == 0 && aligned) {
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, a.hidden_size / 8));
    CombineKernel<T, 8><<<a.plan.num_tokens, threads, 0, stream>>>(
        a.plan.token_offsets, a.plan.token_assignments, a.plan.weight, y, a.shared_out, a.residual,
        a.out, a.hidden_size);
  } else {
    CombineKernel<T, 1><<<a.plan.num_tokens, kThreads, 0, stream>>>(
        a.plan.token_offsets, a.plan.token_assignments, a.plan.weight, y, a.shared_out, a.residual,
        a.out, a.hidden_size);
  }
}

}  // namespace

absl::Status GatherRows(const GatherRowsArgs& a, cudaStream_t stream) {
  if (a.num_rows < 0 || a.row_size < 0) {
    return absl::InvalidArgumentError("gather_rows: negative size");
  }
  if (a.num_rows == 0 || a.row_size == 0) return absl::OkStatus();
  GatherRowsKernel<<<a.num_rows, kThreads, 0, stream>>>(
      static_cast<const char*>(a.x), a.row_size * static_cast<int64_t>(DTypeSize(a.dtype)), a.rows,
      static_cast<char*>(a.out));
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status Combine(const CombineArgs& a, cudaStream_t stream) {
  if (a.hidden_size <= 0) return absl::InvalidArgumentError("combine: hidden_size must be > 0");
  if (a.plan.num_tokens == 0) return absl::OkStatus();
  switch (a.expert_out_dtype) {
    case DType::kF32:
      LaunchCombine<float>(a, stream);
      break;
    case DType::kBF16:
      LaunchCombine<__nv_bfloat16>(a, stream);
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
