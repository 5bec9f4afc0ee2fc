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

ForwardScopes FormRoutingScopes(const ModelConfig& config, int64_t num_tokens,
                                std::span<const SequenceRouting> sequences) {
  ForwardScopes out;
  out.row_mode.assign(num_tokens, 0);
  std::vector<double> factors;  // per scope
  std::map<std::pair<double, int>, size_t> batch_scope;
  auto new_scope = [&](const RoutingOptions& o) {
    out.expert_choice.push_back({o.weighting, 0, {}});
    factors.push_back(o.capacity_factor);
  };
  for (const SequenceRouting& seq : sequences) {
    const RoutingOptions& o = seq.options;
    for (int64_t i = 0; i < seq.num_tokens; ++i)
      out.row_mode[seq.first_row + i] = static_cast<int8_t>(o.mode);
    switch (o.mode) {
      case RoutingMode::kTokenChoice:
        for (int64_t i = 0; i < seq.num_tokens; ++i)
          out.token_choice_rows.push_back(static_cast<int32_t>(seq.first_row + i));
        break;
      case RoutingMode::kExpertChoice:
        if (o.scope == RoutingScope::kRequest) {
          for (int64_t i = 0; i < seq.num_tokens; ++i) {
            if (i == 0 || (seq.scope_block > 0 && (seq.start_pos + i) % seq.scope_block == 0)) {
              new_scope(o);
            }
            out.expert_choice.back().rows.push_back(static_cast<int32_t>(seq.first_row + i));
          }
        } else {
          const auto key = std::make_pair(o.capacity_factor, static_cast<int>(o.weighting));
          auto [it, inserted] = batch_scope.emplace(key, out.expert_choice.size());
          if (inserted) new_scope(o);
          for (int64_t i = 0; i < seq.num_tokens; ++i) {
            out.expert_choice[it->second].rows.push_back(static_cast<int32_t>(seq.first_row + i));
          }
        }
        break;
    }
  }
  std::sort(out.token_choice_rows.begin(), out.token_choice_rows.end());
  size_t kept = 0;
  for (size_t s = 0; s < out.expert_choice.size(); ++s) {
    ExpertChoiceScope& scope = out.expert_choice[s];
    if (scope.rows.empty()) continue;
    std::sort(scope.rows.begin(), scope.rows.end());
    scope.capacity = ExpertChoiceCapacity(factors[s], static_cast<int64_t>(scope.rows.size()),
                                          config.num_experts_per_tok, config.num_experts);
    if (kept != s) out.expert_choice[kept] = std::move(scope);
    ++kept;
  }
  out.expert_choice.resize(kept);
  return out;
}

void FillRoutingStats(const ModelConfig& config, std::span<const SequenceRouting> sequences,
                      std::span<const int8_t> row_mode,
                      std::span<const int32_t> tokens_per_expert_by_mode,
                      std::span<const int32_t> row_experts, LayerRouting* out) {
  const int64_t experts = config.num_experts;
  for (int m = 0; m < kNumRoutingModes; ++m) {
    RoutingLoad& load = out->load.by_mode[m];
    load.Resize(experts, config.num_experts_per_tok);
    for (int64_t e = 0; e < experts; ++e)
      load.tokens_per_expert[e] = tokens_per_expert_by_mode[m * experts + e];
  }
  for (size_t t = 0; t < row_mode.size(); ++t) {
    RoutingLoad& load = out->load.by_mode[row_mode[t]];
    ++load.num_tokens;
    load.num_assignments += row_experts[t];
    load.dropped_tokens += row_experts[t] == 0;
    ++load.experts_per_token[row_experts[t]];
  }
  out->sequence_dropped.assign(sequences.size(), 0);
  out->sequence_experts_per_token.assign(sequences.size(), std::vector<int64_t>(experts + 1, 0));
  for (size_t s = 0; s < sequences.size(); ++s) {
    for (int64_t t = sequences[s].first_row; t < sequences[s].first_row + sequences[s].num_tokens;
         ++t) {
      out->sequence_dropped[s] += row_experts[t] == 0;
      ++out->sequence_experts_per_token[s][row_experts[t]];
    }
  }
}

LayerRouting RouteMoeLayer(const ModelConfig& config, const float* logits, const float* expert_bias,
                           int64_t num_tokens, std::span<const SequenceRouting> sequences) {
  const int64_t experts = config.num_experts, topk = config.num_experts_per_tok;
  const float scale = static_cast<float>(config.routed_scaling_factor);
  LayerRouting out;
  out.topk_idx.assign(num_tokens * topk, -1);
  out.topk_weight.assign(num_tokens * topk, 0.0f);
  std::vector<int32_t> row_experts(num_tokens, 0);  // routed experts per row
  RoutingPlanBuilder builder(num_tokens, experts);
  const ForwardScopes scopes = FormRoutingScopes(config, num_tokens, sequences);

  // Token-choice: each sequence's contiguous rows.
  const cpu::TokenChoiceParams tc{
      experts, topk, config.n_group, config.topk_group, config.norm_topk_prob, scale};
  for (const SequenceRouting& seq : sequences) {
    if (seq.options.mode != RoutingMode::kTokenChoice) continue;
    cpu::TokenChoiceRoute(tc, {logits + seq.first_row * experts, expert_bias, seq.num_tokens,
                               out.topk_idx.data() + seq.first_row * topk,
                               out.topk_weight.data() + seq.first_row * topk});
  }
  for (int32_t t : scopes.token_choice_rows) {
    for (int64_t j = 0; j < topk; ++j)
      builder.Add(t, out.topk_idx[t * topk + j], out.topk_weight[t * topk + j]);
    row_experts[t] = static_cast<int32_t>(topk);
  }

  // Expert-choice, scope by scope. expert_bias and the group limits take no part: a per-expert
  // constant does not change an expert's ranking of tokens.
  if (!scopes.expert_choice.empty()) {
    std::vector<float> scores(num_tokens * experts);  // [num_tokens, num_experts], sigmoid
    std::vector<float> denom(num_tokens, 0.0f);
    for (const ExpertChoiceScope& scope : scopes.expert_choice) {
      for (int32_t r : scope.rows) {
        for (int64_t e = 0; e < experts; ++e) {
          scores[r * experts + e] = 1.0f / (1.0f + std::exp(-logits[r * experts + e]));
        }
      }
    }
    for (const ExpertChoiceScope& scope : scopes.expert_choice) {
      const int64_t t = static_cast<int64_t>(scope.rows.size());
      const int64_t capacity = scope.capacity;
      std::vector<int32_t> selected(experts * capacity);  // [num_experts, capacity]
      cpu::ExpertChoiceSelect(
          {scores.data(), experts, scope.rows.data(), t, capacity, selected.data()});
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
          switch (scope.weighting) {
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

  std::vector<int32_t> by_mode(kNumRoutingModes * experts, 0);
  for (int64_t e = 0; e < experts; ++e) {
    for (int32_t a = out.plan.expert_offsets[e]; a < out.plan.expert_offsets[e + 1]; ++a)
      ++by_mode[scopes.row_mode[out.plan.token_idx[a]] * experts + e];
  }
  FillRoutingStats(config, sequences, scopes.row_mode, by_mode, row_experts, &out);
  return out;
}

}  // namespace moeserve
