// Turning a denoising step's logits into token proposals, and the commit policies of block
// diffusion decoding.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace moeserve {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;         // 0: no top-k filter
  double top_p = 1.0;        // 1: no nucleus filter
};

// One position's proposal: the token x0 and its probability p (under the distribution it was
// drawn from: softmax of the raw logits when greedy; of the tempered, filtered logits otherwise).
struct Proposal {
  int32_t token = 0;
  float p = 0.0f;
};

// Proposes a token for one row of logits ([vocab_size]), never `excluded_token` (the mask token:
// proposing it would commit nothing; it still counts in the softmax that gives p). `rng` is used
// only when temperature > 0.
Proposal Propose(std::span<const float> logits, const SamplingOptions& options,
                 int32_t excluded_token, std::mt19937_64* rng);

enum class CommitPolicy {
  // dInfer: commit every masked position with p >= min(threshold, max_p - 1e-5) (x0 is never the
  // mask token: Propose excludes it), so at least one per step.
  kThreshold,
  // The reference generate(): a quota of block_length / steps per step (remainder to the first
  // steps); all with p > threshold if at least the quota, else the quota with the highest p.
  kScheduled,
};

// The quota of step `step` (0-based) of a block of `block_length` with `steps` steps.
int64_t ScheduledQuota(int64_t block_length, int64_t steps, int64_t step);

// Chooses which masked positions of a block to commit this step. `proposals` are those of the
// masked positions (in position order); returns indices into `proposals`, ascending. Never empty
// when `proposals` is not empty (the threshold bar never exceeds max_p - 1e-5).
std::vector<int32_t> ChooseCommits(CommitPolicy policy, double threshold, int64_t quota,
                                   std::span<const Proposal> proposals);

}  // namespace moeserve
