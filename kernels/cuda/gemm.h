// Matrix products through cuBLAS: y = x @ w^T for row-major activations x and weights w (the
// layout of kernels/cpu/matmul.h), and the grouped form the routed experts need.
//
// Supported types: BF16 x and w with float32 accumulation into F32 or BF16 y (the model's
// projections), and F32 x, w, y in full float32 (CUBLAS_COMPUTE_32F_PEDANTIC: no TF32, for the
// router logits, whose rounding decides routing). Anything else is INVALID_ARGUMENT.
// cuBLAS picks split-K and kernel by shape, so a row's result can depend on how many rows share
// the call; the CPU's batch invariance (kernels/cpu/matmul.h) does not hold here.
//
// Thread-compatible: one Gemm per stream; calls on it are ordered on that stream.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/tensor.h"

namespace moeserve::cuda {

// y[num_rows, w.rows] = x[num_rows, w.cols] @ w^T + beta * y. All pointers are device memory.
struct GemmArgs {
  DType x_dtype = DType::kBF16;
  const void* x = nullptr;
  int64_t x_stride = 0;  // elements between rows, >= w.cols
  int64_t num_rows = 0;
  MatrixView w;  // [n, k], device memory
  DType y_dtype = DType::kF32;
  void* y = nullptr;
  int64_t y_stride = 0;  // >= w.rows
  float beta = 0.0f;     // 1: accumulate into y (a residual add)
};

// A stack of same-shaped matrices in device memory: [num_experts, rows, cols].
struct ExpertWeightsView {
  DType dtype = DType::kBF16;
  const void* data = nullptr;
  int64_t num_experts = 0;
  int64_t rows = 0;
  int64_t cols = 0;
};

// For every expert e: y[b_e : b_e + n_e] = x[b_e : b_e + n_e] @ w[e]^T, with b_e =
// expert_offsets[e] and n_e = expert_offsets[e + 1] - b_e (the routing plan's CSR index, on the
// host). x, w and y share one dtype (BF16 accumulates in float32).
struct GroupedGemmArgs {
  DType dtype = DType::kBF16;
  const void* x = nullptr;  // [expert_offsets.back(), w.cols]
  ExpertWeightsView w;
  std::span<const int32_t> expert_offsets;  // host [w.num_experts + 1]
  void* y = nullptr;                        // [expert_offsets.back(), w.rows]
};

class Gemm {
 public:
  static constexpr size_t kDefaultWorkspaceBytes = size_t{32} << 20;

  static absl::StatusOr<std::unique_ptr<Gemm>> Create(
      cudaStream_t stream, size_t workspace_bytes = kDefaultWorkspaceBytes);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  cudaStream_t stream() const { return stream_; }

  absl::Status Run(const GemmArgs& args);

  // When every expert has the same count (expert-choice plans) this is one strided-batched call;
  // otherwise one grouped-batched call over the experts with rows (cublasGemmGroupedBatchedEx),
  // after a small upload of the per-expert operand pointers.
  absl::Status RunGrouped(const GroupedGemmArgs& args);

 private:
  Gemm(cublasHandle_t handle, cudaStream_t stream, DeviceBuffer workspace)
      : handle_(handle), stream_(stream), workspace_(std::move(workspace)) {}

  cublasHandle_t handle_;
  cudaStream_t stream_;
  DeviceBuffer workspace_;
  DeviceBuffer pointers_;  // device arrays of A, B, C pointers for grouped calls
};

}  // namespace moeserve::cuda
