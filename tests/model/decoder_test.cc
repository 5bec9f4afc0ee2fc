// Block-diffusion decoding: the reference generate() goldens, the KV cache against recomputing the
// prefix, batching against decoding alone, stop conditions, sampling and bad options.
#include "model/decoder.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/checkpoint.h"
#include "model/golden.h"
#include "tests/test_util.h"

namespace moeserve {
namespace {

using ::testing::HasSubstr;

TEST(DecoderGoldenTest, ScheduledPolicyReproducesReferenceGenerate) {
  const std::string dir = testing::TestDataDir() + "/llada2-tiny";
  auto model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  auto reports = VerifyGoldenGenerate(**model, dir);
  ASSERT_TRUE(reports.ok()) << reports.status();
  ASSERT_EQ(reports->size(), 3u);
  for (const GoldenGenerateReport& r : *reports) {
    EXPECT_EQ(r.actual, r.expected) << r.name;
  }
}

class DecoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto config = LoadModelConfig(testing::TestDataDir() + "/llada2-tiny/config.json");
    ASSERT_TRUE(config.ok());
    config_ = *config;
    // A larger init spread than the default gives peaked distributions, so that the policies
    // commit several tokens per step sometimes and one at other times.
    model_ = Model::FromWeights(config_, RandomWeights(config_, {.seed = 31, .init_std = 0.15}));
    engine_.mask_id = 511;
    engine_.stop_ids = {};
  }
  GenerateResult Generate(const std::vector<int32_t>& prompt, const DecodeOptions& d,
                          const RoutingOptions& r = {}, const EngineOptions* engine = nullptr) {
    auto out = GenerateOne(*model_, engine ? *engine : engine_, prompt, d, r);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : GenerateResult{};
  }
  static std::vector<int32_t> Prompt(int n, int salt) {
    std::vector<int32_t> p;
    for (int i = 0; i < n; ++i) p.push_back((i * 53 + salt * 17 + 3) % 500);
    return p;
  }
  ModelConfig config_;
  std::unique_ptr<Model> model_;
  EngineOptions engine_;
};

TEST_F(DecoderTest, CachedDecodingEqualsRecomputingThePrefix) {
  EngineOptions reference = engine_;
  reference.recompute_prefix = true;
  for (CommitPolicy policy : {CommitPolicy::kScheduled, CommitPolicy::kThreshold}) {
    for (int prompt_len : {1, 7, 8, 13}) {
      DecodeOptions d;
      d.block_length = 8;
      d.max_new_tokens = 20;
      d.policy = policy;
      d.steps = 4;
      d.threshold = policy == CommitPolicy::kScheduled ? 0.3 : 0.9;
      const GenerateResult cached = Generate(Prompt(prompt_len, prompt_len), d);
      const GenerateResult recomputed = Generate(Prompt(prompt_len, prompt_len), d, {}, &reference);
      EXPECT_EQ(cached.tokens, recomputed.tokens)
          << CommitPolicyName(policy) << " prompt " << prompt_len;
      EXPECT_EQ(cached.tokens.size(), 20u);
      EXPECT_EQ(cached.finish, FinishReason::kLength);
      EXPECT_EQ(cached.stats.denoising_steps, recomputed.stats.denoising_steps);
    }
  }
}

