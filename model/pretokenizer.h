// Pre-tokenizer machinery of the byte-level BPE tokenizer (model/tokenizer.cc): UTF-8 helpers,
// GPT-2's ByteLevel alphabet, the PCRE2 regex wrapper (tokenizer.json's Oniguruma patterns are
// translated to PCRE2) and HF's Split behaviors. Internal to model/; not a public API.
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moeserve {
namespace tokenizer_internal {

// ---------------------------------------------------------------------------------------------
// UTF-8.

// Byte offset in `s` of the first byte that does not start a well-formed UTF-8 sequence; npos
// when `s` is valid.
size_t FirstInvalidUtf8(absl::string_view s);

// `bytes` as UTF-8, each maximal invalid subsequence replaced by one U+FFFD (from_utf8_lossy).
std::string LossyUtf8(std::string bytes);

// ---------------------------------------------------------------------------------------------
// GPT-2's byte <-> printable code point mapping that byte-level BPE vocabularies are written in:
// the printable Latin-1 bytes stand for themselves, the others for U+0100 and up, in byte order.

struct ByteLevelAlphabet {
  std::array<uint32_t, 256> byte_to_cp;       // byte -> its code point
  std::array<std::string, 256> byte_to_utf8;  // byte -> that code point as UTF-8
  std::array<int16_t, 324> cp_to_byte;        // -1: not a byte-level code point

  // Fills the three tables.
  ByteLevelAlphabet();
};

// The process-wide alphabet (built on first use, never freed).
const ByteLevelAlphabet& Alphabet();

// The raw bytes a byte-level token string stands for (into *bytes); false when a character of
// `token` is not in the alphabet.
bool ByteLevelToBytes(absl::string_view token, std::string* bytes);

// ---------------------------------------------------------------------------------------------
// Regular expressions: tokenizer.json patterns are Oniguruma syntax (what HF tokenizers runs);
// they are translated to PCRE2 where the two differ and then compiled with UTF and UCP.

// The pre-tokenizer regex of GPT-2 (HF ByteLevel with use_regex).
inline constexpr absl::string_view kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// Deleter of a pcre2_match_data.
struct MatchDataFree {
  void operator()(pcre2_match_data* md) const { pcre2_match_data_free(md); }
};
// Match scratch of one Regex (from Regex::NewMatchData), owned by one caller at a time.
using MatchData = std::unique_ptr<pcre2_match_data, MatchDataFree>;

// One cut of Regex::Find: bytes [begin, end) of the subject; a match, or a gap between matches.
struct Span {
  size_t begin;
  size_t end;
  bool match;
};

// A compiled PCRE2 pattern (JIT when available); immutable, shareable across threads.
class Regex {
 public:
  // `literal`: the pattern is a plain string to find. Errors do not name a key; callers add it.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(absl::string_view pattern, bool literal);

  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // A match data block for Find, sized for this pattern; not shared by concurrent calls.
  MatchData NewMatchData() const {
    return MatchData(pcre2_match_data_create_from_pattern(code_, nullptr));
  }

  // Cuts `s` into the matches of the regex and the gaps between them, in order, as HF does with
  // Oniguruma's find_iter: an empty match right where the previous match ended is skipped, and
  // after an empty match the search resumes one character further.
  absl::Status Find(absl::string_view s, pcre2_match_data* md, std::vector<Span>* spans) const;

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}

  static size_t CharLength(absl::string_view s, size_t i) {
    const auto b = static_cast<uint8_t>(s[i]);
    return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
  }

  pcre2_code* code_;
};

// What a Split step does with the matches (HF SplitDelimiterBehavior).
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// One Split pre-tokenizer step of tokenizer.json.
struct SplitStep {
  std::unique_ptr<Regex> regex;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

// HF's NormalizedString::split: turns the matches/gaps of one piece into the new pieces (as
// [begin, end) spans of the piece), empty ones dropped.
void ApplyBehavior(SplitBehavior behavior, bool invert, std::vector<Span>* spans,
                   std::vector<std::pair<size_t, size_t>>* out);

}  // namespace tokenizer_internal
}  // namespace moeserve
