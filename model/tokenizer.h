// Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json (the Ling / LLaDA2 family),
// and the LLaDA2 chat template (declared in model/chat_template.h, included here).
//
// What a tokenizer.json may contain (anything else is an error that names the key):
//   normalizer      null (or an empty Sequence)
//   pre_tokenizer   ByteLevel, or Sequence[Split..., ByteLevel]. Split: pattern {"Regex": ...}
//                   (Oniguruma syntax, run through PCRE2) or {"String": ...}, behavior Isolated /
//                   Removed / MergedWithPrevious / MergedWithNext / Contiguous, invert.
//                   ByteLevel: add_prefix_space, use_regex (the GPT-2 pattern), trim_offsets.
//   model           BPE: vocab, merges ([left, right] pairs or "left right" strings), unk_token,
//                   fuse_unk, byte_fallback, ignore_merges; dropout null or 0;
//                   continuing_subword_prefix / end_of_word_suffix null or "".
//   decoder         ByteLevel
//   added_tokens    special or not, normalized or not; lstrip / rstrip / single_word false.
//   post_processor  not applied: Encode adds no BOS/EOS (like HF encode(add_special_tokens=False)).
//   truncation, padding  null.
//
// Thread-safe: a loaded Tokenizer is immutable; Encode/Decode keep their scratch per call.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "model/chat_template.h"  // RenderChat, ChatMessage: callers get them from here

namespace moeserve {

namespace tokenizer_internal {
struct TokenizerData;  // defined in tokenizer.cc
}  // namespace tokenizer_internal

class Tokenizer {
 public:
  // Reads a Hugging Face tokenizer.json. NotFound when the file cannot be opened;
  // InvalidArgument (naming the file and the key) for bad or unsupported content.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  // The same from the file's text; errors are prefixed "tokenizer.json: ".
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(absl::string_view json_text);

  // The built-in tokenizer of the random-weight demo model: ids 0..255 are the bytes (Encode
  // returns the UTF-8 bytes of the text, no merges), then the special tokens
  // <|endoftext|> 256, <|mask|> 257, <role> 258, </role> 259, <|role_end|> 260,
  // <|startoftext|> 261, matched in the text like added tokens. vocab_size() is 262.
  static std::unique_ptr<Tokenizer> ByteLevelDemo();

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text`, no special tokens added. Added tokens are matched in the raw text first
  // (longest match at the leftmost position), the text between them is pre-tokenized and each
  // piece BPE-encoded. Error when `text` is not valid UTF-8 ("text is not valid UTF-8 at byte N").
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const;

  // The pieces that BPE runs on: `text` cut at added tokens (which appear as their content), then
  // split by the pre-tokenizer. For debugging and tests; Encode does the same cutting.
  absl::StatusOr<std::vector<std::string>> PreTokenize(absl::string_view text) const;

  // The text of `ids`: the bytes of the tokens concatenated (special tokens as their content, or
  // nothing when `skip_special_tokens`), each maximal invalid UTF-8 subsequence replaced by one
  // U+FFFD (Rust String::from_utf8_lossy, as HF's ByteLevel decoder). Error naming the id when
  // an id is outside [0, vocab_size()) or has no token.
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids, bool skip_special_tokens) const;

  // The id of a token given as written in tokenizer.json (byte-level form for BPE tokens, e.g.
  // "Ġworld"; the content for added tokens). Added tokens take precedence over the vocab.
  std::optional<int32_t> TokenId(absl::string_view token) const;
  // The token string of `id` as written in tokenizer.json; nullopt when `id` has no token.
  std::optional<std::string> TokenString(int32_t id) const;

  // Special ids, looked up by their token strings.
  std::optional<int32_t> eos_id() const;       // <|endoftext|>
  std::optional<int32_t> mask_id() const;      // <|mask|>
  std::optional<int32_t> role_end_id() const;  // <|role_end|>

  // One more than the largest id of the vocab and the added tokens.
  int32_t vocab_size() const;
  // Whether `id` is (has the content of) a special added token; false when out of range.
  bool IsSpecial(int32_t id) const;

 private:
  explicit Tokenizer(std::unique_ptr<const tokenizer_internal::TokenizerData> data);

  std::unique_ptr<const tokenizer_internal::TokenizerData> data_;
};

}  // namespace moeserve
