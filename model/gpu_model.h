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
// Host synchronization: with the fused experts (BF16 on sm_90a, moe_gemm.h) nothing between the
// metadata copy and the final copies waits for the host. The cuBLAS experts path takes per-expert
// counts on the host, so there an MoE layer with token-choice rows waits for its plan's offsets
// (a 1 KB copy); an expert-choice-only layer does not (every expert takes the same count, known
// on the host). Work is queued on one stream (created at the device's highest priority), except
// in an MoE layer, where a lower-priority side stream (side_stream.h), joined before the combine,
// runs the shared expert from the layer's start and the plan's row pass and the load counters
// once the plan's CSR part (what the routed experts read) is built; in an expert-choice-only
// layer whose scopes come in row order the routed experts start on the selection itself
// (routing_plan.h's SelectionPlan), and all of the plan build goes to the side stream. At the
// end the logits or proposals and the load counters are copied back.
//
// CUDA graphs (with the fused experts, no trace): the device work from the embedding through the
// last layer takes everything it needs from the host as kernel arguments fixed by the batch's
// shape (token, sequence and routing-scope counts, the metadata layout, the workspace's address);
// per-forward data (ids, positions, cache addresses, scopes' rows) is read from the metadata on
// the device. So a shape's second forward is captured into a graph, and later forwards of that
// shape replay it with one launch: for a denoising loop, every step of a block after the second.
// The first forward of a shape runs eagerly (one-off shapes pay no capture; any lazy setup of
// the kernels happens outside a capture). At most kMaxGraphs are kept, the least recently used
// evicted; growing the workspace or the metadata buffer drops them all. The logit rows' tail
// (final norm, lm_head, argmax; the row count changes every step) is launched eagerly.
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
#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/side_stream.h"
#include "model/config.h"
#include "model/model.h"
#include "model/weights.h"

namespace moeserve {

class GpuModel {
 public:
  // Uploads `weights` (matrices converted to matrix_dtype, BF16 or F32) to the current device.
  static absl::StatusOr<std::unique_ptr<GpuModel>> Create(const ModelConfig& config,
                                                          const ModelWeights& weights,
                                                          DType matrix_dtype,
                                                          bool cuda_graphs = true);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  // `batch` and `spans` as checked by ValidateBatch.
  absl::StatusOr<ForwardOutput> Forward(const ModelConfig& config, std::span<SequenceInput> batch,
                                        std::span<const BatchSpan> spans, ForwardTrace* trace,
                                        const GreedyOptions& greedy) ABSL_LOCKS_EXCLUDED(mu_);

  int64_t weight_bytes() const { return weight_bytes_; }
  DType matrix_dtype() const { return matrix_dtype_; }
  void SetCudaGraphs(bool enabled) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Layer;
  struct Workspace;
  GpuModel() = default;

  // out[num_tokens, hidden_size] = beta * out + W2 · swiglu(W13 · ws.h), on gemm.stream()
  absl::Status Mlp(cuda::Gemm& gemm, Workspace& ws, int64_t num_tokens, const MatrixView& w13,
                   const MatrixView& w2, float* out, float beta);
  absl::Status MoeBlock(const ModelConfig& config, const Layer& layer, int64_t layer_idx,
                        Workspace& ws, int64_t num_tokens, ForwardTrace* trace);

  // Runs `layers` (the device work of the embedding and every layer, queued on stream_): as a
  // replay of the graph captured for `shape`, by capturing it on the shape's second forward, or
  // eagerly. An empty shape: eagerly, no graph (traces, host-synchronizing paths).
  absl::StatusOr<ForwardLaunch> RunLayers(std::vector<int64_t> shape,
                                          absl::FunctionRef<absl::Status()> layers)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropGraphs() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  static constexpr size_t kMaxGraphs = 64;
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    int sightings = 0;  // forwards of this shape so far
    bool failed = false;
    int64_t last_use = 0;
  };

  absl::Mutex mu_;  // one Forward at a time: the members below are its working state
  DType matrix_dtype_ = DType::kBF16;
  cudaStream_t stream_ = nullptr;
  cuda::SideStream side_;  // the shared expert and the plan's row pass beside the routed experts
  std::unique_ptr<cuda::Gemm> gemm_;         // on stream_
  std::unique_ptr<cuda::Gemm> side_gemm_;    // on side_.stream()
  std::vector<cuda::DeviceBuffer> tensors_;  // every weight tensor's device memory
  int64_t weight_bytes_ = 0;
  MatrixView embedding_;
  MatrixView lm_head_;
  const float* final_norm_ = nullptr;
  std::vector<Layer> layers_;
  cuda::DeviceBuffer workspace_;  // grows to the largest forward seen
  cuda::DeviceBuffer metadata_;   // the packed per-forward metadata
  bool cuda_graphs_ = true;
  absl::flat_hash_map<std::vector<int64_t>, Graph> graphs_;  // by batch shape
  int64_t graph_clock_ = 0;
};

}  // namespace moeserve
