#include "server/metrics.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "prometheus/family.h"
#include "prometheus/text_serializer.h"

namespace moeserve {
namespace {

constexpr int kNumGrpcCodes = 17;  // OK .. UNAUTHENTICATED

// Latency buckets from 5 ms (a GPU block) to 120 s (a long CPU demo generation).
const std::vector<double>& LatencyBuckets() {
  static const auto* buckets = new std::vector<double>{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                       2.5,   5,    10,    20,   30,  60,   120};
  return *buckets;
}

// One engine step: 1 ms .. 10 s.
const std::vector<double>& StepBuckets() {
  static const auto* buckets = new std::vector<double>{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                       0.25,  0.5,    1,     2.5,  5,     10};
  return *buckets;
}

// Tokens per forward: powers of two up to 16384.
std::vector<double> ForwardTokenBuckets() {
  std::vector<double> buckets;
  for (double b = 1; b <= 16384; b *= 2) buckets.push_back(b);
  return buckets;
}

// Experts per token: every count up to 2 * top-k, then powers of two up to num_experts.
std::vector<double> ExpertsPerTokenBuckets(int64_t topk, int64_t num_experts) {
  std::vector<double> buckets;
  const int64_t dense_to = std::min<int64_t>(2 * std::max<int64_t>(topk, 1), num_experts);
  for (int64_t j = 0; j <= dense_to; ++j) buckets.push_back(static_cast<double>(j));
  for (int64_t j = 32; j < num_experts; j *= 2) {
    if (j > dense_to) buckets.push_back(static_cast<double>(j));
  }
  return buckets;
}

const char* CodeName(int code) {
  static const char* const kNames[kNumGrpcCodes] = {"OK",
                                                    "CANCELLED",
                                                    "UNKNOWN",
                                                    "INVALID_ARGUMENT",
                                                    "DEADLINE_EXCEEDED",
                                                    "NOT_FOUND",
                                                    "ALREADY_EXISTS",
                                                    "PERMISSION_DENIED",
                                                    "RESOURCE_EXHAUSTED",
                                                    "FAILED_PRECONDITION",
                                                    "ABORTED",
                                                    "OUT_OF_RANGE",
                                                    "UNIMPLEMENTED",
                                                    "INTERNAL",
                                                    "UNAVAILABLE",
                                                    "DATA_LOSS",
                                                    "UNAUTHENTICATED"};
  return kNames[code];
}

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

}  // namespace

absl::StatusOr<ExpertMetricsLevel> ParseExpertMetricsLevel(absl::string_view text) {
  if (text == "per_expert") return ExpertMetricsLevel::kPerExpert;
  if (text == "per_layer") return ExpertMetricsLevel::kPerLayer;
  if (text == "off") return ExpertMetricsLevel::kOff;
  return absl::InvalidArgumentError(
      absl::StrCat("\"", text, "\" is not per_expert, per_layer or off"));
}

const char* ExpertMetricsLevelName(ExpertMetricsLevel level) {
  switch (level) {
    case ExpertMetricsLevel::kPerExpert:
      return "per_expert";
    case ExpertMetricsLevel::kPerLayer:
      return "per_layer";
    case ExpertMetricsLevel::kOff:
      return "off";
  }
  return "?";
}

// Refreshes the scrape-time gauges before the registry is collected.
class ServerMetrics::ScrapeCollectable : public prometheus::Collectable {
 public:
  explicit ScrapeCollectable(ServerMetrics* metrics) : metrics_(metrics) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    metrics_->RefreshScrapeGauges();
    return metrics_->registry_->Collect();
  }

 private:
  ServerMetrics* metrics_;
};

