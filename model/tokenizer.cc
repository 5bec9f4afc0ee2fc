#include "model/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/util/logging.h"
#include "kernels/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace moeserve {
namespace tokenizer_internal {
namespace {

using Json = nlohmann::json;

constexpr int32_t kMaxTokenId = 0x7ffffffe;

// ---------------------------------------------------------------------------------------------
// UTF-8.

// Length of the well-formed UTF-8 sequence starting at s[i] (Unicode Table 3-7), or 0 when there
// is none; then *bad is the length (>= 1) of the maximal subpart there, which from_utf8_lossy
// replaces by one U+FFFD.
size_t Utf8SequenceAt(absl::string_view s, size_t i, size_t* bad) {
  const auto b0 = static_cast<uint8_t>(s[i]);
  if (b0 < 0x80) return 1;
  size_t trail = 0;
  uint8_t lo = 0x80;
  uint8_t hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    trail = 1;
  } else if (b0 == 0xE0) {
    trail = 2;
    lo = 0xA0;
  } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
    trail = 2;
  } else if (b0 == 0xED) {
    trail = 2;
    hi = 0x9F;
  } else if (b0 == 0xF0) {
    trail = 3;
    lo = 0x90;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    trail = 3;
  } else if (b0 == 0xF4) {
    trail = 3;
    hi = 0x8F;
  } else {
    *bad = 1;
    return 0;
  }
  size_t k = 1;
  for (; k <= trail && i + k < s.size(); ++k) {
    const auto b = static_cast<uint8_t>(s[i + k]);
    if (b < lo || b > hi) break;
    lo = 0x80;
    hi = 0xBF;
  }
  if (k == trail + 1) return k;
  *bad = k;
  return 0;
}

// Offset of the first byte that does not start a well-formed sequence; npos when `s` is valid.
size_t FirstInvalidUtf8(absl::string_view s) {
  size_t bad = 0;
  for (size_t i = 0; i < s.size();) {
    if (static_cast<uint8_t>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t n = Utf8SequenceAt(s, i, &bad);
    if (n == 0) return i;
    i += n;
  }
  return absl::string_view::npos;
}

// `bytes` as UTF-8, each maximal invalid subsequence replaced by U+FFFD.
std::string LossyUtf8(std::string bytes) {
  if (FirstInvalidUtf8(bytes) == absl::string_view::npos) return bytes;
  std::string out;
  out.reserve(bytes.size() + 16);
  size_t bad = 0;
  for (size_t i = 0; i < bytes.size();) {
    const size_t n = Utf8SequenceAt(bytes, i, &bad);
    if (n > 0) {
      out.append(bytes, i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += bad;
    }
  }
  return out;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    *out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    *out += static_cast<char>(0xC0 | (cp >> 6));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *out += static_cast<char>(0xE0 | (cp >> 12));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    *out += static_cast<char>(0xF0 | (cp >> 18));
    *out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Decodes the code point at s[*i] of a string known to be valid UTF-8 and advances *i.
uint32_t NextCodePoint(absl::string_view s, size_t* i) {
  const auto b0 = static_cast<uint8_t>(s[*i]);
  int len = b0 < 0x80 ? 1 : b0 < 0xE0 ? 2 : b0 < 0xF0 ? 3 : 4;
  uint32_t cp = len == 1 ? b0 : len == 2 ? (b0 & 0x1F) : len == 3 ? (b0 & 0x0F) : (b0 & 0x07);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[*i + k]) & 0x3F);
  *i += len;
  return cp;
}

// ---------------------------------------------------------------------------------------------
// GPT-2's byte <-> printable code point mapping that byte-level BPE vocabularies are written in:
// the printable Latin-1 bytes stand for themselves, the others for U+0100 and up, in byte order.

struct ByteLevelAlphabet {
  std::array<uint32_t, 256> byte_to_cp;
  std::array<std::string, 256> byte_to_utf8;
  std::array<int16_t, 324> cp_to_byte;  // -1: not a byte-level code point

  ByteLevelAlphabet() {
    cp_to_byte.fill(-1);
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      byte_to_cp[b] = printable ? b : next++;
      cp_to_byte[byte_to_cp[b]] = static_cast<int16_t>(b);
      AppendUtf8(byte_to_cp[b], &byte_to_utf8[b]);
    }
  }
};

const ByteLevelAlphabet& Alphabet() {
  static const ByteLevelAlphabet* alphabet = new ByteLevelAlphabet();
  return *alphabet;
}

