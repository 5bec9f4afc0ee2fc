#include "model/decoder.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/util/status_macros.h"

namespace moeserve {

absl::Status ValidateDecodeOptions(const DecodeOptions& o) {
  auto bad = [](absl::string_view field, auto value, absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("decoding.", field, " = ", value, ": ", why));
  };
  if (o.max_new_tokens < 1 || o.max_new_tokens > kMaxNewTokensLimit) {
    return bad("max_new_tokens", o.max_new_tokens,
               absl::StrCat("must be in [1, ", kMaxNewTokensLimit, "]"));
  }
  if (o.block_length < 1 || o.block_length > kMaxBlockLength) {
    return bad("block_length", o.block_length,
               absl::StrCat("must be in [1, ", kMaxBlockLength, "]"));
  }
  if (!(o.threshold >= 0 && o.threshold <= 1))
    return bad("threshold", o.threshold, "must be in [0, 1]");
  if (o.steps < 0 || o.steps > o.block_length) {
    return bad(
        "steps", o.steps,
        absl::StrCat("must be in [1, block_length = ", o.block_length, "] (0: block_length)"));
  }
  if (!std::isfinite(o.sampling.temperature) || o.sampling.temperature < 0) {
    return bad("temperature", o.sampling.temperature, "must be finite and >= 0");
  }
  if (o.sampling.top_k < 0) return bad("top_k", o.sampling.top_k, "must be >= 0 (0: off)");
  if (!(o.sampling.top_p > 0 && o.sampling.top_p <= 1))
    return bad("top_p", o.sampling.top_p, "must be in (0, 1]");
  for (size_t i = 0; i < o.stop.size(); ++i) {
    if (o.stop[i].empty())
      return absl::InvalidArgumentError(absl::StrCat("decoding.stop[", i, "] is empty"));
  }
  return absl::OkStatus();
}

absl::StatusOr<CommitPolicy> ParseCommitPolicy(absl::string_view text) {
  if (text == "threshold") return CommitPolicy::kThreshold;
  if (text == "scheduled") return CommitPolicy::kScheduled;
  return absl::InvalidArgumentError(
      absl::StrCat("decoding.policy \"", text, "\" is unknown: threshold or scheduled"));
}

const char* CommitPolicyName(CommitPolicy policy) {
  switch (policy) {
    case CommitPolicy::kThreshold:
      return "threshold";
    case CommitPolicy::kScheduled:
      return "scheduled";
  }
  return "?";
}

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "?";
}

struct DiffusionEngine::Sequence {
  Sequence(const ModelConfig& config, SequenceId id, std::vector<int32_t> prompt,
           const DecodeOptions& decode, const RoutingOptions& routing, int32_t mask_id)
      : id(id),
        prompt_len(static_cast<int64_t>(prompt.size())),
        decode(decode),
        routing(routing),
        cache(config),
        rng(decode.seed) {
    const int64_t b = decode.block_length;
    block_start = prompt_len / b * b;
    tokens = std::move(prompt);
    tokens.resize(block_start + b, mask_id);
    masked.assign(b, 0);
    for (int64_t i = prompt_len; i < block_start + b; ++i) masked[i - block_start] = 1;
    stats.prompt_tokens = prompt_len;
    steps = decode.steps > 0 ? decode.steps : b;
    routing_stats.dropped_tokens.assign(config.num_hidden_layers, 0);
    routing_stats.experts_per_token.assign(config.num_hidden_layers, {});
  }
  int64_t block_end() const { return block_start + decode.block_length; }

  SequenceId id;
  int64_t prompt_len;
  DecodeOptions decode;
  RoutingOptions routing;
  KvCache cache;
  std::mt19937_64 rng;
  std::vector<int32_t> tokens;  // [block_end()]: prompt, finished blocks, the current block
  int64_t block_start = 0;      // first position of the current block
  std::vector<char> masked;     // [block_length]: which positions of the current block are masks
  int64_t steps = 0;            // scheduled policy: steps per block
  int64_t step_in_block = 0;
  DecodeStats stats;
  SequenceRoutingStats routing_stats;
};

DiffusionEngine::DiffusionEngine(const Model* model, EngineOptions options)
    : model_(model), options_(std::move(options)) {}

DiffusionEngine::~DiffusionEngine() = default;

