// The LLaDA2 MoE model: one forward over the packed tokens of many sequences, on the CPU (the
// reference, float32 math) or on a GPU (model/gpu_model.h, when built with CUDA).
//
// Per layer: RMSNorm -> Q/K/V projections -> per-head QK RMSNorm -> partial RoPE -> grouped-query
// attention over each sequence's cached K/V plus its chunk (block-causal) -> output projection ->
// residual; RMSNorm -> dense SwiGLU MLP (layers < first_k_dense_replace) or the MoE block (router,
// routing plan, routed experts, shared expert) -> residual. Final RMSNorm and lm_head only for the
// rows asked for. Float32 math over BF16/F32 weights.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/tensor.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/routing.h"
#include "model/sampling.h"
#include "model/weights.h"

namespace moeserve {

enum class Device { kCpu, kCuda };
const char* DeviceName(Device device);
// "cpu", "cuda", or "auto" (cuda when this build has CUDA and a GPU is present, else cpu).
absl::StatusOr<Device> ParseDevice(absl::string_view text);
// Whether this binary was built with the CUDA backend and can see a GPU.
bool CudaAvailable();

struct ModelOptions {
  Device device = Device::kCpu;
  // GPU only: the dtype of the weight matrices and so of every GEMM's inputs. kBF16 (the fast
  // path; F32 checkpoints are rounded) or kF32 (BF16 weights widened exactly: the GPU computes in
  // float32 like the CPU reference, for checking it against the goldens).
  DType gpu_matrix_dtype = DType::kBF16;
  // GPU only: replay the device work of a batch shape seen before (embedding through the last
  // layer) as one CUDA graph instead of launching its ~20 kernels a layer one by one. Only where
  // that work never waits for the host: BF16 with the fused experts (model/gpu_model.h).
  bool cuda_graphs = true;
};

// How a forward's layers were launched (model/gpu_model.h).
enum class ForwardLaunch {
  kEager,     // kernel by kernel (always on the CPU)
  kCaptured,  // captured into a new CUDA graph, then replayed
  kReplayed,  // replayed from a graph captured by an earlier forward of the same shape
};
inline constexpr int kNumForwardLaunches = 3;
const char* ForwardLaunchName(ForwardLaunch launch);  // "eager", "captured", "replayed"

// One sequence's chunk of tokens in a forward.
struct SequenceInput {
  std::span<const int32_t> token_ids;  // [num_tokens]
  // The sequence's cache (required). The chunk sits at positions [cache->length(), +num_tokens)
  // and attends to the committed positions plus itself.
  KvCache* cache = nullptr;
  // Attention block size: a query sees keys of its own and earlier blocks (block-causal, blocks
  // aligned to absolute positions). 0: every key of the chunk and the cache (bidirectional).
  int64_t block_length = 0;
  // How many leading tokens of the chunk keep their K/V in the cache (advance cache->length()):
  // all of a prefill chunk, none of a denoising step, and a finished block's refresh folded into
  // the next block's first step (both in one chunk: block-causal attention makes that exact).
  int64_t commit_tokens = 0;
  // Rows of the chunk (indices into token_ids) whose logits are wanted.
  std::vector<int32_t> logit_rows;
  // How this sequence's tokens reach the experts.
  RoutingOptions routing;
  // Only the greedy proposal of each logit row is wanted (ForwardOutput::greedy), not the row:
  // the GPU then copies back 8 bytes per row instead of the vocabulary.
  bool greedy = false;
};

// Where one sequence's chunk sits in the packed token rows of a forward.
struct BatchSpan {
  int64_t first_row = 0;
  int64_t num_tokens = 0;
  int64_t start_pos = 0;  // absolute position of the chunk's first token (the cache's length)
};

// Checks a batch as Model::Forward does and returns where each chunk sits; errors name the
// sequence and field.
absl::StatusOr<std::vector<BatchSpan>> ValidateBatch(const ModelConfig& config,
                                                     std::span<const SequenceInput> batch);
// The routing view of a batch (per sequence: rows, options, request-scope blocks).
std::vector<SequenceRouting> BatchRouting(std::span<const SequenceInput> batch,
                                          std::span<const BatchSpan> spans);

// What routing did to one sequence in one forward, per MoE layer (indexed by layer; empty entries
// for dense layers).
struct SequenceRoutingStats {
  std::vector<int64_t> dropped_tokens;  // [num_layers]: tokens with no routed expert
  std::vector<std::vector<int64_t>> experts_per_token;  // [num_layers][num_experts + 1]: histogram
};

// What a forward computed inside, for checking against references. Token rows are in packed
// order (the batch's sequences one after another).
struct ForwardTrace {
  // [num_layers + 1] x [num_tokens, hidden_size]: the input of each layer, then the final norm's
  // output.
  std::vector<std::vector<float>> hidden_in;
  // Indexed by layer; empty for dense layers.
  std::vector<std::vector<float>> router_logits;  // [num_tokens, num_experts]
  std::vector<std::vector<int32_t>> topk_idx;     // [num_tokens, topk], token-choice selections
  std::vector<std::vector<float>> topk_weight;    // [num_tokens, topk]
  std::vector<RoutingPlan> plans;                 // the routing plan of each MoE layer
};

// How greedy proposals are made (Propose at temperature 0 over ids [0, num_ids), never
// excluded_token).
struct GreedyOptions {
  int32_t excluded_token = -1;  // the mask token; -1: none
  int64_t num_ids = 0;          // 0: the whole vocabulary
};

struct ForwardOutput {
  // [num_logit_rows, vocab_size]: the logit rows of the sequences that are not greedy, sequence
  // by sequence, in the order asked.
  std::vector<float> logits;
  // The proposals of the greedy sequences' logit rows, sequence by sequence, in the order asked.
  std::vector<Proposal> greedy;
  // [num_layers]: load of each MoE layer by routing mode (empty entries for dense layers).
  std::vector<LayerLoad> layer_load;
  // [batch size]: per-sequence routing statistics.
  std::vector<SequenceRoutingStats> sequences;
  ForwardLaunch launch = ForwardLaunch::kEager;
};

class GpuModel;

class Model {
 public:
  // Loads config.json and the safetensors weights of a Hugging Face checkpoint directory.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     const ModelOptions& options = {});
  // A CPU model over `weights`.
  static std::unique_ptr<Model> FromWeights(ModelConfig config, ModelWeights weights);
  // A model over `weights` on options.device: for the GPU the weights are uploaded and the host
  // copy is released.
  static absl::StatusOr<std::unique_ptr<Model>> Create(ModelConfig config, ModelWeights weights,
                                                       const ModelOptions& options);
  ~Model();

