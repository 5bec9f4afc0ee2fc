#include "model/tokenizer.h"

#include <algorithm>
#include <array>
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
#include "model/pretokenizer.h"
#include "nlohmann/json.hpp"

namespace moeserve {
namespace tokenizer_internal {
namespace {

using Json = nlohmann::json;

constexpr int32_t kMaxTokenId = 0x7ffffffe;

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

}  // namespace moeserve
