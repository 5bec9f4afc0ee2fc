// Tokens per expert, per MoE layer and routing mode, accumulated over the engine's forwards: since
// the server started, and over a window of the most recent forwards. Read by GetExpertLoad (and
// the metrics). Thread-safe: the engine loop adds, RPC threads read.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "model/config.h"
#include "model/routing.h"

namespace moeserve {

// One routing mode's counts: rows are the MoE layers in order.
struct ExpertLoadCounts {
  std::vector<int64_t> tokens_per_expert;  // [num_moe_layers * num_experts], row-major
  std::vector<int64_t> tokens;             // [num_moe_layers]
  std::vector<int64_t> dropped_tokens;     // [num_moe_layers]
};

struct ExpertLoadSnapshot {
  int64_t forwards = 0;
  std::vector<int32_t> layers;  // [num_moe_layers]: model layer index of each row
  int64_t num_experts = 0;
  ExpertLoadCounts by_mode[kNumRoutingModes];
};

class ExpertLoadTracker {
 public:
  // `window`: how many recent forwards the recent view covers (>= 1).
  ExpertLoadTracker(const ModelConfig& config, int64_t window);

  // Adds one forward's load (indexed by model layer; dense layers' entries are empty).
  void Add(const std::vector<LayerLoad>& layer_load);
  ExpertLoadSnapshot SinceStart() const;
  ExpertLoadSnapshot Recent() const;

 private:
  ExpertLoadSnapshot Empty() const;
  static void Accumulate(ExpertLoadSnapshot& into, const ExpertLoadSnapshot& add, int64_t sign);

  std::vector<int32_t> layers_;
  int64_t num_experts_;
  int64_t window_;
  mutable absl::Mutex mu_;
  ExpertLoadSnapshot total_ ABSL_GUARDED_BY(mu_);
  ExpertLoadSnapshot recent_ ABSL_GUARDED_BY(mu_);
  std::deque<ExpertLoadSnapshot> history_ ABSL_GUARDED_BY(mu_);  // the forwards in recent_
};

}  // namespace moeserve