absl::Status ValidateSequence(const ModelConfig& c, std::span<const int32_t> prompt,
                              const DecodeOptions& decode, const RoutingOptions& routing,
                              bool can_detokenize) {
  RETURN_IF_ERROR(ValidateDecodeOptions(decode));
  if (absl::Status s = ValidateRoutingOptions(routing); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("routing.", s.message()));
  }
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token_ids[", i, "] = ", prompt[i],
                                                     " is outside the vocabulary [0, ",
                                                     c.vocab_size, ")"));
    }
  }
  if (!decode.stop.empty() && !can_detokenize) {
    return absl::InvalidArgumentError("decoding.stop needs a tokenizer, and this engine has none");
  }
  // Every position up to the end of the last block must be within the model's context.
  const int64_t last = SequencePositions(static_cast<int64_t>(prompt.size()), decode);
  if (last > c.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt.size(), " tokens) + decoding.max_new_tokens (",
                     decode.max_new_tokens, ") rounded up to whole blocks is ", last,
                     " positions, over the context limit ", c.max_position_embeddings));
  }
  return absl::OkStatus();
}

int64_t SequencePositions(int64_t prompt_tokens, const DecodeOptions& decode) {
  const int64_t b = decode.block_length;
  return (prompt_tokens + decode.max_new_tokens + b - 1) / b * b;
}

absl::StatusOr<SequenceId> DiffusionEngine::Add(std::vector<int32_t> prompt,
                                                const DecodeOptions& decode,
                                                const RoutingOptions& routing) {
  const ModelConfig& c = model_->config();
  RETURN_IF_ERROR(
      ValidateSequence(c, prompt, decode, routing, static_cast<bool>(options_.detokenize)));
  const SequenceId id = next_id_++;
  sequences_.emplace(
      id, std::make_unique<Sequence>(c, id, std::move(prompt), decode, routing, options_.mask_id));
  return id;
}

bool DiffusionEngine::Cancel(SequenceId id) { return sequences_.erase(id) > 0; }

int64_t DiffusionEngine::kv_cache_bytes() const {
  int64_t total = 0;
  for (const auto& [id, seq] : sequences_) total += seq->cache.bytes();
  return total;
}

