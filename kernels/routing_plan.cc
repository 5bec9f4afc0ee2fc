#include "kernels/routing_plan.h"

#include <algorithm>

namespace moeserve {

RoutingPlanBuilder::RoutingPlanBuilder(int64_t num_tokens, int64_t num_experts)
    : num_tokens_(num_tokens), num_experts_(num_experts) {}

RoutingPlan RoutingPlanBuilder::Finish() && {
  std::sort(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) {
    return a.expert_idx != b.expert_idx ? a.expert_idx < b.expert_idx : a.token_idx < b.token_idx;
  });
  RoutingPlan plan;
  plan.num_tokens = num_tokens_;
  plan.num_experts = num_experts_;
  plan.expert_offsets.assign(num_experts_ + 1, 0);
  plan.token_idx.reserve(entries_.size());
  plan.weight.reserve(entries_.size());
  for (const Entry& e : entries_) {
    ++plan.expert_offsets[e.expert_idx + 1];
    plan.token_idx.push_back(e.token_idx);
    plan.weight.push_back(e.weight);
  }
  for (int64_t e = 0; e < num_experts_; ++e) plan.expert_offsets[e + 1] += plan.expert_offsets[e];
  return plan;
}

}  // namespace moeserve
