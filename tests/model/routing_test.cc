// Expert-choice and mixed-mode routing: invariants over many random shapes and seeds, hand-checked
// small cases, and option validation.
#include "model/routing.h"

#include <algorithm>
#include <cmath>
#include <ostream>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace moeserve {
namespace {

using ::testing::HasSubstr;

ModelConfig RouterConfig(int64_t experts, int64_t topk, int64_t groups = 1,
                         int64_t topk_group = 1) {
  ModelConfig c = DemoModelConfig();
  c.num_experts = experts;
  c.num_experts_per_tok = topk;
  c.n_group = groups;
  c.topk_group = topk_group;
  return c;
}

RoutingOptions ExpertChoice(double cf, RoutingScope scope = RoutingScope::kRequest,
                            ExpertChoiceWeighting w = ExpertChoiceWeighting::kRenormalized) {
  return {RoutingMode::kExpertChoice, cf, scope, w};
}

float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

TEST(CapacityTest, Formula) {
  EXPECT_EQ(ExpertChoiceCapacity(1.0, 32, 8, 256), 1);   // exactly 1: not bumped by rounding
  EXPECT_EQ(ExpertChoiceCapacity(1.25, 32, 8, 256), 2);  // ceil(1.25)
  EXPECT_EQ(ExpertChoiceCapacity(1.0, 4096, 8, 256), 128);
  EXPECT_EQ(ExpertChoiceCapacity(0.01, 32, 8, 256), 1);  // at least 1
  EXPECT_EQ(ExpertChoiceCapacity(64, 32, 8, 256), 32);   // at most T
  EXPECT_EQ(ExpertChoiceCapacity(1.0, 0, 8, 256), 0);
  EXPECT_EQ(ExpertChoiceCapacity(0.1, 30, 3, 10), 1);   // ceil(0.9)
  EXPECT_EQ(ExpertChoiceCapacity(1.1, 30, 3, 10), 10);  // ceil(9.9)
}

struct EcCase {
  int64_t experts, topk, tokens, scopes;
  double cf;
  uint32_t seed;
};
void PrintTo(const EcCase& c, std::ostream* os) {
  *os << "E=" << c.experts << " k=" << c.topk << " T=" << c.tokens << " scopes=" << c.scopes
      << " cf=" << c.cf << " seed=" << c.seed;
}

class ExpertChoiceProperties : public ::testing::TestWithParam<EcCase> {};

TEST_P(ExpertChoiceProperties, Invariants) {
  const EcCase ec = GetParam();
  const ModelConfig config = RouterConfig(ec.experts, ec.topk);
  std::mt19937 rng(ec.seed);
  // Split the tokens into `scopes` request-scope sequences of random lengths (>= 1).
  std::vector<SequenceRouting> seqs;
  int64_t row = 0;
  for (int64_t s = 0; s < ec.scopes; ++s) {
    const int64_t left = ec.tokens - row - (ec.scopes - s - 1);
    const int64_t n = s == ec.scopes - 1 ? left : 1 + static_cast<int64_t>(rng() % left);
    seqs.push_back({row, n, ExpertChoice(ec.cf)});
    row += n;
  }
  // Coarse logits make exact score ties common, which exercises the tie-break.
  std::vector<float> logits(ec.tokens * ec.experts);
  for (float& x : logits) x = static_cast<float>(static_cast<int>(rng() % 9) - 4) * 0.5f;
  const std::vector<float> bias(ec.experts, 0.0f);
  const LayerRouting r = RouteMoeLayer(config, logits.data(), bias.data(), ec.tokens, seqs);

  int64_t expected_assignments = 0;
  std::vector<int64_t> experts_of_token(ec.tokens, 0);
  for (const SequenceRouting& seq : seqs) {
    const int64_t c = ExpertChoiceCapacity(ec.cf, seq.num_tokens, ec.topk, ec.experts);
    ASSERT_GE(c, 1);
    ASSERT_LE(c, seq.num_tokens);
    expected_assignments += c * ec.experts;
    for (int64_t e = 0; e < ec.experts; ++e) {
      std::vector<char> chosen(seq.num_tokens, 0);
      int64_t count = 0;
      for (int32_t a = r.plan.expert_offsets[e]; a < r.plan.expert_offsets[e + 1]; ++a) {
        const int32_t t = r.plan.token_idx[a];
        if (t < seq.first_row || t >= seq.first_row + seq.num_tokens) continue;
        chosen[t - seq.first_row] = 1;
        ++count;
        ++experts_of_token[t];
      }
      ASSERT_EQ(count, c) << "expert " << e << " must take exactly its capacity in the scope at "
                          << seq.first_row;
      // Every chosen token's score >= every unchosen token's; on equal scores the chosen token has
      // the lower index.
      for (int64_t i = 0; i < seq.num_tokens; ++i) {
        if (!chosen[i]) continue;
        const float si = Sigmoid(logits[(seq.first_row + i) * ec.experts + e]);
        for (int64_t j = 0; j < seq.num_tokens; ++j) {
          if (chosen[j]) continue;
          const float sj = Sigmoid(logits[(seq.first_row + j) * ec.experts + e]);
          ASSERT_TRUE(si > sj || (si == sj && i < j))
              << "expert " << e << " took " << i << " over " << j;
        }
      }
    }
  }
  const RoutingLoad& load = r.load.by_mode[static_cast<int>(RoutingMode::kExpertChoice)];
  EXPECT_EQ(r.plan.num_assignments(), expected_assignments);
  EXPECT_EQ(load.num_assignments, expected_assignments);
  EXPECT_EQ(load.num_tokens, ec.tokens);
  const int64_t dropped = std::count(experts_of_token.begin(), experts_of_token.end(), 0);
  EXPECT_EQ(load.dropped_tokens, dropped);
  int64_t seq_dropped = 0;
  for (int64_t d : r.sequence_dropped) seq_dropped += d;
  EXPECT_EQ(seq_dropped, dropped);
  for (int64_t j = 0; j <= ec.experts; ++j) {
    EXPECT_EQ(load.experts_per_token[j],
              std::count(experts_of_token.begin(), experts_of_token.end(), j));
  }
  if (ec.scopes == 1) {
    EXPECT_EQ(load.MaxOverMean(), 1.0);
  }
  // Renormalized weights of a token that got experts sum to routed_scaling_factor.
  std::vector<double> weight_sum(ec.tokens, 0.0);
  for (int64_t a = 0; a < r.plan.num_assignments(); ++a)
    weight_sum[r.plan.token_idx[a]] += r.plan.weight[a];
  for (int64_t t = 0; t < ec.tokens; ++t) {
    if (experts_of_token[t] > 0) {
      EXPECT_NEAR(weight_sum[t], config.routed_scaling_factor, 1e-5);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(RandomShapes, ExpertChoiceProperties, ::testing::ValuesIn([] {
                           std::vector<EcCase> cases;
                           std::mt19937 rng(1234);
                           const double cfs[] = {0.25, 1.0, 1.25, 2.0, 64.0};
                           for (uint32_t i = 0; i < 40; ++i) {
                             const int64_t experts = 1 + rng() % 40;
                             const int64_t topk = 1 + rng() % experts;
                             const int64_t tokens = 1 + rng() % 70;
                             const int64_t scopes = 1 + rng() % std::min<int64_t>(tokens, 4);
                             cases.push_back({experts, topk, tokens, scopes, cfs[i % 5], i});
                           }
                           cases.push_back({256, 8, 32, 1, 1.0, 99});    // LLaDA2.0-mini block
                           cases.push_back({256, 8, 512, 2, 1.25, 98});  // two prefill chunks
                           cases.push_back({16, 16, 5, 1, 1.0, 97});     // topk == num_experts
                           return cases;
                         }()));

TEST(ExpertChoiceTest, LargeCapacityTakesEveryToken) {
  const ModelConfig config = RouterConfig(8, 2);
  const std::vector<float> logits = testing::RandomFloats(10 * 8, 5);
  const std::vector<float> bias(8, 0.0f);
  const SequenceRouting seq{0, 10, ExpertChoice(64.0)};
  const LayerRouting r = RouteMoeLayer(config, logits.data(), bias.data(), 10, {&seq, 1});
  for (int64_t e = 0; e < 8; ++e) EXPECT_EQ(r.plan.expert_count(e), 10);
  const RoutingLoad& load = r.load.by_mode[1];
  EXPECT_EQ(load.experts_per_token[8], 10);
  EXPECT_EQ(load.dropped_tokens, 0);
}

TEST(ExpertChoiceTest, HandCheckedWeights) {
  // 3 tokens, 2 experts, top-1, cf 1 -> C = ceil(3 * 1 / 2) = 2.
  // Expert 0 scores: t0 .9 t1 .2 t2 .6 -> takes t0, t2. Expert 1: t0 .3 t1 .7 t2 .8 -> takes t2,
  // t1.
  auto logit = [](double s) { return static_cast<float>(std::log(s / (1 - s))); };
  const float logits[6] = {logit(.9), logit(.3), logit(.2), logit(.7), logit(.6), logit(.8)};
  const float bias[2] = {5.0f, -5.0f};  // must not matter
  ModelConfig config = RouterConfig(2, 1);
  config.routed_scaling_factor = 2.0;
  for (auto weighting : {ExpertChoiceWeighting::kRenormalized, ExpertChoiceWeighting::kRaw}) {
    const SequenceRouting seq{0, 3, ExpertChoice(1.0, RoutingScope::kRequest, weighting)};
    const LayerRouting r = RouteMoeLayer(config, logits, bias, 3, {&seq, 1});
    ASSERT_EQ(r.plan.expert_offsets, (std::vector<int32_t>{0, 2, 4}));
    EXPECT_EQ(r.plan.token_idx, (std::vector<int32_t>{0, 2, 1, 2}));
    const bool renorm = weighting == ExpertChoiceWeighting::kRenormalized;
    const std::vector<double> expect =
        renorm ? std::vector<double>{2.0, 2 * .6 / 1.4, 2.0, 2 * .8 / 1.4}
               : std::vector<double>{1.8, 1.2, 1.4, 1.6};
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(r.plan.weight[i], expect[i], 1e-5) << i;
    EXPECT_EQ(r.sequence_dropped[0], 0);
    EXPECT_EQ(r.load.by_mode[1].experts_per_token, (std::vector<int64_t>{0, 2, 1}));
  }
}

TEST(ExpertChoiceTest, TiesGoToLowerTokenIndex) {
  const ModelConfig config = RouterConfig(1, 1);
  const float logits[4] = {0.5f, 0.5f, 0.5f, 0.5f};
  const float bias[1] = {0};
  // C = ceil(1.0 * 4 * 1 / 1) clipped to 4: use cf 0.5 -> C = 2.
  const SequenceRouting seq{0, 4, ExpertChoice(0.5)};
  const LayerRouting r = RouteMoeLayer(config, logits, bias, 4, {&seq, 1});
  EXPECT_EQ(r.plan.token_idx, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(r.sequence_dropped[0], 2);
}

TEST(ExpertChoiceTest, RequestScopeIsIndependentOfTheBatch) {
  const ModelConfig config = RouterConfig(16, 4);
  const int64_t na = 8, nb = 13;
  const std::vector<float> logits = testing::RandomFloats((na + nb) * 16, 6, -3, 3);
  const std::vector<float> bias(16, 0.0f);
  const SequenceRouting alone{0, na, ExpertChoice(1.25)};
  const LayerRouting ra = RouteMoeLayer(config, logits.data(), bias.data(), na, {&alone, 1});
  // Now the same rows second in a batch, after a token-choice and before nothing.
  std::vector<float> batched((nb + na) * 16);
  std::copy(logits.begin() + na * 16, logits.end(), batched.begin());
  std::copy(logits.begin(), logits.begin() + na * 16, batched.begin() + nb * 16);
  const SequenceRouting seqs[2] = {{0, nb, {}}, {nb, na, ExpertChoice(1.25)}};
  const LayerRouting rb = RouteMoeLayer(config, batched.data(), bias.data(), nb + na, seqs);
  for (int64_t e = 0; e < 16; ++e) {
    std::vector<std::pair<int32_t, float>> a, b;
    for (int32_t i = ra.plan.expert_offsets[e]; i < ra.plan.expert_offsets[e + 1]; ++i) {
      a.push_back({ra.plan.token_idx[i], ra.plan.weight[i]});
    }
    for (int32_t i = rb.plan.expert_offsets[e]; i < rb.plan.expert_offsets[e + 1]; ++i) {
      if (rb.plan.token_idx[i] >= nb)
        b.push_back({rb.plan.token_idx[i] - static_cast<int32_t>(nb), rb.plan.weight[i]});
    }
    EXPECT_EQ(a, b) << "expert " << e;  // same tokens, bit-identical weights
  }
  EXPECT_EQ(rb.load.by_mode[0].num_tokens, nb);
  EXPECT_EQ(rb.load.by_mode[1].num_tokens, na);
  EXPECT_EQ(rb.load.by_mode[0].num_assignments, nb * 4);
}

TEST(ExpertChoiceTest, BatchScopePoolsSequences) {
  const ModelConfig config = RouterConfig(4, 1);
  const std::vector<float> logits = testing::RandomFloats(12 * 4, 7);
  const std::vector<float> bias(4, 0.0f);
  const auto pooled = ExpertChoice(1.0, RoutingScope::kBatch);
  // Rows 0-3 batch scope, 4-7 token-choice, 8-11 batch scope: one scope of 8 rows, C = 2.
  const SequenceRouting seqs[3] = {{0, 4, pooled}, {4, 4, {}}, {8, 4, pooled}};
  const LayerRouting r = RouteMoeLayer(config, logits.data(), bias.data(), 12, seqs);
  for (int64_t e = 0; e < 4; ++e) {
    int64_t ec = 0;
    for (int32_t i = r.plan.expert_offsets[e]; i < r.plan.expert_offsets[e + 1]; ++i) {
      const int32_t t = r.plan.token_idx[i];
      if (t < 4 || t >= 8) ++ec;
    }
    EXPECT_EQ(ec, 2) << "expert " << e;
  }
  EXPECT_EQ(r.load.by_mode[1].MaxOverMean(), 1.0);
}

TEST(RoutingOptionsTest, RejectsBadValuesNamingTheOption) {
  for (double cf : {0.0, -1.0, 64.5, std::nan(""), double{INFINITY}}) {
    RoutingOptions o = ExpertChoice(cf);
    const absl::Status s = ValidateRoutingOptions(o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << cf;
    EXPECT_THAT(std::string(s.message()), HasSubstr("capacity_factor")) << cf;
  }
  EXPECT_TRUE(ValidateRoutingOptions(ExpertChoice(64.0)).ok());
  EXPECT_TRUE(ValidateRoutingOptions(ExpertChoice(1e-3)).ok());
  EXPECT_THAT(std::string(ParseRoutingMode("top_k").status().message()),
              HasSubstr("routing mode \"top_k\""));
  EXPECT_THAT(std::string(ParseRoutingScope("global").status().message()),
              HasSubstr("routing scope \"global\""));
  EXPECT_THAT(std::string(ParseExpertChoiceWeighting("softmax").status().message()),
              HasSubstr("weighting"));
  EXPECT_EQ(*ParseRoutingMode("expert_choice"), RoutingMode::kExpertChoice);
  EXPECT_EQ(*ParseRoutingScope("batch"), RoutingScope::kBatch);
  EXPECT_EQ(*ParseExpertChoiceWeighting("raw"), ExpertChoiceWeighting::kRaw);
}

TEST(RoutingLoadTest, Statistics) {
  RoutingLoad load;
  load.Resize(4, 2);
  load.tokens_per_expert = {1, 2, 3, 6};
  load.num_assignments = 12;
  load.num_tokens = 6;
  EXPECT_DOUBLE_EQ(load.MaxOverMean(), 2.0);
  EXPECT_NEAR(load.CoefficientOfVariation(), std::sqrt((4.0 + 1 + 0 + 9) / 4) / 3, 1e-12);
  EXPECT_DOUBLE_EQ(load.EffectiveCapacityFactor(), 1.0);
  RoutingLoad sum;
  sum.Add(load);
  sum.Add(load);
  EXPECT_EQ(sum.tokens_per_expert, (std::vector<int64_t>{2, 4, 6, 12}));
  EXPECT_EQ(sum.num_tokens, 12);
}

}  // namespace
}  // namespace moeserve
