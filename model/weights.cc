#include "model/weights.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace moeserve {
namespace {

MlpWeights AllocateMlp(int64_t hidden, int64_t width, DType dtype) {
  return {HostTensor(dtype, {2 * width, hidden}), HostTensor(dtype, {hidden, width})};
}

// Binds gate_proj/up_proj/down_proj of one SwiGLU MLP (`prefix` ends in '.') into w13/w2 at
// expert slot `slot` (0 for unfused MLPs).
void BindMlp(const std::string& prefix, int64_t hidden, int64_t width, HostTensor* w13,
             HostTensor* w2, int64_t slot, std::vector<TensorBinding>* out) {
  const int64_t n = width * hidden;
  const bool bound = w13 != nullptr;
  auto part = [&](HostTensor* dst, int64_t offset) {
    return bound ? std::vector<TensorPart>{{dst, offset, 0, n}} : std::vector<TensorPart>{};
  };
  out->push_back({prefix + "gate_proj.weight", {width, hidden}, "BF16", part(w13, slot * 2 * n)});
  out->push_back({prefix + "up_proj.weight", {width, hidden}, "BF16", part(w13, slot * 2 * n + n)});
  out->push_back({prefix + "down_proj.weight", {hidden, width}, "BF16", part(w2, slot * n)});
}

}  // namespace

int64_t TensorBinding::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

RouterWeights AllocateRouter(const ModelConfig& c) {
  RouterWeights r{HostTensor(DType::kF32, {c.num_experts, c.hidden_size}),
                  HostTensor(DType::kF32, {c.num_experts})};
  std::fill_n(r.expert_bias.data<float>(), c.num_experts, 0.0f);
  return r;
}

ModelWeights AllocateWeights(const ModelConfig& c, DType matrix_dtype) {
  const DType f32 = DType::kF32;
  const int64_t h = c.hidden_size;
  ModelWeights w;
  w.embedding = HostTensor(matrix_dtype, {c.vocab_size, h});
  w.final_norm = HostTensor(f32, {h});
  if (!c.tie_word_embeddings) w.lm_head = HostTensor(matrix_dtype, {c.vocab_size, h});
  w.layers.resize(c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& layer = w.layers[l];
    layer.input_norm = HostTensor(f32, {h});
    layer.post_attention_norm = HostTensor(f32, {h});
    AttentionWeights& a = layer.attention;
    a.wq = HostTensor(matrix_dtype, {c.q_size(), h});
    a.wk = HostTensor(matrix_dtype, {c.kv_size(), h});
    a.wv = HostTensor(matrix_dtype, {c.kv_size(), h});
    a.wo = HostTensor(matrix_dtype, {h, c.q_size()});
    a.q_norm = HostTensor(f32, {c.head_dim});
    a.k_norm = HostTensor(f32, {c.head_dim});
    if (!c.IsMoeLayer(l)) {
      layer.mlp = AllocateMlp(h, c.intermediate_size, matrix_dtype);
      continue;
    }
    MoeWeights& m = layer.moe;
    const int64_t width = c.moe_intermediate_size;
    m.gate = AllocateRouter(c);
    m.experts_w13 = HostTensor(matrix_dtype, {c.num_experts, 2 * width, h});
    m.experts_w2 = HostTensor(matrix_dtype, {c.num_experts, h, width});
    if (c.num_shared_experts > 0) m.shared = AllocateMlp(h, c.shared_expert_width(), matrix_dtype);
  }
  return w;
}

