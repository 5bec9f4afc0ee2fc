#include "server/expert_load.h"

#include <algorithm>

namespace moeserve {

ExpertLoadTracker::ExpertLoadTracker(const ModelConfig& config, int64_t window)
    : num_experts_(config.num_experts), window_(std::max<int64_t>(window, 1)) {
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    if (config.IsMoeLayer(l)) layers_.push_back(static_cast<int32_t>(l));
  }
  total_ = Empty();
  recent_ = Empty();
}

ExpertLoadSnapshot ExpertLoadTracker::Empty() const {
  ExpertLoadSnapshot s;
  s.layers = layers_;
  s.num_experts = num_experts_;
  const size_t rows = layers_.size();
  for (ExpertLoadCounts& m : s.by_mode) {
    m.tokens_per_expert.assign(rows * num_experts_, 0);
    m.tokens.assign(rows, 0);
    m.dropped_tokens.assign(rows, 0);
  }
  return s;
}

void ExpertLoadTracker::Accumulate(ExpertLoadSnapshot& into, const ExpertLoadSnapshot& add,
                                   int64_t sign) {
  into.forwards += sign * add.forwards;
  for (int m = 0; m < kNumRoutingModes; ++m) {
    auto add_all = [sign](std::vector<int64_t>& a, const std::vector<int64_t>& b) {
      for (size_t i = 0; i < a.size(); ++i) a[i] += sign * b[i];
    };
    add_all(into.by_mode[m].tokens_per_expert, add.by_mode[m].tokens_per_expert);
    add_all(into.by_mode[m].tokens, add.by_mode[m].tokens);
    add_all(into.by_mode[m].dropped_tokens, add.by_mode[m].dropped_tokens);
  }
}

void ExpertLoadTracker::Add(const std::vector<LayerLoad>& layer_load) {
  ExpertLoadSnapshot step = Empty();
  step.forwards = 1;
  for (size_t row = 0; row < layers_.size(); ++row) {
    const size_t l = static_cast<size_t>(layers_[row]);
    if (l >= layer_load.size()) continue;
    for (int m = 0; m < kNumRoutingModes; ++m) {
      const RoutingLoad& load = layer_load[l].by_mode[m];
      ExpertLoadCounts& out = step.by_mode[m];
      for (size_t e = 0; e < load.tokens_per_expert.size() && e < size_t(num_experts_); ++e) {
        out.tokens_per_expert[row * num_experts_ + e] = load.tokens_per_expert[e];
      }
      out.tokens[row] = load.num_tokens;
      out.dropped_tokens[row] = load.dropped_tokens;
    }
  }
  absl::MutexLock lock(&mu_);
  Accumulate(total_, step, 1);
  Accumulate(recent_, step, 1);
  history_.push_back(std::move(step));
  if (static_cast<int64_t>(history_.size()) > window_) {
    Accumulate(recent_, history_.front(), -1);
    history_.pop_front();
  }
}

ExpertLoadSnapshot ExpertLoadTracker::SinceStart() const {
  absl::MutexLock lock(&mu_);
  return total_;
}

ExpertLoadSnapshot ExpertLoadTracker::Recent() const {
  absl::MutexLock lock(&mu_);
  return recent_;
}

}  // namespace moeserve
