// The forward pass with expert-choice routing, against a naive float64 reference written here
// from the weights alone (loop over experts, pick tokens, accumulate), and mixed-mode batches
// against single-sequence forwards.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "gtest/gtest.h"
#include "model/checkpoint.h"
#include "model/model.h"
#include "model/routing.h"
#include "tests/test_util.h"

namespace moeserve {
namespace {

using Vec = std::vector<double>;
const std::string kTinyDir = testing::TestDataDir() + "/llada2-tiny";

double W(const HostTensor& t, int64_t i) { return testing::At(t, i); }

// y[n, rows] = x[n, cols] @ m^T for a [rows, cols] matrix (or slice `slice` of a 3-D tensor).
Vec Linear(const Vec& x, int64_t n, const HostTensor& m, int64_t slice = -1) {
  const bool three = m.shape().size() == 3;
  const int64_t rows = three ? m.dim(1) : m.dim(0), cols = three ? m.dim(2) : m.dim(1);
  const int64_t base = three ? slice * rows * cols : 0;
  Vec y(n * rows, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        y[i * rows + r] += x[i * cols + c] * W(m, base + r * cols + c);
  return y;
}

Vec RmsNorm(const Vec& x, int64_t dim, const HostTensor& w, double eps) {
  Vec y(x.size());
  for (size_t r = 0; r < x.size() / dim; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
    const double inv = 1 / std::sqrt(ss / dim + eps);
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = x[r * dim + i] * inv * W(w, i);
  }
  return y;
}

Vec SwiGluMlp(const Vec& x, int64_t n, const HostTensor& w13, const HostTensor& w2,
              int64_t slice = -1) {
  const Vec gu = Linear(x, n, w13, slice);
  const int64_t width = (w13.shape().size() == 3 ? w13.dim(1) : w13.dim(0)) / 2;
  Vec act(n * width);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < width; ++j) {
      const double g = gu[i * 2 * width + j], u = gu[i * 2 * width + width + j];
      act[i * width + j] = g / (1 + std::exp(-g)) * u;
    }
  return Linear(act, n, w2, slice);
}

struct NaiveResult {
  Vec logits;               // [n, vocab]
  double min_margin = 1e9;  // smallest score gap at any expert's capacity boundary
};

// One sequence, no cache, block-causal attention, every MoE layer expert-choice in request scope
// (each block of the sequence one scope) with renormalized weights.
NaiveResult NaiveExpertChoiceForward(const Model& model, const std::vector<int32_t>& ids,
                                     int64_t block, double cf) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  const int64_t n = static_cast<int64_t>(ids.size()), h = c.hidden_size, hd = c.head_dim;
  NaiveResult result;
  Vec x(n * h);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < h; ++d) x[i * h + d] = W(w.embedding, ids[i] * h + d);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    Vec hn = RmsNorm(x, h, lw.input_norm, c.rms_norm_eps);
    Vec q = RmsNorm(Linear(hn, n, lw.attention.wq), hd, lw.attention.q_norm, c.rms_norm_eps);
    Vec k = RmsNorm(Linear(hn, n, lw.attention.wk), hd, lw.attention.k_norm, c.rms_norm_eps);
    const Vec v = Linear(hn, n, lw.attention.wv);
    for (Vec* t : {&q, &k}) {  // rotate-half RoPE on the first rotary_dim dims of every head
      const int64_t heads = static_cast<int64_t>(t->size()) / (n * hd), half = c.rotary_dim / 2;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t hh = 0; hh < heads; ++hh)
          for (int64_t j = 0; j < half; ++j) {
            const double angle = i * std::pow(c.rope_theta, -2.0 * j / c.rotary_dim);
            double& a = (*t)[(i * heads + hh) * hd + j];
            double& b = (*t)[(i * heads + hh) * hd + j + half];
            const double a0 = a, b0 = b;
            a = a0 * std::cos(angle) - b0 * std::sin(angle);
            b = b0 * std::cos(angle) + a0 * std::sin(angle);
          }
    }
    Vec attn(n * c.q_size(), 0.0);
    const int64_t group = c.num_attention_heads / c.num_key_value_heads;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t hh = 0; hh < c.num_attention_heads; ++hh) {
        const int64_t kv = hh / group;
        Vec s;
        for (int64_t j = 0; j <= (i / block + 1) * block - 1 && j < n; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < hd; ++d)
            dot += q[(i * c.num_attention_heads + hh) * hd + d] *
                   k[(j * c.num_key_value_heads + kv) * hd + d];
          s.push_back(dot / std::sqrt(double(hd)));
        }
        const double mx = *std::max_element(s.begin(), s.end());
        double den = 0;
        for (double& e : s) den += (e = std::exp(e - mx));
        for (size_t j = 0; j < s.size(); ++j)
          for (int64_t d = 0; d < hd; ++d)
            attn[(i * c.num_attention_heads + hh) * hd + d] +=
                s[j] / den * v[(j * c.num_key_value_heads + kv) * hd + d];
      }
    const Vec o = Linear(attn, n, lw.attention.wo);
    for (int64_t i = 0; i < n * h; ++i) x[i] += o[i];
    hn = RmsNorm(x, h, lw.post_attention_norm, c.rms_norm_eps);
    Vec out(n * h, 0.0);
    if (!c.IsMoeLayer(l)) {
      out = SwiGluMlp(hn, n, lw.mlp.w13, lw.mlp.w2);
    } else {
      const MoeWeights& m = lw.moe;
      const Vec logits = Linear(hn, n, m.gate.weight);
      Vec denom(n, 0.0);
      auto score = [&](int64_t t, int64_t e) {
        return 1 / (1 + std::exp(-logits[t * c.num_experts + e]));
      };
      // Request scope: each block of the sequence is its own scope.
      std::vector<std::vector<int64_t>> taken(c.num_experts);
      for (int64_t b0 = 0; b0 < n; b0 += block) {
        const int64_t t_scope = std::min(block, n - b0);
        const int64_t cap = ExpertChoiceCapacity(cf, t_scope, c.num_experts_per_tok, c.num_experts);
        for (int64_t e = 0; e < c.num_experts; ++e) {
          std::vector<int64_t> order(t_scope);
          std::iota(order.begin(), order.end(), b0);
          std::stable_sort(order.begin(), order.end(),
                           [&](int64_t a, int64_t b) { return score(a, e) > score(b, e); });
          taken[e].insert(taken[e].end(), order.begin(), order.begin() + cap);
          if (cap < t_scope)
            result.min_margin =
                std::min(result.min_margin, score(order[cap - 1], e) - score(order[cap], e));
          for (int64_t t = 0; t < cap; ++t) denom[order[t]] += score(order[t], e);
        }
      }
      for (int64_t e = 0; e < c.num_experts; ++e) {
        for (int64_t t : taken[e]) {
          const Vec xt(hn.begin() + t * h, hn.begin() + (t + 1) * h);
          const Vec y = SwiGluMlp(xt, 1, m.experts_w13, m.experts_w2, e);
          const double weight = score(t, e) / denom[t] * c.routed_scaling_factor;
          for (int64_t d = 0; d < h; ++d) out[t * h + d] += weight * y[d];
        }
      }
      const Vec shared = SwiGluMlp(hn, n, m.shared.w13, m.shared.w2);
      for (int64_t i = 0; i < n * h; ++i) out[i] += shared[i];
    }
    for (int64_t i = 0; i < n * h; ++i) x[i] += out[i];
  }
  result.logits = Linear(RmsNorm(x, h, w.final_norm, c.rms_norm_eps), n, w.output_matrix());
  return result;
}

