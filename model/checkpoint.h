// Hugging Face checkpoints of LLaDA2: loading (single-file or sharded safetensors), writing
// (random weights in the exact upstream layout, for tests and demos), and in-memory random
// initialisation for full-size benchmark shapes.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/weights.h"

namespace moeserve {

// Loads `dir`/model.safetensors, or the shards listed by `dir`/model.safetensors.index.json,
// into the compute layout for `config`. Every tensor's name, dtype (BF16, F16, F32) and shape is
// checked against the config first; missing, unexpected, mis-shaped or wrongly typed tensors are
// reported together (which tensor, which file, expected vs found). Logs progress.
absl::StatusOr<ModelWeights> LoadCheckpointWeights(const std::string& dir,
                                                   const ModelConfig& config);

// Random weights of `config`'s shape, built in memory. Values are BF16-representable, drawn from a
// counter-based generator keyed by (seed, tensor name, element), so they do not depend on thread
// count, and a checkpoint written from them loads back bit-exactly. Norm weights are near 1,
// matrices uniform with standard deviation `init_std`, expert biases small.
struct RandomInitOptions {
  uint64_t seed = 0;
  double init_std = 0.02;
  DType matrix_dtype = DType::kBF16;
};
ModelWeights RandomWeights(const ModelConfig& config, const RandomInitOptions& options);

// Only the routers of every MoE layer ([num_moe_layers]), for routing studies on full-size shapes
// without the experts' memory: read from a checkpoint, or random (the same values RandomWeights
// gives the routers for the same options).
absl::StatusOr<std::vector<RouterWeights>> LoadRouterWeights(const std::string& dir,
                                                             const ModelConfig& config);
std::vector<RouterWeights> RandomRouterWeights(const ModelConfig& config,
                                               const RandomInitOptions& options);

// Writes `weights` as a Hugging Face checkpoint in `dir` (created if needed): config.json and
// model.safetensors, or, with num_shards > 1, model-0000i-of-0000N.safetensors plus
// model.safetensors.index.json. Tensors are written in the upstream dtypes (BF16, expert_bias F32).
struct WriteCheckpointOptions {
  int num_shards = 1;
};
absl::Status WriteCheckpoint(const std::string& dir, const ModelConfig& config,
                             const ModelWeights& weights, const WriteCheckpointOptions& options);

}  // namespace moeserve
