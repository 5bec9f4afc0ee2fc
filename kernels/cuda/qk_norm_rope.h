// Per-head RMSNorm (QK-norm) fused with partial rotate-half RoPE, in place, on the GPU: what
// cpu::RmsNorm over rows of head_dim followed by cpu::ApplyRope computes.
//
// RoPE follows kernels/cpu/rope.h exactly in convention: pair i < rotary_dim/2 of a head is
// (x[i], x[i + rotary_dim/2]); angle = position * inv_freq[i]. inv_freq is computed on the host
// by the CPU reference's own float32 expression and passed in as a kernel parameter, the angle is
// one float32 product as there, and cos/sin are evaluated in double and rounded to float as
// there, so the rotation itself matches the CPU bit for bit (up to rare double-rounding cases of
// the device's double cos/sin). The norm's sum of squares runs in a different order: with
// QK-norm on, results agree to float32 rounding.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/tensor.h"

namespace moeserve::cuda {

struct QkNormRopeArgs {
  float* x = nullptr;                  // [num_tokens, num_heads, head_dim], updated in place
  const int32_t* positions = nullptr;  // [num_tokens], absolute positions
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;    // <= 1024
  int64_t rotary_dim = 0;  // even, <= head_dim and <= 512; 0: no rotation
  float theta = 10000.0f;
  DType norm_weight_dtype = DType::kF32;
  const void* norm_weight = nullptr;  // [head_dim], or null: RoPE only, no norm
  float eps = 1e-6f;
};
absl::Status QkNormRope(const QkNormRopeArgs& args, cudaStream_t stream);

}  // namespace moeserve::cuda
