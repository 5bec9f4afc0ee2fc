// The LLaDA2 forward pass against the upstream reference (tests/data/llada2-tiny) and against
// itself (KV cache vs. whole prefix, batched vs. alone).
#include <cstdio>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/checkpoint.h"
#include "model/golden.h"
#include "model/model.h"
#include "tests/test_util.h"

namespace moeserve {
namespace {

using ::testing::HasSubstr;

const std::string kTinyDir = testing::TestDataDir() + "/llada2-tiny";

TEST(GoldenTest, TinyModelMatchesUpstreamReference) {
  auto model = Model::Load(kTinyDir);
  ASSERT_TRUE(model.ok()) << model.status();
  auto report = VerifyGoldenForward(**model, kTinyDir);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->cases.size(), 2u);
  for (const GoldenCaseReport& c : report->cases) {
    // logits + (layers + 1) hidden states + per MoE layer: router logits, expert sets, weights.
    EXPECT_EQ(c.checks.size(), 1u + 4u + 2u * 3u) << c.name;
    for (const GoldenCheck& check : c.checks) {
      std::printf("  %-28s worst %.3e %s\n", check.name.c_str(), check.max_rel_err,
                  check.ok ? "" : check.detail.c_str());
      EXPECT_TRUE(check.ok) << check.name << ": " << check.max_rel_err << " " << check.detail;
    }
  }
  EXPECT_TRUE(report->ok);
}

TEST(GoldenTest, DetectsAWrongModel) {
  // The same shape with other weights must fail: the comparison is not vacuous.
  auto config = LoadModelConfig(kTinyDir + "/config.json");
  ASSERT_TRUE(config.ok());
  auto model = Model::FromWeights(*config, RandomWeights(*config, {.seed = 5}));
  auto report = VerifyGoldenForward(*model, kTinyDir);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_FALSE(report->ok);
}

class RandomModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto config = LoadModelConfig(kTinyDir + "/config.json");
    ASSERT_TRUE(config.ok());
    config_ = *config;
    model_ = Model::FromWeights(config_, RandomWeights(config_, {.seed = 21, .init_std = 0.1}));
  }
  static std::vector<int32_t> Ids(int n, int salt) {
    std::vector<int32_t> ids;
    for (int i = 0; i < n; ++i) ids.push_back((i * 37 + salt * 101 + 5) % 500);
    return ids;
  }
  static std::vector<int32_t> AllRows(size_t n) {
    std::vector<int32_t> rows(n);
    for (size_t i = 0; i < n; ++i) rows[i] = static_cast<int32_t>(i);
    return rows;
  }
  ModelConfig config_;
  std::unique_ptr<Model> model_;
};

TEST_F(RandomModelTest, CachedChunksEqualWholePrefix) {
  const std::vector<int32_t> ids = Ids(24, 1);
  const int64_t block = 8;
  // Expert-choice request scopes are blocks, so chunking does not change its routing either.
  for (const RoutingOptions routing :
       {RoutingOptions{}, RoutingOptions{RoutingMode::kExpertChoice, 1.0}}) {
    KvCache whole_cache(config_);
    std::vector<SequenceInput> whole(1);
    whole[0] = {ids, &whole_cache, block, 0, AllRows(ids.size()), routing};
    auto full = model_->Forward(whole);
    ASSERT_TRUE(full.ok()) << full.status();

    KvCache cache(config_);
    std::vector<float> chunked;
    for (int64_t start = 0; start < 24; start += block) {
      std::vector<SequenceInput> in(1);
      in[0] = {std::span(ids).subspan(start, block), &cache, block, block, AllRows(block), routing};
      auto out = model_->Forward(in);
      ASSERT_TRUE(out.ok()) << out.status();
      chunked.insert(chunked.end(), out->logits.begin(), out->logits.end());
      EXPECT_EQ(cache.length(), start + block);
    }
    EXPECT_EQ(chunked, full->logits)
        << "cached K/V must give bit-identical logits, mode " << static_cast<int>(routing.mode);
  }
}

TEST_F(RandomModelTest, UncommittedStepLeavesCacheAndRepeats) {
  const std::vector<int32_t> prompt = Ids(8, 2), block = Ids(8, 3);
  KvCache cache(config_);
  std::vector<SequenceInput> in(1);
  in[0] = {prompt, &cache, 8, 8, {}};
  ASSERT_TRUE(model_->Forward(in).ok());
  in[0] = {block, &cache, 8, 0, AllRows(8)};
  auto a = model_->Forward(in);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(cache.length(), 8);
  auto b = model_->Forward(in);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->logits, b->logits);
}

TEST_F(RandomModelTest, BatchedSequenceEqualsAlone) {
  const std::vector<int32_t> a = Ids(11, 4), b = Ids(16, 5), c = Ids(3, 6);
  auto run = [&](std::vector<const std::vector<int32_t>*> seqs) {
    std::vector<KvCache> caches;
    for (size_t i = 0; i < seqs.size(); ++i) caches.emplace_back(config_);
    std::vector<SequenceInput> in(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i)
      in[i] = {*seqs[i], &caches[i], 8, 0, AllRows(seqs[i]->size())};
    auto out = model_->Forward(in);
    EXPECT_TRUE(out.ok()) << out.status();
    return out->logits;
  };
  const std::vector<float> alone = run({&a});
  const std::vector<float> batched = run({&b, &a, &c});
  const size_t offset = b.size() * config_.vocab_size;
  const std::vector<float> a_in_batch(batched.begin() + offset,
                                      batched.begin() + offset + alone.size());
  EXPECT_EQ(a_in_batch, alone) << "a sequence's logits must not depend on its batch";
}

TEST_F(RandomModelTest, RejectsBadInputsNamingTheField) {
  KvCache cache(config_), other(config_);
  const std::vector<int32_t> bad_id = {1, 512, 3};
  std::vector<SequenceInput> in(1);
  in[0] = {bad_id, &cache, 0, 0, {}};
  auto s = model_->Forward(in);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("batch[0].token_ids[1] = 512"));

  const std::vector<int32_t> ok_ids = {1, 2, 3};
  in[0] = {ok_ids, &cache, 0, 0, {3}};
  s = model_->Forward(in);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("batch[0].logit_rows"));

  in[0] = {ok_ids, nullptr, 0, 0, {}};
  EXPECT_THAT(std::string(model_->Forward(in).status().message()), HasSubstr("batch[0].cache"));

  std::vector<SequenceInput> two(2);
  two[0] = {ok_ids, &cache, 0, 0, {}};
  two[1] = {ok_ids, &cache, 0, 0, {}};
  EXPECT_THAT(std::string(model_->Forward(two).status().message()), HasSubstr("shares its cache"));

  const std::vector<int32_t> long_ids(config_.max_position_embeddings + 1, 1);
  in[0] = {long_ids, &other, 0, 0, {}};
  EXPECT_THAT(std::string(model_->Forward(in).status().message()),
              HasSubstr("max_position_embeddings"));
  EXPECT_EQ(other.length(), 0);
}

TEST_F(RandomModelTest, EmptyBatchAndEmptyChunk) {
  std::vector<SequenceInput> none;
  auto out = model_->Forward(none);
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE(out->logits.empty());
  KvCache cache(config_);
  std::vector<SequenceInput> in(1);
  in[0] = {std::span<const int32_t>(), &cache, 0, 0, {}};
  EXPECT_TRUE(model_->Forward(in).ok());
  EXPECT_EQ(cache.length(), 0);
}

}  // namespace
}  // namespace moeserve
