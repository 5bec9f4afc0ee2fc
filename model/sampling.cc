#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moeserve {

Proposal Propose(std::span<const float> logits, const SamplingOptions& options,
                 int32_t excluded_token, std::mt19937_64* rng) {
  const int64_t vocab = static_cast<int64_t>(logits.size());
  const float max = *std::max_element(logits.begin(), logits.end());
  if (options.temperature <= 0) {
    // Greedy: argmax (first maximum, as torch.argmax), p = softmax(logits)[x0] in float32.
    int64_t best = -1;
    for (int64_t i = 0; i < vocab; ++i) {
      if (i != excluded_token && (best < 0 || logits[i] > logits[best])) best = i;
    }
    float sum = 0.0f;
    for (float l : logits) sum += std::exp(l - max);
    return {static_cast<int32_t>(best), std::exp(logits[best] - max) / sum};
  }
  // Tempered softmax, then top-k and top-p filters, renormalized; sample; p of the sample.
  const float inv_t = static_cast<float>(1.0 / options.temperature);
  std::vector<int32_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::vector<float> prob(vocab);
  for (int64_t i = 0; i < vocab; ++i)
    prob[i] = i == excluded_token ? 0.0f : std::exp((logits[i] - max) * inv_t);
  int64_t keep = vocab;
  if (options.top_k > 0 || options.top_p < 1.0) {
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return prob[a] > prob[b]; });
    if (options.top_k > 0) keep = std::min<int64_t>(keep, options.top_k);
    if (options.top_p < 1.0) {
      double total = 0;
      for (int64_t i = 0; i < keep; ++i) total += prob[order[i]];
      double cumulative = 0;
      for (int64_t i = 0; i < keep; ++i) {
        cumulative += prob[order[i]];
        if (cumulative >= options.top_p * total) {
          keep = i + 1;
          break;
        }
      }
    }
  }
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += prob[order[i]];
  std::uniform_real_distribution<double> uniform(0.0, total);
  const double u = uniform(*rng);
  double cumulative = 0;
  int32_t chosen = order[keep - 1];
  for (int64_t i = 0; i < keep; ++i) {
    cumulative += prob[order[i]];
    if (u < cumulative) {
      chosen = order[i];
      break;
    }
  }
  return {chosen, static_cast<float>(prob[chosen] / total)};
}

int64_t ScheduledQuota(int64_t block_length, int64_t steps, int64_t step) {
  return block_length / steps + (step < block_length % steps ? 1 : 0);
}

std::vector<int32_t> ChooseCommits(CommitPolicy policy, double threshold, int64_t quota,
                                   std::span<const Proposal> proposals) {
  std::vector<int32_t> chosen;
  const int32_t n = static_cast<int32_t>(proposals.size());
  if (n == 0) return chosen;
  switch (policy) {
    case CommitPolicy::kThreshold: {
      float max_p = 0.0f;
      for (const Proposal& pr : proposals) max_p = std::max(max_p, pr.p);
      const float bar = std::min(static_cast<float>(threshold), max_p - 1e-5f);
      for (int32_t i = 0; i < n; ++i) {
        if (proposals[i].p >= bar) chosen.push_back(i);
      }
      break;
    }
    case CommitPolicy::kScheduled: {
      for (int32_t i = 0; i < n; ++i) {
        if (proposals[i].p > threshold) chosen.push_back(i);
      }
      const int64_t want = std::min<int64_t>(quota, n);
      if (static_cast<int64_t>(chosen.size()) < want) {
        // The quota with the highest p; ties to the lower position.
        chosen.resize(n);
        std::iota(chosen.begin(), chosen.end(), 0);
        std::stable_sort(chosen.begin(), chosen.end(),
                         [&](int32_t a, int32_t b) { return proposals[a].p > proposals[b].p; });
        chosen.resize(want);
        std::sort(chosen.begin(), chosen.end());
      }
      break;
    }
  }
  return chosen;
}

}  // namespace moeserve
