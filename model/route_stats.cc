#include "model/route_stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/rms_norm.h"
#include "nlohmann/json.hpp"

namespace moeserve {
namespace {

using Json = nlohmann::json;

// Sequence s of S gets tokens [s*N/S, (s+1)*N/S).
std::vector<SequenceRouting> SplitSequences(const RouteStatsOptions& o) {
  std::vector<SequenceRouting> seqs;
  for (int64_t s = 0; s < o.num_sequences; ++s) {
    const int64_t first = s * o.num_tokens / o.num_sequences;
    const int64_t next = (s + 1) * o.num_tokens / o.num_sequences;
    seqs.push_back({first, next - first, o.routing});
  }
  return seqs;
}

}  // namespace

absl::StatusOr<std::vector<RouteStatsLayer>> RunRouteStats(
    const ModelConfig& config, const std::vector<RouterWeights>& routers,
    const RouteStatsOptions& o) {
  if (o.num_tokens <= 0)
    return absl::InvalidArgumentError(absl::StrCat("tokens = ", o.num_tokens, ": must be > 0"));
  if (o.num_sequences <= 0 || o.num_sequences > o.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequences = ", o.num_sequences, ": must be in [1, tokens = ", o.num_tokens, "]"));
  }
  if (!std::isfinite(o.skew) || o.skew < 0) {
    return absl::InvalidArgumentError(absl::StrCat("skew = ", o.skew, ": must be finite and >= 0"));
  }
  if (absl::Status s = ValidateRoutingOptions(o.routing); !s.ok()) return s;
  if (static_cast<int64_t>(routers.size()) != config.num_moe_layers()) {
    return absl::InvalidArgumentError(
        absl::StrCat(routers.size(), " routers for ", config.num_moe_layers(), " MoE layers"));
  }
  const int64_t n = o.num_tokens, h = config.hidden_size, e = config.num_experts;
  const std::vector<SequenceRouting> seqs = SplitSequences(o);
  const std::vector<float> ones(h, 1.0f);
  std::vector<float> hidden(n * h),
      logits(n * e);  // [num_tokens, hidden_size], [num_tokens, num_experts]
  std::vector<RouteStatsLayer> out;
  for (int64_t l = 0; l < config.num_moe_layers(); ++l) {
    std::mt19937_64 rng(o.seed * 1000003 + static_cast<uint64_t>(l));
    std::normal_distribution<float> normal;
    for (float& x : hidden) x = normal(rng);
    cpu::RmsNorm(hidden.data(), n, h, ones.data(), static_cast<float>(config.rms_norm_eps),
                 hidden.data());
    const RouterWeights& r = routers[l];
    cpu::Matmul(hidden.data(), n, AsMatrix(r.weight), logits.data());
    if (o.skew > 0) {
      std::vector<int64_t> rank(e);
      std::iota(rank.begin(), rank.end(), 1);
      std::shuffle(rank.begin(), rank.end(), rng);
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t j = 0; j < e; ++j)
          logits[t * e + j] -= static_cast<float>(o.skew * std::log(rank[j]));
      }
    }
    LayerRouting routed =
        RouteMoeLayer(config, logits.data(), r.expert_bias.data<float>(), n, seqs);
    out.push_back({config.first_k_dense_replace + l,
                   std::move(routed.load.by_mode[static_cast<int>(o.routing.mode)])});
  }
  return out;
}

std::string RouteStatsJson(const ModelConfig& config, const RouteStatsOptions& o,
                           const std::vector<RouteStatsLayer>& layers) {
  Json j;
  j["options"] = {{"routing", RoutingModeName(o.routing.mode)},
                  {"capacity_factor", o.routing.capacity_factor},
                  {"scope", RoutingScopeName(o.routing.scope)},
                  {"weighting", ExpertChoiceWeightingName(o.routing.weighting)},
                  {"tokens", o.num_tokens},
                  {"sequences", o.num_sequences},
                  {"seed", o.seed},
                  {"skew", o.skew}};
  j["model"] = {{"num_experts", config.num_experts},
                {"topk", config.num_experts_per_tok},
                {"moe_layers", config.num_moe_layers()},
                {"hidden_size", config.hidden_size}};
  Json arr = Json::array();
  double sum_mm = 0, sum_cv = 0, max_mm = 0;
  int64_t dropped = 0;
  for (const RouteStatsLayer& layer : layers) {
    const RoutingLoad& load = layer.load;
    std::vector<int64_t> hist = load.experts_per_token;
    while (hist.size() > 1 && hist.back() == 0) hist.pop_back();
    arr.push_back({{"layer", layer.layer},
                   {"tokens_per_expert", load.tokens_per_expert},
                   {"dropped_tokens", load.dropped_tokens},
                   {"experts_per_token_histogram", hist},
                   {"max_over_mean", load.MaxOverMean()},
                   {"cv", load.CoefficientOfVariation()},
                   {"effective_capacity_factor", load.EffectiveCapacityFactor()}});
    sum_mm += load.MaxOverMean();
    sum_cv += load.CoefficientOfVariation();
    max_mm = std::max(max_mm, load.MaxOverMean());
    dropped += load.dropped_tokens;
  }
  j["layers"] = arr;
  const double nl = std::max<double>(1, layers.size());
  j["summary"] = {{"mean_max_over_mean", sum_mm / nl},
                  {"worst_max_over_mean", max_mm},
                  {"mean_cv", sum_cv / nl},
                  {"dropped_tokens_per_layer", dropped / nl}};
  return j.dump();
}

std::string RouteStatsTable(const ModelConfig& config, const RouteStatsOptions& o,
                            const std::vector<RouteStatsLayer>& layers) {
  std::string s = absl::StrFormat(
      "routing %s, capacity factor %.3g, scope %s, %d tokens in %d sequences, skew %.3g, %d "
      "experts top-%d\n",
      RoutingModeName(o.routing.mode), o.routing.capacity_factor, RoutingScopeName(o.routing.scope),
      o.num_tokens, o.num_sequences, o.skew, config.num_experts, config.num_experts_per_tok);
  absl::StrAppend(
      &s, absl::StrFormat("%5s %8s %8s %9s %7s %9s %8s %s\n", "layer", "min", "max", "max/mean",
                          "cv", "dropped", "eff.cf", "experts/token (0,1,2,..)"));
  for (const RouteStatsLayer& layer : layers) {
    const RoutingLoad& load = layer.load;
    std::vector<int64_t> hist = load.experts_per_token;
    while (hist.size() > 1 && hist.back() == 0) hist.pop_back();
    if (hist.size() > 12) hist.resize(12);
    absl::StrAppend(
        &s, absl::StrFormat(
                "%5d %8d %8d %9.4f %7.4f %9d %8.4f %s\n", layer.layer,
                *std::min_element(load.tokens_per_expert.begin(), load.tokens_per_expert.end()),
                *std::max_element(load.tokens_per_expert.begin(), load.tokens_per_expert.end()),
                load.MaxOverMean(), load.CoefficientOfVariation(), load.dropped_tokens,
                load.EffectiveCapacityFactor(), absl::StrJoin(hist, ",")));
  }
  return s;
}

}  // namespace moeserve
