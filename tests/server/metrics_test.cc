// ServerMetrics driven with synthetic engine steps and request outcomes, read back through the
// Prometheus text exposition.
#include "server/metrics.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "gtest/gtest.h"
#include "model/config.h"
#include "tests/test_util.h"

namespace moeserve {
namespace {

// The demo model: 4 layers, layer 0 dense, layers 1-3 MoE, 32 experts, top-4.
ModelConfig Config() { return DemoModelConfig(); }

ServerMetricsOptions Options(ExpertMetricsLevel level, int64_t window = 2) {
  ServerMetricsOptions options;
  options.expert_level = level;
  options.load_window = window;
  options.version = "1.2.3";
  options.model = "demo";
  options.backend = "cpu";
  return options;
}

// The value of the sample whose line starts with `series` followed by a space; NaN if none.
double Value(const std::string& text, const std::string& series) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.size() > series.size() && line.compare(0, series.size(), series) == 0 &&
        line[series.size()] == ' ') {
      return std::strtod(line.c_str() + series.size() + 1, nullptr);
    }
  }
  return std::nan("");
}

// Samples (not comments) whose name is `name` exactly.
int CountSeries(const std::string& text, const std::string& name) {
  std::istringstream lines(text);
  std::string line;
  int count = 0;
  while (std::getline(lines, line)) {
    if (line.compare(0, name.size(), name) == 0 && line.size() > name.size() &&
        (line[name.size()] == '{' || line[name.size()] == ' ')) {
      ++count;
    }
  }
  return count;
}

// One step: `tokens` tokens per MoE layer in `mode`, every token to the experts listed.
StepResult Step(const ModelConfig& config, RoutingMode mode, const std::vector<int>& experts,
                int64_t tokens, int64_t dropped = 0) {
  StepResult step;
  step.batch_tokens = tokens + dropped;
  step.batch_sequences = 1;
  step.layer_load.resize(static_cast<size_t>(config.num_hidden_layers));
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    if (!config.IsMoeLayer(l)) continue;
    for (RoutingLoad& load : step.layer_load[l].by_mode) {
      load.Resize(config.num_experts, config.num_experts_per_tok);
    }
    RoutingLoad& load = step.layer_load[l].by_mode[static_cast<int>(mode)];
    load.num_tokens = tokens + dropped;
    load.dropped_tokens = dropped;
    for (int e : experts) load.tokens_per_expert[e] += tokens;
    load.num_assignments = tokens * static_cast<int64_t>(experts.size());
    load.experts_per_token[experts.size()] += tokens;
    load.experts_per_token[0] += dropped;
  }
  return step;
}