// The raw bytes a byte-level token string stands for; false when a character of `token` is not
// in the alphabet.
bool ByteLevelToBytes(absl::string_view token, std::string* bytes) {
  const ByteLevelAlphabet& a = Alphabet();
  bytes->clear();
  for (size_t i = 0; i < token.size();) {
    const uint32_t cp = NextCodePoint(token, &i);
    if (cp >= a.cp_to_byte.size() || a.cp_to_byte[cp] < 0) return false;
    *bytes += static_cast<char>(a.cp_to_byte[cp]);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Regular expressions: tokenizer.json patterns are Oniguruma syntax (what HF tokenizers runs);
// they are translated to PCRE2 where the two differ and then compiled with UTF and UCP.

// Rewrites the Oniguruma constructs whose PCRE2 meaning differs:
//   \s \S   Oniguruma: Unicode White_Space. PCRE2 (UCP) also counts U+180E. -> \p{White_Space}
//   \h \H   Oniguruma: hex digit (PCRE2: horizontal space). -> \p{AHex}
//   \v      Oniguruma: vertical tab (PCRE2: vertical space class). -> \x{0B}
//   \uHHHH  -> \x{HHHH}
//   (?m)    Oniguruma: dot matches newline. -> (?s)
//   {,n}    -> {0,n}
// Refused (error): \w \W \b \B (word characters are defined differently), nested classes and
// class intersection (&&). ^ and $ are line anchors in Oniguruma: compiled with PCRE2_MULTILINE.
absl::StatusOr<std::string> OnigurumaToPcre2(absl::string_view p) {
  auto refuse = [&](absl::string_view why, size_t at) {
    return absl::InvalidArgumentError(absl::StrCat(why, " (at byte ", at, ")"));
  };
  auto is_hex = [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
  };
  std::string out;
  out.reserve(p.size() + 64);
  bool in_class = false;
  size_t class_body = 0;  // offset of the first character of the class body
  for (size_t i = 0; i < p.size();) {
    const char c = p[i];
    if (c == '\\') {
      if (i + 1 >= p.size()) return refuse("the pattern ends with a lone backslash", i);
      const char e = p[i + 1];
      switch (e) {
        case 's':
          out += "\\p{White_Space}";
          break;
        case 'S':
          out += "\\P{White_Space}";
          break;
        case 'h':
          out += "\\p{AHex}";
          break;
        case 'H':
          out += "\\P{AHex}";
          break;
        case 'v':
          out += "\\x{0B}";
          break;
        case 'w':
        case 'W':
        case 'b':
        case 'B':
          return refuse(absl::StrCat("\\", std::string(1, e),
                                     " is not supported (Oniguruma and PCRE2 define word "
                                     "characters differently)"),
                        i);
        case 'u': {
          if (i + 6 > p.size() || !is_hex(p[i + 2]) || !is_hex(p[i + 3]) || !is_hex(p[i + 4]) ||
              !is_hex(p[i + 5])) {
            return refuse("\\u must be followed by 4 hex digits", i);
          }
          absl::StrAppend(&out, "\\x{", p.substr(i + 2, 4), "}");
          i += 6;
          continue;
        }
        default:
          out += c;
          out += e;
          break;
      }
      i += 2;
      continue;
    }
    if (in_class) {
      if (c == '[') {
        if (i + 1 < p.size() && p[i + 1] == ':') {  // POSIX bracket [:alpha:]
          const size_t end = p.find(":]", i + 2);
          if (end == absl::string_view::npos) return refuse("unterminated [: :]", i);
          out.append(p.data() + i, end + 2 - i);
          i = end + 2;
          continue;
        }
        return refuse("nested character classes are not supported", i);
      }
      if (c == '&' && i + 1 < p.size() && p[i + 1] == '&') {
        return refuse("character class intersection (&&) is not supported", i);
      }
      if (c == ']' && i != class_body) in_class = false;
      out += c;
      ++i;
      continue;
    }
    if (c == '[') {
      in_class = true;
      out += c;
      ++i;
      if (i < p.size() && p[i] == '^') {
        out += '^';
        ++i;
      }
      class_body = i;
      continue;
    }
    if (c == '(' && i + 2 < p.size() && p[i + 1] == '?') {
      size_t j = i + 2;
      while (j < p.size() && (std::isalpha(static_cast<unsigned char>(p[j])) || p[j] == '-')) ++j;
      if (j > i + 2 && j < p.size() && (p[j] == ':' || p[j] == ')')) {
        out += "(?";
        for (size_t k = i + 2; k < j; ++k) {
          const char f = p[k];
          if (f != 'i' && f != 'm' && f != 'x' && f != '-') {
            return refuse(absl::StrCat("inline option '", std::string(1, f), "' is not supported"),
                          k);
          }
          out += f == 'm' ? 's' : f;
        }
        i = j;
        continue;
      }
      out += "(?";
      i += 2;
      continue;
    }
    if (c == '{' && i + 1 < p.size() && p[i + 1] == ',') {
      size_t j = i + 2;
      while (j < p.size() && p[j] >= '0' && p[j] <= '9') ++j;
      if (j > i + 2 && j < p.size() && p[j] == '}') {
        out += "{0";
        ++i;
        continue;
      }
    }
    out += c;
    ++i;
  }
  if (in_class) return refuse("unterminated character class", p.size());
  return out;
}

// The pre-tokenizer regex of GPT-2 (HF ByteLevel with use_regex).
constexpr absl::string_view kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct MatchDataFree {
  void operator()(pcre2_match_data* md) const { pcre2_match_data_free(md); }
};
using MatchData = std::unique_ptr<pcre2_match_data, MatchDataFree>;

struct Span {
  size_t begin;
  size_t end;
  bool match;
};

class Regex {
 public:
  // `literal`: the pattern is a plain string to find. Errors do not name a key; callers add it.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(absl::string_view pattern, bool literal) {
    std::string translated(pattern);
    if (!literal) {
      ASSIGN_OR_RETURN(translated, OnigurumaToPcre2(pattern));
    }
    const uint32_t options =
        literal ? PCRE2_UTF | PCRE2_LITERAL
                : PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE | PCRE2_NEVER_BACKSLASH_C;
    pcre2_compile_context* context = pcre2_compile_context_create(nullptr);
    pcre2_set_newline(context, PCRE2_NEWLINE_LF);
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()),
                                     translated.size(), options, &error, &offset, context);
    pcre2_compile_context_free(context);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return absl::InvalidArgumentError(absl::StrCat("PCRE2 cannot compile \"", translated,
                                                     "\": ", reinterpret_cast<char*>(message),
                                                     " (at byte ", offset, ")"));
    }
    std::unique_ptr<Regex> re(new Regex(code));
    const int jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    if (jit != 0) {
      MOESERVE_LOG(DEBUG) << "tokenizer: PCRE2 JIT unavailable (" << jit
                          << "), using the interpreter";
    }
    return re;
  }

  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  MatchData NewMatchData() const {
    return MatchData(pcre2_match_data_create_from_pattern(code_, nullptr));
  }

  // Cuts `s` into the matches of the regex and the gaps between them, in order, as HF does with
  // Oniguruma's find_iter: an empty match right where the previous match ended is skipped, and
  // after an empty match the search resumes one character further.
  absl::Status Find(absl::string_view s, pcre2_match_data* md, std::vector<Span>* spans) const {
    spans->clear();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t start = 0;
    size_t prev = 0;
    bool have_last = false;
    size_t last_end = 0;
    while (start <= s.size()) {
      int rc = pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
        rc = pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md,
                         nullptr);
      }
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        return absl::ResourceExhaustedError(
            absl::StrCat("pre-tokenizer regex failed at byte ", start, " of a ", s.size(),
                         "-byte piece: ", reinterpret_cast<char*>(message)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t ms = ov[0];
      const size_t me = ov[1];
      if (ms == me) {
        const size_t step = me < s.size() ? CharLength(s, me) : 1;
        if (have_last && last_end == me) {
          start = me + step;
          continue;
        }
        start = me + step;
      } else {
        start = me;
      }
      if (prev != ms) spans->push_back({prev, ms, false});
      spans->push_back({ms, me, true});
      prev = me;
      have_last = true;
      last_end = me;
    }
    if (prev != s.size()) spans->push_back({prev, s.size(), false});
    return absl::OkStatus();
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}

  static size_t CharLength(absl::string_view s, size_t i) {
    const auto b = static_cast<uint8_t>(s[i]);
    return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
  }

  pcre2_code* code_;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitStep {
  std::unique_ptr<Regex> regex;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

// HF's NormalizedString::split: turns the matches/gaps of one piece into the new pieces (as
// [begin, end) spans of the piece), empty ones dropped.
void ApplyBehavior(SplitBehavior behavior, bool invert, std::vector<Span>* spans,
                   std::vector<std::pair<size_t, size_t>>* out) {
  out->clear();
  if (invert) {
    for (Span& s : *spans) s.match = !s.match;
  }
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Span& s : *spans) out->emplace_back(s.begin, s.end);
      break;
    case SplitBehavior::kRemoved:
      for (const Span& s : *spans) {
        if (!s.match) out->emplace_back(s.begin, s.end);
      }
      break;
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const Span& s : *spans) {
        if (s.match == previous_match && !out->empty()) {
          out->back().second = s.end;
        } else {
          out->emplace_back(s.begin, s.end);
        }
        previous_match = s.match;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const Span& s : *spans) {
        if (s.match && !previous_match && !out->empty()) {
          out->back().second = s.end;
        } else {
          out->emplace_back(s.begin, s.end);
        }
        previous_match = s.match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = spans->rbegin(); it != spans->rend(); ++it) {
        if (it->match && !previous_match && !out->empty()) {
          out->back().first = it->begin;
        } else {
          out->emplace_back(it->begin, it->end);
        }
        previous_match = it->match;
      }
      std::reverse(out->begin(), out->end());
      break;
    }
  }
  out->erase(std::remove_if(out->begin(), out->end(),
                            [](const std::pair<size_t, size_t>& p) { return p.first == p.second; }),
             out->end());
}

