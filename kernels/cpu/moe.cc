#include "kernels/cpu/moe.h"

#include <algorithm>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/swiglu.h"

namespace moeserve::cpu {

void MoeExperts(const MoeExpertsArgs& args) {
  const RoutingPlan& plan = *args.plan;
  const int64_t hidden = args.w13->dim(2);
  const int64_t width = args.w13->dim(1) / 2;
  const int64_t num_assignments = plan.num_assignments();
  if (num_assignments == 0) return;

  std::vector<float> expert_out(num_assignments * hidden);  // [num_assignments, hidden_size]
#pragma omp parallel
  {
    std::vector<float> xs, gate_up, act;
#pragma omp for schedule(dynamic, 1)
    for (int64_t e = 0; e < plan.num_experts; ++e) {
      const int64_t begin = plan.expert_offsets[e], count = plan.expert_count(e);
      if (count == 0) continue;
      xs.resize(count * hidden);
      gate_up.resize(count * 2 * width);
      act.resize(count * width);
      for (int64_t i = 0; i < count; ++i) {
        std::copy_n(args.x + plan.token_idx[begin + i] * hidden, hidden, xs.data() + i * hidden);
      }
      // Nested inside this parallel region, Matmul runs on this thread only.
      Matmul(xs.data(), count, AsMatrix(*args.w13, e), gate_up.data());
      SwiGlu(gate_up.data(), count, width, act.data());
      Matmul(act.data(), count, AsMatrix(*args.w2, e), expert_out.data() + begin * hidden);
    }
  }

  // Combine: for each token, its assignments in ascending expert order.
  std::vector<int32_t> token_offsets(plan.num_tokens + 1, 0), by_token(num_assignments);
  for (int64_t a = 0; a < num_assignments; ++a) ++token_offsets[plan.token_idx[a] + 1];
  for (int64_t t = 0; t < plan.num_tokens; ++t) token_offsets[t + 1] += token_offsets[t];
  {
    std::vector<int32_t> fill(token_offsets.begin(), token_offsets.end() - 1);
    for (int64_t a = 0; a < num_assignments; ++a) by_token[fill[plan.token_idx[a]]++] = a;
  }
#pragma omp parallel for schedule(static) if (plan.num_tokens > 64)
  for (int64_t t = 0; t < plan.num_tokens; ++t) {
    float* o = args.out + t * hidden;
    for (int32_t j = token_offsets[t]; j < token_offsets[t + 1]; ++j) {
      const int32_t a = by_token[j];
      const float w = plan.weight[a];
      const float* y = expert_out.data() + static_cast<int64_t>(a) * hidden;
      for (int64_t d = 0; d < hidden; ++d) o[d] += w * y[d];
    }
  }
}

}  // namespace moeserve::cpu
