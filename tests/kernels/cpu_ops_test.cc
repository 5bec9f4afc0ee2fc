// CPU ops against float64 references written separately here, over grids of shapes with edge
// cases (0 and 1 rows, odd sizes, topk == num_experts).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <ostream>
#include <set>

#include "gtest/gtest.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/swiglu.h"
#include "kernels/cpu/token_choice.h"
#include "kernels/routing_plan.h"
#include "tests/test_util.h"

namespace moeserve {
namespace {

using testing::AllClose;
using testing::At;
using testing::kF32Atol;
using testing::kF32Rtol;
using testing::RandomFloats;
using testing::RandomMatrix;

struct MatmulCase {
  int64_t n, m, k;
  DType dtype;
};
void PrintTo(const MatmulCase& c, std::ostream* os) {
  *os << "n=" << c.n << " m=" << c.m << " k=" << c.k << " " << DTypeName(c.dtype);
}

class MatmulTest : public ::testing::TestWithParam<MatmulCase> {};

TEST_P(MatmulTest, MatchesFloat64Reference) {
  const MatmulCase c = GetParam();
  const HostTensor w = RandomMatrix(c.dtype, {c.m, c.k}, 1);
  const std::vector<float> x = RandomFloats(c.n * c.k, 2);
  std::vector<float> y(c.n * c.m, NAN);
  cpu::Matmul(x.data(), c.n, AsMatrix(w), y.data());
  std::vector<double> ref(c.n * c.m, 0.0);
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t j = 0; j < c.m; ++j)
      for (int64_t p = 0; p < c.k; ++p)
        ref[i * c.m + j] += double(x[i * c.k + p]) * At(w, j * c.k + p);
  EXPECT_TRUE(AllClose(y, ref, kF32Rtol, kF32Atol * c.k));
}

TEST_P(MatmulTest, RowResultDoesNotDependOnBatch) {
  const MatmulCase c = GetParam();
  const int64_t n = c.n + 2;  // the row of interest plus at least one other
  const HostTensor w = RandomMatrix(c.dtype, {c.m, c.k}, 3);
  const std::vector<float> x = RandomFloats(n * c.k, 4);
  std::vector<float> all(n * c.m), one(c.m);
  cpu::Matmul(x.data(), n, AsMatrix(w), all.data());
  const int64_t row = n - 1;
  cpu::Matmul(x.data() + row * c.k, 1, AsMatrix(w), one.data());
  for (int64_t j = 0; j < c.m; ++j) ASSERT_EQ(all[row * c.m + j], one[j]) << "column " << j;
}

INSTANTIATE_TEST_SUITE_P(Grid, MatmulTest, ::testing::ValuesIn([] {
                           std::vector<MatmulCase> cases;
                           for (int64_t n : {0, 1, 3, 17})
                             for (int64_t m : {1, 5, 33, 64})
                               for (int64_t k : {1, 7, 8, 130})
                                 for (DType d : {DType::kF32, DType::kBF16})
                                   cases.push_back({n, m, k, d});
                           return cases;
                         }()));

TEST(MatmulTest, StridedOperands) {
  const int64_t n = 3, m = 4, k = 5, xs = 9, ys = 7;
  const HostTensor w = RandomMatrix(DType::kF32, {m, k}, 5);
  const std::vector<float> x = RandomFloats(n * xs, 6);
  std::vector<float> y(n * ys, -7.0f);
  cpu::Matmul({x.data(), xs, n, AsMatrix(w), y.data(), ys});
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < ys; ++j) {
      if (j >= m) {
        EXPECT_EQ(y[i * ys + j], -7.0f) << "wrote outside the output row";
        continue;
      }
      double ref = 0;
      for (int64_t p = 0; p < k; ++p) ref += double(x[i * xs + p]) * At(w, j * k + p);
      EXPECT_NEAR(y[i * ys + j], ref, 1e-5);
    }
  }
}