  const ModelConfig& config() const { return config_; }
  Device device() const { return gpu_ ? Device::kCuda : Device::kCpu; }
  // Bytes of K/V cache one position of one sequence takes (every layer, K and V): float32 on the
  // CPU, the matrices' dtype on the GPU.
  int64_t kv_bytes_per_position() const;
  // The host weights (CPU models; empty tensors on the GPU, whose weights live on the device).
  const ModelWeights& weights() const { return weights_; }

  // Runs the batch. Checks every input first (token ids in range, positions within
  // max_position_embeddings, logit rows in range, one chunk per cache) and fails before computing
  // anything. Concurrent calls need distinct caches (on the GPU they run one at a time), and a
  // cache used on one device stays on it.
  absl::StatusOr<ForwardOutput> Forward(std::span<SequenceInput> batch,
                                        ForwardTrace* trace = nullptr,
                                        const GreedyOptions& greedy = {}) const;

  // GPU models: turns CUDA graphs on or off for later forwards (ModelOptions::cuda_graphs); tests
  // and benchmarks compare both ways in one process.
  void SetCudaGraphs(bool enabled);

 private:
  Model(ModelConfig config, ModelWeights weights);
  absl::StatusOr<ForwardOutput> ForwardCpu(std::span<SequenceInput> batch,
                                           std::span<const BatchSpan> spans, ForwardTrace* trace,
                                           const GreedyOptions& greedy) const;

  ModelConfig config_;
  ModelWeights weights_;
  std::unique_ptr<GpuModel> gpu_;  // set for Device::kCuda
};

}  // namespace moeserve
