// Elementwise over [num_rows, width], a grid-stride loop of one element per thread step.
#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/swiglu.h"

namespace moeserve::cuda {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest.
constexpr int64_t kMaxBlocks = 4096;

template <typename T>
__global__ void SwiGluKernel(const T* __restrict__ gate_up, int64_t num_rows, int64_t width,
                             float* __restrict__ out_f32, __nv_bfloat16* __restrict__ out_bf16) {
  const int64_t total = num_rows * width;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / width, col = idx % width;
    const float g = ToFloat(gate_up[row * 2 * width + col]);
    const float u = ToFloat(gate_up[row * 2 * width + width + col]);
    const float h = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
    if (out_f32 != nullptr) out_f32[idx] = h;
    if (out_bf16 != nullptr) out_bf16[idx] = __float2bfloat16_rn(h);
  }
}

}  // namespace

absl::Status SwiGlu(const SwiGluArgs& a, cudaStream_t stream) {
  if (a.num_rows < 0 || a.width <= 0) {
    return absl::InvalidArgumentError("swiglu: num_rows must be >= 0 and width > 0");
  }
  if (a.out_f32 == nullptr && a.out_bf16 == nullptr) {
    return absl::InvalidArgumentError("swiglu: neither out_f32 nor out_bf16 is set");
  }
  const int64_t total = a.num_rows * a.width;
  if (total == 0) return absl::OkStatus();
  const int blocks = static_cast<int>(std::min<int64_t>(CeilDiv(total, kThreads), kMaxBlocks));
  switch (a.in_dtype) {
    case DType::kF32:
      SwiGluKernel<<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(a.gate_up),
                                                    a.num_rows, a.width, a.out_f32, a.out_bf16);
      break;
    case DType::kBF16:
      SwiGluKernel<<<blocks, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(a.gate_up),
                                                    a.num_rows, a.width, a.out_f32, a.out_bf16);
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
