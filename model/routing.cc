#include "model/routing.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/expert_choice.h"
#include "kernels/cpu/token_choice.h"

namespace moeserve {

absl::Status ValidateRoutingOptions(const RoutingOptions& o) {
  if (!std::isfinite(o.capacity_factor) || o.capacity_factor <= 0 ||
      o.capacity_factor > kMaxCapacityFactor) {
    return absl::InvalidArgumentError(absl::StrCat("capacity_factor = ", o.capacity_factor,
                                                   ": must be finite and in (0, ",
                                                   kMaxCapacityFactor, "]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<RoutingMode> ParseRoutingMode(absl::string_view text) {
  if (text == "token_choice") return RoutingMode::kTokenChoice;
  if (text == "expert_choice") return RoutingMode::kExpertChoice;
  return absl::InvalidArgumentError(
      absl::StrCat("routing mode \"", text, "\" is unknown: token_choice or expert_choice"));
}

absl::StatusOr<RoutingScope> ParseRoutingScope(absl::string_view text) {
  if (text == "request") return RoutingScope::kRequest;
  if (text == "batch") return RoutingScope::kBatch;
  return absl::InvalidArgumentError(
      absl::StrCat("routing scope \"", text, "\" is unknown: request or batch"));
}

absl::StatusOr<ExpertChoiceWeighting> ParseExpertChoiceWeighting(absl::string_view text) {
  if (text == "renormalized") return ExpertChoiceWeighting::kRenormalized;
  if (text == "raw") return ExpertChoiceWeighting::kRaw;
  return absl::InvalidArgumentError(
      absl::StrCat("expert-choice weighting \"", text, "\" is unknown: renormalized or raw"));
}

const char* RoutingModeName(RoutingMode mode) {
  switch (mode) {
    case RoutingMode::kTokenChoice:
      return "token_choice";
    case RoutingMode::kExpertChoice:
      return "expert_choice";
  }
  return "?";
}

const char* RoutingScopeName(RoutingScope scope) {
  switch (scope) {
    case RoutingScope::kRequest:
      return "request";
    case RoutingScope::kBatch:
      return "batch";
  }
  return "?";
}

const char* ExpertChoiceWeightingName(ExpertChoiceWeighting weighting) {
  switch (weighting) {
    case ExpertChoiceWeighting::kRenormalized:
      return "renormalized";
    case ExpertChoiceWeighting::kRaw:
      return "raw";
  }
  return "?";
}

int64_t ExpertChoiceCapacity(double capacity_factor, int64_t num_tokens, int64_t topk,
                             int64_t num_experts) {
  if (num_tokens == 0) return 0;
  // The 1e-9 slack keeps exact integers (1.0 * 32 * 8 / 256 = 1) from being bumped up by rounding.
  const double exact = capacity_factor * static_cast<double>(num_tokens) *
                       static_cast<double>(topk) / static_cast<double>(num_experts);
  const int64_t c = static_cast<int64_t>(std::ceil(exact - 1e-9));
  return std::clamp<int64_t>(c, 1, num_tokens);
}

void RoutingLoad::Resize(int64_t num_experts, int64_t model_topk) {
  tokens_per_expert.assign(num_experts, 0);
  experts_per_token.assign(num_experts + 1, 0);
  topk = model_topk;
}

void RoutingLoad::Add(const RoutingLoad& o) {
  if (tokens_per_expert.empty()) Resize(static_cast<int64_t>(o.tokens_per_expert.size()), o.topk);
  num_tokens += o.num_tokens;
  num_assignments += o.num_assignments;
  dropped_tokens += o.dropped_tokens;
  for (size_t e = 0; e < o.tokens_per_expert.size(); ++e)
    tokens_per_expert[e] += o.tokens_per_expert[e];
  for (size_t j = 0; j < o.experts_per_token.size(); ++j)
    experts_per_token[j] += o.experts_per_token[j];
}

double RoutingLoad::MaxOverMean() const {
  if (num_assignments == 0) return 0;
  const double mean =
      static_cast<double>(num_assignments) / static_cast<double>(tokens_per_expert.size());
  return static_cast<double>(
             *std::max_element(tokens_per_expert.begin(), tokens_per_expert.end())) /
         mean;
}

double RoutingLoad::CoefficientOfVariation() const {
  if (num_assignments == 0) return 0;
  const double n = static_cast<double>(tokens_per_expert.size());
  const double mean = static_cast<double>(num_assignments) / n;
  double var = 0;
  for (int64_t c : tokens_per_expert) var += (c - mean) * (c - mean);
  return std::sqrt(var / n) / mean;
}

double RoutingLoad::EffectiveCapacityFactor() const {
  if (num_tokens == 0 || topk == 0) return 0;
  return static_cast<double>(num_assignments) /
         (static_cast<double>(num_tokens) * static_cast<double>(topk));
}

LayerRouting RouteMoeLayer(const ModelConfig& config, const float* logits, const float* expert_bias,
                           int64_t num_tokens, std::span<const SequenceRouting> sequences) {
  const int64_t experts = config.num_experts, topk = config.num_experts_per_tok;
  const float scale = static_cast<float>(config.routed_scaling_factor);
  LayerRouting out;
  out.topk_idx.assign(num_tokens * topk, -1);
  out.topk_weight.assign(num_tokens * topk, 0.0f);
  std::vector<int32_t> row_experts(num_tokens, 0);  // routed experts per row
  std::vector<int8_t> row_mode(num_tokens, 0);
  RoutingPlanBuilder builder(num_tokens, experts);

  // Token-choice: each sequence's contiguous rows.
  const cpu::TokenChoiceParams tc{
      experts, topk, config.n_group, config.topk_group, config.norm_topk_prob, scale};
  // Expert-choice scopes: one per block of each request-scope sequence; batch-scope sequences
  // grouped by their (capacity factor, weighting), each group one scope.
  std::vector<std::pair<RoutingOptions, std::vector<int32_t>>> scopes;
  std::map<std::pair<double, int>, size_t> batch_scope;
  for (const SequenceRouting& seq : sequences) {
    for (int64_t i = 0; i < seq.num_tokens; ++i)
      row_mode[seq.first_row + i] = static_cast<int8_t>(seq.options.mode);
    switch (seq.options.mode) {
      case RoutingMode::kTokenChoice: {
        cpu::TokenChoiceRoute(tc, {logits + seq.first_row * experts, expert_bias, seq.num_tokens,
                                   out.topk_idx.data() + seq.first_row * topk,
                                   out.topk_weight.data() + seq.first_row * topk});
        for (int64_t t = seq.first_row; t < seq.first_row + seq.num_tokens; ++t) {
          for (int64_t j = 0; j < topk; ++j) {
            builder.Add(static_cast<int32_t>(t), out.topk_idx[t * topk + j],
                        out.topk_weight[t * topk + j]);
          }
          row_experts[t] = static_cast<int32_t>(topk);
        }
        break;
      }
      case RoutingMode::kExpertChoice: {
        if (seq.options.scope == RoutingScope::kRequest) {
          for (int64_t i = 0; i < seq.num_tokens; ++i) {
            if (i == 0 || (seq.scope_block > 0 && (seq.start_pos + i) % seq.scope_block == 0)) {
              scopes.push_back({seq.options, {}});
            }
            scopes.back().second.push_back(static_cast<int32_t>(seq.first_row + i));
          }
        } else {
          const auto key =
              std::make_pair(seq.options.capacity_factor, static_cast<int>(seq.options.weighting));
          auto [it, inserted] = batch_scope.emplace(key, scopes.size());
          if (inserted) scopes.push_back({seq.options, {}});
          for (int64_t i = 0; i < seq.num_tokens; ++i) {
            scopes[it->second].second.push_back(static_cast<int32_t>(seq.first_row + i));
          }
        }
        break;
      }
    }
  }

  if (!scopes.empty()) {
    std::vector<float> scores(num_tokens * experts);  // [num_tokens, num_experts], sigmoid
    std::vector<float> denom(num_tokens, 0.0f);
    for (const auto& [options, rows] : scopes) {
      for (int32_t r : rows) {
        for (int64_t e = 0; e < experts; ++e) {
          scores[r * experts + e] = 1.0f / (1.0f + std::exp(-logits[r * experts + e]));
        }
      }
    }
    for (auto& [options, rows] : scopes) {
      std::sort(rows.begin(), rows.end());
      const int64_t t = static_cast<int64_t>(rows.size());
      if (t == 0) continue;
      const int64_t capacity = ExpertChoiceCapacity(options.capacity_factor, t, topk, experts);
      std::vector<int32_t> selected(experts * capacity);  // [num_experts, capacity]
      cpu::ExpertChoiceSelect({scores.data(), experts, rows.data(), t, capacity, selected.data()});
      // Renormalization denominators, summed in ascending expert order per token.
      for (int64_t e = 0; e < experts; ++e) {
        for (int64_t c = 0; c < capacity; ++c) {
          const int32_t r = selected[e * capacity + c];
          denom[r] += scores[r * experts + e];
          ++row_experts[r];
        }
      }
      for (int64_t e = 0; e < experts; ++e) {
        for (int64_t c = 0; c < capacity; ++c) {
          const int32_t r = selected[e * capacity + c];
          const float s = scores[r * experts + e];
          float w = 0;
          switch (options.weighting) {
            case ExpertChoiceWeighting::kRenormalized:
              w = s / denom[r] * scale;
              break;
            case ExpertChoiceWeighting::kRaw:
              w = s * scale;
              break;
          }
          builder.Add(r, static_cast<int32_t>(e), w);
        }
      }
    }
  }
  out.plan = std::move(builder).Finish();

  // Load statistics.
  for (RoutingLoad& load : out.load.by_mode) load.Resize(experts, topk);
  for (int64_t e = 0; e < experts; ++e) {
    for (int32_t a = out.plan.expert_offsets[e]; a < out.plan.expert_offsets[e + 1]; ++a) {
      ++out.load.by_mode[row_mode[out.plan.token_idx[a]]].tokens_per_expert[e];
    }
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    RoutingLoad& load = out.load.by_mode[row_mode[t]];
    ++load.num_tokens;
    load.num_assignments += row_experts[t];
    load.dropped_tokens += row_experts[t] == 0;
    ++load.experts_per_token[row_experts[t]];
  }
  out.sequence_dropped.assign(sequences.size(), 0);
  out.sequence_experts_per_token.assign(sequences.size(), std::vector<int64_t>(experts + 1, 0));
  for (size_t s = 0; s < sequences.size(); ++s) {
    for (int64_t t = sequences[s].first_row; t < sequences[s].first_row + sequences[s].num_tokens;
         ++t) {
      out.sequence_dropped[s] += row_experts[t] == 0;
      ++out.sequence_experts_per_token[s][row_experts[t]];
    }
  }
  return out;
}

}  // namespace moeserve
