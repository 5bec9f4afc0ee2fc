#include "kernels/cpu/token_choice.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace moeserve::cpu {
namespace {

// Indices of the `k` largest values, descending, ties to the lower index.
void TopK(const float* values, int64_t n, int64_t k, std::vector<int32_t>* order) {
  order->resize(n);
  std::iota(order->begin(), order->end(), 0);
  std::partial_sort(order->begin(), order->begin() + k, order->end(),
                    [values](int32_t a, int32_t b) {
                      return values[a] != values[b] ? values[a] > values[b] : a < b;
                    });
  order->resize(k);
}

}  // namespace

void TokenChoiceRoute(const TokenChoiceParams& p, const TokenChoiceArgs& args) {
  const int64_t per_group = p.num_experts / p.n_group;
#pragma omp parallel if (args.num_tokens > 256)
  {
    std::vector<float> scores(p.num_experts), choice(p.num_experts), group_score(p.n_group);
    std::vector<int32_t> order;
    std::vector<char> keep_group(p.n_group);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < args.num_tokens; ++t) {
      const float* logits = args.logits + t * p.num_experts;
      for (int64_t e = 0; e < p.num_experts; ++e) {
        scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
        choice[e] = scores[e] + (args.expert_bias ? args.expert_bias[e] : 0.0f);
      }
      for (int64_t g = 0; g < p.n_group; ++g) {
        TopK(choice.data() + g * per_group, per_group, std::min<int64_t>(2, per_group), &order);
        float sum = 0.0f;
        for (int32_t i : order) sum += choice[g * per_group + i];
        group_score[g] = sum;
      }
      TopK(group_score.data(), p.n_group, p.topk_group, &order);
      std::fill(keep_group.begin(), keep_group.end(), 0);
      for (int32_t g : order) keep_group[g] = 1;
      for (int64_t e = 0; e < p.num_experts; ++e) {
        if (!keep_group[e / per_group]) choice[e] = 0.0f;
      }
      TopK(choice.data(), p.num_experts, p.topk, &order);
      int32_t* idx = args.topk_idx + t * p.topk;
      float* weight = args.topk_weight + t * p.topk;
      float sum = 0.0f;
      for (int64_t j = 0; j < p.topk; ++j) {
        idx[j] = order[j];
        weight[j] = scores[order[j]];
        sum += weight[j];
      }
      const float denom = p.norm_topk_prob && p.topk > 1 ? sum + 1e-20f : 1.0f;
      for (int64_t j = 0; j < p.topk; ++j) weight[j] = weight[j] / denom * p.routed_scaling_factor;
    }
  }
}

}  // namespace moeserve::cpu