std::vector<TensorBinding> BindCheckpointTensors(const ModelConfig& c, ModelWeights* w) {
  std::vector<TensorBinding> out;
  const int64_t h = c.hidden_size;
  auto whole = [w](HostTensor* dst) {
    return w ? std::vector<TensorPart>{{dst, 0, 0, dst->numel()}} : std::vector<TensorPart>{};
  };
  auto add = [&](std::string name, std::vector<int64_t> shape, HostTensor* dst,
                 std::string dtype = "BF16") {
    out.push_back({std::move(name), std::move(shape), std::move(dtype), whole(dst)});
  };
  auto layer_ptr = [w](int64_t l) { return w ? &w->layers[l] : nullptr; };
#define MOESERVE_FIELD(ptr, member) ((ptr) ? &(ptr)->member : nullptr)

  add("model.word_embeddings.weight", {c.vocab_size, h}, MOESERVE_FIELD(w, embedding));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights* layer = layer_ptr(l);
    const std::string p = absl::StrCat("model.layers.", l, ".");
    add(p + "input_layernorm.weight", {h}, MOESERVE_FIELD(layer, input_norm));
    add(p + "post_attention_layernorm.weight", {h}, MOESERVE_FIELD(layer, post_attention_norm));
    AttentionWeights* a = MOESERVE_FIELD(layer, attention);
    // query_key_value: q rows, then k rows, then v rows.
    TensorBinding qkv{
        p + "attention.query_key_value.weight", {c.q_size() + 2 * c.kv_size(), h}, "BF16", {}};
    if (a) {
      qkv.parts = {{&a->wq, 0, 0, c.q_size() * h},
                   {&a->wk, 0, c.q_size() * h, c.kv_size() * h},
                   {&a->wv, 0, (c.q_size() + c.kv_size()) * h, c.kv_size() * h}};
    }
    out.push_back(std::move(qkv));
    add(p + "attention.dense.weight", {h, c.q_size()}, MOESERVE_FIELD(a, wo));
    add(p + "attention.query_layernorm.weight", {c.head_dim}, MOESERVE_FIELD(a, q_norm));
    add(p + "attention.key_layernorm.weight", {c.head_dim}, MOESERVE_FIELD(a, k_norm));
    if (!c.IsMoeLayer(l)) {
      MlpWeights* mlp = MOESERVE_FIELD(layer, mlp);
      BindMlp(p + "mlp.", h, c.intermediate_size, MOESERVE_FIELD(mlp, w13), MOESERVE_FIELD(mlp, w2),
              0, &out);
      continue;
    }
    MoeWeights* m = MOESERVE_FIELD(layer, moe);
    RouterWeights* gate = MOESERVE_FIELD(m, gate);
    add(p + "mlp.gate.weight", {c.num_experts, h}, MOESERVE_FIELD(gate, weight));
    if (c.moe_router_enable_expert_bias) {
      add(p + "mlp.gate.expert_bias", {c.num_experts}, MOESERVE_FIELD(gate, expert_bias), "F32");
    }
    for (int64_t e = 0; e < c.num_experts; ++e) {
      BindMlp(absl::StrCat(p, "mlp.experts.", e, "."), h, c.moe_intermediate_size,
              MOESERVE_FIELD(m, experts_w13), MOESERVE_FIELD(m, experts_w2), e, &out);
    }
    if (c.num_shared_experts > 0) {
      MlpWeights* shared = MOESERVE_FIELD(m, shared);
      BindMlp(p + "mlp.shared_experts.", h, c.shared_expert_width(), MOESERVE_FIELD(shared, w13),
              MOESERVE_FIELD(shared, w2), 0, &out);
    }
  }
  add("model.norm.weight", {h}, MOESERVE_FIELD(w, final_norm));
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, h}, MOESERVE_FIELD(w, lm_head));
#undef MOESERVE_FIELD
  return out;
}

std::vector<TensorBinding> BindRouterTensors(const ModelConfig& config,
                                             std::vector<RouterWeights>* routers) {
  std::vector<TensorBinding> out;
  for (TensorBinding& b : BindCheckpointTensors(config, nullptr)) {
    const bool weight = b.name.ends_with(".mlp.gate.weight"),
               bias = b.name.ends_with(".mlp.gate.expert_bias");
    if (!weight && !bias) continue;
    const int64_t layer = std::stoll(b.name.substr(std::string("model.layers.").size()));
    RouterWeights& r = (*routers)[layer - config.first_k_dense_replace];
    HostTensor* dst = weight ? &r.weight : &r.expert_bias;
    b.parts = {{dst, 0, 0, dst->numel()}};
    out.push_back(std::move(b));
  }
  return out;
}

int64_t ParameterCount(const ModelConfig& config) {
  int64_t total = 0;
  for (const TensorBinding& b : BindCheckpointTensors(config, nullptr)) total += b.numel();
  return total;
}

}  // namespace moeserve
