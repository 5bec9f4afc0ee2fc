// Load studies of the routers alone: run every MoE layer's router over N tokens split into S
// sequences, route them in one mode, and report per layer tokens per expert, dropped tokens, the
// experts-per-token histogram, max/mean and the coefficient of variation.
//
// Hidden states are random (standard normal, RMS-normalized like the input of an MoE block), so
// no expert weights are needed: full-size shapes fit in a few hundred MB. Random router weights
// route almost uniformly; `skew` adds a Zipf-distributed per-expert offset to the router logits
// (expert of popularity rank r gets -skew * ln r; ranks a random permutation per layer) to
// emulate a trained model's imbalance. A per-expert offset cannot change an expert's ranking of
// tokens, so expert-choice is unaffected by it, by construction.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/routing.h"
#include "model/weights.h"

namespace moeserve {

struct RouteStatsOptions {
  int64_t num_tokens = 4096;
  int64_t num_sequences = 1;
  uint64_t seed = 0;
  double skew = 0.0;  // >= 0; 0 = no offset
  RoutingOptions routing;
};

struct RouteStatsLayer {
  int64_t layer = 0;
  RoutingLoad load;  // of options.routing.mode
};

// `routers`: [num_moe_layers] (LoadRouterWeights or RandomRouterWeights).
absl::StatusOr<std::vector<RouteStatsLayer>> RunRouteStats(
    const ModelConfig& config, const std::vector<RouterWeights>& routers,
    const RouteStatsOptions& options);

// The report as JSON (one object: options, per-layer entries, a summary over layers).
std::string RouteStatsJson(const ModelConfig& config, const RouteStatsOptions& options,
                           const std::vector<RouteStatsLayer>& layers);
// The report as a human-readable table.
std::string RouteStatsTable(const ModelConfig& config, const RouteStatsOptions& options,
                            const std::vector<RouteStatsLayer>& layers);

}  // namespace moeserve
