// The Prometheus metrics of `moeserve serve`: every metric family is defined here (metrics.cc),
// every child series is created up front, so that updating one on the engine thread is an index
// and an atomic add. docs/METRICS.md lists the families.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/routing.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace moeserve {

// How much of the expert load is exported.
enum class ExpertMetricsLevel {
  kPerExpert,  // everything, including moeserve_expert_tokens_total{layer, expert, routing}
  kPerLayer,   // per-layer families only
  kOff,        // no expert-load families
};
absl::StatusOr<ExpertMetricsLevel> ParseExpertMetricsLevel(absl::string_view text);
const char* ExpertMetricsLevelName(ExpertMetricsLevel level);

struct ServerMetricsOptions {
  ExpertMetricsLevel expert_level = ExpertMetricsLevel::kPerExpert;
  int64_t load_window = 100;  // forwards covered by the max/mean and CV gauges (>= 1)
  std::string version;        // build_info labels
  std::string model;
  std::string backend;
};

// The queue, batch and cache view refreshed at every scrape.
struct QueueStats {
  int64_t waiting = 0;
  int64_t running = 0;
  int64_t waiting_limit = 0;  // --max_queue_length
  double kv_cache_usage_ratio = 0;
};

// One request's outcome, recorded once where the request ends.
struct RequestOutcome {
  RoutingMode routing = RoutingMode::kTokenChoice;
  int code = 0;                     // gRPC status code (0 = OK)
  absl::Duration total_time;        // arrival to the end
  bool queued = false;              // the request reached the scheduler and got a final event
  absl::Duration queue_time;        // queued only
  absl::Duration first_block_time;  // 0: no block was produced
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
};

class ServerMetrics {
 public:
  // `config` gives the MoE layers and the number of experts.
  ServerMetrics(const ModelConfig& config, const ServerMetricsOptions& options);
  ~ServerMetrics();

  // Engine thread, after every step.
  void ObserveStep(const StepResult& step, absl::Duration step_time);
  // Any thread: one call per request.
  void ObserveRequest(const RequestOutcome& outcome);
  // Called before every collection to refresh the queue gauges (may be empty).
  void SetQueueStatsSource(std::function<QueueStats()> source);

  // What an Exposer registers: refreshes the scrape-time gauges, then collects the registry.
  std::shared_ptr<prometheus::Collectable> collectable() const { return collectable_; }
  // The metric families as Prometheus text (tests, debugging).
  std::string Serialize() const;

  const std::vector<int32_t>& moe_layers() const { return moe_layers_; }

 private:
  class ScrapeCollectable;
  struct LayerSeries {
    prometheus::Counter* tokens = nullptr;
    prometheus::Counter* dropped = nullptr;
    prometheus::Gauge* max_over_mean = nullptr;
    prometheus::Gauge* cv = nullptr;
    std::vector<prometheus::Counter*> expert_tokens;  // [num_experts], empty unless per-expert
  };

  void RefreshScrapeGauges();
  void UpdateWindow(const StepResult& step);

  const ServerMetricsOptions options_;
  std::vector<int32_t> moe_layers_;  // model layer index of each MoE row
  std::vector<int> row_of_layer_;    // [num_hidden_layers]: row, or -1 for dense layers
  int64_t num_experts_ = 0;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> collectable_;  // a ScrapeCollectable

  // Expert load, [mode][row].
  std::vector<LayerSeries> layers_[kNumRoutingModes];
  prometheus::Histogram* experts_per_token_[kNumRoutingModes] = {};
  std::vector<double> experts_per_token_bounds_;
  // Window of recent forwards, engine thread only: counts per [slot][mode][row][expert], and the
  // running sums per [mode][row][expert].
  std::vector<int64_t> window_counts_;
  std::vector<int64_t> window_sums_;
  int64_t window_next_ = 0;

  // Serving.
  std::vector<prometheus::Counter*> requests_[kNumRoutingModes];  // [code]
  prometheus::Histogram* request_duration_[kNumRoutingModes] = {};
  prometheus::Histogram* queue_duration_[kNumRoutingModes] = {};
  prometheus::Histogram* first_block_[kNumRoutingModes] = {};
  prometheus::Counter* generated_tokens_[kNumRoutingModes] = {};
  prometheus::Counter* prompt_tokens_[kNumRoutingModes] = {};
  prometheus::Counter* forwards_ = nullptr;
  prometheus::Counter* forward_launches_[kNumForwardLaunches] = {};
  prometheus::Histogram* forward_tokens_ = nullptr;
  prometheus::Histogram* step_duration_ = nullptr;
  prometheus::Gauge* batch_tokens_ = nullptr;
  prometheus::Gauge* batch_sequences_ = nullptr;
  prometheus::Gauge* waiting_ = nullptr;
  prometheus::Gauge* waiting_limit_ = nullptr;
  prometheus::Gauge* running_ = nullptr;
  prometheus::Gauge* kv_usage_ = nullptr;

  absl::Mutex source_mu_;
  std::function<QueueStats()> queue_source_ ABSL_GUARDED_BY(source_mu_);
};

}  // namespace moeserve
