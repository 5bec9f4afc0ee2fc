// SwiGLU over a fused gate/up projection on the GPU, as cpu::SwiGlu: h = silu(gate) * up with
// silu(g) = g / (1 + e^-g), gate in the first `width` columns of a row and up in the next.
// Same float32 formula as the CPU with IEEE division; expf differs from glibc's by at most 2 ulp,
// so results agree to a few float32 ulps.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/tensor.h"

namespace moeserve::cuda {

struct SwiGluArgs {
  DType in_dtype = DType::kF32;
  const void* gate_up = nullptr;  // [num_rows, 2 * width]
  int64_t num_rows = 0;
  int64_t width = 0;
  float* out_f32 = nullptr;           // [num_rows, width], or null
  __nv_bfloat16* out_bf16 = nullptr;  // [num_rows, width], or null
};
absl::Status SwiGlu(const SwiGluArgs& args, cudaStream_t stream);

}  // namespace moeserve::cuda