ServerMetrics::ServerMetrics(const ModelConfig& config, const ServerMetricsOptions& options)
    : options_(options),
      num_experts_(config.num_experts),
      registry_(std::make_shared<prometheus::Registry>()) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  using prometheus::BuildHistogram;
  prometheus::Registry& r = *registry_;
  row_of_layer_.assign(static_cast<size_t>(config.num_hidden_layers), -1);
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    if (!config.IsMoeLayer(l)) continue;
    row_of_layer_[static_cast<size_t>(l)] = static_cast<int>(moe_layers_.size());
    moe_layers_.push_back(static_cast<int32_t>(l));
  }
  const size_t rows = moe_layers_.size();
  const size_t experts = static_cast<size_t>(num_experts_);

  // Expert load.
  if (options_.expert_level != ExpertMetricsLevel::kOff) {
    auto& moe_tokens = BuildCounter()
                           .Name("moeserve_moe_tokens_total")
                           .Help("Tokens routed by a MoE layer, per model layer and routing mode.")
                           .Register(r);
    auto& dropped = BuildCounter()
                        .Name("moeserve_moe_dropped_tokens_total")
                        .Help(
                            "Tokens of a MoE layer that got no routed expert (expert-choice "
                            "only: they get the shared expert alone).")
                        .Register(r);
    auto& max_over_mean =
        BuildGauge()
            .Name("moeserve_expert_load_max_over_mean")
            .Help(
                "Tokens of the busiest expert over the mean tokens per expert, over the last "
                "--expert_load_window forwards (1 = perfectly even; 0 = no tokens).")
            .Register(r);
    auto& cv = BuildGauge()
                   .Name("moeserve_expert_load_cv")
                   .Help(
                       "Coefficient of variation (std / mean) of tokens per expert, over the "
                       "last --expert_load_window forwards (0 = perfectly even or no tokens).")
                   .Register(r);
    auto& per_token = BuildHistogram()
                          .Name("moeserve_experts_per_token")
                          .Help(
                              "Routed experts a token got in one MoE layer, over all MoE "
                              "layers, per routing mode.")
                          .Register(r);
    prometheus::Family<prometheus::Counter>* expert_tokens = nullptr;
    if (options_.expert_level == ExpertMetricsLevel::kPerExpert) {
      expert_tokens = &BuildCounter()
                           .Name("moeserve_expert_tokens_total")
                           .Help(
                               "Token-expert assignments, per MoE layer, expert and routing "
                               "mode.")
                           .Register(r);
    }
    experts_per_token_bounds_ = ExpertsPerTokenBuckets(config.num_experts_per_tok, num_experts_);
    std::vector<std::string> expert_names(experts);
    for (size_t e = 0; e < experts; ++e) expert_names[e] = std::to_string(e);
    for (int m = 0; m < kNumRoutingModes; ++m) {
      const std::string mode = RoutingModeName(static_cast<RoutingMode>(m));
      experts_per_token_[m] = &per_token.Add({{"routing", mode}}, experts_per_token_bounds_);
      layers_[m].resize(rows);
      for (size_t row = 0; row < rows; ++row) {
        const std::string layer = std::to_string(moe_layers_[row]);
        const prometheus::Labels labels = {{"layer", layer}, {"routing", mode}};
        LayerSeries& s = layers_[m][row];
        s.tokens = &moe_tokens.Add(labels);
        s.dropped = &dropped.Add(labels);
        s.max_over_mean = &max_over_mean.Add(labels);
        s.cv = &cv.Add(labels);
        if (expert_tokens != nullptr) {
          s.expert_tokens.resize(experts);
          for (size_t e = 0; e < experts; ++e) {
            s.expert_tokens[e] = &expert_tokens->Add(
                {{"layer", layer}, {"expert", expert_names[e]}, {"routing", mode}});
          }
        }
      }
    }
    const size_t slots = static_cast<size_t>(std::max<int64_t>(options_.load_window, 1));
    window_sums_.assign(kNumRoutingModes * rows * experts, 0);
    window_counts_.assign(slots * window_sums_.size(), 0);
  }

  // Requests.
  auto& requests = BuildCounter()
                       .Name("moeserve_requests_total")
                       .Help(
                           "Generate and GenerateStream calls that ended, per routing mode and "
                           "final gRPC status code.")
                       .Register(r);
  auto& duration = BuildHistogram()
                       .Name("moeserve_request_duration_seconds")
                       .Help("Time from a call's arrival to its end, per routing mode.")
                       .Register(r);
  auto& queue = BuildHistogram()
                    .Name("moeserve_request_queue_duration_seconds")
                    .Help("Time a request waited in the queue before it joined the batch.")
                    .Register(r);
  auto& first_block = BuildHistogram()
                          .Name("moeserve_time_to_first_block_seconds")
                          .Help("Time from a request's arrival to its first finished block.")
                          .Register(r);
  auto& generated = BuildCounter()
                        .Name("moeserve_generated_tokens_total")
                        .Help("Tokens returned to clients, per routing mode.")
                        .Register(r);
  auto& prompt = BuildCounter()
                     .Name("moeserve_prompt_tokens_total")
                     .Help("Prompt tokens of requests that ended, per routing mode.")
                     .Register(r);
  for (int m = 0; m < kNumRoutingModes; ++m) {
    const std::string mode = RoutingModeName(static_cast<RoutingMode>(m));
    requests_[m].resize(kNumGrpcCodes);
    for (int code = 0; code < kNumGrpcCodes; ++code) {
      requests_[m][code] = &requests.Add({{"routing", mode}, {"code", CodeName(code)}});
    }
    request_duration_[m] = &duration.Add({{"routing", mode}}, LatencyBuckets());
    queue_duration_[m] = &queue.Add({{"routing", mode}}, LatencyBuckets());
    first_block_[m] = &first_block.Add({{"routing", mode}}, LatencyBuckets());
    generated_tokens_[m] = &generated.Add({{"routing", mode}});
    prompt_tokens_[m] = &prompt.Add({{"routing", mode}});
  }

  // Engine.
  forwards_ = &BuildCounter()
                   .Name("moeserve_forwards_total")
                   .Help("Engine steps (one batched forward each).")
                   .Register(r)
                   .Add({});
  auto& launches = BuildCounter()
                       .Name("moeserve_forward_launches_total")
                       .Help(
                           "Engine steps by how the forward's layers ran on the GPU: eager (kernel "
                           "by kernel; always on the CPU), captured (into a new CUDA graph), "
                           "replayed (from a graph of the same batch shape).")
                       .Register(r);
  for (int l = 0; l < kNumForwardLaunches; ++l) {
    forward_launches_[l] =
        &launches.Add({{"launch", ForwardLaunchName(static_cast<ForwardLaunch>(l))}});
  }
  forward_tokens_ = &BuildHistogram()
                         .Name("moeserve_forward_tokens")
                         .Help("Tokens packed into one forward.")
                         .Register(r)
                         .Add({}, ForwardTokenBuckets());
  step_duration_ = &BuildHistogram()
                        .Name("moeserve_engine_step_duration_seconds")
                        .Help("Wall time of one engine step.")
                        .Register(r)
                        .Add({}, StepBuckets());
  batch_tokens_ = &BuildGauge()
                       .Name("moeserve_batch_tokens")
                       .Help("Tokens in the last forward.")
                       .Register(r)
                       .Add({});
  batch_sequences_ = &BuildGauge()
                          .Name("moeserve_batch_sequences")
                          .Help("Sequences in the last forward.")
                          .Register(r)
                          .Add({});
  waiting_ = &BuildGauge()
                  .Name("moeserve_requests_waiting")
                  .Help("Requests in the queue, not yet admitted into the batch.")
                  .Register(r)
                  .Add({});
  waiting_limit_ = &BuildGauge()
                        .Name("moeserve_requests_waiting_limit")
                        .Help(
                            "Requests that may wait at most (--max_queue_length); beyond it, "
                            "RESOURCE_EXHAUSTED.")
                        .Register(r)
                        .Add({});
  running_ = &BuildGauge()
                  .Name("moeserve_requests_running")
                  .Help("Requests admitted into the batch.")
                  .Register(r)
                  .Add({});
  kv_usage_ = &BuildGauge()
                   .Name("moeserve_kv_cache_usage_ratio")
                   .Help("K/V cache bytes reserved by admitted requests over --kv_cache_gib.")
                   .Register(r)
                   .Add({});
  BuildGauge()
      .Name("moeserve_build_info")
      .Help("Always 1; the labels name the server version, the model and the compute backend.")
      .Register(r)
      .Add(
          {{"version", options_.version}, {"model", options_.model}, {"backend", options_.backend}})
      .Set(1);

  collectable_ = std::make_shared<ScrapeCollectable>(this);
}