std::vector<int32_t> AllRows(size_t n) {
  std::vector<int32_t> rows(n);
  std::iota(rows.begin(), rows.end(), 0);
  return rows;
}

TEST(ExpertChoiceForwardTest, MatchesNaiveReferenceOnTinyCheckpoint) {
  auto model = Model::Load(kTinyDir);
  ASSERT_TRUE(model.ok()) << model.status();
  const std::vector<int32_t> ids = {481, 147, 81,  222, 291, 17,  300, 5,   42, 99,  7,   256,
                                    311, 12,  499, 3,   511, 511, 511, 511, 88, 511, 511, 511};
  for (double cf : {1.0, 1.25, 2.0}) {
    const NaiveResult ref = NaiveExpertChoiceForward(**model, ids, 8, cf);
    // The comparison means something only if no selection sits on a near-tie.
    ASSERT_GT(ref.min_margin, 1e-5) << "pick other ids: a capacity boundary is a near-tie";
    KvCache cache((*model)->config());
    std::vector<SequenceInput> in(1);
    in[0] = {ids, &cache, 8, 0, AllRows(ids.size()), {RoutingMode::kExpertChoice, cf}};
    auto out = (*model)->Forward(in);
    ASSERT_TRUE(out.ok()) << out.status();
    double max_ref = 0, max_err = 0;
    for (size_t i = 0; i < ref.logits.size(); ++i) {
      max_ref = std::max(max_ref, std::abs(ref.logits[i]));
      max_err = std::max(max_err, std::abs(out->logits[i] - ref.logits[i]));
    }
    std::printf(
        "expert-choice cf %.2f: max rel err vs naive float64 reference %.3e (boundary margin "
        "%.2e)\n",
        cf, max_err / max_ref, ref.min_margin);
    EXPECT_LE(max_err / max_ref, 1e-4) << "cf " << cf;
    // Expert-choice is really in effect: every expert of every MoE layer took exactly C tokens in
    // each of the three 8-token blocks.
    const int64_t cap = 3 * ExpertChoiceCapacity(cf, 8, 4, 16);
    for (int64_t l = 1; l < 3; ++l) {
      const RoutingLoad& load = out->layer_load[l].by_mode[1];
      for (int64_t count : load.tokens_per_expert) EXPECT_EQ(count, cap);
      EXPECT_EQ(load.dropped_tokens, out->sequences[0].dropped_tokens[l]);
    }
  }
}

