#include "model/gpu_model.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/argmax.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/expert_choice.h"
#include "kernels/cuda/moe_dispatch.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/qk_norm_rope.h"
#include "kernels/cuda/rms_norm.h"
#include "kernels/cuda/routing_load.h"
#include "kernels/cuda/routing_plan.h"
#include "kernels/cuda/swiglu.h"
#include "kernels/cuda/token_choice.h"
#include "kernels/util/logging.h"
#include "kernels/util/status_macros.h"

namespace moeserve {
namespace {

constexpr size_t kAlign = 256;
static_assert(cuda::kMaxLoadModes == kNumRoutingModes,
              "the device load counters have one slot per routing mode");
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Lays out buffers in one block: a first pass with a null base measures, a second carves.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* Take(int64_t count) {
    offset_ = AlignUp(offset_);
    T* p = base_ != nullptr ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
    return p;
  }
  void* TakeBytes(size_t bytes) { return Take<std::byte>(static_cast<int64_t>(bytes)); }
  size_t size() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// Packs host arrays into one buffer for a single host-to-device copy; Place returns the offset.
class MetadataPacker {
 public:
  template <typename T>
  size_t Place(std::span<const T> values) {
    bytes_.resize(AlignUp(bytes_.size()));
    const size_t at = bytes_.size();
    bytes_.resize(at + std::max<size_t>(values.size_bytes(), 1));
    if (!values.empty()) std::memcpy(bytes_.data() + at, values.data(), values.size_bytes());
    return at;
  }
  const std::vector<std::byte>& bytes() const { return bytes_; }

 private:
  std::vector<std::byte> bytes_;
};

// One sequence's K/V on the device: [num_layers][2 (K, V)][capacity][kv_size] of the kv dtype.
class DeviceKv : public KvCache::DeviceState {
 public:
  int64_t bytes() const override { return static_cast<int64_t>(buffer.bytes()); }
  void* at(int64_t layer, int which, size_t elem, int64_t kv_size) const {
    return buffer.as<char>() + ((2 * layer + which) * capacity * kv_size) * elem;
  }
  cuda::DeviceBuffer buffer;
  int64_t capacity = 0;
};

// Makes room for positions [0, needed) in the cache's device state, keeping committed positions.
absl::StatusOr<DeviceKv*> EnsureDeviceKv(KvCache* cache, int64_t needed, int64_t num_layers,
                                         int64_t kv_size, size_t elem, cudaStream_t stream) {
  KvCache::DeviceState* state = cache->device_state();
  DeviceKv* kv = state != nullptr ? dynamic_cast<DeviceKv*>(state) : nullptr;
  if (state != nullptr && kv == nullptr) {
    return absl::InvalidArgumentError("a cache of another backend was given to the GPU forward");
  }
  if (kv == nullptr && cache->length() > 0) {
    return absl::InvalidArgumentError("a cache filled by the CPU forward was given to the GPU");
  }
  if (kv != nullptr && kv->capacity >= needed) return kv;
  // Grow in steps of kKvGrowthPositions: device memory held stays within that of what the
  // sequence uses (the server's K/V budget counts positions), at the price of one copy of the
  // committed K/V every kKvGrowthPositions positions.
  constexpr int64_t kKvGrowthPositions = 256;
  const int64_t old_capacity = kv != nullptr ? kv->capacity : 0;
  const int64_t capacity =
      (needed + kKvGrowthPositions - 1) / kKvGrowthPositions * kKvGrowthPositions;
  auto grown = std::make_unique<DeviceKv>();
  ASSIGN_OR_RETURN(grown->buffer,
                   cuda::DeviceBuffer::Allocate(2 * num_layers * capacity * kv_size * elem));
  grown->capacity = capacity;
  const int64_t keep = cache->length();
  if (kv != nullptr && keep > 0) {
    CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(grown->buffer.data(), capacity * kv_size * elem,
                                           kv->buffer.data(), old_capacity * kv_size * elem,
                                           keep * kv_size * elem, 2 * num_layers,
                                           cudaMemcpyDeviceToDevice, stream));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  }
  DeviceKv* out = grown.get();
  cache->set_device_state(std::move(grown));
  return out;
}

// Puts one MoE layer's statistics into the forward's output.
void StoreLayerStats(int64_t layer, LayerRouting routed, ForwardOutput* out) {
  out->layer_load[layer] = std::move(routed.load);
  for (size_t s = 0; s < out->sequences.size(); ++s) {
    out->sequences[s].dropped_tokens[layer] = routed.sequence_dropped[s];
    out->sequences[s].experts_per_token[layer] = std::move(routed.sequence_experts_per_token[s]);
  }
}

// An MoE block's forks of the side stream, joined into `main` at Join, or when the block
// returns early with an error: no side work then outlives the failed forward (whose caller waits
// for `main`), and a capture still ends joined.
class SideWork {
 public:
  SideWork(cuda::SideStream& side, cudaStream_t main) : side_(side), main_(main) {}
  SideWork(const SideWork&) = delete;
  SideWork& operator=(const SideWork&) = delete;
  ~SideWork() {
    if (forked_) side_.Join(main_).IgnoreError();
  }
  absl::Status Fork() {
    RETURN_IF_ERROR(side_.Fork(main_));
    forked_ = true;
    return absl::OkStatus();
  }
  absl::Status Join() {
    forked_ = false;
    return side_.Join(main_);
  }

 private:
  cuda::SideStream& side_;
  cudaStream_t main_;
  bool forked_ = false;
};

}  // namespace

struct GpuModel::Layer {
  const float* input_norm = nullptr;
  const float* post_attention_norm = nullptr;
  MatrixView wq, wk, wv, wo;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  bool moe = false;
  MatrixView w13, w2;  // dense MLP
  MatrixView router;   // F32 [num_experts, hidden_size]
  const float* expert_bias = nullptr;
  cuda::ExpertWeightsView experts_w13, experts_w2;
  MatrixView shared_w13, shared_w2;  // rows == 0: no shared expert
};

