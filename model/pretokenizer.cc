#include "model/pretokenizer.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"
#include "kernels/util/logging.h"
#include "kernels/util/status_macros.h"

namespace moeserve {
namespace tokenizer_internal {

// ---------------------------------------------------------------------------------------------
// UTF-8.

namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

// ---------------------------------------------------------------------------------------------
// GPT-2's byte <-> printable code point mapping that byte-level BPE vocabularies are written in:
// the printable Latin-1 bytes stand for themselves, the others for U+0100 and up, in byte order.

ByteLevelAlphabet::ByteLevelAlphabet() {
  cp_to_byte.fill(-1);
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    byte_to_cp[b] = printable ? b : next++;
    cp_to_byte[byte_to_cp[b]] = static_cast<int16_t>(b);
    AppendUtf8(byte_to_cp[b], &byte_to_utf8[b]);
  }
}

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

namespace {

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

}  // namespace

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(absl::string_view pattern, bool literal) {
  std::string translated(pattern);
  if (!literal) {
    ASSIGN_OR_RETURN(translated, OnigurumaToPcre2(pattern));
  }
  const uint32_t options = literal
                               ? PCRE2_UTF | PCRE2_LITERAL
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

absl::Status Regex::Find(absl::string_view s, pcre2_match_data* md,
                         std::vector<Span>* spans) const {
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

}  // namespace tokenizer_internal
}  // namespace moeserve