TEST_F(DecoderTest, BatchedSequencesEqualDecodingAlone) {
  const RoutingOptions tc{};
  const RoutingOptions ec{RoutingMode::kExpertChoice, 1.25};
  struct Request {
    std::vector<int32_t> prompt;
    DecodeOptions decode;
    RoutingOptions routing;
  };
  std::vector<Request> requests;
  for (int i = 0; i < 5; ++i) {
    DecodeOptions d;
    d.block_length = i % 2 ? 8 : 4;
    d.max_new_tokens = 6 + 5 * i;
    d.policy = i % 3 ? CommitPolicy::kThreshold : CommitPolicy::kScheduled;
    d.threshold = 0.8;
    d.sampling.temperature = i == 4 ? 0.8 : 0.0;
    d.seed = 77;
    requests.push_back({Prompt(3 + 9 * i, i), d, i % 2 ? ec : tc});
  }
  // A small budget forces prefill chunking and sequences waiting their turn.
  EngineOptions small = engine_;
  small.max_batch_tokens = 24;
  DiffusionEngine engine(model_.get(), small);
  std::map<SequenceId, size_t> which;
  for (size_t i = 0; i < requests.size(); ++i) {
    auto id = engine.Add(requests[i].prompt, requests[i].decode, requests[i].routing);
    ASSERT_TRUE(id.ok()) << id.status();
    which[*id] = i;
  }
  std::vector<std::vector<int32_t>> together(requests.size());
  int steps = 0;
  while (!engine.idle()) {
    auto step = engine.Step();
    ASSERT_TRUE(step.ok()) << step.status();
    EXPECT_LE(step->batch_tokens, small.max_batch_tokens + 16)
        << "budget overshoot beyond one lone block";
    for (const SequenceEvent& e : step->events) {
      auto& out = together[which[e.id]];
      out.insert(out.end(), e.new_tokens.begin(), e.new_tokens.end());
    }
    ASSERT_LT(++steps, 1000);
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    const GenerateResult alone =
        Generate(requests[i].prompt, requests[i].decode, requests[i].routing);
    EXPECT_EQ(together[i], alone.tokens)
        << "request " << i << " (" << RoutingModeName(requests[i].routing.mode) << ")";
  }
}

TEST_F(DecoderTest, StopsAtStopTokenIncludingIt) {
  DecodeOptions d;
  d.block_length = 4;
  d.max_new_tokens = 16;
  const GenerateResult free_run = Generate(Prompt(5, 1), d);
  ASSERT_EQ(free_run.tokens.size(), 16u);
  // Make the 6th generated token a stop token: decoding ends after its block, cut after it.
  EngineOptions e = engine_;
  e.stop_ids = {free_run.tokens[5]};
  const auto first = std::find(free_run.tokens.begin(), free_run.tokens.end(), free_run.tokens[5]);
  const GenerateResult stopped = Generate(Prompt(5, 1), d, {}, &e);
  EXPECT_EQ(stopped.finish, FinishReason::kEos);
  EXPECT_EQ(stopped.tokens, std::vector<int32_t>(free_run.tokens.begin(), first + 1));
}

TEST_F(DecoderTest, StopStrings) {
  DecodeOptions d;
  d.block_length = 4;
  d.max_new_tokens = 32;
  const GenerateResult free_run = Generate(Prompt(6, 2), d);
  // Text of an id: "<id>" — the stop string is the 9th token's text.
  EngineOptions e = engine_;
  e.detokenize = [](std::span<const int32_t> ids) -> absl::StatusOr<std::string> {
    std::string s;
    for (int32_t id : ids) s += "<" + std::to_string(id) + ">";
    return s;
  };
  d.stop = {"<" + std::to_string(free_run.tokens[8]) + ">"};
  const GenerateResult stopped = Generate(Prompt(6, 2), d, {}, &e);
  EXPECT_EQ(stopped.finish, FinishReason::kStop);
  EXPECT_LE(stopped.tokens.size(), 12u);  // ends with the block that holds the stop string
  EXPECT_GE(stopped.tokens.size(), 4u);
  // Without a detokenizer, stop strings are refused.
  auto refused = GenerateOne(*model_, engine_, Prompt(6, 2), d, {});
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("decoding.stop"));
}

TEST_F(DecoderTest, SamplingIsReproducibleBySeed) {
  DecodeOptions d;
  d.block_length = 8;
  d.max_new_tokens = 24;
  d.sampling = {1.0, 50, 0.9};
  d.seed = 5;
  const GenerateResult a = Generate(Prompt(4, 3), d), b = Generate(Prompt(4, 3), d);
  d.seed = 6;
  const GenerateResult c = Generate(Prompt(4, 3), d);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_NE(a.tokens, c.tokens);
}

TEST_F(DecoderTest, StatisticsAndCancel) {
  DecodeOptions d;
  d.block_length = 8;
  d.max_new_tokens = 16;
  d.policy = CommitPolicy::kScheduled;
  d.steps = 8;
  d.threshold = 1.0;  // never above: exactly one token per step
  const GenerateResult r = Generate(Prompt(8, 4), d);
  EXPECT_EQ(r.stats.denoising_steps, 16);
  EXPECT_EQ(r.stats.blocks, 2);
  EXPECT_EQ(r.stats.forwards, 16);  // refreshes ride along with the next block's first step
  EXPECT_DOUBLE_EQ(r.stats.tokens_per_forward(), 1.0);

  DiffusionEngine engine(model_.get(), engine_);
  auto id = engine.Add(Prompt(8, 4), d, {});
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(engine.Step().ok());
  EXPECT_GT(engine.kv_cache_bytes(), 0);
  EXPECT_TRUE(engine.Cancel(*id));
  EXPECT_FALSE(engine.Cancel(*id));
  EXPECT_TRUE(engine.idle());
  EXPECT_EQ(engine.kv_cache_bytes(), 0);
}