// Device buffers and the host-side sizes of one forward.
struct GpuModel::Workspace {
  // Activations.
  float* x = nullptr;              // [num_tokens, hidden_size], the residual stream
  float* h_f32 = nullptr;          // [num_tokens, hidden_size], normed (the router's input)
  void* h = nullptr;               // [num_tokens, hidden_size] in the matrix dtype (GEMM input)
  float* q = nullptr;              // [num_tokens, num_heads, head_dim]
  float* k = nullptr;              // [num_tokens, num_kv_heads, head_dim]
  float* v = nullptr;              // [num_tokens, num_kv_heads, head_dim]
  void* attn = nullptr;            // [num_tokens, q_size] in the matrix dtype
  void* attn_workspace = nullptr;  // split-key partials (attention.h)
  size_t attn_workspace_bytes = 0;
  void* gate_up = nullptr;      // [num_tokens, 2 * max width] in the matrix dtype
  void* act = nullptr;          // [num_tokens, max width] in the matrix dtype
  float* shared_out = nullptr;  // [num_tokens, hidden_size]
  // Routing.
  float* router_logits = nullptr;  // [num_tokens, num_experts]
  int32_t* topk_idx = nullptr;     // [num_tc_rows, topk]
  float* topk_weight = nullptr;    // [num_tc_rows, topk]
  int32_t* selected = nullptr;     // [num_experts, total_capacity]
  void* ec_workspace = nullptr;
  size_t ec_workspace_bytes = 0;
  cuda::DeviceRoutingPlan plan;
  // Expert-choice rows alone, scopes in row order: the experts read this plan (the selection
  // itself) and all of the plan build runs beside them (else only the row pass does).
  bool plan_beside = false;
  cuda::DeviceRoutingPlan selection_plan;
  void* plan_workspace = nullptr;
  size_t plan_workspace_bytes = 0;
  void* experts_workspace = nullptr;
  size_t experts_workspace_bytes = 0;
  void* expert_out = nullptr;  // [num_assignments, hidden_size] in the matrix dtype
  int32_t* load = nullptr;     // [num_layers][load_stride]: RoutingLoadCounts' outputs
  int64_t load_stride = 0;     // 2 * num_experts + num_tokens
  // Logit rows.
  float* rows_x = nullptr;          // [num_logit_rows, hidden_size]
  void* rows_h = nullptr;           // [num_logit_rows, hidden_size] in the matrix dtype
  float* logits = nullptr;          // [num_logit_rows, vocab_size]
  int32_t* greedy_token = nullptr;  // [num_greedy_rows]
  float* greedy_prob = nullptr;     // [num_greedy_rows]
  // Metadata (in metadata_).
  const int32_t* ids = nullptr;
  const int32_t* positions = nullptr;
  const cuda::AttentionSequence* sequences = nullptr;  // [num_layers][num_sequences]
  const int32_t* tc_rows = nullptr;
  cuda::ExpertChoiceScopes scopes;
  const uint8_t* renormalize = nullptr;
  const int8_t* row_mode = nullptr;
  const int32_t* logit_rows = nullptr;  // full rows, then greedy rows
  // Host sizes.
  int64_t num_sequences = 0;
  int64_t max_queries = 0;
  int64_t num_tc_rows = 0;
  int64_t num_assignments = 0;
  std::vector<int32_t> expert_offsets;  // host copy of the plan's offsets
};

