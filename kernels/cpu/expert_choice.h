// Expert-choice selection (Zhou et al. 2022, with LLaDA2's sigmoid gate), on the CPU.
//
// Within one routing scope of T token rows, every expert takes the `capacity` rows with the
// highest score in its column. Ties go to the lower token row. capacity must be in [1, T], so every
// expert takes exactly `capacity` rows: the plan is perfectly even. Scores are the sigmoid of the
// router logits; expert_bias and group limits do not enter: a per-expert constant does not change
// an expert's ranking of tokens, and group limits are a per-token notion.
// Cost: one partial selection per expert over T scores (O(E * T) compares, no full sort).
#pragma once

#include <cstdint>

namespace moeserve::cpu {

struct ExpertChoiceArgs {
  const float* scores = nullptr;  // [num_rows_total, num_experts], sigmoid scores of all rows
  int64_t num_experts = 0;
  const int32_t* rows = nullptr;  // [num_rows]: the scope's rows, ascending
  int64_t num_rows = 0;
  int64_t capacity = 0;         // in [1, num_rows]
  int32_t* selected = nullptr;  // [num_experts, capacity]: chosen rows, descending score
};
void ExpertChoiceSelect(const ExpertChoiceArgs& args);

}  // namespace moeserve::cpu