TEST(ServerMetricsTest, ExpertLoadCountersAndGauges) {
  const ModelConfig config = Config();
  ServerMetrics metrics(config, Options(ExpertMetricsLevel::kPerExpert));
  EXPECT_EQ(metrics.moe_layers(), (std::vector<int32_t>{1, 2, 3}));
  metrics.ObserveStep(Step(config, RoutingMode::kTokenChoice, {0, 1, 2, 3}, 10),
                      absl::Milliseconds(20));
  StepResult replayed = Step(config, RoutingMode::kExpertChoice, {5, 6}, 3, /*dropped=*/2);
  replayed.launch = ForwardLaunch::kReplayed;
  metrics.ObserveStep(replayed, absl::Milliseconds(30));
  const std::string text = metrics.Serialize();
  EXPECT_EQ(
      Value(text, R"(moeserve_expert_tokens_total{expert="0",layer="1",routing="token_choice"})"),
      10);
  EXPECT_EQ(
      Value(text, R"(moeserve_expert_tokens_total{expert="4",layer="1",routing="token_choice"})"),
      0);
  EXPECT_EQ(
      Value(text, R"(moeserve_expert_tokens_total{expert="6",layer="3",routing="expert_choice"})"),
      3);
  EXPECT_EQ(Value(text, R"(moeserve_moe_tokens_total{layer="2",routing="token_choice"})"), 10);
  EXPECT_EQ(Value(text, R"(moeserve_moe_tokens_total{layer="2",routing="expert_choice"})"), 5);
  EXPECT_EQ(Value(text, R"(moeserve_moe_dropped_tokens_total{layer="2",routing="expert_choice"})"),
            2);
  EXPECT_EQ(Value(text, R"(moeserve_moe_dropped_tokens_total{layer="2",routing="token_choice"})"),
            0);
  // Token-choice: 4 of 32 experts hold all 40 assignments; mean 1.25, max 10: 8.
  EXPECT_DOUBLE_EQ(
      Value(text, R"(moeserve_expert_load_max_over_mean{layer="1",routing="token_choice"})"), 8.0);
  // CV of (10 x 4, 0 x 28): mean 1.25, std sqrt(4 * 8.75^2 + 28 * 1.25^2) / sqrt(32).
  const double std_dev = std::sqrt((4 * 8.75 * 8.75 + 28 * 1.25 * 1.25) / 32);
  EXPECT_NEAR(Value(text, R"(moeserve_expert_load_cv{layer="1",routing="token_choice"})"),
              std_dev / 1.25, 1e-12);
  EXPECT_NEAR(Value(text, R"(moeserve_expert_load_cv{layer="1",routing="expert_choice"})"),
              std::sqrt((2 * 2.8125 * 2.8125 + 30 * 0.1875 * 0.1875) / 32) / 0.1875, 1e-12);
  // Experts per token: 3 layers x 10 tokens with 4 experts; 3 x (3 with 2, 2 with none).
  EXPECT_EQ(Value(text, R"(moeserve_experts_per_token_count{routing="token_choice"})"), 30);
  EXPECT_EQ(Value(text, R"(moeserve_experts_per_token_sum{routing="token_choice"})"), 120);
  EXPECT_EQ(Value(text, R"(moeserve_experts_per_token_bucket{routing="token_choice",le="3"})"), 0);
  EXPECT_EQ(Value(text, R"(moeserve_experts_per_token_bucket{routing="token_choice",le="4"})"), 30);
  EXPECT_EQ(Value(text, R"(moeserve_experts_per_token_bucket{routing="expert_choice",le="0"})"), 6);
  EXPECT_EQ(Value(text, R"(moeserve_experts_per_token_count{routing="expert_choice"})"), 15);
  // Engine.
  EXPECT_EQ(Value(text, "moeserve_forwards_total"), 2);
  EXPECT_EQ(Value(text, R"(moeserve_forward_launches_total{launch="eager"})"), 1);
  EXPECT_EQ(Value(text, R"(moeserve_forward_launches_total{launch="captured"})"), 0);
  EXPECT_EQ(Value(text, R"(moeserve_forward_launches_total{launch="replayed"})"), 1);
  EXPECT_EQ(Value(text, "moeserve_batch_tokens"), 5);
  EXPECT_EQ(Value(text, "moeserve_engine_step_duration_seconds_count"), 2);
  EXPECT_NEAR(Value(text, "moeserve_engine_step_duration_seconds_sum"), 0.05, 1e-9);
  EXPECT_EQ(Value(text, R"(moeserve_forward_tokens_bucket{le="8"})"), 1);
  EXPECT_EQ(Value(text, R"(moeserve_build_info{backend="cpu",model="demo",version="1.2.3"})"), 1);
}

TEST(ServerMetricsTest, WindowForgetsOldForwards) {
  const ModelConfig config = Config();
  ServerMetrics metrics(config, Options(ExpertMetricsLevel::kPerLayer, /*window=*/2));
  const std::string tc = R"(moeserve_expert_load_max_over_mean{layer="1",routing="token_choice"})";
  std::vector<int> all(32);
  for (int e = 0; e < 32; ++e) all[e] = e;
  metrics.ObserveStep(Step(config, RoutingMode::kTokenChoice, {0}, 32), absl::Milliseconds(1));
  EXPECT_DOUBLE_EQ(Value(metrics.Serialize(), tc), 32.0);
  metrics.ObserveStep(Step(config, RoutingMode::kTokenChoice, all, 1), absl::Milliseconds(1));
  // (33, 1 x 31) over 2 forwards: mean 2, max 33.
  EXPECT_DOUBLE_EQ(Value(metrics.Serialize(), tc), 16.5);
  metrics.ObserveStep(Step(config, RoutingMode::kTokenChoice, all, 1), absl::Milliseconds(1));
  // The first forward left the window: perfectly even.
  EXPECT_DOUBLE_EQ(Value(metrics.Serialize(), tc), 1.0);
  EXPECT_DOUBLE_EQ(
      Value(metrics.Serialize(), R"(moeserve_expert_load_cv{layer="1",routing="token_choice"})"),
      0.0);
  // The other mode saw nothing: 0.
  EXPECT_EQ(Value(metrics.Serialize(),
                  R"(moeserve_expert_load_max_over_mean{layer="1",routing="expert_choice"})"),
            0.0);
}