GpuModel::~GpuModel() {
  {
    absl::MutexLock lock(&mu_);
    DropGraphs();
  }
  side_gemm_.reset();
  gemm_.reset();
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::StatusOr<std::unique_ptr<GpuModel>> GpuModel::Create(const ModelConfig& c,
                                                           const ModelWeights& w,
                                                           DType matrix_dtype, bool cuda_graphs) {
  if (!cuda::CudaDeviceAvailable()) {
    return absl::UnavailableError("device cuda: no CUDA device is available");
  }
  // What the kernels can run, checked before anything is uploaded.
  const int64_t group = c.num_attention_heads / c.num_key_value_heads;
  if (c.head_dim != 16 && c.head_dim != 32 && c.head_dim != 64 && c.head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat("device cuda: head_dim = ", c.head_dim,
                                                   " is not supported (16, 32, 64 or 128)"));
  }
  if (64 % group != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device cuda: num_attention_heads / num_key_value_heads = ", group, " must divide 64"));
  }
  if (c.num_moe_layers() > 0 &&
      (c.num_experts > 1024 || c.n_group > 32 || c.num_experts_per_tok > 32)) {
    return absl::InvalidArgumentError(
        absl::StrCat("device cuda: num_experts = ", c.num_experts, ", n_group = ", c.n_group,
                     ", num_experts_per_tok = ", c.num_experts_per_tok,
                     ": the GPU routers take at most 1024 experts, 32 groups and top-32"));
  }
  std::unique_ptr<GpuModel> m(new GpuModel());
  m->matrix_dtype_ = matrix_dtype;
  m->cuda_graphs_ = cuda_graphs;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&m->stream_, cudaStreamNonBlocking,
                                                    cuda::HighestStreamPriority()));
  ASSIGN_OR_RETURN(m->side_, cuda::SideStream::Create());
  ASSIGN_OR_RETURN(m->gemm_, cuda::Gemm::Create(m->stream_));
  ASSIGN_OR_RETURN(m->side_gemm_, cuda::Gemm::Create(m->side_.stream()));

  const auto start = std::chrono::steady_clock::now();
  int64_t uploaded = 0, total = w.embedding.numel() + w.lm_head.numel();
  for (const LayerWeights& l : w.layers) {
    for (const HostTensor* t :
         {&l.attention.wq, &l.attention.wk, &l.attention.wv, &l.attention.wo, &l.mlp.w13, &l.mlp.w2,
          &l.moe.experts_w13, &l.moe.experts_w2, &l.moe.shared.w13, &l.moe.shared.w2}) {
      total += t->numel();
    }
  }
  // Uploads one tensor, converting matrices to the matrix dtype (norms, router and bias: F32).
  auto upload = [&](const HostTensor& t, DType dtype) -> absl::StatusOr<const void*> {
    if (t.empty()) return nullptr;
    ASSIGN_OR_RETURN(cuda::DeviceBuffer buffer,
                     cuda::DeviceBuffer::Allocate(t.numel() * DTypeSize(dtype)));
    if (t.dtype() == dtype) {
      RETURN_IF_ERROR(cuda::CopyToDevice(t.raw(), t.bytes(), buffer.data()));
    } else {
      // Converted in chunks of 16M elements to bound the host staging memory.
      constexpr int64_t kChunk = int64_t{1} << 24;
      std::vector<uint16_t> bf16;
      std::vector<float> f32;
      for (int64_t begin = 0; begin < t.numel(); begin += kChunk) {
        const int64_t n = std::min(kChunk, t.numel() - begin);
        char* dst = buffer.as<char>() + begin * DTypeSize(dtype);
        if (dtype == DType::kF32) {
          f32.resize(n);
          for (int64_t i = 0; i < n; ++i) f32[i] = Bf16ToFloat(t.data<uint16_t>()[begin + i]);
          RETURN_IF_ERROR(cuda::CopyToDevice(f32.data(), n * sizeof(float), dst));
        } else {
          bf16.resize(n);
          for (int64_t i = 0; i < n; ++i) bf16[i] = FloatToBf16(t.data<float>()[begin + i]);
          RETURN_IF_ERROR(cuda::CopyToDevice(bf16.data(), n * sizeof(uint16_t), dst));
        }
      }
    }
    const void* data = buffer.data();
    m->weight_bytes_ += static_cast<int64_t>(buffer.bytes());
    m->tensors_.push_back(std::move(buffer));
    return data;
  };
  auto matrix = [&](const HostTensor& t) -> absl::StatusOr<MatrixView> {
    ASSIGN_OR_RETURN(const void* data, upload(t, matrix_dtype));
    if (t.empty()) return MatrixView{matrix_dtype, nullptr, 0, 0};
    uploaded += t.numel();
    return MatrixView{matrix_dtype, data, t.dim(0), t.numel() / t.dim(0)};
  };
  auto f32 = [&](const HostTensor& t) -> absl::StatusOr<const float*> {
    ASSIGN_OR_RETURN(const void* data, upload(t, DType::kF32));
    return static_cast<const float*>(data);
  };
  auto experts = [&](const HostTensor& t) -> absl::StatusOr<cuda::ExpertWeightsView> {
    ASSIGN_OR_RETURN(MatrixView all, matrix(t));
    return cuda::ExpertWeightsView{matrix_dtype, all.data, t.dim(0), t.dim(1), t.dim(2)};
  };

  ASSIGN_OR_RETURN(m->embedding_, matrix(w.embedding));
  m->lm_head_ = m->embedding_;
  if (!w.lm_head.empty()) {
    ASSIGN_OR_RETURN(m->lm_head_, matrix(w.lm_head));
  }
  ASSIGN_OR_RETURN(m->final_norm_, f32(w.final_norm));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    Layer layer;
    ASSIGN_OR_RETURN(layer.input_norm, f32(lw.input_norm));
    ASSIGN_OR_RETURN(layer.post_attention_norm, f32(lw.post_attention_norm));
    ASSIGN_OR_RETURN(layer.wq, matrix(lw.attention.wq));
    ASSIGN_OR_RETURN(layer.wk, matrix(lw.attention.wk));
    ASSIGN_OR_RETURN(layer.wv, matrix(lw.attention.wv));
    ASSIGN_OR_RETURN(layer.wo, matrix(lw.attention.wo));
    ASSIGN_OR_RETURN(layer.q_norm, f32(lw.attention.q_norm));
    ASSIGN_OR_RETURN(layer.k_norm, f32(lw.attention.k_norm));
    layer.moe = c.IsMoeLayer(l);
    if (!layer.moe) {
      ASSIGN_OR_RETURN(layer.w13, matrix(lw.mlp.w13));
      ASSIGN_OR_RETURN(layer.w2, matrix(lw.mlp.w2));
    } else {
      ASSIGN_OR_RETURN(const void* router, upload(lw.moe.gate.weight, DType::kF32));
      layer.router = {DType::kF32, router, c.num_experts, c.hidden_size};
      ASSIGN_OR_RETURN(layer.expert_bias, f32(lw.moe.gate.expert_bias));
      ASSIGN_OR_RETURN(layer.experts_w13, experts(lw.moe.experts_w13));
      ASSIGN_OR_RETURN(layer.experts_w2, experts(lw.moe.experts_w2));
      ASSIGN_OR_RETURN(layer.shared_w13, matrix(lw.moe.shared.w13));
      ASSIGN_OR_RETURN(layer.shared_w2, matrix(lw.moe.shared.w2));
    }
    m->layers_.push_back(layer);
    if (l % 5 == 4 || l + 1 == c.num_hidden_layers) {
      MOESERVE_LOG(INFO) << "GPU upload: layer " << l + 1 << "/" << c.num_hidden_layers << ", "
                         << uploaded * 100 / std::max<int64_t>(total, 1) << "% of the matrices";
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MOESERVE_LOG(INFO) << "GPU weights: " << m->weight_bytes_ / (1 << 20) << " MiB in "
                     << DTypeName(matrix_dtype) << " matrices, uploaded in " << seconds << " s";
  return m;
}

