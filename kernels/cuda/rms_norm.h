// RMSNorm on the GPU, as cpu::RmsNorm: out = x / sqrt(mean(x^2) + eps) * weight, one row at a
// time, in float32. Writes a float32 result, a BF16 copy (the input of the next BF16 GEMM), or
// both. In-place use (out_f32 == x) is allowed. The sum of squares runs in a different order than
// on the CPU: results agree to float32 rounding, not bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/tensor.h"

namespace moeserve::cuda {

struct RmsNormArgs {
  const float* x = nullptr;  // [num_rows, dim]
  int64_t num_rows = 0;
  int64_t dim = 0;
  DType weight_dtype = DType::kF32;
  const void* weight = nullptr;  // [dim]
  float eps = 1e-6f;
  float* out_f32 = nullptr;           // [num_rows, dim], or null
  __nv_bfloat16* out_bf16 = nullptr;  // [num_rows, dim], or null
};
absl::Status RmsNorm(const RmsNormArgs& args, cudaStream_t stream);

}  // namespace moeserve::cuda
