#include "model/model.h"

#include <algorithm>
#include <filesystem>
#include <set>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/swiglu.h"
#include "kernels/util/logging.h"
#include "kernels/util/status_macros.h"
#include "model/checkpoint.h"
#if MOESERVE_HAVE_CUDA
#include "kernels/cuda/cuda_check.h"
#include "model/gpu_model.h"
#else
namespace moeserve {
class GpuModel {};  // no GPU backend in this build: Model::gpu_ stays null
}  // namespace moeserve
#endif

namespace moeserve {
namespace {

// out[n, hidden] += W2 · swiglu(W13 · x)
void DenseMlp(const MlpWeights& mlp, const float* x, int64_t n, float* out) {
  const int64_t width = mlp.w2.dim(1), hidden = mlp.w2.dim(0);
  std::vector<float> gate_up(n * 2 * width), act(n * width), y(n * hidden);
  cpu::Matmul(x, n, AsMatrix(mlp.w13), gate_up.data());
  cpu::SwiGlu(gate_up.data(), n, width, act.data());
  cpu::Matmul(act.data(), n, AsMatrix(mlp.w2), y.data());
  for (int64_t i = 0; i < n * hidden; ++i) out[i] += y[i];
}

}  // namespace

const char* DeviceName(Device device) {
  switch (device) {
    case Device::kCpu:
      return "cpu";
    case Device::kCuda:
      return "cuda";
  }
  return "?";
}

bool CudaAvailable() {
#if MOESERVE_HAVE_CUDA
  return cuda::CudaDeviceAvailable();
#else
  return false;
#endif
}

absl::StatusOr<Device> ParseDevice(absl::string_view text) {
  if (text == "cpu") return Device::kCpu;
  if (text == "cuda") return Device::kCuda;
  if (text == "auto") return CudaAvailable() ? Device::kCuda : Device::kCpu;
  return absl::InvalidArgumentError(
      absl::StrCat("device \"", text, "\" is unknown: cpu, cuda or auto"));
}

Model::Model(ModelConfig config, ModelWeights weights)
    : config_(std::move(config)), weights_(std::move(weights)) {}

Model::~Model() = default;

std::unique_ptr<Model> Model::FromWeights(ModelConfig config, ModelWeights weights) {
  return std::unique_ptr<Model>(new Model(std::move(config), std::move(weights)));
}

absl::StatusOr<std::unique_ptr<Model>> Model::Create(ModelConfig config, ModelWeights weights,
                                                     const ModelOptions& options) {
  switch (options.device) {
    case Device::kCpu:
      return FromWeights(std::move(config), std::move(weights));
    case Device::kCuda: {
#if MOESERVE_HAVE_CUDA
      ASSIGN_OR_RETURN(
          std::unique_ptr<GpuModel> gpu,
          GpuModel::Create(config, weights, options.gpu_matrix_dtype, options.cuda_graphs));
      std::unique_ptr<Model> model(new Model(std::move(config), ModelWeights()));
      model->gpu_ = std::move(gpu);
      return model;
#else
      return absl::FailedPreconditionError(
          "device cuda: this binary was built without the CUDA backend (-DMOESERVE_CUDA=OFF or "
          "no CUDA toolkit)");
#endif
    }
  }
  return absl::InternalError("unknown device");
}

int64_t Model::kv_bytes_per_position() const {
  int64_t element = 4;
#if MOESERVE_HAVE_CUDA
  if (gpu_) element = static_cast<int64_t>(DTypeSize(gpu_->matrix_dtype()));
#endif
  return 2 * config_.num_hidden_layers * config_.kv_size() * element;
}

void Model::SetCudaGraphs(bool enabled) {
#if MOESERVE_HAVE_CUDA
  if (gpu_) gpu_->SetCudaGraphs(enabled);
#else
  (void)enabled;
#endif
}

const char* ForwardLaunchName(ForwardLaunch launch) {
  switch (launch) {
    case ForwardLaunch::kEager:
      return "eager";
    case ForwardLaunch::kCaptured:
      return "captured";
    case ForwardLaunch::kReplayed:
      return "replayed";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const ModelOptions& options) {
  ASSIGN_OR_RETURN(ModelConfig config,
                   LoadModelConfig((std::filesystem::path(dir) / "config.json").string()));
  ASSIGN_OR_RETURN(ModelWeights weights, LoadCheckpointWeights(dir, config));
  return Create(std::move(config), std::move(weights), options);
}

absl::StatusOr<std::vector<BatchSpan>> ValidateBatch(const ModelConfig& c,
                                                     std::span<const SequenceInput> batch) {
  std::vector<BatchSpan> spans;
  std::set<const KvCache*> caches;
  int64_t num_tokens = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    const SequenceInput& seq = batch[s];
    if (seq.cache == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("batch[", s, "].cache is null"));
    if (!caches.insert(seq.cache).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch[", s, "] shares its cache with an earlier sequence"));
    }
    if (absl::Status s_ok = ValidateRoutingOptions(seq.routing); !s_ok.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("batch[", s, "].routing.", s_ok.message()));
    }
    if (seq.block_length < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch[", s, "].block_length = ", seq.block_length, " is negative"));
    }
    const int64_t n = static_cast<int64_t>(seq.token_ids.size());
    for (int64_t i = 0; i < n; ++i) {
      if (seq.token_ids[i] < 0 || seq.token_ids[i] >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("batch[", s, "].token_ids[", i, "] = ", seq.token_ids[i],
                         " is outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    const int64_t start = seq.cache->length();
    if (start + n > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("batch[", s, "]: positions up to ", start + n,
                                                     " exceed max_position_embeddings ",
                                                     c.max_position_embeddings));
    }
    if (seq.commit_tokens < 0 || seq.commit_tokens > n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "batch[", s, "].commit_tokens = ", seq.commit_tokens, " is outside [0, ", n, "]"));
    }
    for (int32_t row : seq.logit_rows) {
      if (row < 0 || row >= n) {
        return absl::InvalidArgumentError(absl::StrCat("batch[", s, "].logit_rows has ", row,
                                                       ", outside the chunk [0, ", n, ")"));
      }
    }
    spans.push_back({num_tokens, n, start});
    num_tokens += n;
  }
  return spans;
}