absl::StatusOr<ForwardOutput> GpuModel::Forward(const ModelConfig& c,
                                                std::span<SequenceInput> batch,
                                                std::span<const BatchSpan> spans,
                                                ForwardTrace* trace, const GreedyOptions& greedy) {
  absl::MutexLock lock(&mu_);
  const DType a_dtype = matrix_dtype_;
  const size_t a_elem = DTypeSize(a_dtype);
  const int64_t hidden = c.hidden_size, experts = c.num_experts, topk = c.num_experts_per_tok;
  const int64_t layers = c.num_hidden_layers, num_seqs = static_cast<int64_t>(batch.size());
  const int64_t kv_size = c.kv_size();
  int64_t num_tokens = 0, num_full_rows = 0, num_greedy_rows = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    num_tokens += spans[s].num_tokens;
    (batch[s].greedy ? num_greedy_rows : num_full_rows) +=
        static_cast<int64_t>(batch[s].logit_rows.size());
  }
  const int64_t num_logit_rows = num_full_rows + num_greedy_rows;
  ForwardOutput output;
  output.layer_load.resize(layers);
  output.sequences.resize(batch.size());
  for (SequenceRoutingStats& s : output.sequences) {
    s.dropped_tokens.assign(layers, 0);
    s.experts_per_token.resize(layers);
  }
  if (trace != nullptr) {
    *trace = ForwardTrace();
    trace->hidden_in.resize(layers + 1);
    trace->router_logits.resize(layers);
    trace->topk_idx.resize(layers);
    trace->topk_weight.resize(layers);
    trace->plans.resize(layers);
  }
  if (num_tokens == 0) {  // nothing to run; zero load statistics, as the CPU reports them
    const std::vector<SequenceRouting> routing = BatchRouting(batch, spans);
    const std::vector<int32_t> no_load(kNumRoutingModes * experts, 0);
    for (int64_t l = 0; l < layers; ++l) {
      if (!layers_[l].moe) continue;
      LayerRouting routed;
      FillRoutingStats(c, routing, {}, no_load, {}, &routed);
      StoreLayerStats(l, std::move(routed), &output);
    }
    for (size_t s = 0; s < batch.size(); ++s) batch[s].cache->Commit(spans[s].start_pos);
    return output;
  }

  // Host metadata: ids, positions, attention table, routing scopes, logit rows.
  std::vector<int32_t> ids(num_tokens), positions(num_tokens);
  std::vector<cuda::AttentionSequence> attention(layers * num_seqs);  // [layers][num_seqs]
  int64_t max_queries = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const BatchSpan& span = spans[s];
    std::copy(batch[s].token_ids.begin(), batch[s].token_ids.end(), ids.begin() + span.first_row);
    for (int64_t i = 0; i < span.num_tokens; ++i)
      positions[span.first_row + i] = static_cast<int32_t>(span.start_pos + i);
    const int64_t num_keys = span.start_pos + span.num_tokens;
    ASSIGN_OR_RETURN(DeviceKv * kv,
                     EnsureDeviceKv(batch[s].cache, num_keys, layers, kv_size, a_elem, stream_));
    for (int64_t l = 0; l < layers; ++l) {
      cuda::AttentionSequence& a = attention[l * num_seqs + s];
      a.k_cache = kv->at(l, 0, a_elem, kv_size);
      a.v_cache = kv->at(l, 1, a_elem, kv_size);
      a.first_row = static_cast<int32_t>(span.first_row);
      a.num_queries = static_cast<int32_t>(span.num_tokens);
      a.query_start = static_cast<int32_t>(span.start_pos);
      // Block-causal over blocks of block_length; 0 (bidirectional) and lengths past the keys
      // both mean one block of all keys.
      const int64_t block = batch[s].block_length > 0 ? batch[s].block_length : num_keys;
      a.block_length = static_cast<int32_t>(std::max<int64_t>(1, std::min(block, num_keys)));
    }
    max_queries = std::max(max_queries, span.num_tokens);
  }
  const std::vector<SequenceRouting> routing = BatchRouting(batch, spans);
  const ForwardScopes scopes = FormRoutingScopes(c, num_tokens, routing);
  std::vector<int32_t> row_offsets{0}, scope_rows, capacity, selected_offsets{0};
  std::vector<uint8_t> renormalize;
  for (const ExpertChoiceScope& scope : scopes.expert_choice) {
    scope_rows.insert(scope_rows.end(), scope.rows.begin(), scope.rows.end());
    row_offsets.push_back(static_cast<int32_t>(scope_rows.size()));
    capacity.push_back(static_cast<int32_t>(scope.capacity));
    selected_offsets.push_back(selected_offsets.back() + capacity.back());
    renormalize.push_back(scope.weighting == ExpertChoiceWeighting::kRenormalized);
  }
  std::vector<int32_t> logit_rows;  // full rows first, then greedy rows
  for (bool greedy_pass : {false, true}) {
    for (int64_t s = 0; s < num_seqs; ++s) {
      if (batch[s].greedy != greedy_pass) continue;
      for (int32_t r : batch[s].logit_rows)
        logit_rows.push_back(static_cast<int32_t>(spans[s].first_row + r));
    }
  }

  MetadataPacker packer;
  const size_t at_ids = packer.Place<int32_t>(ids);
  const size_t at_positions = packer.Place<int32_t>(positions);
  const size_t at_attention = packer.Place<cuda::AttentionSequence>(attention);
  const size_t at_tc_rows = packer.Place<int32_t>(scopes.token_choice_rows);
  const size_t at_row_offsets = packer.Place<int32_t>(row_offsets);
  const size_t at_scope_rows = packer.Place<int32_t>(scope_rows);
  const size_t at_capacity = packer.Place<int32_t>(capacity);
  const size_t at_selected_offsets = packer.Place<int32_t>(selected_offsets);
  const size_t at_renormalize = packer.Place<uint8_t>(renormalize);
  const size_t at_row_mode = packer.Place<int8_t>(scopes.row_mode);
  const bool plan_beside = c.num_moe_layers() > 0 && scopes.token_choice_rows.empty() &&
                           !scopes.expert_choice.empty() && cuda::ScopesInRowOrder(scope_rows);
  const size_t at_uniform_offsets = packer.Place<int32_t>(
      plan_beside ? cuda::UniformExpertOffsets(experts, selected_offsets.back())
                  : std::vector<int32_t>());
  // Last: the logit rows change every denoising step and only the eager tail reads them, so no
  // graph's key holds their size (the offsets before them must not move with it).
  const size_t at_logit_rows = packer.Place<int32_t>(logit_rows);
  if (metadata_.bytes() < packer.bytes().size()) {
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    DropGraphs();  // they read the old buffer
    metadata_ = cuda::DeviceBuffer();
    ASSIGN_OR_RETURN(metadata_, cuda::DeviceBuffer::Allocate(packer.bytes().size() * 2));
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(metadata_.data(), packer.bytes().data(),
                                       packer.bytes().size(), cudaMemcpyHostToDevice, stream_));

  Workspace ws;
  const char* meta = metadata_.as<char>();
  ws.ids = reinterpret_cast<const int32_t*>(meta + at_ids);
  ws.positions = reinterpret_cast<const int32_t*>(meta + at_positions);
  ws.sequences = reinterpret_cast<const cuda::AttentionSequence*>(meta + at_attention);
  ws.tc_rows = reinterpret_cast<const int32_t*>(meta + at_tc_rows);
  ws.scopes.num_scopes = static_cast<int64_t>(scopes.expert_choice.size());
  ws.scopes.row_offsets = reinterpret_cast<const int32_t*>(meta + at_row_offsets);
  ws.scopes.rows = reinterpret_cast<const int32_t*>(meta + at_scope_rows);
  ws.scopes.capacity = reinterpret_cast<const int32_t*>(meta + at_capacity);
  ws.scopes.selected_offsets = reinterpret_cast<const int32_t*>(meta + at_selected_offsets);
  for (const ExpertChoiceScope& scope : scopes.expert_choice) {
    ws.scopes.max_scope_rows =
        std::max<int64_t>(ws.scopes.max_scope_rows, static_cast<int64_t>(scope.rows.size()));
  }
  ws.scopes.total_capacity = selected_offsets.back();
  ws.renormalize = reinterpret_cast<const uint8_t*>(meta + at_renormalize);
  ws.row_mode = reinterpret_cast<const int8_t*>(meta + at_row_mode);
  ws.logit_rows = reinterpret_cast<const int32_t*>(meta + at_logit_rows);
  ws.num_sequences = num_seqs;
  ws.max_queries = max_queries;
  ws.num_tc_rows = static_cast<int64_t>(scopes.token_choice_rows.size());
  ws.num_assignments = ws.num_tc_rows * topk + experts * ws.scopes.total_capacity;
  ws.load_stride = 2 * experts + num_tokens;

  // Device workspace, carved twice: to measure, then over the (grown) buffer.
  const int64_t width =
      std::max({c.intermediate_size, c.moe_intermediate_size, c.shared_expert_width()});
  cuda::AttentionArgs attention_shape;  // the launch shape every layer's attention has
  attention_shape.num_sequences = num_seqs;
  attention_shape.max_queries = max_queries;
  attention_shape.num_heads = c.num_attention_heads;
  attention_shape.num_kv_heads = c.num_key_value_heads;
  attention_shape.head_dim = c.head_dim;
  attention_shape.kv_dtype = a_dtype;
  attention_shape.num_tokens = num_tokens;
  auto carve = [&](Carver& cv) {
    ws.x = cv.Take<float>(num_tokens * hidden);
    ws.h_f32 = cv.Take<float>(num_tokens * hidden);
    ws.h = a_dtype == DType::kF32 ? static_cast<void*>(ws.h_f32)
                                  : cv.TakeBytes(num_tokens * hidden * a_elem);
    ws.q = cv.Take<float>(num_tokens * c.q_size());
    ws.k = cv.Take<float>(num_tokens * kv_size);
    ws.v = cv.Take<float>(num_tokens * kv_size);
    ws.attn = cv.TakeBytes(num_tokens * c.q_size() * a_elem);
    ws.attn_workspace_bytes = cuda::AttentionWorkspaceBytes(attention_shape);
    ws.attn_workspace = cv.TakeBytes(ws.attn_workspace_bytes);
    ws.gate_up = cv.TakeBytes(num_tokens * 2 * width * a_elem);
    ws.act = cv.TakeBytes(num_tokens * width * a_elem);
    ws.shared_out = cv.Take<float>(num_tokens * hidden);
    if (c.num_moe_layers() > 0) {
      ws.router_logits = cv.Take<float>(num_tokens * experts);
      ws.topk_idx = cv.Take<int32_t>(ws.num_tc_rows * topk);
      ws.topk_weight = cv.Take<float>(ws.num_tc_rows * topk);
      ws.selected = cv.Take<int32_t>(experts * ws.scopes.total_capacity);
      ws.ec_workspace_bytes =
          cuda::ExpertChoiceWorkspaceBytes(cuda::LogitsLayout::kTokenMajor, num_tokens, experts);
      ws.ec_workspace = cv.TakeBytes(ws.ec_workspace_bytes);
      ws.plan = {num_tokens, experts, ws.num_assignments};
      ws.plan.expert_offsets = cv.Take<int32_t>(experts + 1);
      ws.plan.token_idx = cv.Take<int32_t>(ws.num_assignments);
      ws.plan.weight = cv.Take<float>(ws.num_assignments);
      ws.plan.token_offsets = cv.Take<int32_t>(num_tokens + 1);
      ws.plan.token_assignments = cv.Take<int32_t>(ws.num_assignments);
      ws.plan_beside = plan_beside;
      if (plan_beside) {
        const cuda::ExpertChoiceSelections ec{ws.scopes, ws.selected};
        ws.selection_plan = cuda::SelectionPlan(
            ec, num_tokens, experts, reinterpret_cast<const int32_t*>(meta + at_uniform_offsets));
      }
      ws.plan_workspace_bytes = cuda::BuildRoutingPlanWorkspaceBytes(num_tokens, experts);
      ws.plan_workspace = cv.TakeBytes(ws.plan_workspace_bytes);
      ws.experts_workspace_bytes = cuda::MoeExpertsWorkspaceBytes(
          a_dtype, ws.num_assignments, experts, hidden, c.moe_intermediate_size);
      ws.experts_workspace = cv.TakeBytes(ws.experts_workspace_bytes);
      ws.expert_out = cv.TakeBytes(ws.num_assignments * hidden * a_elem);
      ws.load = cv.Take<int32_t>(layers * ws.load_stride);
    }
    ws.rows_x = cv.Take<float>(num_logit_rows * hidden);
    ws.rows_h = a_dtype == DType::kF32 ? static_cast<void*>(ws.rows_x)
                                       : cv.TakeBytes(num_logit_rows * hidden * a_elem);
    ws.logits = cv.Take<float>(num_logit_rows * c.vocab_size);
    ws.greedy_token = cv.Take<int32_t>(num_greedy_rows);
    ws.greedy_prob = cv.Take<float>(num_greedy_rows);
  };
  Carver measure(nullptr);
  carve(measure);
  if (workspace_.bytes() < measure.size()) {
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    DropGraphs();  // they use the old buffer
    workspace_ = cuda::DeviceBuffer();
    ASSIGN_OR_RETURN(workspace_, cuda::DeviceBuffer::Allocate(measure.size()));
  }
  Carver cv(workspace_.data());
  carve(cv);

  auto gemm = [&](const void* x, int64_t rows, const MatrixView& w, DType y_dtype, void* y,
                  float beta) {
    return gemm_->Run({a_dtype, x, w.cols, rows, w, y_dtype, y, w.rows, beta});
  };
  auto norm = [&](const float* x, int64_t rows, const float* weight, float* out_f32, void* out_a) {
    cuda::RmsNormArgs args{x,           rows,   hidden,
                           DType::kF32, weight, static_cast<float>(c.rms_norm_eps)};
    args.out_f32 = out_f32;
    if (a_dtype == DType::kBF16) args.out_bf16 = static_cast<__nv_bfloat16*>(out_a);
    if (a_dtype == DType::kF32) args.out_f32 = static_cast<float*>(out_a);
    return cuda::RmsNorm(args, stream_);
  };
  auto download = [&](const void* device, size_t count, auto* host) -> absl::Status {
    using T = std::remove_pointer_t<decltype(host)>;
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    if (count == 0) return absl::OkStatus();
    return cuda::CopyToHost(device, count * sizeof(T), host);
  };

  // The device work of the embedding and every layer: no host round trip on the graphable path.
  auto run_layers = [&]() -> absl::Status {
    RETURN_IF_ERROR(cuda::Embedding(embedding_, ws.ids, num_tokens, ws.x, stream_));
    for (int64_t l = 0; l < layers; ++l) {
      const Layer& layer = layers_[l];
      if (trace != nullptr) {
        trace->hidden_in[l].resize(num_tokens * hidden);
        RETURN_IF_ERROR(download(ws.x, num_tokens * hidden, trace->hidden_in[l].data()));
      }
      // Attention.
      RETURN_IF_ERROR(norm(ws.x, num_tokens, layer.input_norm, nullptr, ws.h));
      RETURN_IF_ERROR(gemm(ws.h, num_tokens, layer.wq, DType::kF32, ws.q, 0.0f));
      RETURN_IF_ERROR(gemm(ws.h, num_tokens, layer.wk, DType::kF32, ws.k, 0.0f));
      RETURN_IF_ERROR(gemm(ws.h, num_tokens, layer.wv, DType::kF32, ws.v, 0.0f));
      const float theta = static_cast<float>(c.rope_theta),
                  eps = static_cast<float>(c.rms_norm_eps);
      RETURN_IF_ERROR(
          cuda::QkNormRope({ws.q, ws.positions, num_tokens, c.num_attention_heads, c.head_dim,
                            c.rotary_dim, theta, DType::kF32, layer.q_norm, eps},
                           stream_));
      RETURN_IF_ERROR(
          cuda::QkNormRope({ws.k, ws.positions, num_tokens, c.num_key_value_heads, c.head_dim,
                            c.rotary_dim, theta, DType::kF32, layer.k_norm, eps},
                           stream_));
      const cuda::AttentionSequence* table = ws.sequences + l * num_seqs;
      RETURN_IF_ERROR(
          cuda::AppendKv({ws.k, ws.v, table, num_seqs, max_queries, kv_size, a_dtype}, stream_));
      cuda::AttentionArgs attn = attention_shape;
      attn.q = ws.q;
      attn.sequences = table;
      attn.workspace = ws.attn_workspace;
      attn.workspace_bytes = ws.attn_workspace_bytes;
      if (a_dtype == DType::kF32) attn.out = static_cast<float*>(ws.attn);
      if (a_dtype == DType::kBF16) attn.out_bf16 = static_cast<__nv_bfloat16*>(ws.attn);
      RETURN_IF_ERROR(cuda::Attention(attn, stream_));
      RETURN_IF_ERROR(gemm(ws.attn, num_tokens, layer.wo, DType::kF32, ws.x, 1.0f));

      // MLP or MoE.
      if (!layer.moe) {
        RETURN_IF_ERROR(norm(ws.x, num_tokens, layer.post_attention_norm, nullptr, ws.h));
        RETURN_IF_ERROR(Mlp(*gemm_, ws, num_tokens, layer.w13, layer.w2, ws.x, 1.0f));
      } else {
        RETURN_IF_ERROR(norm(ws.x, num_tokens, layer.post_attention_norm, ws.h_f32, ws.h));
        RETURN_IF_ERROR(MoeBlock(c, layer, l, ws, num_tokens, trace));
      }
    }
    return absl::OkStatus();
  };
  // Everything those launches take from the host besides the model's own buffers: the sizes, the
  // metadata's layout and the two buffers' addresses (the workspace is carved from the sizes).
  std::vector<int64_t> shape;
  const bool host_free = c.num_moe_layers() == 0 ||
                         cuda::MoeExpertsFused(a_dtype, experts, hidden, c.moe_intermediate_size);
  if (cuda_graphs_ && trace == nullptr && host_free) {
    shape = {num_tokens,
             num_seqs,
             max_queries,
             ws.num_tc_rows,
             ws.scopes.num_scopes,
             ws.scopes.max_scope_rows,
             ws.scopes.total_capacity,
             ws.num_assignments,
             static_cast<int64_t>(reinterpret_cast<uintptr_t>(metadata_.data())),
             static_cast<int64_t>(reinterpret_cast<uintptr_t>(workspace_.data()))};
    shape.push_back(plan_beside);
    for (size_t at :
         {at_positions, at_attention, at_tc_rows, at_row_offsets, at_scope_rows, at_capacity,
          at_selected_offsets, at_renormalize, at_row_mode, at_uniform_offsets}) {
      shape.push_back(static_cast<int64_t>(at));
    }
  }
  ASSIGN_OR_RETURN(output.launch, RunLayers(std::move(shape), run_layers));
  for (int64_t s = 0; s < num_seqs; ++s) {
    batch[s].cache->Commit(spans[s].start_pos + batch[s].commit_tokens);
  }

  // Final norm and lm_head for the rows asked for (all rows' norm when tracing).
  if (trace != nullptr) {
    RETURN_IF_ERROR(cuda::RmsNorm({ws.x, num_tokens, hidden, DType::kF32, final_norm_,
                                   static_cast<float>(c.rms_norm_eps), ws.h_f32},
                                  stream_));
    trace->hidden_in[layers].resize(num_tokens * hidden);
    RETURN_IF_ERROR(download(ws.h_f32, num_tokens * hidden, trace->hidden_in[layers].data()));
  }
  if (num_logit_rows > 0) {
    RETURN_IF_ERROR(cuda::GatherRows(
        {DType::kF32, ws.x, hidden, ws.logit_rows, num_logit_rows, ws.rows_x}, stream_));
    cuda::RmsNormArgs args{ws.rows_x,   num_logit_rows, hidden,
                           DType::kF32, final_norm_,    static_cast<float>(c.rms_norm_eps)};
    if (a_dtype == DType::kF32) args.out_f32 = ws.rows_x;
    if (a_dtype == DType::kBF16) args.out_bf16 = static_cast<__nv_bfloat16*>(ws.rows_h);
    RETURN_IF_ERROR(cuda::RmsNorm(args, stream_));
    RETURN_IF_ERROR(gemm_->Run({a_dtype, ws.rows_h, hidden, num_logit_rows, lm_head_, DType::kF32,
                                ws.logits, c.vocab_size, 0.0f}));
  }
  if (num_greedy_rows > 0) {
    cuda::ArgmaxArgs args{ws.logits + num_full_rows * c.vocab_size,
                          num_greedy_rows,
                          greedy.num_ids > 0 ? greedy.num_ids : c.vocab_size,
                          greedy.excluded_token,
                          ws.greedy_token,
                          ws.greedy_prob};
    args.row_stride = c.vocab_size;
    RETURN_IF_ERROR(cuda::ArgmaxWithProb(args, stream_));
  }
  output.logits.resize(num_full_rows * c.vocab_size);
  RETURN_IF_ERROR(download(ws.logits, output.logits.size(), output.logits.data()));
  std::vector<int32_t> tokens(num_greedy_rows);
  std::vector<float> probs(num_greedy_rows);
  RETURN_IF_ERROR(download(ws.greedy_token, tokens.size(), tokens.data()));
  RETURN_IF_ERROR(download(ws.greedy_prob, probs.size(), probs.data()));
  for (int64_t r = 0; r < num_greedy_rows; ++r) output.greedy.push_back({tokens[r], probs[r]});

  // Load statistics of every MoE layer, counted on the device.
  if (c.num_moe_layers() > 0) {
    std::vector<int32_t> load(layers * ws.load_stride);
    RETURN_IF_ERROR(download(ws.load, load.size(), load.data()));
    for (int64_t l = 0; l < layers; ++l) {
      if (!layers_[l].moe) continue;
      const int32_t* slot = load.data() + l * ws.load_stride;
      LayerRouting routed;
      FillRoutingStats(c, routing, scopes.row_mode, std::span<const int32_t>(slot, 2 * experts),
                       std::span<const int32_t>(slot + 2 * experts, num_tokens), &routed);
      StoreLayerStats(l, std::move(routed), &output);
    }
  }
  return output;
}