absl::StatusOr<StepResult> DiffusionEngine::Step() {
  StepResult result;
  if (sequences_.empty()) return result;

  // Pack one chunk per sequence, in admission order, within the token budget. A chunk is the
  // uncommitted positions up to the end of the current block: the refresh of a finished block
  // and/or prefill (committed), then the current block (denoised). A prefill too long for the
  // budget is cut to whole blocks and committed without a denoising step.
  std::vector<Sequence*> in_batch;
  std::vector<char> denoising;
  std::vector<SequenceInput> inputs;
  int64_t budget = options_.max_batch_tokens;
  for (auto& [id, seq_ptr] : sequences_) {
    Sequence& seq = *seq_ptr;
    if (options_.recompute_prefix) seq.cache.Clear();
    const int64_t start = seq.cache.length();
    const int64_t b = seq.decode.block_length;
    int64_t end = seq.block_end();
    bool denoise = true;
    if (end - start > budget) {
      const int64_t prefill_blocks = std::min(budget, seq.block_start - start) / b;
      if (prefill_blocks > 0) {
        end = start + prefill_blocks * b;
        denoise = false;
      } else if (!inputs.empty()) {
        continue;  // waits for the next step; a lone sequence goes over budget by under 2 blocks
      }
    }
    SequenceInput in;
    in.token_ids = std::span<const int32_t>(seq.tokens).subspan(start, end - start);
    in.cache = &seq.cache;
    in.block_length = b;
    in.commit_tokens =
        options_.recompute_prefix ? 0 : (denoise ? seq.block_start - start : end - start);
    if (denoise) {
      for (int64_t i = 0; i < b; ++i) {
        if (seq.masked[i])
          in.logit_rows.push_back(static_cast<int32_t>(seq.block_start - start + i));
      }
    }
    in.routing = seq.routing;
    in.greedy = seq.decode.sampling.temperature == 0;
    budget -= end - start;
    result.batch_tokens += end - start;
    inputs.push_back(std::move(in));
    in_batch.push_back(&seq);
    denoising.push_back(denoise);
  }
  result.batch_sequences = static_cast<int64_t>(inputs.size());
  const int64_t vocab = model_->config().vocab_size;
  const int64_t generatable = options_.num_generatable_ids > 0
                                  ? std::min<int64_t>(options_.num_generatable_ids, vocab)
                                  : vocab;
  ASSIGN_OR_RETURN(ForwardOutput out,
                   model_->Forward(inputs, nullptr, {options_.mask_id, generatable}));
  result.layer_load = std::move(out.layer_load);
  result.launch = out.launch;

  int64_t logit_row = 0, greedy_row = 0;
  std::vector<SequenceId> finished;
  for (size_t s = 0; s < in_batch.size(); ++s) {
    Sequence& seq = *in_batch[s];
    ++seq.stats.forwards;
    for (size_t l = 0; l < out.sequences[s].experts_per_token.size(); ++l) {
      seq.routing_stats.dropped_tokens[l] += out.sequences[s].dropped_tokens[l];
      const std::vector<int64_t>& hist = out.sequences[s].experts_per_token[l];
      std::vector<int64_t>& acc = seq.routing_stats.experts_per_token[l];
      if (acc.size() < hist.size()) acc.resize(hist.size(), 0);
      for (size_t j = 0; j < hist.size(); ++j) acc[j] += hist[j];
    }
    if (!denoising[s]) continue;

    // Propose for every masked position, then commit by the policy.
    const std::vector<int32_t>& rows = inputs[s].logit_rows;
    std::vector<Proposal> proposals;
    if (inputs[s].greedy) {
      proposals.assign(out.greedy.begin() + greedy_row,
                       out.greedy.begin() + greedy_row + static_cast<int64_t>(rows.size()));
      greedy_row += static_cast<int64_t>(rows.size());
    } else {
      for (size_t r = 0; r < rows.size(); ++r) {
        const std::span<const float> logits(out.logits.data() + (logit_row + r) * vocab,
                                            generatable);
        proposals.push_back(Propose(logits, seq.decode.sampling, options_.mask_id, &seq.rng));
      }
      logit_row += static_cast<int64_t>(rows.size());
    }
    const int64_t quota = ScheduledQuota(seq.decode.block_length, seq.steps,
                                         std::min(seq.step_in_block, seq.steps - 1));
    for (int32_t i : ChooseCommits(seq.decode.policy, seq.decode.threshold, quota, proposals)) {
      const int64_t abs_pos =
          static_cast<int64_t>(inputs[s].token_ids.data() - seq.tokens.data()) + rows[i];
      seq.tokens[abs_pos] = proposals[i].token;
      seq.masked[abs_pos - seq.block_start] = 0;
    }
    ++seq.step_in_block;
    ++seq.stats.denoising_steps;
    if (std::count(seq.masked.begin(), seq.masked.end(), 1) > 0) continue;

    // The block is finished: emit its generated tokens, check the stop conditions.
    ++seq.stats.blocks;
    SequenceEvent event;
    event.id = seq.id;
    const int64_t first = std::max(seq.prompt_len, seq.block_start);
    int64_t cut = std::min(seq.block_end(), seq.prompt_len + seq.decode.max_new_tokens);
    for (int64_t p = first; p < cut; ++p) {
      if (std::find(options_.stop_ids.begin(), options_.stop_ids.end(), seq.tokens[p]) !=
          options_.stop_ids.end()) {
        cut = p + 1;  // the stop token is part of the output, as in the reference
        event.finish = FinishReason::kEos;
        break;
      }
    }
    if (event.finish == FinishReason::kNone && cut - seq.prompt_len >= seq.decode.max_new_tokens) {
      event.finish = FinishReason::kLength;
    }
    event.new_tokens.assign(seq.tokens.begin() + first, seq.tokens.begin() + cut);
    seq.stats.generated_tokens += cut - first;
    if (event.finish == FinishReason::kNone && !seq.decode.stop.empty()) {
      auto text = options_.detokenize(
          std::span<const int32_t>(seq.tokens).subspan(seq.prompt_len, cut - seq.prompt_len));
      if (text.ok() && FindStop(*text, seq.decode.stop) != std::string::npos)
        event.finish = FinishReason::kStop;
    }
    event.stats = seq.stats;
    if (event.finish != FinishReason::kNone) {
      event.routing = std::move(seq.routing_stats);
      finished.push_back(seq.id);
    } else {
      event.routing = seq.routing_stats;
      // Next block: all masks. Its first step commits this block's K/V (the refresh).
      seq.block_start += seq.decode.block_length;
      seq.tokens.resize(seq.block_end(), options_.mask_id);
      std::fill(seq.masked.begin(), seq.masked.end(), 1);
      seq.step_in_block = 0;
    }
    result.events.push_back(std::move(event));
  }
  for (SequenceId id : finished) sequences_.erase(id);
  return result;
}

size_t FindStop(absl::string_view text, const std::vector<std::string>& stops) {
  size_t best = std::string::npos;
  for (const std::string& stop : stops) best = std::min(best, text.find(stop));
  return best;
}

absl::StatusOr<GenerateResult> GenerateOne(const Model& model, const EngineOptions& engine_options,
                                           const std::vector<int32_t>& prompt,
                                           const DecodeOptions& decode,
                                           const RoutingOptions& routing) {
  DiffusionEngine engine(&model, engine_options);
  ASSIGN_OR_RETURN(SequenceId id, engine.Add(prompt, decode, routing));
  GenerateResult result;
  while (!engine.idle()) {
    ASSIGN_OR_RETURN(StepResult step, engine.Step());
    for (SequenceEvent& e : step.events) {
      if (e.id != id) continue;
      result.tokens.insert(result.tokens.end(), e.new_tokens.begin(), e.new_tokens.end());
      result.finish = e.finish;
      result.stats = e.stats;
    }
  }
  return result;
}

}  // namespace moeserve