ServerMetrics::~ServerMetrics() = default;

void ServerMetrics::ObserveStep(const StepResult& step, absl::Duration step_time) {
  forwards_->Increment();
  forward_launches_[static_cast<int>(step.launch)]->Increment();
  forward_tokens_->Observe(static_cast<double>(step.batch_tokens));
  step_duration_->Observe(Seconds(step_time));
  batch_tokens_->Set(static_cast<double>(step.batch_tokens));
  batch_sequences_->Set(static_cast<double>(step.batch_sequences));
  if (options_.expert_level == ExpertMetricsLevel::kOff) return;

  std::vector<double> bucket_increments(experts_per_token_bounds_.size() + 1);
  for (int m = 0; m < kNumRoutingModes; ++m) {
    std::fill(bucket_increments.begin(), bucket_increments.end(), 0.0);
    double sum = 0;
    bool any = false;
    for (size_t l = 0; l < step.layer_load.size() && l < row_of_layer_.size(); ++l) {
      const int row = row_of_layer_[l];
      if (row < 0) continue;
      const RoutingLoad& load = step.layer_load[l].by_mode[m];
      LayerSeries& s = layers_[m][static_cast<size_t>(row)];
      if (load.num_tokens > 0) s.tokens->Increment(static_cast<double>(load.num_tokens));
      if (load.dropped_tokens > 0) s.dropped->Increment(static_cast<double>(load.dropped_tokens));
      if (!s.expert_tokens.empty()) {
        const size_t n = std::min(load.tokens_per_expert.size(), s.expert_tokens.size());
        for (size_t e = 0; e < n; ++e) {
          if (load.tokens_per_expert[e] > 0) {
            s.expert_tokens[e]->Increment(static_cast<double>(load.tokens_per_expert[e]));
          }
        }
      }
      // experts_per_token[j] tokens got j experts: bucket of the first bound >= j.
      for (size_t j = 0; j < load.experts_per_token.size(); ++j) {
        const int64_t count = load.experts_per_token[j];
        if (count == 0) continue;
        const auto it = std::lower_bound(experts_per_token_bounds_.begin(),
                                         experts_per_token_bounds_.end(), static_cast<double>(j));
        bucket_increments[static_cast<size_t>(it - experts_per_token_bounds_.begin())] +=
            static_cast<double>(count);
        sum += static_cast<double>(count) * static_cast<double>(j);
        any = true;
      }
    }
    if (any) experts_per_token_[m]->ObserveMultiple(bucket_increments, sum);
  }
  UpdateWindow(step);
}