TEST(RmsNormTest, MatchesFloat64Reference) {
  for (int64_t dim : {1, 16, 100, 2048}) {
    const int64_t rows = 5;
    const std::vector<float> x = RandomFloats(rows * dim, 7, -3, 3);
    const std::vector<float> w = RandomFloats(dim, 8, 0.5, 1.5);
    std::vector<float> y(rows * dim);
    cpu::RmsNorm(x.data(), rows, dim, w.data(), 1e-6f, y.data());
    std::vector<double> ref(rows * dim);
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += double(x[r * dim + i]) * x[r * dim + i];
      const double inv = 1.0 / std::sqrt(ss / dim + 1e-6);
      for (int64_t i = 0; i < dim; ++i) ref[r * dim + i] = x[r * dim + i] * inv * w[i];
    }
    EXPECT_TRUE(AllClose(y, ref, kF32Rtol, kF32Atol)) << "dim " << dim;
    // In place gives the same result.
    std::vector<float> z = x;
    cpu::RmsNorm(z.data(), rows, dim, w.data(), 1e-6f, z.data());
    EXPECT_EQ(z, y);
  }
}

TEST(RopeTest, MatchesRotateHalfFormula) {
  const int64_t tokens = 4, heads = 3, head_dim = 16;
  for (int64_t rotary : {0, 2, 8, 16}) {
    std::vector<float> x = RandomFloats(tokens * heads * head_dim, 9);
    const std::vector<float> orig = x;
    const std::vector<int32_t> pos = {0, 1, 37, 4095};
    cpu::ApplyRope({x.data(), pos.data(), tokens, heads, head_dim, rotary, 600000.0f});
    std::vector<double> ref(orig.begin(), orig.end());
    const int64_t half = rotary / 2;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const double angle = pos[t] * std::pow(600000.0, -2.0 * i / rotary);
          const int64_t base = (t * heads + h) * head_dim;
          const double a = orig[base + i], b = orig[base + i + half];
          ref[base + i] = a * std::cos(angle) - b * std::sin(angle);
          ref[base + i + half] = b * std::cos(angle) + a * std::sin(angle);
        }
    // Angles up to 4095 rad carry float32 rounding of the angle itself (~2.4e-4 rad).
    EXPECT_TRUE(AllClose(x, ref, 0, 1e-3)) << "rotary_dim " << rotary;
    for (int64_t h = 0; h < heads; ++h)  // position 0 is the identity
      for (int64_t i = 0; i < head_dim; ++i) EXPECT_EQ(x[h * head_dim + i], orig[h * head_dim + i]);
  }
}