std::vector<SequenceRouting> BatchRouting(std::span<const SequenceInput> batch,
                                          std::span<const BatchSpan> spans) {
  std::vector<SequenceRouting> routing(batch.size());
  for (size_t s = 0; s < batch.size(); ++s) {
    routing[s] = {spans[s].first_row, spans[s].num_tokens, batch[s].routing, spans[s].start_pos,
                  batch[s].block_length};
  }
  return routing;
}

absl::StatusOr<ForwardOutput> Model::Forward(std::span<SequenceInput> batch, ForwardTrace* trace,
                                             const GreedyOptions& greedy) const {
  ASSIGN_OR_RETURN(const std::vector<BatchSpan> spans, ValidateBatch(config_, batch));
  if (greedy.num_ids < 0 || greedy.num_ids > config_.vocab_size ||
      greedy.excluded_token >= config_.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("greedy options (num_ids ", greedy.num_ids, ", excluded_token ",
                     greedy.excluded_token, ") do not fit the vocabulary ", config_.vocab_size));
  }
#if MOESERVE_HAVE_CUDA
  if (gpu_) return gpu_->Forward(config_, batch, spans, trace, greedy);
#endif
  return ForwardCpu(batch, spans, trace, greedy);
}

absl::StatusOr<ForwardOutput> Model::ForwardCpu(std::span<SequenceInput> batch,
                                                std::span<const BatchSpan> spans,
                                                ForwardTrace* trace,
                                                const GreedyOptions& greedy) const {
  const ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size;
  int64_t num_tokens = 0, num_logit_rows = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    if (batch[s].cache->device_state() != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch[", s, "].cache holds GPU K/V; the CPU forward cannot use it"));
    }
    num_tokens += spans[s].num_tokens;
    num_logit_rows += static_cast<int64_t>(batch[s].logit_rows.size());
  }

  std::vector<int32_t> ids(num_tokens), positions(num_tokens);
  for (size_t s = 0; s < batch.size(); ++s) {
    std::copy(batch[s].token_ids.begin(), batch[s].token_ids.end(),
              ids.begin() + spans[s].first_row);
    for (int64_t i = 0; i < spans[s].num_tokens; ++i)
      positions[spans[s].first_row + i] = spans[s].start_pos + i;
    batch[s].cache->Reserve(spans[s].start_pos + spans[s].num_tokens);
  }
  if (trace != nullptr) {
    *trace = ForwardTrace();
    trace->hidden_in.resize(c.num_hidden_layers + 1);
    trace->router_logits.resize(c.num_hidden_layers);
    trace->topk_idx.resize(c.num_hidden_layers);
    trace->topk_weight.resize(c.num_hidden_layers);
    trace->plans.resize(c.num_hidden_layers);
  }
  ForwardOutput output;
  output.layer_load.resize(c.num_hidden_layers);
  output.sequences.resize(batch.size());
  const std::vector<SequenceRouting> routing = BatchRouting(batch, spans);
  for (size_t s = 0; s < batch.size(); ++s) {
    output.sequences[s].dropped_tokens.assign(c.num_hidden_layers, 0);
    output.sequences[s].experts_per_token.resize(c.num_hidden_layers);
  }

  std::vector<float> x(num_tokens * hidden);  // [num_tokens, hidden_size], the residual stream
  cpu::Embedding(AsMatrix(weights_.embedding), ids.data(), num_tokens, x.data());

  const float eps = static_cast<float>(c.rms_norm_eps);
  std::vector<float> h(num_tokens * hidden);         // [num_tokens, hidden_size]
  std::vector<float> q(num_tokens * c.q_size());     // [num_tokens, num_heads, head_dim]
  std::vector<float> k(num_tokens * c.kv_size());    // [num_tokens, num_kv_heads, head_dim]
  std::vector<float> v(num_tokens * c.kv_size());    // [num_tokens, num_kv_heads, head_dim]
  std::vector<float> attn(num_tokens * c.q_size());  // [num_tokens, num_heads, head_dim]
  std::vector<float> mlp_out(num_tokens * hidden);   // [num_tokens, hidden_size]

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& layer = weights_.layers[l];
    const AttentionWeights& aw = layer.attention;
    if (trace != nullptr) trace->hidden_in[l] = x;

    // Attention.
    cpu::RmsNorm(x.data(), num_tokens, hidden, layer.input_norm.data<float>(), eps, h.data());
    cpu::Matmul(h.data(), num_tokens, AsMatrix(aw.wq), q.data());
    cpu::Matmul(h.data(), num_tokens, AsMatrix(aw.wk), k.data());
    cpu::Matmul(h.data(), num_tokens, AsMatrix(aw.wv), v.data());
    cpu::RmsNorm(q.data(), num_tokens * c.num_attention_heads, c.head_dim, aw.q_norm.data<float>(),
                 eps, q.data());
    cpu::RmsNorm(k.data(), num_tokens * c.num_key_value_heads, c.head_dim, aw.k_norm.data<float>(),
                 eps, k.data());
    const float theta = static_cast<float>(c.rope_theta);
    cpu::ApplyRope({q.data(), positions.data(), num_tokens, c.num_attention_heads, c.head_dim,
                    c.rotary_dim, theta});
    cpu::ApplyRope({k.data(), positions.data(), num_tokens, c.num_key_value_heads, c.head_dim,
                    c.rotary_dim, theta});
    for (size_t s = 0; s < batch.size(); ++s) {
      const BatchSpan& span = spans[s];
      KvCache& cache = *batch[s].cache;
      const int64_t kv = c.kv_size();
      std::copy_n(k.data() + span.first_row * kv, span.num_tokens * kv,
                  cache.keys(l) + span.start_pos * kv);
      std::copy_n(v.data() + span.first_row * kv, span.num_tokens * kv,
                  cache.values(l) + span.start_pos * kv);
      const int64_t num_keys = span.start_pos + span.num_tokens;
      cpu::AttentionArgs args;
      args.q = q.data() + span.first_row * c.q_size();
      args.k = cache.keys(l);
      args.v = cache.values(l);
      args.out = attn.data() + span.first_row * c.q_size();
      args.num_queries = span.num_tokens;
      args.num_keys = num_keys;
      args.query_start = span.start_pos;
      args.num_heads = c.num_attention_heads;
      args.num_kv_heads = c.num_key_value_heads;
      args.head_dim = c.head_dim;
      args.block_length = batch[s].block_length > 0 ? batch[s].block_length : num_keys;
      cpu::Attention(args);
    }
    cpu::Matmul(attn.data(), num_tokens, AsMatrix(aw.wo), h.data());
    for (int64_t i = 0; i < num_tokens * hidden; ++i) x[i] += h[i];

    // MLP or MoE.
    cpu::RmsNorm(x.data(), num_tokens, hidden, layer.post_attention_norm.data<float>(), eps,
                 h.data());
    std::fill(mlp_out.begin(), mlp_out.end(), 0.0f);
    if (!c.IsMoeLayer(l)) {
      DenseMlp(layer.mlp, h.data(), num_tokens, mlp_out.data());
    } else {
      const MoeWeights& moe = layer.moe;
      std::vector<float> logits(num_tokens * c.num_experts);  // [num_tokens, num_experts], fp32
      cpu::Matmul(h.data(), num_tokens, AsMatrix(moe.gate.weight), logits.data());
      LayerRouting routed =
          RouteMoeLayer(c, logits.data(), moe.gate.expert_bias.data<float>(), num_tokens, routing);
      const RoutingPlan& plan = routed.plan;
      if (!moe.shared.w13.empty()) DenseMlp(moe.shared, h.data(), num_tokens, mlp_out.data());
      cpu::MoeExperts({h.data(), &plan, &moe.experts_w13, &moe.experts_w2, mlp_out.data()});
      output.layer_load[l] = std::move(routed.load);
      for (size_t s = 0; s < batch.size(); ++s) {
        output.sequences[s].dropped_tokens[l] = routed.sequence_dropped[s];
        output.sequences[s].experts_per_token[l] = std::move(routed.sequence_experts_per_token[s]);
      }
      if (trace != nullptr) {
        trace->router_logits[l] = std::move(logits);
        trace->topk_idx[l] = std::move(routed.topk_idx);
        trace->topk_weight[l] = std::move(routed.topk_weight);
        trace->plans[l] = std::move(routed.plan);
      }
    }
    for (int64_t i = 0; i < num_tokens * hidden; ++i) x[i] += mlp_out[i];
  }

  for (size_t s = 0; s < batch.size(); ++s) {
    batch[s].cache->Commit(spans[s].start_pos + batch[s].commit_tokens);
  }

  // Final norm and lm_head for the rows asked for (all rows when tracing).
  if (trace != nullptr) {
    trace->hidden_in[c.num_hidden_layers].resize(num_tokens * hidden);
    cpu::RmsNorm(x.data(), num_tokens, hidden, weights_.final_norm.data<float>(), eps,
                 trace->hidden_in[c.num_hidden_layers].data());
  }
  std::vector<float> rows(num_logit_rows * hidden);  // [num_logit_rows, hidden_size]
  int64_t r = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    for (int32_t row : batch[s].logit_rows) {
      cpu::RmsNorm(x.data() + (spans[s].first_row + row) * hidden, 1, hidden,
                   weights_.final_norm.data<float>(), eps, rows.data() + r * hidden);
      ++r;
    }
  }
  std::vector<float> logits(num_logit_rows * c.vocab_size);  // [num_logit_rows, vocab_size]
  cpu::Matmul(rows.data(), num_logit_rows, AsMatrix(weights_.output_matrix()), logits.data());
  const int64_t greedy_ids = greedy.num_ids > 0 ? greedy.num_ids : c.vocab_size;
  r = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    for (size_t i = 0; i < batch[s].logit_rows.size(); ++i, ++r) {
      const float* row = logits.data() + r * c.vocab_size;
      if (batch[s].greedy) {
        output.greedy.push_back(Propose(std::span<const float>(row, greedy_ids), SamplingOptions(),
                                        greedy.excluded_token, nullptr));
      } else {
        output.logits.insert(output.logits.end(), row, row + c.vocab_size);
      }
    }
  }
  return output;
}

}  // namespace moeserve
