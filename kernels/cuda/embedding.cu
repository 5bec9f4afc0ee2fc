// One block per token copies a table row, converting to float32. Rows whose width is a multiple
// of 8 (every real model) move 16 bytes per load; other widths take the element loop.
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/embedding.h"

namespace moeserve::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void EmbeddingKernel(const T* __restrict__ table, const int32_t* __restrict__ token_ids,
                                int64_t cols, float* __restrict__ out) {
  const int64_t token = blockIdx.x;
  const T* src = table + static_cast<int64_t>(token_ids[token]) * cols;
  float* dst = out + token * cols;
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  if (cols % 8 == 0) {
    for (int64_t i = threadIdx.x * kVec; i < cols; i += blockDim.x * kVec) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src + i);
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; j += 4) {
        *reinterpret_cast<float4*>(dst + i + j) =
            make_float4(ToFloat(v[j]), ToFloat(v[j + 1]), ToFloat(v[j + 2]), ToFloat(v[j + 3]));
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = ToFloat(src[i]);
  }
}

}  // namespace

absl::Status Embedding(const MatrixView& table, const int32_t* token_ids, int64_t num_tokens,
                       float* out, cudaStream_t stream) {
  if (num_tokens < 0) return absl::InvalidArgumentError("embedding: num_tokens is negative");
  if (num_tokens == 0 || table.cols == 0) return absl::OkStatus();
  switch (table.dtype) {
    case DType::kF32:
      EmbeddingKernel<<<num_tokens, kThreads, 0, stream>>>(static_cast<const float*>(table.data),
                                                           token_ids, table.cols, out);
      break;
    case DType::kBF16:
      EmbeddingKernel<<<num_tokens, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(table.data), token_ids, table.cols, out);
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