TEST_F(DecoderTest, RejectsBadOptionsNamingTheField) {
  DiffusionEngine engine(model_.get(), engine_);
  auto expect_error = [&](std::vector<int32_t> prompt, DecodeOptions d, const char* field,
                          RoutingOptions r = {}) {
    auto id = engine.Add(prompt, d, r);
    ASSERT_FALSE(id.ok()) << field;
    EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(id.status().message()), HasSubstr(field));
  };
  const DecodeOptions ok;
  expect_error({}, ok, "prompt is empty");
  expect_error({1, 600}, ok, "token_ids[1] = 600");
  expect_error(std::vector<int32_t>(4090, 1), ok, "context limit");
  DecodeOptions d = ok;
  d.max_new_tokens = 0;
  expect_error({1}, d, "decoding.max_new_tokens");
  d.max_new_tokens = kMaxNewTokensLimit + 1;
  expect_error({1}, d, "decoding.max_new_tokens");
  d = ok;
  d.block_length = 0;
  expect_error({1}, d, "decoding.block_length");
  d.block_length = kMaxBlockLength + 1;
  expect_error({1}, d, "decoding.block_length");
  d = ok;
  d.threshold = 1.5;
  expect_error({1}, d, "decoding.threshold");
  d.threshold = -0.1;
  expect_error({1}, d, "decoding.threshold");
  d = ok;
  d.steps = 33;
  expect_error({1}, d, "decoding.steps");
  d = ok;
  d.sampling.temperature = -1;
  expect_error({1}, d, "decoding.temperature");
  d = ok;
  d.sampling.top_p = 0;
  expect_error({1}, d, "decoding.top_p");
  expect_error({1}, ok, "routing.capacity_factor", {RoutingMode::kExpertChoice, 0.0});
  EXPECT_THAT(std::string(ParseCommitPolicy("greedy").status().message()),
              HasSubstr("decoding.policy \"greedy\""));
  EXPECT_TRUE(engine.idle());
}

TEST(SamplingTest, ScheduledQuotaSpreadsTheRemainder) {
  EXPECT_EQ(ScheduledQuota(8, 3, 0), 3);
  EXPECT_EQ(ScheduledQuota(8, 3, 1), 3);
  EXPECT_EQ(ScheduledQuota(8, 3, 2), 2);
  EXPECT_EQ(ScheduledQuota(32, 32, 31), 1);
}

TEST(SamplingTest, CommitPolicies) {
  const std::vector<Proposal> p = {{1, 0.2f}, {2, 0.97f}, {3, 0.5f}, {4, 0.96f}};
  EXPECT_EQ(ChooseCommits(CommitPolicy::kThreshold, 0.95, 0, p), (std::vector<int32_t>{1, 3}));
  // Nothing above the threshold: the bar drops to max_p - 1e-5, so the best one commits.
  EXPECT_EQ(ChooseCommits(CommitPolicy::kThreshold, 0.99, 0, p), (std::vector<int32_t>{1}));
  // Scheduled: two above 0.9 >= quota 2: both; quota 3: the three best.
  EXPECT_EQ(ChooseCommits(CommitPolicy::kScheduled, 0.9, 2, p), (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(ChooseCommits(CommitPolicy::kScheduled, 0.9, 3, p), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(ChooseCommits(CommitPolicy::kScheduled, 0.9, 9, p).size(), 4u);
}

TEST(SamplingTest, GreedyNeverProposesTheExcludedToken) {
  const std::vector<float> logits = {0.0f, 5.0f, 1.0f};
  Proposal pr = Propose(logits, {}, 1, nullptr);
  EXPECT_EQ(pr.token, 2);
  EXPECT_NEAR(pr.p, std::exp(1.0) / (1 + std::exp(5.0) + std::exp(1.0)), 1e-6);
  pr = Propose(logits, {}, -1, nullptr);
  EXPECT_EQ(pr.token, 1);
}

}  // namespace
}  // namespace moeserve