TEST(ServerMetricsTest, SeriesCountsPerLevel) {
  const ModelConfig config = Config();
  const int layers = 3;
  const int experts = 32;
  const std::string per_expert =
      ServerMetrics(config, Options(ExpertMetricsLevel::kPerExpert)).Serialize();
  const std::string per_layer =
      ServerMetrics(config, Options(ExpertMetricsLevel::kPerLayer)).Serialize();
  const std::string off = ServerMetrics(config, Options(ExpertMetricsLevel::kOff)).Serialize();
  EXPECT_EQ(CountSeries(per_expert, "moeserve_expert_tokens_total"), layers * experts * 2);
  EXPECT_EQ(CountSeries(per_layer, "moeserve_expert_tokens_total"), 0);
  EXPECT_EQ(CountSeries(off, "moeserve_expert_tokens_total"), 0);
  for (const char* name : {"moeserve_moe_tokens_total", "moeserve_moe_dropped_tokens_total",
                           "moeserve_expert_load_max_over_mean", "moeserve_expert_load_cv"}) {
    EXPECT_EQ(CountSeries(per_expert, name), layers * 2) << name;
    EXPECT_EQ(CountSeries(per_layer, name), layers * 2) << name;
    EXPECT_EQ(CountSeries(off, name), 0) << name;
  }
  EXPECT_EQ(CountSeries(per_layer, "moeserve_experts_per_token_count"), 2);
  EXPECT_EQ(CountSeries(off, "moeserve_experts_per_token_count"), 0);
  // Serving families are there at every level: 17 codes x 2 modes.
  EXPECT_EQ(CountSeries(off, "moeserve_requests_total"), 34);
  EXPECT_EQ(CountSeries(off, "moeserve_requests_waiting"), 1);
  // Off: an engine step still counts, without expert families.
  ServerMetrics metrics(config, Options(ExpertMetricsLevel::kOff));
  metrics.ObserveStep(Step(config, RoutingMode::kExpertChoice, {1}, 4), absl::Milliseconds(1));
  EXPECT_EQ(Value(metrics.Serialize(), "moeserve_forwards_total"), 1);
}

// The scrape at the full LLaDA2.0-mini shape (19 MoE layers x 256 experts x 2 modes) at the
// default detail: its series, bytes and serialization time, and the engine thread's cost of one
// forward's update. Prints the numbers (docs/METRICS.md quotes them); asserts only the counts.
TEST(ServerMetricsTest, FullMiniShapeScrapeCost) {
  auto config = LoadModelConfig(testing::SourceDir() + "/model/configs/LLaDA2.0-mini-preview.json");
  ASSERT_TRUE(config.ok()) << config.status();
  ServerMetrics metrics(*config, Options(ExpertMetricsLevel::kPerExpert, 100));
  std::vector<int> all(config->num_experts);
  for (int e = 0; e < config->num_experts; ++e) all[e] = e;
  const StepResult tc = Step(*config, RoutingMode::kTokenChoice, all, 1000);
  const StepResult ec = Step(*config, RoutingMode::kExpertChoice, all, 1000);
  using Clock = std::chrono::steady_clock;
  std::vector<double> observe_us;
  for (int i = 0; i < 200; ++i) {
    const auto start = Clock::now();
    metrics.ObserveStep(i % 2 ? tc : ec, absl::Milliseconds(10));
    observe_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count());
  }
  std::string text;
  std::vector<double> scrape_ms;
  for (int i = 0; i < 20; ++i) {
    const auto start = Clock::now();
    text = metrics.Serialize();
    scrape_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }
  std::sort(observe_us.begin(), observe_us.end());
  std::sort(scrape_ms.begin(), scrape_ms.end());
  int samples = 0;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) samples += !line.empty() && line[0] != '#';
  const int series = CountSeries(text, "moeserve_expert_tokens_total");
  std::printf(
      "full LLaDA2.0-mini shape, per_expert: %d samples (%d of moeserve_expert_tokens_total), "
      "%zu bytes per scrape, serialization median %.2f ms; ObserveStep median %.1f us per "
      "forward\n",
      samples, series, text.size(), scrape_ms[scrape_ms.size() / 2],
      observe_us[observe_us.size() / 2]);
  EXPECT_EQ(series, 19 * 256 * 2);
  EXPECT_EQ(CountSeries(text, "moeserve_expert_load_cv"), 19 * 2);
}

