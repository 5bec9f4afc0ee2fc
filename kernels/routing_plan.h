// The expert-centric routing plan: the one thing the expert kernels see of routing.
//
// Whatever router produced them (token-choice, expert-choice, several scopes of either in one
// forward), the selections of a forward become, for every expert, the list of (token_idx, weight)
// pairs it processes. Assignments are grouped by expert (expert_offsets is a CSR index) and, inside
// an expert, sorted by ascending token_idx, so the plan, and everything computed from it, does not
// depend on the order in which routers added their selections.
#pragma once

#include <cstdint>
#include <vector>

namespace moeserve {

struct RoutingPlan {
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  std::vector<int32_t> expert_offsets;  // [num_experts + 1]
  std::vector<int32_t> token_idx;       // [num_assignments]
  std::vector<float> weight;            // [num_assignments]

  int64_t num_assignments() const { return static_cast<int64_t>(token_idx.size()); }
  int64_t expert_count(int64_t expert_idx) const {
    return expert_offsets[expert_idx + 1] - expert_offsets[expert_idx];
  }
};

// Collects (token_idx, expert_idx, weight) selections from any number of routers, then sorts them
// into a RoutingPlan. Not thread-safe.
class RoutingPlanBuilder {
 public:
  RoutingPlanBuilder(int64_t num_tokens, int64_t num_experts);
  void Add(int32_t token_idx, int32_t expert_idx, float weight) {
    entries_.push_back({token_idx, expert_idx, weight});
  }
  RoutingPlan Finish() &&;

 private:
  struct Entry {
    int32_t token_idx;
    int32_t expert_idx;
    float weight;
  };
  int64_t num_tokens_;
  int64_t num_experts_;
  std::vector<Entry> entries_;
};

}  // namespace moeserve
