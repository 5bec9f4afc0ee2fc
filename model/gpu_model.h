// The LLaDA2 forward on a GPU (built with CUDA only): what Model::Forward computes on the CPU,
// with the kernels of kernels/cuda, weights and K/V caches in device memory.
//
// Per forward: the batch's metadata (ids, positions, each sequence's cache pointers per layer,
// the routing scopes of model/routing.h's FormRoutingScopes, the logit rows) is packed on the host
// and copied in one transfer; then embedding, and per layer RMSNorm -> Q/K/V GEMMs -> QK-norm +
// RoPE -> K/V append -> fused attention -> output GEMM accumulated into the residual -> RMSNorm ->
// dense SwiGLU MLP, or the MoE block: F32 router GEMM, token-choice routing of the token-choice
// rows and expert-choice selection of every scope on the device, one device routing plan for
// both, load counters, shared expert, routed experts (grouped GEMMs), combine into the residual.
// Last, the logit rows' final norm, lm_head, and either the rows or their greedy proposals
// (argmax) copied back, with the load counters of every MoE layer in one transfer.
//
// Host synchronization: the grouped GEMMs take per-expert counts on the host, so an MoE layer with
// token-choice rows waits for its plan's offsets (a 1 KB copy); an expert-choice-only layer does
// not (every expert takes the same count, known on the host). Everything else is queued on one
// stream; at the end the logits or proposals and the load counters are copied back.
//
// Numerics: with BF16 matrices the GEMM inputs (normed activations, attention output, SwiGLU
// output) are BF16 and the residual stream, attention, norms and routing stay float32; with F32
// matrices every GEMM is full float32 (no TF32) and the results agree with the CPU to float32
// rounding. The K/V cache has the matrices' dtype.
//
// Thread-safe: Forward calls are serialized by a mutex (they share the stream, the cuBLAS handle
// and the workspace); the engine loop is the one caller in the server.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/gemm.h"
#include "model/config.h"
#include "model/model.h"
#include "model/weights.h"

namespace moeserve {

class GpuModel {
 public:
  // Uploads `weights` (matrices converted to matrix_dtype, BF16 or F32) to the current device.
  static absl::StatusOr<std::unique_ptr<GpuModel>> Create(const ModelConfig& config,
                                                          const ModelWeights& weights,
                                                          DType matrix_dtype);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  // `batch` and `spans` as checked by ValidateBatch.
  absl::StatusOr<ForwardOutput> Forward(const ModelConfig& config, std::span<SequenceInput> batch,
                                        std::span<const BatchSpan> spans, ForwardTrace* trace,
                                        const GreedyOptions& greedy) ABSL_LOCKS_EXCLUDED(mu_);

  int64_t weight_bytes() const { return weight_bytes_; }
  DType matrix_dtype() const { return matrix_dtype_; }

 private:
  struct Layer;
  struct Workspace;
  GpuModel() = default;

  // out[num_tokens, hidden_size] = beta * out + W2 · swiglu(W13 · ws.h)
  absl::Status Mlp(Workspace& ws, int64_t num_tokens, const MatrixView& w13, const MatrixView& w2,
                   float* out, float beta);
  absl::Status MoeBlock(const ModelConfig& config, const Layer& layer, int64_t layer_idx,
                        Workspace& ws, int64_t num_tokens, ForwardTrace* trace);

  absl::Mutex mu_;  // one Forward at a time: the members below are its working state
  DType matrix_dtype_ = DType::kBF16;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::Gemm> gemm_;
  std::vector<cuda::DeviceBuffer> tensors_;  // every weight tensor's device memory
  int64_t weight_bytes_ = 0;
  MatrixView embedding_;
  MatrixView lm_head_;
  const float* final_norm_ = nullptr;
  std::vector<Layer> layers_;
  cuda::DeviceBuffer workspace_;  // grows to the largest forward seen
  cuda::DeviceBuffer metadata_;   // the packed per-forward metadata
};

}  // namespace moeserve