struct AttentionCase {
  int64_t num_queries, num_cached, num_heads, num_kv_heads, head_dim, block_length;
};
void PrintTo(const AttentionCase& c, std::ostream* os) {
  *os << "q=" << c.num_queries << " cached=" << c.num_cached << " heads=" << c.num_heads << "/"
      << c.num_kv_heads << " d=" << c.head_dim << " block=" << c.block_length;
}
class AttentionTest : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionTest, MatchesMaskedSoftmaxReference) {
  const AttentionCase c = GetParam();
  const int64_t keys = c.num_cached + c.num_queries;
  const std::vector<float> q = RandomFloats(c.num_queries * c.num_heads * c.head_dim, 10, -2, 2);
  const std::vector<float> k = RandomFloats(keys * c.num_kv_heads * c.head_dim, 11, -2, 2);
  const std::vector<float> v = RandomFloats(keys * c.num_kv_heads * c.head_dim, 12);
  std::vector<float> out(c.num_queries * c.num_heads * c.head_dim, NAN);
  cpu::AttentionArgs args{q.data(),       k.data(),   v.data(),      out.data(),
                          c.num_queries,  keys,       c.num_cached,  c.num_heads,
                          c.num_kv_heads, c.head_dim, c.block_length};
  cpu::Attention(args);
  std::vector<double> ref(out.size(), 0.0);
  const int64_t group = c.num_heads / c.num_kv_heads;
  for (int64_t i = 0; i < c.num_queries; ++i)
    for (int64_t h = 0; h < c.num_heads; ++h) {
      const int64_t p = c.num_cached + i, kv = h / group;
      std::vector<double> s;
      for (int64_t j = 0; j < keys; ++j) {
        const bool visible = j / c.block_length <= p / c.block_length;
        double dot = 0;
        for (int64_t d = 0; d < c.head_dim; ++d)
          dot += double(q[(i * c.num_heads + h) * c.head_dim + d]) *
                 k[(j * c.num_kv_heads + kv) * c.head_dim + d];
        s.push_back(visible ? dot / std::sqrt(double(c.head_dim)) : -INFINITY);
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double denom = 0;
      for (double& x : s) denom += (x = std::exp(x - mx));
      for (int64_t j = 0; j < keys; ++j)
        for (int64_t d = 0; d < c.head_dim; ++d)
          ref[(i * c.num_heads + h) * c.head_dim + d] +=
              s[j] / denom * v[(j * c.num_kv_heads + kv) * c.head_dim + d];
    }
  EXPECT_TRUE(AllClose(out, ref, kF32Rtol, kF32Atol));
}

INSTANTIATE_TEST_SUITE_P(
    Grid, AttentionTest,
    ::testing::Values(AttentionCase{1, 0, 1, 1, 8, 1}, AttentionCase{8, 0, 4, 2, 16, 8},
                      AttentionCase{8, 16, 4, 2, 16, 8}, AttentionCase{5, 11, 4, 1, 16, 4},
                      AttentionCase{24, 0, 4, 2, 16, 8}, AttentionCase{16, 0, 4, 4, 16, 16},
                      AttentionCase{7, 9, 6, 3, 12, 100}, AttentionCase{3, 5, 2, 2, 128, 1}));

TEST(SwiGluTest, MatchesFormula) {
  const int64_t rows = 3, width = 17;
  const std::vector<float> gu = RandomFloats(rows * 2 * width, 13, -6, 6);
  std::vector<float> out(rows * width);
  cpu::SwiGlu(gu.data(), rows, width, out.data());
  std::vector<double> ref(rows * width);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i) {
      const double g = gu[r * 2 * width + i], u = gu[r * 2 * width + width + i];
      ref[r * width + i] = g / (1 + std::exp(-g)) * u;
    }
  EXPECT_TRUE(AllClose(out, ref, kF32Rtol, kF32Atol));
}