// ---------------------------------------------------------------------------------------------
// BPE merges: (left id, right id) -> (rank, merged id), open addressing on a 64-bit key.

class MergeTable {
 public:
  struct Entry {
    uint64_t key;
    uint32_t rank;
    int32_t id;
  };

  static uint64_t Key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  void Reserve(size_t n) {
    size_t capacity = 16;
    while (capacity < 2 * n) capacity *= 2;
    slots_.assign(capacity, Entry{kEmpty, 0, 0});
    mask_ = capacity - 1;
  }

  // A later merge of the same pair replaces the earlier one (as HF's HashMap collect does).
  void Insert(uint64_t key, uint32_t rank, int32_t id) {
    for (size_t i = Hash(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty || slots_[i].key == key) {
        slots_[i] = Entry{key, rank, id};
        return;
      }
    }
  }

  const Entry* Find(uint64_t key) const {
    if (slots_.empty()) return nullptr;
    for (size_t i = Hash(key);; i = (i + 1) & mask_) {
      const Entry& e = slots_[i];
      if (e.key == key) return &e;
      if (e.key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  size_t Hash(uint64_t key) const {
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    return static_cast<size_t>(h ^ (h >> 29)) & mask_;
  }

  std::vector<Entry> slots_;
  size_t mask_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Added tokens, found by leftmost-longest matching.

class AddedMatcher {
 public:
  void Add(std::string content, int32_t id) { tokens_.push_back({std::move(content), id}); }
  void Finish() {
    for (size_t i = 0; i < tokens_.size(); ++i) {
      by_first_byte_[static_cast<uint8_t>(tokens_[i].content[0])].push_back(i);
    }
    for (auto& bucket : by_first_byte_) {
      std::stable_sort(bucket.begin(), bucket.end(), [this](size_t a, size_t b) {
        return tokens_[a].content.size() > tokens_[b].content.size();
      });
    }
  }
  bool empty() const { return tokens_.empty(); }

  // The leftmost match at or after `from`, the longest there: {position, length, id}.
  bool Find(absl::string_view text, size_t from, size_t* pos, size_t* len, int32_t* id) const {
    for (size_t p = from; p < text.size(); ++p) {
      const auto& bucket = by_first_byte_[static_cast<uint8_t>(text[p])];
      for (size_t index : bucket) {
        const std::string& c = tokens_[index].content;
        if (c.size() <= text.size() - p && std::memcmp(text.data() + p, c.data(), c.size()) == 0) {
          *pos = p;
          *len = c.size();
          *id = tokens_[index].id;
          return true;
        }
      }
    }
    return false;
  }

 private:
  struct Token {
    std::string content;
    int32_t id;
  };
  std::vector<Token> tokens_;
  std::array<std::vector<size_t>, 256> by_first_byte_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------

struct TokenizerData {
  // Ids.
  int32_t vocab_size = 0;
  std::vector<std::string> token_strings;  // as written in tokenizer.json
  std::vector<std::string> token_bytes;    // what Decode emits (HF ByteLevel decoder rule)
  std::vector<uint8_t> has_token;
  std::vector<uint8_t> special;
  std::unordered_map<std::string, int32_t> vocab;  // model.vocab
  std::unordered_map<std::string, int32_t> added_by_content;

  // BPE.
  std::array<int32_t, 256> byte_ids;  // id of each byte's single-character token, or -1
  std::array<std::vector<int32_t>, 256> byte_fallback_ids;  // <0xXX> ids, empty when unusable
  MergeTable merges;
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::unordered_map<std::string, int32_t> raw_vocab;  // raw bytes -> id, for ignore_merges

  // Added tokens: matched first those with normalized false, then those with normalized true.
  AddedMatcher raw_added;
  AddedMatcher normalized_added;

  // Pre-tokenizer: the Split steps, then ByteLevel.
  std::vector<SplitStep> splits;
  bool add_prefix_space = false;
  std::unique_ptr<Regex> byte_level_regex;  // set when ByteLevel use_regex
};

namespace {

// Per-call scratch of Encode / PreTokenize.
struct Scratch {
  explicit Scratch(const TokenizerData& d) {
    for (const SplitStep& step : d.splits) split_md.push_back(step.regex->NewMatchData());
    if (d.byte_level_regex) byte_level_md = d.byte_level_regex->NewMatchData();
  }
  std::vector<MatchData> split_md;
  MatchData byte_level_md;
  std::vector<Span> spans;
  std::vector<std::pair<size_t, size_t>> cuts;
  std::vector<absl::string_view> pieces;
  std::vector<absl::string_view> next_pieces;
  std::deque<std::string> owned;  // pieces with a prefix space added

  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  struct Candidate {
    uint32_t rank;
    int32_t pos;
    int32_t id;
  };
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
};

// Splits one stretch of text without added tokens into the pieces BPE runs on.
absl::Status PreTokenizeSegment(const TokenizerData& d, absl::string_view segment, Scratch* s) {
  s->pieces.clear();
  s->pieces.push_back(segment);
  auto apply = [s](const Regex& regex, pcre2_match_data* md, SplitBehavior behavior,
                   bool invert) -> absl::Status {
    s->next_pieces.clear();
    for (absl::string_view piece : s->pieces) {
      RETURN_IF_ERROR(regex.Find(piece, md, &s->spans));
      ApplyBehavior(behavior, invert, &s->spans, &s->cuts);
      for (const auto& [b, e] : s->cuts) s->next_pieces.push_back(piece.substr(b, e - b));
    }
    std::swap(s->pieces, s->next_pieces);
    return absl::OkStatus();
  };
  for (size_t k = 0; k < d.splits.size(); ++k) {
    RETURN_IF_ERROR(
        apply(*d.splits[k].regex, s->split_md[k].get(), d.splits[k].behavior, d.splits[k].invert));
  }
  if (d.add_prefix_space) {
    for (absl::string_view& piece : s->pieces) {
      if (piece.empty() || piece[0] != ' ') {
        s->owned.push_back(absl::StrCat(" ", piece));
        piece = s->owned.back();
      }
    }
  }
  if (d.byte_level_regex) {
    RETURN_IF_ERROR(
        apply(*d.byte_level_regex, s->byte_level_md.get(), SplitBehavior::kIsolated, false));
  }
  return absl::OkStatus();
}

// Calls fn(piece, added_id) for the pieces of `text` in order: added tokens with their id, the
// pre-tokenized pieces between them with -1.
template <typename Fn>
absl::Status ForEachPiece(const TokenizerData& d, absl::string_view text, Scratch* s, Fn&& fn) {
  const size_t bad = FirstInvalidUtf8(text);
  if (bad != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("text is not valid UTF-8 at byte ", bad));
  }
  auto plain = [&](absl::string_view segment) -> absl::Status {
    if (segment.empty()) return absl::OkStatus();
    RETURN_IF_ERROR(PreTokenizeSegment(d, segment, s));
    for (absl::string_view piece : s->pieces) fn(piece, -1);
    s->owned.clear();
    return absl::OkStatus();
  };
  // Second pass: the normalized added tokens within a stretch left by the first pass.
  auto normalized_pass = [&](absl::string_view segment) -> absl::Status {
    size_t at = 0;
    size_t pos = 0;
    size_t len = 0;
    int32_t id = -1;
    while (!d.normalized_added.empty() && d.normalized_added.Find(segment, at, &pos, &len, &id)) {
      RETURN_IF_ERROR(plain(segment.substr(at, pos - at)));
      fn(segment.substr(pos, len), id);
      at = pos + len;
    }
    return plain(segment.substr(at));
  };
  size_t at = 0;
  size_t pos = 0;
  size_t len = 0;
  int32_t id = -1;
  while (!d.raw_added.empty() && d.raw_added.Find(text, at, &pos, &len, &id)) {
    RETURN_IF_ERROR(normalized_pass(text.substr(at, pos - at)));
    fn(text.substr(pos, len), id);
    at = pos + len;
  }
  return normalized_pass(text.substr(at));
}

// BPE on one piece (raw bytes): the adjacent pair with the lowest merge rank is merged first,
// leftmost on ties, until no adjacent pair has a merge (HF's Word::merge_all without dropout).
void EncodePiece(const TokenizerData& d, absl::string_view piece, Scratch* s,
                 std::vector<int32_t>* out) {
  if (d.ignore_merges) {
    auto it = d.raw_vocab.find(std::string(piece));
    if (it != d.raw_vocab.end()) {
      out->push_back(it->second);
      return;
    }
  }
  auto& symbols = s->symbols;
  symbols.clear();
  auto add = [&symbols](int32_t id) {
    const auto n = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, n - 1, -1, true});
    if (n > 0) symbols[n - 1].next = n;
  };
  // Unknown bytes: byte fallback tokens, else unk (consecutive ones fused with fuse_unk).
  bool pending_unk = false;
  for (char ch : piece) {
    const auto b = static_cast<uint8_t>(ch);
    if (d.byte_ids[b] >= 0) {
      if (pending_unk) add(*d.unk_id);
      pending_unk = false;
      add(d.byte_ids[b]);
      continue;
    }
    if (d.byte_fallback && !d.byte_fallback_ids[b].empty()) {
      if (pending_unk) add(*d.unk_id);
      pending_unk = false;
      for (int32_t id : d.byte_fallback_ids[b]) add(id);
      continue;
    }
    if (d.unk_id.has_value()) {
      if (pending_unk && !d.fuse_unk) add(*d.unk_id);
      pending_unk = true;
    }
  }
  if (pending_unk) add(*d.unk_id);

  auto& heap = s->heap;
  heap.clear();
  auto later = [](const Scratch::Candidate& a, const Scratch::Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  auto push_pair = [&](int32_t pos) {
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    const MergeTable::Entry* e = d.merges.Find(MergeTable::Key(symbols[pos].id, symbols[next].id));
    if (e == nullptr) return;
    heap.push_back({e->rank, pos, e->id});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push_pair(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Scratch::Candidate top = heap.back();
    heap.pop_back();
    Scratch::Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Scratch::Symbol& right = symbols[left.next];
    const MergeTable::Entry* e = d.merges.Find(MergeTable::Key(left.id, right.id));
    if (e == nullptr || e->id != top.id) continue;  // stale: the pair has changed
    left.id = top.id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (left.prev >= 0) push_pair(left.prev);
    push_pair(top.pos);
  }
  for (const Scratch::Symbol& sym : symbols) {
    if (sym.alive) out->push_back(sym.id);
  }
}

// ---------------------------------------------------------------------------------------------
// Loading tokenizer.json.

std::string Short(const Json& value) {
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  constexpr size_t kMax = 80;
  if (text.size() > kMax) {
    size_t cut = kMax;
    while (cut > 0 && (static_cast<uint8_t>(text[cut]) & 0xC0) == 0x80) --cut;
    text = absl::StrCat(text.substr(0, cut), "...");
  }
  return text;
}

std::string Sub(absl::string_view parent, absl::string_view key) {
  return parent.empty() ? std::string(key) : absl::StrCat(parent, ".", key);
}
std::string Sub(absl::string_view parent, size_t index) {
  return absl::StrCat(parent, "[", index, "]");
}

class Loader {
 public:
  explicit Loader(std::string source) : source_(std::move(source)) {}

  absl::Status Bad(absl::string_view key, const Json& value, absl::string_view why) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ": key \"", key, "\" = ", Short(value), ": ", why));
  }
  absl::Status Missing(absl::string_view key) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": missing key \"", key, "\""));
  }

  // Every key of `object` (at `path`) must be one of `allowed`.
  absl::Status CheckKeys(const Json& object, absl::string_view path,
                         std::initializer_list<absl::string_view> allowed) const {
    for (const auto& [key, value] : object.items()) {
      if (std::find(allowed.begin(), allowed.end(), absl::string_view(key)) == allowed.end()) {
        return Bad(Sub(path, key), value, "unknown key (not supported)");
      }
    }
    return absl::OkStatus();
  }

  // Absent or null: `fallback`.
  absl::StatusOr<bool> Bool(const Json& object, absl::string_view path, absl::string_view key,
                            std::optional<bool> fallback) const {
    auto it = object.find(std::string(key));
    if (it == object.end() || it->is_null()) {
      if (!fallback.has_value()) return Missing(Sub(path, key));
      return *fallback;
    }
    if (!it->is_boolean()) return Bad(Sub(path, key), *it, "expected true or false");
    return it->get<bool>();
  }

  absl::StatusOr<std::string> TypeOf(const Json& object, absl::string_view path) const {
    if (!object.is_object()) return Bad(path, object, "expected an object");
    auto it = object.find("type");
    if (it == object.end()) return Missing(Sub(path, "type"));
    if (!it->is_string()) return Bad(Sub(path, "type"), *it, "expected a string");
    return it->get<std::string>();
  }

  absl::StatusOr<std::unique_ptr<TokenizerData>> Build(const Json& root);

 private:
  absl::Status ReadModel(const Json& model, TokenizerData* d,
                         std::vector<std::pair<std::string, int32_t>>* vocab_entries) const;
  absl::Status ReadMerges(const Json& merges, TokenizerData* d) const;
  absl::Status ReadPreTokenizer(const Json& pre, TokenizerData* d) const;
  absl::Status ReadByteLevel(const Json& j, absl::string_view path, bool decoder,
                             TokenizerData* d) const;
  absl::Status ReadSplit(const Json& j, absl::string_view path, TokenizerData* d) const;

  std::string source_;
};