void GpuModel::SetCudaGraphs(bool enabled) {
  absl::MutexLock lock(&mu_);
  cuda_graphs_ = enabled;
}

void GpuModel::DropGraphs() {
  // An executable graph still running is freed once it completes.
  for (auto& [shape, graph] : graphs_) {
    if (graph.exec != nullptr) cudaGraphExecDestroy(graph.exec);
  }
  graphs_.clear();
}

absl::StatusOr<ForwardLaunch> GpuModel::RunLayers(std::vector<int64_t> shape,
                                                  absl::FunctionRef<absl::Status()> layers) {
  if (shape.empty()) {
    RETURN_IF_ERROR(layers());
    return ForwardLaunch::kEager;
  }
  auto it = graphs_.find(shape);
  if (it == graphs_.end()) {
    if (graphs_.size() >= kMaxGraphs) {
      auto oldest = graphs_.begin();
      for (auto g = graphs_.begin(); g != graphs_.end(); ++g) {
        if (g->second.last_use < oldest->second.last_use) oldest = g;
      }
      if (oldest->second.exec != nullptr) cudaGraphExecDestroy(oldest->second.exec);
      graphs_.erase(oldest);
    }
    it = graphs_.emplace(std::move(shape), Graph{}).first;
  }
  Graph& graph = it->second;
  graph.last_use = ++graph_clock_;
  if (graph.exec != nullptr) {
    CUDA_RETURN_IF_ERROR(cudaGraphLaunch(graph.exec, stream_));
    return ForwardLaunch::kReplayed;
  }
  if (graph.failed || ++graph.sightings < 2) {
    RETURN_IF_ERROR(layers());
    return ForwardLaunch::kEager;
  }
  // Thread-local capture: other threads' CUDA calls (a cache's allocation, say) stay legal.
  CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  const absl::Status queued = layers();
  cudaGraph_t captured = nullptr;
  cudaError_t error = cudaStreamEndCapture(stream_, &captured);
  if (queued.ok() && error == cudaSuccess) {
    error = cudaGraphInstantiate(&graph.exec, captured, cuda::kGraphInstantiateFlags);
  }
  if (captured != nullptr) cudaGraphDestroy(captured);
  if (!queued.ok() || error != cudaSuccess) {
    // Nothing captured has run: the forward runs eagerly, and so does this shape from now on.
    cudaGetLastError();
    graph.exec = nullptr;
    graph.failed = true;
    MOESERVE_LOG(WARNING) << "CUDA graph capture of a forward failed ("
                          << (queued.ok() ? cudaGetErrorString(error) : queued.message())
                          << "); that batch shape runs without a graph";
    RETURN_IF_ERROR(layers());
    return ForwardLaunch::kEager;
  }
  CUDA_RETURN_IF_ERROR(cudaGraphLaunch(graph.exec, stream_));
  return ForwardLaunch::kCaptured;
}