void ServerMetrics::UpdateWindow(const StepResult& step) {
  const size_t rows = moe_layers_.size();
  const size_t experts = static_cast<size_t>(num_experts_);
  const size_t slot_size = window_sums_.size();
  if (slot_size == 0) return;
  int64_t* slot = window_counts_.data() + static_cast<size_t>(window_next_) * slot_size;
  const int64_t slots = static_cast<int64_t>(window_counts_.size() / slot_size);
  window_next_ = (window_next_ + 1) % slots;
  // Forget the oldest forward, then add this one in its place.
  for (size_t i = 0; i < slot_size; ++i) window_sums_[i] -= slot[i];
  std::fill(slot, slot + slot_size, 0);
  for (size_t l = 0; l < step.layer_load.size() && l < row_of_layer_.size(); ++l) {
    const int row = row_of_layer_[l];
    if (row < 0) continue;
    for (int m = 0; m < kNumRoutingModes; ++m) {
      const std::vector<int64_t>& counts = step.layer_load[l].by_mode[m].tokens_per_expert;
      const size_t base = (static_cast<size_t>(m) * rows + static_cast<size_t>(row)) * experts;
      const size_t n = std::min(counts.size(), experts);
      for (size_t e = 0; e < n; ++e) {
        slot[base + e] = counts[e];
        window_sums_[base + e] += counts[e];
      }
    }
  }
  for (int m = 0; m < kNumRoutingModes; ++m) {
    for (size_t row = 0; row < rows; ++row) {
      const int64_t* sums = window_sums_.data() + (static_cast<size_t>(m) * rows + row) * experts;
      double total = 0;
      double max = 0;
      for (size_t e = 0; e < experts; ++e) {
        total += static_cast<double>(sums[e]);
        max = std::max(max, static_cast<double>(sums[e]));
      }
      double max_over_mean = 0;
      double cv = 0;
      if (total > 0) {
        const double mean = total / static_cast<double>(experts);
        double squares = 0;
        for (size_t e = 0; e < experts; ++e) {
          const double d = static_cast<double>(sums[e]) - mean;
          squares += d * d;
        }
        max_over_mean = max / mean;
        cv = std::sqrt(squares / static_cast<double>(experts)) / mean;
      }
      layers_[m][row].max_over_mean->Set(max_over_mean);
      layers_[m][row].cv->Set(cv);
    }
  }
}

void ServerMetrics::ObserveRequest(const RequestOutcome& outcome) {
  const int m = static_cast<int>(outcome.routing);
  const int code = outcome.code >= 0 && outcome.code < kNumGrpcCodes ? outcome.code : 2;
  requests_[m][static_cast<size_t>(code)]->Increment();
  request_duration_[m]->Observe(Seconds(outcome.total_time));
  if (outcome.queued) queue_duration_[m]->Observe(Seconds(outcome.queue_time));
  if (outcome.first_block_time > absl::ZeroDuration()) {
    first_block_[m]->Observe(Seconds(outcome.first_block_time));
  }
  if (outcome.prompt_tokens > 0) {
    prompt_tokens_[m]->Increment(static_cast<double>(outcome.prompt_tokens));
  }
  if (outcome.generated_tokens > 0) {
    generated_tokens_[m]->Increment(static_cast<double>(outcome.generated_tokens));
  }
}

void ServerMetrics::SetQueueStatsSource(std::function<QueueStats()> source) {
  absl::MutexLock lock(&source_mu_);
  queue_source_ = std::move(source);
}

void ServerMetrics::RefreshScrapeGauges() {
  absl::MutexLock lock(&source_mu_);
  if (!queue_source_) return;
  const QueueStats stats = queue_source_();
  waiting_->Set(static_cast<double>(stats.waiting));
  running_->Set(static_cast<double>(stats.running));
  waiting_limit_->Set(static_cast<double>(stats.waiting_limit));
  kv_usage_->Set(stats.kv_cache_usage_ratio);
}

std::string ServerMetrics::Serialize() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, collectable_->Collect());
  return out.str();
}

}  // namespace moeserve