absl::Status Loader::ReadByteLevel(const Json& j, absl::string_view path, bool decoder,
                                   TokenizerData* d) const {
  RETURN_IF_ERROR(CheckKeys(j, path, {"type", "add_prefix_space", "trim_offsets", "use_regex"}));
  // The decoder ignores these (HF's ByteLevel decoder only maps characters back to bytes).
  ASSIGN_OR_RETURN(const bool add_prefix_space,
                   Bool(j, path, "add_prefix_space",
                        decoder ? std::optional<bool>(true) : std::optional<bool>()));
  ASSIGN_OR_RETURN(const bool use_regex, Bool(j, path, "use_regex", true));
  ASSIGN_OR_RETURN(const bool trim_offsets, Bool(j, path, "trim_offsets", true));
  (void)trim_offsets;  // offsets only
  if (decoder) return absl::OkStatus();
  d->add_prefix_space = add_prefix_space;
  if (use_regex) {
    auto re = Regex::Compile(kGpt2Pattern, false);
    if (!re.ok()) return re.status();
    d->byte_level_regex = std::move(*re);
  }
  return absl::OkStatus();
}

absl::Status Loader::ReadSplit(const Json& j, absl::string_view path, TokenizerData* d) const {
  RETURN_IF_ERROR(CheckKeys(j, path, {"type", "pattern", "behavior", "invert"}));
  SplitStep step;
  const std::string pattern_key = Sub(path, "pattern");
  auto pattern = j.find("pattern");
  if (pattern == j.end()) return Missing(pattern_key);
  if (!pattern->is_object() || pattern->size() != 1) {
    return Bad(pattern_key, *pattern, "expected {\"Regex\": ...} or {\"String\": ...}");
  }
  const std::string kind = pattern->begin().key();
  const Json& text = pattern->begin().value();
  const std::string text_key = Sub(pattern_key, kind);
  if (kind != "Regex" && kind != "String") {
    return Bad(text_key, text, "expected \"Regex\" or \"String\"");
  }
  if (!text.is_string()) return Bad(text_key, text, "expected a string");
  auto re = Regex::Compile(text.get<std::string>(), kind == "String");
  if (!re.ok()) return Bad(text_key, text, re.status().message());
  step.regex = std::move(*re);

  const std::string behavior_key = Sub(path, "behavior");
  auto behavior = j.find("behavior");
  if (behavior == j.end()) return Missing(behavior_key);
  const std::string b = behavior->is_string() ? behavior->get<std::string>() : "";
  if (b == "Removed") {
    step.behavior = SplitBehavior::kRemoved;
  } else if (b == "Isolated") {
    step.behavior = SplitBehavior::kIsolated;
  } else if (b == "MergedWithPrevious") {
    step.behavior = SplitBehavior::kMergedWithPrevious;
  } else if (b == "MergedWithNext") {
    step.behavior = SplitBehavior::kMergedWithNext;
  } else if (b == "Contiguous") {
    step.behavior = SplitBehavior::kContiguous;
  } else {
    return Bad(behavior_key, *behavior,
               "expected Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous");
  }
  ASSIGN_OR_RETURN(step.invert, Bool(j, path, "invert", false));
  d->splits.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status Loader::ReadPreTokenizer(const Json& pre, TokenizerData* d) const {
  const std::string path = "pre_tokenizer";
  if (pre.is_null()) {
    return Bad(path, pre, "a ByteLevel pre-tokenizer is required (byte-level BPE only)");
  }
  ASSIGN_OR_RETURN(const std::string type, TypeOf(pre, path));
  if (type == "ByteLevel") return ReadByteLevel(pre, path, false, d);
  if (type != "Sequence") {
    return Bad(Sub(path, "type"), pre["type"], "only Sequence and ByteLevel are supported");
  }
  RETURN_IF_ERROR(CheckKeys(pre, path, {"type", "pretokenizers"}));
  const std::string list_key = Sub(path, "pretokenizers");
  auto list = pre.find("pretokenizers");
  if (list == pre.end()) return Missing(list_key);
  if (!list->is_array() || list->empty()) return Bad(list_key, *list, "expected a list");
  for (size_t i = 0; i < list->size(); ++i) {
    const std::string item_key = Sub(list_key, i);
    ASSIGN_OR_RETURN(const std::string item_type, TypeOf((*list)[i], item_key));
    const bool last = i + 1 == list->size();
    if (item_type == "Split" && !last) {
      RETURN_IF_ERROR(ReadSplit((*list)[i], item_key, d));
    } else if (item_type == "ByteLevel" && last) {
      RETURN_IF_ERROR(ReadByteLevel((*list)[i], item_key, false, d));
    } else {
      return Bad(Sub(item_key, "type"), (*list)[i]["type"],
                 "supported: Split steps followed by one ByteLevel, last");
    }
  }
  return absl::OkStatus();
}

absl::Status Loader::ReadModel(const Json& model, TokenizerData* d,
                               std::vector<std::pair<std::string, int32_t>>* vocab_entries) const {
  const std::string path = "model";
  ASSIGN_OR_RETURN(const std::string type, TypeOf(model, path));
  if (type != "BPE") return Bad("model.type", model["type"], "only \"BPE\" is supported");
  RETURN_IF_ERROR(
      CheckKeys(model, path,
                {"type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                 "fuse_unk", "byte_fallback", "ignore_merges", "vocab", "merges"}));
  if (auto it = model.find("dropout"); it != model.end() && !it->is_null()) {
    if (!it->is_number() || it->get<double>() != 0.0) {
      return Bad("model.dropout", *it, "BPE dropout is not supported (null or 0 only)");
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (auto it = model.find(key); it != model.end() && !it->is_null()) {
      if (!it->is_string() || !it->get<std::string>().empty()) {
        return Bad(Sub(path, key), *it, "not supported (null or \"\" only)");
      }
    }
  }
  ASSIGN_OR_RETURN(d->fuse_unk, Bool(model, path, "fuse_unk", false));
  ASSIGN_OR_RETURN(d->byte_fallback, Bool(model, path, "byte_fallback", false));
  ASSIGN_OR_RETURN(d->ignore_merges, Bool(model, path, "ignore_merges", false));

  auto vocab = model.find("vocab");
  if (vocab == model.end()) return Missing("model.vocab");
  if (!vocab->is_object()) return Bad("model.vocab", *vocab, "expected an object token -> id");
  d->vocab.reserve(vocab->size());
  vocab_entries->reserve(vocab->size());
  for (const auto& [token, id] : vocab->items()) {
    const std::string key = absl::StrCat("model.vocab[", Json(token).dump(), "]");
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxTokenId) {
      return Bad(key, id, absl::StrCat("expected an id in [0, ", kMaxTokenId, "]"));
    }
    if (FirstInvalidUtf8(token) != absl::string_view::npos) {
      return Bad(key, id, "the token is not valid UTF-8");
    }
    const auto v = static_cast<int32_t>(id.get<int64_t>());
    d->vocab.emplace(token, v);
    vocab_entries->emplace_back(token, v);
  }

  if (auto it = model.find("unk_token"); it != model.end() && !it->is_null()) {
    if (!it->is_string()) return Bad("model.unk_token", *it, "expected a string or null");
    auto found = d->vocab.find(it->get<std::string>());
    if (found == d->vocab.end()) return Bad("model.unk_token", *it, "not in model.vocab");
    d->unk_id = found->second;
  }
  auto merges = model.find("merges");
  if (merges == model.end()) return Missing("model.merges");
  return ReadMerges(*merges, d);
}

absl::Status Loader::ReadMerges(const Json& merges, TokenizerData* d) const {
  if (!merges.is_array()) return Bad("model.merges", merges, "expected a list");
  d->merges.Reserve(merges.size());
  std::string left;
  std::string right;
  for (size_t i = 0; i < merges.size(); ++i) {
    const Json& m = merges[i];
    const std::string key = Sub("model.merges", i);
    if (m.is_array()) {  // ["left", "right"]
      if (m.size() != 2 || !m[0].is_string() || !m[1].is_string()) {
        return Bad(key, m, "expected [left, right] or \"left right\"");
      }
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else if (m.is_string()) {  // "left right" (tokenizers < 0.20)
      const std::string& s = m.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return Bad(key, m, "expected \"left right\" with exactly one space");
      }
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else {
      return Bad(key, m, "expected [left, right] or \"left right\"");
    }
    auto l = d->vocab.find(left);
    if (l == d->vocab.end()) {
      return Bad(key, m,
                 absl::StrCat("unknown token ", Json(left).dump(), " (not in model.vocab)"));
    }
    auto r = d->vocab.find(right);
    if (r == d->vocab.end()) {
      return Bad(key, m,
                 absl::StrCat("unknown token ", Json(right).dump(), " (not in model.vocab)"));
    }
    auto merged = d->vocab.find(left + right);
    if (merged == d->vocab.end()) {
      return Bad(
          key, m,
          absl::StrCat("the merged token ", Json(left + right).dump(), " is not in model.vocab"));
    }
    d->merges.Insert(MergeTable::Key(l->second, r->second), static_cast<uint32_t>(i),
                     merged->second);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TokenizerData>> Loader::Build(const Json& root) {
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": expected a JSON object"));
  }
  RETURN_IF_ERROR(CheckKeys(root, "",
                            {"version", "truncation", "padding", "added_tokens", "normalizer",
                             "pre_tokenizer", "post_processor", "decoder", "model"}));
  auto d = std::make_unique<TokenizerData>();
  for (const char* key : {"truncation", "padding"}) {
    if (auto it = root.find(key); it != root.end() && !it->is_null()) {
      return Bad(key, *it, "not supported (must be null)");
    }
  }
  if (auto it = root.find("normalizer"); it != root.end() && !it->is_null()) {
    ASSIGN_OR_RETURN(const std::string type, TypeOf(*it, "normalizer"));
    auto list = it->find("normalizers");
    if (type != "Sequence" || it->size() != 2 || list == it->end() || !list->is_array() ||
        !list->empty()) {
      return Bad("normalizer", *it, "not supported (null or an empty Sequence only)");
    }
  }
  // post_processor: not applied (Encode adds no special tokens), any value accepted.

  auto model = root.find("model");
  if (model == root.end()) return Missing("model");
  std::vector<std::pair<std::string, int32_t>> vocab_entries;
  RETURN_IF_ERROR(ReadModel(*model, d.get(), &vocab_entries));

  auto pre = root.find("pre_tokenizer");
  if (pre == root.end()) return Missing("pre_tokenizer");
  RETURN_IF_ERROR(ReadPreTokenizer(*pre, d.get()));

  auto decoder = root.find("decoder");
  if (decoder == root.end()) return Missing("decoder");
  if (decoder->is_null()) return Bad("decoder", *decoder, "a ByteLevel decoder is required");
  ASSIGN_OR_RETURN(const std::string decoder_type, TypeOf(*decoder, "decoder"));
  if (decoder_type != "ByteLevel") {
    return Bad("decoder.type", (*decoder)["type"], "only \"ByteLevel\" is supported");
  }
  RETURN_IF_ERROR(ReadByteLevel(*decoder, "decoder", true, d.get()));

  // Added tokens.
  struct Added {
    std::string content;
    int32_t id;
    bool special;
    bool normalized;
  };
  std::vector<Added> added;
  if (auto list = root.find("added_tokens"); list != root.end() && !list->is_null()) {
    if (!list->is_array()) return Bad("added_tokens", *list, "expected a list");
    for (size_t i = 0; i < list->size(); ++i) {
      const Json& t = (*list)[i];
      const std::string path = Sub("added_tokens", i);
      if (!t.is_object()) return Bad(path, t, "expected an object");
      RETURN_IF_ERROR(CheckKeys(
          t, path, {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"}));
      Added a;
      auto id = t.find("id");
      if (id == t.end()) return Missing(Sub(path, "id"));
      if (!id->is_number_integer() || id->get<int64_t>() < 0 || id->get<int64_t>() > kMaxTokenId) {
        return Bad(Sub(path, "id"), *id, absl::StrCat("expected an id in [0, ", kMaxTokenId, "]"));
      }
      a.id = static_cast<int32_t>(id->get<int64_t>());
      auto content = t.find("content");
      if (content == t.end()) return Missing(Sub(path, "content"));
      if (!content->is_string() || content->get<std::string>().empty()) {
        return Bad(Sub(path, "content"), *content, "expected a non-empty string");
      }
      a.content = content->get<std::string>();
      if (FirstInvalidUtf8(a.content) != absl::string_view::npos) {
        return Bad(Sub(path, "content"), *content, "not valid UTF-8");
      }
      ASSIGN_OR_RETURN(a.special, Bool(t, path, "special", false));
      ASSIGN_OR_RETURN(a.normalized, Bool(t, path, "normalized", !a.special));
      for (const char* flag : {"single_word", "lstrip", "rstrip"}) {
        ASSIGN_OR_RETURN(const bool on, Bool(t, path, flag, false));
        if (on) return Bad(Sub(path, flag), t[flag], "not supported (false only)");
      }
      if (auto v = d->vocab.find(a.content); v != d->vocab.end() && v->second != a.id) {
        return Bad(Sub(path, "id"), *id,
                   absl::StrCat("model.vocab has ", Json(a.content).dump(), " as id ", v->second));
      }
      if (d->added_by_content.count(a.content) > 0) {
        return Bad(Sub(path, "content"), *content, "duplicate added token");
      }
      d->added_by_content.emplace(a.content, a.id);
      added.push_back(std::move(a));
    }
  }

  // Id tables.
  int64_t max_id = -1;
  for (const auto& [token, id] : vocab_entries) max_id = std::max<int64_t>(max_id, id);
  for (const Added& a : added) max_id = std::max<int64_t>(max_id, a.id);
  d->vocab_size = static_cast<int32_t>(max_id + 1);
  d->token_strings.assign(d->vocab_size, std::string());
  d->token_bytes.assign(d->vocab_size, std::string());
  d->has_token.assign(d->vocab_size, 0);
  d->special.assign(d->vocab_size, 0);
  auto decode_bytes = [](const std::string& token) {
    std::string bytes;
    return ByteLevelToBytes(token, &bytes) ? bytes : token;  // HF: whole token as UTF-8 if not
  };
  for (const auto& [token, id] : vocab_entries) {
    if (d->has_token[id]) {
      return Bad(absl::StrCat("model.vocab[", Json(token).dump(), "]"), Json(id),
                 absl::StrCat("id used twice (also by ", Json(d->token_strings[id]).dump(), ")"));
    }
    d->has_token[id] = 1;
    d->token_strings[id] = token;
    d->token_bytes[id] = decode_bytes(token);
  }
  for (size_t i = 0; i < added.size(); ++i) {
    const Added& a = added[i];
    if (d->has_token[a.id] && d->token_strings[a.id] != a.content) {
      auto it = d->added_by_content.find(d->token_strings[a.id]);
      const bool by_added = it != d->added_by_content.end() && it->second == a.id;
      return Bad(Sub(Sub("added_tokens", i), "id"), Json(a.id),
                 absl::StrCat("id already used by ", by_added ? "added token " : "model.vocab ",
                              Json(d->token_strings[a.id]).dump()));
    }
    d->has_token[a.id] = 1;
    d->token_strings[a.id] = a.content;
    d->token_bytes[a.id] = decode_bytes(a.content);
    d->special[a.id] = a.special ? 1 : 0;
    (a.normalized ? d->normalized_added : d->raw_added).Add(a.content, a.id);
  }
  d->raw_added.Finish();
  d->normalized_added.Finish();

  // Initial BPE symbols: one per byte.
  const ByteLevelAlphabet& alphabet = Alphabet();
  for (int b = 0; b < 256; ++b) {
    auto it = d->vocab.find(alphabet.byte_to_utf8[b]);
    d->byte_ids[b] = it == d->vocab.end() ? -1 : it->second;
    if (d->byte_fallback) {  // HF: <0xXX> for each UTF-8 byte of the missing character
      std::vector<int32_t> ids;
      for (char c : alphabet.byte_to_utf8[b]) {
        char name[8];
        std::snprintf(name, sizeof(name), "<0x%02X>", static_cast<uint8_t>(c));
        auto f = d->vocab.find(name);
        if (f == d->vocab.end()) {
          ids.clear();
          break;
        }
        ids.push_back(f->second);
      }
      d->byte_fallback_ids[b] = std::move(ids);
    }
    if (d->byte_ids[b] < 0 && !d->unk_id.has_value() &&
        !(d->byte_fallback && !d->byte_fallback_ids[b].empty())) {
      return Bad(
          "model.vocab", Json(nullptr),
          absl::StrCat("the byte-level token ", Json(alphabet.byte_to_utf8[b]).dump(), " (byte ", b,
                       ") is missing, and there is no unk_token or "
                       "byte_fallback to encode it"));
    }
  }
  if (d->ignore_merges) {
    std::string bytes;
    for (const auto& [token, id] : vocab_entries) {
      if (ByteLevelToBytes(token, &bytes)) d->raw_vocab.emplace(bytes, id);
    }
  }
  return d;
}

absl::StatusOr<std::unique_ptr<TokenizerData>> BuildFromText(absl::string_view json_text,
                                                             const std::string& source) {
  Json root;
  try {
    root = Json::parse(json_text.begin(), json_text.end());
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, " is not valid JSON: ", e.what()));
  }
  Loader loader(source);
  try {
    return loader.Build(root);
  } catch (const Json::exception& e) {  // defensive: every access above is type-checked
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
}

}  // namespace
}  // namespace tokenizer_internal

using tokenizer_internal::TokenizerData;

Tokenizer::Tokenizer(std::unique_ptr<const TokenizerData> data) : data_(std::move(data)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  ASSIGN_OR_RETURN(auto data, tokenizer_internal::BuildFromText(text.str(), path));
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(data)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(absl::string_view json_text) {
  ASSIGN_OR_RETURN(auto data, tokenizer_internal::BuildFromText(json_text, "tokenizer.json"));
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(data)));
}

std::unique_ptr<Tokenizer> Tokenizer::ByteLevelDemo() {
  const auto& alphabet = tokenizer_internal::Alphabet();
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[alphabet.byte_to_utf8[b]] = b;
  nlohmann::json added = nlohmann::json::array();
  const char* const specials[] = {"<|endoftext|>", "<|mask|>",     "<role>",
                                  "</role>",       "<|role_end|>", "<|startoftext|>"};
  for (int i = 0; i < 6; ++i) {
    added.push_back({{"id", 256 + i},
                     {"content", specials[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  const nlohmann::json byte_level = {{"type", "ByteLevel"},
                                     {"add_prefix_space", false},
                                     {"trim_offsets", false},
                                     {"use_regex", false}};
  const nlohmann::json root = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", byte_level},
      {"post_processor", nullptr},
      {"decoder", byte_level},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
  };
  tokenizer_internal::Loader loader("ByteLevelDemo");
  auto data = loader.Build(root);
  if (!data.ok()) {
    MOESERVE_LOG(ERROR) << "ByteLevelDemo: " << data.status();
    std::abort();
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(*data)));
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(absl::string_view text) const {
  const TokenizerData& d = *data_;
  tokenizer_internal::Scratch scratch(d);
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  RETURN_IF_ERROR(tokenizer_internal::ForEachPiece(
      d, text, &scratch, [&](absl::string_view piece, int32_t added_id) {
        if (added_id >= 0) {
          ids.push_back(added_id);
        } else {
          tokenizer_internal::EncodePiece(d, piece, &scratch, &ids);
        }
      }));
  return ids;
}

absl::StatusOr<std::vector<std::string>> Tokenizer::PreTokenize(absl::string_view text) const {
  tokenizer_internal::Scratch scratch(*data_);
  std::vector<std::string> pieces;
  RETURN_IF_ERROR(tokenizer_internal::ForEachPiece(
      *data_, text, &scratch,
      [&](absl::string_view piece, int32_t) { pieces.emplace_back(piece); }));
  return pieces;
}

absl::StatusOr<std::string> Tokenizer::Decode(std::span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  const TokenizerData& d = *data_;
  std::string bytes;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= d.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("ids[", i, "] = ", id, " is out of range [0, ", d.vocab_size, ")"));
    }
    if (!d.has_token[id]) {
      return absl::InvalidArgumentError(absl::StrCat("ids[", i, "] = ", id, " has no token"));
    }
    if (skip_special_tokens && d.special[id]) continue;
    bytes += d.token_bytes[id];
  }
  return tokenizer_internal::LossyUtf8(std::move(bytes));
}

std::optional<int32_t> Tokenizer::TokenId(absl::string_view token) const {
  const std::string key(token);
  if (auto it = data_->added_by_content.find(key); it != data_->added_by_content.end()) {
    return it->second;
  }
  if (auto it = data_->vocab.find(key); it != data_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::TokenString(int32_t id) const {
  if (id < 0 || id >= data_->vocab_size || !data_->has_token[id]) return std::nullopt;
  return data_->token_strings[id];
}

std::optional<int32_t> Tokenizer::eos_id() const { return TokenId("<|endoftext|>"); }
std::optional<int32_t> Tokenizer::mask_id() const { return TokenId("<|mask|>"); }
std::optional<int32_t> Tokenizer::role_end_id() const { return TokenId("<|role_end|>"); }
int32_t Tokenizer::vocab_size() const { return data_->vocab_size; }

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < data_->vocab_size && data_->special[id] != 0;
}

// ---------------------------------------------------------------------------------------------

absl::StatusOr<std::string> RenderChat(std::span<const ChatMessage> messages,
                                       bool add_generation_prompt) {
  if (messages.empty()) return absl::InvalidArgumentError("messages: must not be empty");
  std::string out = "<role>SYSTEM</role>";
  if (messages[0].role == "system") absl::StrAppend(&out, messages[0].content, "\n");
  out += "detailed thinking off<|role_end|>";
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      absl::StrAppend(&out, "<role>HUMAN</role>", m.content, "<|role_end|>");
    } else if (m.role == "system") {
      if (i > 0) absl::StrAppend(&out, "<role>SYSTEM</role>", m.content, "<|role_end|>");
    } else if (m.role == "assistant") {
      absl::StrAppend(&out, "<role>ASSISTANT</role>", m.content, "<|role_end|>");
    } else {
      const std::string role =
          nlohmann::json(m.role).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      return absl::InvalidArgumentError(
          absl::StrCat("messages[", i, "].role: unknown role ", role,
                       " (expected \"system\", \"user\" or \"assistant\")"));
    }
  }
  if (add_generation_prompt) out += "<role>ASSISTANT</role>";
  return out;
}

}  // namespace moeserve