TEST(ServerMetricsTest, RequestOutcomesAndScrapeGauges) {
  ServerMetrics metrics(Config(), Options(ExpertMetricsLevel::kPerLayer));
  RequestOutcome ok;
  ok.routing = RoutingMode::kExpertChoice;
  ok.code = 0;
  ok.total_time = absl::Milliseconds(300);
  ok.queued = true;
  ok.queue_time = absl::Milliseconds(7);
  ok.first_block_time = absl::Milliseconds(40);
  ok.prompt_tokens = 5;
  ok.generated_tokens = 16;
  metrics.ObserveRequest(ok);
  metrics.ObserveRequest(ok);
  RequestOutcome rejected;  // refused before queueing: no queue time, no block
  rejected.code = 3;
  rejected.total_time = absl::Milliseconds(1);
  metrics.ObserveRequest(rejected);
  metrics.SetQueueStatsSource([] { return QueueStats{3, 2, 256, 0.25}; });
  const std::string text = metrics.Serialize();
  EXPECT_EQ(Value(text, R"(moeserve_requests_total{code="OK",routing="expert_choice"})"), 2);
  EXPECT_EQ(
      Value(text, R"(moeserve_requests_total{code="INVALID_ARGUMENT",routing="token_choice"})"), 1);
  EXPECT_EQ(Value(text, R"(moeserve_requests_total{code="OK",routing="token_choice"})"), 0);
  EXPECT_EQ(Value(text, R"(moeserve_generated_tokens_total{routing="expert_choice"})"), 32);
  EXPECT_EQ(Value(text, R"(moeserve_prompt_tokens_total{routing="expert_choice"})"), 10);
  EXPECT_EQ(Value(text, R"(moeserve_request_duration_seconds_count{routing="token_choice"})"), 1);
  EXPECT_EQ(
      Value(text, R"(moeserve_request_duration_seconds_bucket{routing="expert_choice",le="0.25"})"),
      0);
  EXPECT_EQ(
      Value(text, R"(moeserve_request_duration_seconds_bucket{routing="expert_choice",le="0.5"})"),
      2);
  EXPECT_EQ(Value(text, R"(moeserve_request_queue_duration_seconds_count{routing="token_choice"})"),
            0);
  EXPECT_EQ(
      Value(text,
            R"(moeserve_request_queue_duration_seconds_bucket{routing="expert_choice",le="0.01"})"),
      2);
  EXPECT_EQ(Value(text, R"(moeserve_time_to_first_block_seconds_count{routing="expert_choice"})"),
            2);
  EXPECT_EQ(Value(text, "moeserve_requests_waiting"), 3);
  EXPECT_EQ(Value(text, "moeserve_requests_running"), 2);
  EXPECT_EQ(Value(text, "moeserve_requests_waiting_limit"), 256);
  EXPECT_EQ(Value(text, "moeserve_kv_cache_usage_ratio"), 0.25);
}

TEST(ServerMetricsTest, ParsesLevels) {
  EXPECT_EQ(*ParseExpertMetricsLevel("per_expert"), ExpertMetricsLevel::kPerExpert);
  EXPECT_EQ(*ParseExpertMetricsLevel("per_layer"), ExpertMetricsLevel::kPerLayer);
  EXPECT_EQ(*ParseExpertMetricsLevel("off"), ExpertMetricsLevel::kOff);
  EXPECT_FALSE(ParseExpertMetricsLevel("all").ok());
}

}  // namespace
}  // namespace moeserve