absl::Status GpuModel::Mlp(cuda::Gemm& gemm, Workspace& ws, int64_t num_tokens,
                           const MatrixView& w13, const MatrixView& w2, float* out, float beta) {
  const DType a_dtype = matrix_dtype_;
  RETURN_IF_ERROR(
      gemm.Run({a_dtype, ws.h, w13.cols, num_tokens, w13, a_dtype, ws.gate_up, w13.rows, 0.0f}));
  cuda::SwiGluArgs args{a_dtype, ws.gate_up, num_tokens, w13.rows / 2};
  if (a_dtype == DType::kF32) args.out_f32 = static_cast<float*>(ws.act);
  if (a_dtype == DType::kBF16) args.out_bf16 = static_cast<__nv_bfloat16*>(ws.act);
  RETURN_IF_ERROR(cuda::SwiGlu(args, gemm.stream()));
  return gemm.Run({a_dtype, ws.act, w2.cols, num_tokens, w2, DType::kF32, out, w2.rows, beta});
}

absl::Status GpuModel::MoeBlock(const ModelConfig& c, const Layer& layer, int64_t l, Workspace& ws,
                                int64_t num_tokens, ForwardTrace* trace) {
  const DType a_dtype = matrix_dtype_;
  const int64_t hidden = c.hidden_size, experts = c.num_experts, topk = c.num_experts_per_tok;
  const float scale = static_cast<float>(c.routed_scaling_factor);
  // The shared expert reads only ws.h: it runs on the side stream, beside the router and the
  // routed experts (its output's one reader is the combine, after the join below).
  SideWork side_work(side_, stream_);
  const float* shared = nullptr;
  if (layer.shared_w13.rows > 0) {
    RETURN_IF_ERROR(side_work.Fork());
    RETURN_IF_ERROR(
        Mlp(*side_gemm_, ws, num_tokens, layer.shared_w13, layer.shared_w2, ws.shared_out, 0.0f));
    shared = ws.shared_out;
  }
  // Router logits in full float32: their rounding decides routing.
  RETURN_IF_ERROR(gemm_->Run({DType::kF32, ws.h_f32, hidden, num_tokens, layer.router, DType::kF32,
                              ws.router_logits, experts, 0.0f}));
  cuda::TokenChoiceSelections tc{ws.tc_rows, ws.num_tc_rows, topk, ws.topk_idx, ws.topk_weight};
  if (ws.num_tc_rows > 0) {
    const cpu::TokenChoiceParams params{experts,          topk, c.n_group, c.topk_group,
                                        c.norm_topk_prob, scale};
    RETURN_IF_ERROR(cuda::TokenChoiceRoute(params,
                                           {ws.router_logits, layer.expert_bias, ws.tc_rows,
                                            ws.num_tc_rows, ws.topk_idx, ws.topk_weight},
                                           stream_));
  }
  cuda::ExpertChoiceSelections ec{ws.scopes, ws.selected, ws.renormalize, ws.router_logits, scale};
  if (ws.scopes.num_scopes > 0) {
    cuda::ExpertChoiceSelectArgs args;
    args.logits = ws.router_logits;
    args.num_tokens = num_tokens;
    args.num_experts = experts;
    args.scopes = ws.scopes;
    args.selected = ws.selected;
    args.workspace = ws.ec_workspace;
    args.workspace_bytes = ws.ec_workspace_bytes;
    RETURN_IF_ERROR(cuda::ExpertChoiceSelect(args, stream_));
  }
  // The plan: its CSR part (what the experts read) on this stream, then the row pass and the load
  // counters beside the experts, on the side stream, joined before the combine (the plan's other
  // reader). When the selection is the CSR part (SelectionPlan), all of the build goes beside.
  cuda::BuildRoutingPlanArgs build;
  build.token_choice = ws.num_tc_rows > 0 ? &tc : nullptr;
  build.expert_choice = ws.scopes.num_scopes > 0 ? &ec : nullptr;
  build.plan = ws.plan;
  build.workspace = ws.plan_workspace;
  build.workspace_bytes = ws.plan_workspace_bytes;
  if (!ws.plan_beside) RETURN_IF_ERROR(cuda::BuildRoutingPlanCsr(build, stream_));
  RETURN_IF_ERROR(side_work.Fork());
  if (ws.plan_beside) RETURN_IF_ERROR(cuda::BuildRoutingPlanCsr(build, side_.stream()));
  RETURN_IF_ERROR(cuda::FinishRoutingPlan(build, side_.stream()));
  RETURN_IF_ERROR(cuda::RoutingLoadCounts({ws.plan, ws.row_mode, ws.load + l * ws.load_stride,
                                           ws.load + l * ws.load_stride + 2 * experts},
                                          side_.stream()));

  // The cuBLAS path's grouped GEMMs take the per-expert counts on the host: known for
  // expert-choice-only plans (every expert takes the scopes' total capacity), copied back
  // otherwise. The fused path reads them on the device.
  const bool fused = cuda::MoeExpertsFused(a_dtype, experts, hidden, c.moe_intermediate_size);
  ws.expert_offsets.clear();
  if (!fused) {
    ws.expert_offsets.resize(experts + 1);
    if (ws.num_tc_rows > 0) {
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws.expert_offsets.data(), ws.plan.expert_offsets,
                                           (experts + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                           stream_));
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    } else {
      for (int64_t e = 0; e <= experts; ++e)
        ws.expert_offsets[e] = static_cast<int32_t>(e * ws.scopes.total_capacity);
    }
  }

  cuda::MoeExpertsArgs experts_args;
  experts_args.x = ws.h;
  experts_args.plan = ws.plan_beside ? ws.selection_plan : ws.plan;
  experts_args.expert_offsets = ws.expert_offsets;
  experts_args.w13 = layer.experts_w13;
  experts_args.w2 = layer.experts_w2;
  experts_args.expert_out = ws.expert_out;
  experts_args.workspace = ws.experts_workspace;
  experts_args.workspace_bytes = ws.experts_workspace_bytes;
  RETURN_IF_ERROR(cuda::MoeExperts(*gemm_, experts_args));
  RETURN_IF_ERROR(side_work.Join());
  RETURN_IF_ERROR(
      cuda::Combine({ws.plan, a_dtype, ws.expert_out, shared, ws.x, ws.x, hidden}, stream_));

  if (trace != nullptr) {
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    ASSIGN_OR_RETURN(trace->router_logits[l],
                     cuda::Download(ws.router_logits, num_tokens * experts));
    ASSIGN_OR_RETURN(const std::vector<int32_t> rows, cuda::Download(ws.tc_rows, ws.num_tc_rows));
    ASSIGN_OR_RETURN(const std::vector<int32_t> idx,
                     cuda::Download(ws.topk_idx, ws.num_tc_rows * topk));
    ASSIGN_OR_RETURN(const std::vector<float> weight,
                     cuda::Download(ws.topk_weight, ws.num_tc_rows * topk));
    trace->topk_idx[l].assign(num_tokens * topk, -1);
    trace->topk_weight[l].assign(num_tokens * topk, 0.0f);
    for (size_t i = 0; i < rows.size(); ++i) {
      std::copy_n(idx.begin() + i * topk, topk, trace->topk_idx[l].begin() + rows[i] * topk);
      std::copy_n(weight.begin() + i * topk, topk, trace->topk_weight[l].begin() + rows[i] * topk);
    }
    ASSIGN_OR_RETURN(trace->plans[l], cuda::DownloadRoutingPlan(ws.plan));
  }
  return absl::OkStatus();
}

}  // namespace moeserve