TEST(ExpertChoiceForwardTest, MixedBatchEqualsEachSequenceAlone) {
  auto config = LoadModelConfig(kTinyDir + "/config.json");
  ASSERT_TRUE(config.ok());
  auto model = Model::FromWeights(*config, RandomWeights(*config, {.seed = 8, .init_std = 0.1}));
  const RoutingOptions tc{};
  const RoutingOptions ec{RoutingMode::kExpertChoice, 1.25};
  const RoutingOptions ec_raw{RoutingMode::kExpertChoice, 2.0, RoutingScope::kRequest,
                              ExpertChoiceWeighting::kRaw};
  std::vector<std::vector<int32_t>> ids = {{1, 2, 3, 4, 5, 6, 7, 8, 9},
                                           {40, 41, 42, 43, 44, 45, 46, 47},
                                           {100, 7, 300},
                                           {9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12}};
  const RoutingOptions options[4] = {tc, ec, ec_raw, ec};
  auto run = [&](const std::vector<size_t>& which) {
    std::vector<KvCache> caches;
    for (size_t i = 0; i < which.size(); ++i) caches.emplace_back(*config);
    std::vector<SequenceInput> in(which.size());
    for (size_t i = 0; i < which.size(); ++i) {
      in[i] = {ids[which[i]], &caches[i], 8, 0, AllRows(ids[which[i]].size()), options[which[i]]};
    }
    auto out = model->Forward(in);
    EXPECT_TRUE(out.ok()) << out.status();
    return *out;
  };
  const ForwardOutput batched = run({0, 1, 2, 3});
  size_t offset = 0;
  for (size_t s = 0; s < 4; ++s) {
    const ForwardOutput alone = run({s});
    const std::vector<float> part(batched.logits.begin() + offset,
                                  batched.logits.begin() + offset + alone.logits.size());
    EXPECT_EQ(part, alone.logits) << "sequence " << s << " (" << RoutingModeName(options[s].mode)
                                  << ")";
    EXPECT_EQ(batched.sequences[s].dropped_tokens, alone.sequences[0].dropped_tokens);
    offset += alone.logits.size();
  }
  // Load is split by mode: 9 token-choice tokens, 23 expert-choice tokens per MoE layer.
  EXPECT_EQ(batched.layer_load[1].by_mode[0].num_tokens, 9);
  EXPECT_EQ(batched.layer_load[1].by_mode[1].num_tokens, 23);
  EXPECT_EQ(batched.layer_load[1].by_mode[0].num_assignments, 9 * 4);
}

TEST(ExpertChoiceForwardTest, RejectsBadRoutingOptionNamingIt) {
  auto config = LoadModelConfig(kTinyDir + "/config.json");
  ASSERT_TRUE(config.ok());
  auto model = Model::FromWeights(*config, RandomWeights(*config, {.seed = 1}));
  KvCache cache(*config);
  const std::vector<int32_t> ids = {1, 2};
  std::vector<SequenceInput> in(1);
  in[0] = {ids, &cache, 0, 0, {}, {RoutingMode::kExpertChoice, std::nan("")}};
  auto out = model->Forward(in);
  ASSERT_FALSE(out.ok());
  EXPECT_NE(std::string(out.status().message()).find("batch[0].routing.capacity_factor"),
            std::string::npos)
      << out.status();
}

}  // namespace
}  // namespace moeserve
