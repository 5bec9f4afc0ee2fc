// Block-diffusion decoding of many sequences at once: the engine the server's batcher drives.
//
// A sequence's prompt is prefilled block-causally (its full blocks, K/V cached). Generation then
// proceeds block by block: a block starts as mask tokens (after any prompt tail that shares it);
// each denoising step runs the block against the cache, proposes x0 and p per masked position
// (sampling.h) and commits positions by the request's policy. A finished block's K/V are refreshed
// by committing it as the leading part of the next step's chunk (block-causal attention makes
// that identical to a separate refresh forward, one forward fewer per block). Decoding stops at
// eos (and <|role_end|> when the tokenizer has it), after max_new_tokens, or at a stop string.
//
// One Step() packs one chunk per live sequence (prefill chunk or current block), within the token
// budget, into one forward; sequences of both routing modes share it. Not thread-safe: one thread
// (the engine loop) owns the engine.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/model.h"
#include "model/routing.h"
#include "model/sampling.h"

namespace moeserve {

inline constexpr int64_t kMaxBlockLength = 256;
inline constexpr int64_t kMaxNewTokensLimit = 1 << 16;

struct DecodeOptions {
  int64_t max_new_tokens = 128;  // in [1, kMaxNewTokensLimit] and within the context
  int64_t block_length = 32;     // in [1, kMaxBlockLength]
  CommitPolicy policy = CommitPolicy::kThreshold;
  double threshold = 0.95;   // in [0, 1]
  int64_t steps = 0;         // scheduled: steps per block, in [1, block_length]; 0 = block_length
  SamplingOptions sampling;  // temperature >= 0 (0 greedy), top_k >= 0, top_p in (0, 1]
  uint64_t seed = 0;         // for temperature > 0: same seed, same tokens
  std::vector<std::string> stop;  // stop strings (need EngineOptions::detokenize)
};

// Errors name the field ("decoding.threshold = 1.5: must be in [0, 1]").
absl::Status ValidateDecodeOptions(const DecodeOptions& options);
absl::StatusOr<CommitPolicy> ParseCommitPolicy(absl::string_view text);  // threshold | scheduled
const char* CommitPolicyName(CommitPolicy policy);

// Checks a sequence before it is added: the options, the prompt ids against the vocabulary, the
// context limit. Errors name the field.
absl::Status ValidateSequence(const ModelConfig& config, std::span<const int32_t> prompt,
                              const DecodeOptions& decode, const RoutingOptions& routing,
                              bool can_detokenize);
// Positions a sequence occupies at most: prompt + max_new_tokens, rounded up to whole blocks.
int64_t SequencePositions(int64_t prompt_tokens, const DecodeOptions& decode);

enum class FinishReason { kNone, kEos, kLength, kStop, kCancelled };
const char* FinishReasonName(FinishReason reason);

struct DecodeStats {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;  // tokens returned (after cuts at eos / length / stop)
  int64_t forwards = 0;          // forwards this sequence took part in
  int64_t denoising_steps = 0;   // steps over all blocks
  int64_t blocks = 0;            // generation blocks finished
  double tokens_per_forward() const {
    return forwards ? static_cast<double>(generated_tokens) / static_cast<double>(forwards) : 0.0;
  }
  double forwards_per_block() const {
    return blocks ? static_cast<double>(forwards) / static_cast<double>(blocks) : 0.0;
  }
};

using SequenceId = int64_t;

// What a Step() produced for one sequence.
struct SequenceEvent {
  SequenceId id = 0;
  std::vector<int32_t> new_tokens;            // tokens of a block that just finished (after cuts)
  FinishReason finish = FinishReason::kNone;  // kNone while the sequence goes on
  DecodeStats stats;
  // Routing of this sequence so far, per layer: dropped tokens and experts-per-token histogram.
  SequenceRoutingStats routing;
};

struct StepResult {
  std::vector<SequenceEvent> events;
  int64_t batch_tokens = 0;           // tokens in this step's forward
  int64_t batch_sequences = 0;        // sequences in it
  std::vector<LayerLoad> layer_load;  // this forward's routing load
  ForwardLaunch launch = ForwardLaunch::kEager;
};

struct EngineOptions {
  int32_t mask_id = 0;
  std::vector<int32_t> stop_ids;  // eos, role end: generation ends after the block that has one
  // Only ids below this are ever generated (the tokenizer's vocabulary, when the model's is padded
  // beyond it); 0: every id of the model's vocabulary.
  int32_t num_generatable_ids = 0;
  int64_t max_batch_tokens = 4096;  // per forward
  // Reference mode for tests: every step recomputes the whole prefix (no cache reuse), the way
  // the upstream generate() does.
  bool recompute_prefix = false;
  // Token ids to text (special tokens skipped), for stop strings; empty: stop strings refused.
  std::function<absl::StatusOr<std::string>(std::span<const int32_t>)> detokenize;
};

class DiffusionEngine {
 public:
  // `model` must outlive the engine.
  DiffusionEngine(const Model* model, EngineOptions options);
  ~DiffusionEngine();

  // Validates and queues a sequence; it joins the next Step().
  absl::StatusOr<SequenceId> Add(std::vector<int32_t> prompt, const DecodeOptions& decode,
                                 const RoutingOptions& routing);
  // Drops a sequence and frees its cache; false if unknown (already finished).
  bool Cancel(SequenceId id);
  // One forward over the packed work of live sequences.
  absl::StatusOr<StepResult> Step();
  bool idle() const { return sequences_.empty(); }
  // Whether stop strings can be checked (EngineOptions::detokenize is set).
  bool can_detokenize() const { return static_cast<bool>(options_.detokenize); }
  int64_t num_sequences() const { return static_cast<int64_t>(sequences_.size()); }
  // Bytes of K/V cache held by live sequences.
  int64_t kv_cache_bytes() const;

 private:
  struct Sequence;
  const Model* model_;
  EngineOptions options_;
  SequenceId next_id_ = 1;
  std::map<SequenceId, std::unique_ptr<Sequence>> sequences_;  // admission order = id order
};

// Position of the earliest occurrence of any of `stops` in `text`, or npos.
size_t FindStop(absl::string_view text, const std::vector<std::string>& stops);

// Convenience: decodes one prompt to the end (greedy or seeded), returning the generated ids.
struct GenerateResult {
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::kNone;
  DecodeStats stats;
};
absl::StatusOr<GenerateResult> GenerateOne(const Model& model, const EngineOptions& engine,
                                           const std::vector<int32_t>& prompt,
                                           const DecodeOptions& decode,
                                           const RoutingOptions& routing);

}  // namespace moeserve