// A separately written token-choice reference: full sorts, double precision.
void NaiveTokenChoice(const cpu::TokenChoiceParams& p, const float* logits, const float* bias,
                      std::vector<std::pair<int32_t, double>>* out) {
  const int64_t per_group = p.num_experts / p.n_group;
  std::vector<double> s(p.num_experts), c(p.num_experts);
  for (int64_t e = 0; e < p.num_experts; ++e) {
    s[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    c[e] = static_cast<float>(s[e]) + bias[e];
  }
  std::vector<std::pair<double, int64_t>> groups;
  for (int64_t g = 0; g < p.n_group; ++g) {
    std::vector<double> in(c.begin() + g * per_group, c.begin() + (g + 1) * per_group);
    std::sort(in.rbegin(), in.rend());
    groups.push_back({-(in[0] + (per_group > 1 ? in[1] : 0.0)), g});
  }
  std::sort(groups.begin(), groups.end());
  std::set<int64_t> kept;
  for (int64_t i = 0; i < p.topk_group; ++i) kept.insert(groups[i].second);
  std::vector<std::pair<double, int64_t>> experts;
  for (int64_t e = 0; e < p.num_experts; ++e)
    experts.push_back({kept.count(e / per_group) ? -c[e] : 0.0, e});
  std::sort(experts.begin(), experts.end());
  double sum = 0;
  for (int64_t i = 0; i < p.topk; ++i) sum += s[experts[i].second];
  out->clear();
  for (int64_t i = 0; i < p.topk; ++i) {
    const double w = s[experts[i].second] / (p.norm_topk_prob && p.topk > 1 ? sum : 1.0) *
                     p.routed_scaling_factor;
    out->push_back({static_cast<int32_t>(experts[i].second), w});
  }
  std::sort(out->begin(), out->end());
}

TEST(TokenChoiceTest, HandCheckedGroupLimit) {
  // 8 experts in 4 groups of 2, keep 2 groups, top-2. Expert 0 has the best single score, but its
  // group {0,1} sums lower than groups {4,5} and {6,7}: group limiting must exclude it.
  const float logit_of[8] = {3.0f, -4.0f, 0.5f, 0.4f, 2.0f, 1.9f, 1.0f, 1.2f};
  const float bias[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  cpu::TokenChoiceParams p{8, 2, 4, 2, true, 2.5f};
  int32_t idx[2];
  float w[2];
  cpu::TokenChoiceRoute(p, {logit_of, bias, 1, idx, w});
  EXPECT_EQ(idx[0], 4);
  EXPECT_EQ(idx[1], 5);
  const double s4 = 1 / (1 + std::exp(-2.0)), s5 = 1 / (1 + std::exp(-1.9));
  EXPECT_NEAR(w[0], 2.5 * s4 / (s4 + s5), 1e-6);
  EXPECT_NEAR(w[1], 2.5 * s5 / (s4 + s5), 1e-6);
}

TEST(TokenChoiceTest, BiasSteersSelectionButNotWeights) {
  const float logits[4] = {1.0f, 0.0f, -1.0f, 2.0f};
  const float bias[4] = {0.0f, 0.0f, 5.0f, 0.0f};
  cpu::TokenChoiceParams p{4, 1, 1, 1, false, 1.0f};
  int32_t idx;
  float w;
  cpu::TokenChoiceRoute(p, {logits, bias, 1, &idx, &w});
  EXPECT_EQ(idx, 2);
  EXPECT_FLOAT_EQ(w, 1.0f / (1.0f + std::exp(1.0f)));  // unbiased sigmoid, no renormalization
}

TEST(TokenChoiceTest, TiesGoToLowerExpertIndex) {
  const float logits[6] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
  const float bias[6] = {0, 0, 0, 0, 0, 0};
  cpu::TokenChoiceParams p{6, 3, 3, 2, true, 1.0f};
  int32_t idx[3];
  float w[3];
  cpu::TokenChoiceRoute(p, {logits, bias, 1, idx, w});
  EXPECT_EQ(idx[0], 0);
  EXPECT_EQ(idx[1], 1);
  EXPECT_EQ(idx[2], 2);
}

struct RouteCase {
  int64_t experts, topk, groups, topk_group, tokens;
};
void PrintTo(const RouteCase& c, std::ostream* os) {
  *os << "E=" << c.experts << " k=" << c.topk << " groups=" << c.groups << "/" << c.topk_group
      << " T=" << c.tokens;
}
class TokenChoiceGridTest : public ::testing::TestWithParam<RouteCase> {};

TEST_P(TokenChoiceGridTest, MatchesNaiveReference) {
  const RouteCase rc = GetParam();
  cpu::TokenChoiceParams p{rc.experts, rc.topk, rc.groups, rc.topk_group, true, 2.5f};
  const std::vector<float> logits = RandomFloats(rc.tokens * rc.experts, 14, -4, 4);
  const std::vector<float> bias = RandomFloats(rc.experts, 15, -0.1f, 0.1f);
  std::vector<int32_t> idx(rc.tokens * rc.topk);
  std::vector<float> w(rc.tokens * rc.topk);
  cpu::TokenChoiceRoute(p, {logits.data(), bias.data(), rc.tokens, idx.data(), w.data()});
  std::vector<std::pair<int32_t, double>> ref;
  for (int64_t t = 0; t < rc.tokens; ++t) {
    NaiveTokenChoice(p, logits.data() + t * rc.experts, bias.data(), &ref);
    std::vector<std::pair<int32_t, double>> ours;
    for (int64_t j = 0; j < rc.topk; ++j)
      ours.push_back({idx[t * rc.topk + j], w[t * rc.topk + j]});
    std::sort(ours.begin(), ours.end());
    for (int64_t j = 0; j < rc.topk; ++j) {
      ASSERT_EQ(ours[j].first, ref[j].first) << "token " << t;
      ASSERT_NEAR(ours[j].second, ref[j].second, 1e-6) << "token " << t;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Grid, TokenChoiceGridTest,
                         ::testing::Values(RouteCase{16, 4, 4, 2, 50}, RouteCase{256, 8, 8, 4, 64},
                                           RouteCase{8, 8, 1, 1, 10} /* topk == num_experts */,
                                           RouteCase{12, 3, 3, 3, 20}, RouteCase{7, 2, 1, 1, 1},
                                           RouteCase{64, 1, 8, 1, 33}));

TEST(RoutingPlanTest, GroupsByExpertAndSortsTokens) {
  RoutingPlanBuilder b(4, 3);
  b.Add(3, 2, 0.5f);
  b.Add(1, 0, 0.25f);
  b.Add(0, 2, 1.0f);
  b.Add(2, 0, 0.75f);
  const RoutingPlan plan = std::move(b).Finish();
  EXPECT_EQ(plan.expert_offsets, (std::vector<int32_t>{0, 2, 2, 4}));
  EXPECT_EQ(plan.token_idx, (std::vector<int32_t>{1, 2, 0, 3}));
  EXPECT_EQ(plan.weight, (std::vector<float>{0.25f, 0.75f, 1.0f, 0.5f}));
  EXPECT_EQ(plan.expert_count(1), 0);
}

TEST(MoeExpertsTest, MatchesPerAssignmentLoop) {
  const int64_t tokens = 9, experts = 5, hidden = 12, width = 6;
  const HostTensor w13 = RandomMatrix(DType::kBF16, {experts, 2 * width, hidden}, 16);
  const HostTensor w2 = RandomMatrix(DType::kBF16, {experts, hidden, width}, 17);
  const std::vector<float> x = RandomFloats(tokens * hidden, 18);
  RoutingPlanBuilder b(tokens, experts);
  std::vector<std::tuple<int, int, float>> assignments;
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e)
      if ((t * 7 + e * 3) % 4 == 0) assignments.push_back({t, e, 0.1f * (t + 1) + 0.01f * e});
  for (auto [t, e, w] : assignments) b.Add(t, e, w);
  const RoutingPlan plan = std::move(b).Finish();
  std::vector<float> out(tokens * hidden, 1.0f);  // accumulates into existing values
  cpu::MoeExperts({x.data(), &plan, &w13, &w2, out.data()});
  std::vector<double> ref(tokens * hidden, 1.0);
  for (auto [t, e, w] : assignments) {
    std::vector<double> act(width);
    for (int64_t i = 0; i < width; ++i) {
      double g = 0, u = 0;
      for (int64_t d = 0; d < hidden; ++d) {
        g += At(w13, (e * 2 * width + i) * hidden + d) * double(x[t * hidden + d]);
        u += At(w13, (e * 2 * width + width + i) * hidden + d) * double(x[t * hidden + d]);
      }
      act[i] = g / (1 + std::exp(-g)) * u;
    }
    for (int64_t d = 0; d < hidden; ++d) {
      double y = 0;
      for (int64_t i = 0; i < width; ++i) y += At(w2, (e * hidden + d) * width + i) * act[i];
      ref[t * hidden + d] += w * y;
    }
  }
  EXPECT_TRUE(AllClose(out, ref, kF32Rtol, kF32Atol));
}

}  // namespace
}  // namespace moeserve
