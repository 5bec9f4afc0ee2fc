#include "model/tokenizer.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace moeserve {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

const std::string kDir = testing::TestDataDir() + "/tokenizer";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<Json> ReadJsonl(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::vector<Json> rows;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) rows.push_back(Json::parse(line));
  }
  return rows;
}

std::vector<int32_t> Ids(const Json& j) { return j.get<std::vector<int32_t>>(); }

std::string Message(const absl::Status& status) { return std::string(status.message()); }

// Loading the 7 MB tokenizer.json takes a moment: once per suite.
class GoldenTokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto t = Tokenizer::Load(kDir + "/tokenizer.json");
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = t->release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }
  static const Tokenizer& tok() { return *tokenizer_; }

  static Tokenizer* tokenizer_;
};
Tokenizer* GoldenTokenizerTest::tokenizer_ = nullptr;

// Checks every line of a cases.jsonl: ids, token strings, pieces and both decodes.
void CheckCases(const Tokenizer& tok, const std::string& path, size_t expected_count) {
  const std::vector<Json> cases = ReadJsonl(path);
  ASSERT_EQ(cases.size(), expected_count);
  size_t passed = 0;
  for (const Json& c : cases) {
    SCOPED_TRACE(c["id"].get<std::string>() + " (" + c["category"].get<std::string>() + ")");
    const std::string text = c["text"];
    const std::vector<int32_t> want = Ids(c["ids"]);
    bool ok = true;

    auto pieces = tok.PreTokenize(text);
    ASSERT_TRUE(pieces.ok()) << pieces.status();
    EXPECT_EQ(*pieces, c["pieces"].get<std::vector<std::string>>());
    ok &= *pieces == c["pieces"].get<std::vector<std::string>>();

    auto ids = tok.Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, want);
    ok &= *ids == want;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(tok.TokenString(want[i]).value_or("<none>"), c["tokens"][i].get<std::string>());
    }

    auto decoded = tok.Decode(want, /*skip_special_tokens=*/false);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, c["decoded"].get<std::string>());
    ok &= *decoded == c["decoded"].get<std::string>();
    auto skipped = tok.Decode(want, /*skip_special_tokens=*/true);
    ASSERT_TRUE(skipped.ok()) << skipped.status();
    EXPECT_EQ(*skipped, c["decoded_skip_special"].get<std::string>());
    ok &= *skipped == c["decoded_skip_special"].get<std::string>();
    passed += ok ? 1 : 0;
  }
  std::printf("%s: %zu of %zu cases passed\n", path.c_str(), passed, cases.size());
}

TEST_F(GoldenTokenizerTest, EncodeDecodeCases) { CheckCases(tok(), kDir + "/cases.jsonl", 227); }

TEST_F(GoldenTokenizerTest, DecodeCases) {
  const std::vector<Json> cases = ReadJsonl(kDir + "/decode_cases.jsonl");
  ASSERT_EQ(cases.size(), 121u);
  size_t passed = 0;
  for (const Json& c : cases) {
    SCOPED_TRACE(c["id"].get<std::string>() + ": " + c["note"].get<std::string>());
    auto decoded = tok().Decode(Ids(c["ids"]), c["skip_special_tokens"].get<bool>());
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, c["decoded"].get<std::string>());
    passed += *decoded == c["decoded"].get<std::string>() ? 1 : 0;
  }
  std::printf("decode_cases.jsonl: %zu of %zu cases passed\n", passed, cases.size());
}

TEST_F(GoldenTokenizerTest, ChatCases) {
  const std::vector<Json> cases = ReadJsonl(kDir + "/chat_cases.jsonl");
  ASSERT_EQ(cases.size(), 5u);
  size_t passed = 0;
  for (const Json& c : cases) {
    SCOPED_TRACE(c["id"].get<std::string>());
    std::vector<ChatMessage> messages;
    for (const Json& m : c["messages"]) messages.push_back({m["role"], m["content"]});
    auto rendered = RenderChat(messages, c["add_generation_prompt"].get<bool>());
    ASSERT_TRUE(rendered.ok()) << rendered.status();
    EXPECT_EQ(*rendered, c["rendered"].get<std::string>());
    auto ids = tok().Encode(*rendered);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, Ids(c["ids"]));
    passed += *rendered == c["rendered"].get<std::string>() && *ids == Ids(c["ids"]) ? 1 : 0;
  }
  std::printf("chat_cases.jsonl: %zu of %zu cases passed\n", passed, cases.size());
}

TEST_F(GoldenTokenizerTest, SpecialIdsComeFromTheFile) {
  EXPECT_EQ(tok().vocab_size(), 100262);
  EXPECT_EQ(tok().eos_id(), 100257);
  EXPECT_EQ(tok().mask_id(), 100258);
  EXPECT_EQ(tok().role_end_id(), 100261);
  EXPECT_EQ(tok().TokenId("<|startoftext|>"), 100256);
  EXPECT_EQ(tok().TokenId("<role>"), 100259);
  EXPECT_EQ(tok().TokenId("</role>"), 100260);
  EXPECT_EQ(tok().TokenId("Ġworld"), 1917);
  EXPECT_EQ(tok().TokenId("no such token"), std::nullopt);
  EXPECT_TRUE(tok().IsSpecial(100258));
  EXPECT_FALSE(tok().IsSpecial(1917));
  EXPECT_FALSE(tok().IsSpecial(-1));
  EXPECT_FALSE(tok().IsSpecial(100262));
  EXPECT_EQ(tok().TokenString(100261), "<|role_end|>");
  EXPECT_EQ(tok().TokenString(100262), std::nullopt);
}

// Oniguruma's \s is Unicode White_Space, which PCRE2's \s is not quite (it adds U+180E): the
// pattern is translated. Per Oniguruma, U+180E is "other" and joins the run of other symbols.
TEST_F(GoldenTokenizerTest, WhitespaceClassIsOniguruma) {
  auto pieces = tok().PreTokenize("a\u180E\u180Eb \u3000x\u00A0\u2028");
  ASSERT_TRUE(pieces.ok()) << pieces.status();
  EXPECT_EQ(*pieces,
            (std::vector<std::string>{"a", "\u180E\u180E", "b", " ", "\u3000x", "\u00A0\u2028"}));
}

TEST_F(GoldenTokenizerTest, InvalidUtf8InputIsAnError) {
  auto ids = tok().Encode("abc\xC3(def");
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(ids.status()), HasSubstr("text is not valid UTF-8 at byte 3"));
  for (const char* bad : {"\xED\xA0\x80", "\xF4\x90\x80\x80", "\xC0\xAF", "\xFF", "x\xE2\x82"}) {
    EXPECT_FALSE(tok().Encode(bad).ok()) << bad;
    EXPECT_FALSE(tok().PreTokenize(bad).ok()) << bad;
  }
}

TEST_F(GoldenTokenizerTest, OutOfRangeIdIsAnError) {
  const std::vector<int32_t> high = {9906, 100262};
  auto a = tok().Decode(high, false);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(a.status()), HasSubstr("ids[1] = 100262 is out of range [0, 100262)"));
  const std::vector<int32_t> negative = {-5};
  auto b = tok().Decode(negative, true);
  ASSERT_FALSE(b.ok());
  EXPECT_THAT(Message(b.status()), HasSubstr("-5"));
}

// Long runs within one piece (a single whitespace run, a single word) stay fast and exact.
TEST_F(GoldenTokenizerTest, LongPiecesRoundTrip) {
  std::string spaces(200000, ' ');
  spaces += "x";
  std::string letters;
  for (int i = 0; i < 50000; ++i) letters += "abcdefghij"[i % 10];
  std::string cjk;
  for (int i = 0; i < 20000; ++i) cjk += "\u4e2d\u6587";
  for (const std::string& text : {spaces, letters, cjk, std::string(100000, '\n')}) {
    auto ids = tok().Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    auto back = tok().Decode(*ids, false);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, text);
  }
}

TEST_F(GoldenTokenizerTest, ConcurrentEncodeMatchesGoldens) {
  const std::vector<Json> cases = ReadJsonl(kDir + "/cases.jsonl");
  std::atomic<int> mismatches{0};
  std::atomic<int> checked{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round) {
        for (size_t i = 0; i < cases.size(); ++i) {
          const Json& c = cases[(i + 31 * t) % cases.size()];
          auto ids = tok().Encode(c["text"].get<std::string>());
          if (!ids.ok() || *ids != Ids(c["ids"])) ++mismatches;
          auto text = tok().Decode(Ids(c["ids"]), false);
          if (!text.ok() || *text != c["decoded"].get<std::string>()) ++mismatches;
          ++checked;
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(checked.load(), 8 * 3 * static_cast<int>(cases.size()));
}

// Reports (does not assert) the encode speed on ~1 MiB of the cases' texts, repeated.
TEST_F(GoldenTokenizerTest, EncodeSpeedOnOneMegabyte) {
  const std::vector<Json> cases = ReadJsonl(kDir + "/cases.jsonl");
  std::string text;
  while (text.size() < (size_t{1} << 20)) {
    for (const Json& c : cases) {
      text += c["text"].get<std::string>();
      text += '\n';
    }
  }
  double best = 1e30;
  size_t tokens = 0;
  for (int run = 0; run < 3; ++run) {
    const auto start = std::chrono::steady_clock::now();
    auto ids = tok().Encode(text);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ASSERT_TRUE(ids.ok()) << ids.status();
    tokens = ids->size();
    best = std::min(best, seconds);
    if (run == 0) {
      auto back = tok().Decode(*ids, false);
      ASSERT_TRUE(back.ok());
      EXPECT_EQ(*back, text);
    }
  }
  std::printf("encode of %zu bytes -> %zu tokens: best of 3 %.1f ms, %.0f tokens/s, %.1f MB/s\n",
              text.size(), tokens, best * 1e3, tokens / best, text.size() / best / 1e6);
}

TEST(SmallLegacyTokenizerTest, StringMergesCases) {
  auto t = Tokenizer::Load(kDir + "/small_legacy/tokenizer.json");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->vocab_size(), 4102);
  EXPECT_EQ((*t)->mask_id(), 4098);
  EXPECT_EQ((*t)->eos_id(), 4097);
  EXPECT_EQ((*t)->role_end_id(), 4101);
  CheckCases(**t, kDir + "/small_legacy/cases.jsonl", 227);
}

// Error cases: a mutation of the small legacy tokenizer.json at one key.
Json SmallJson() { return Json::parse(ReadFile(kDir + "/small_legacy/tokenizer.json")); }

absl::Status LoadError(const Json& j) {
  auto t = Tokenizer::FromJson(j.dump());
  return t.ok() ? absl::OkStatus() : t.status();
}

TEST(TokenizerErrorTest, MissingFile) {
  auto t = Tokenizer::Load("/nonexistent/dir/tokenizer.json");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(t.status()), HasSubstr("/nonexistent/dir/tokenizer.json"));
}

TEST(TokenizerErrorTest, NotJson) {
  auto t = Tokenizer::FromJson("{\"model\": {");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(t.status()), HasSubstr("not valid JSON"));
  auto u = Tokenizer::FromJson("[1, 2]");
  ASSERT_FALSE(u.ok());
  EXPECT_THAT(Message(u.status()), HasSubstr("expected a JSON object"));
  // A file path is named in the error.
  auto v = Tokenizer::Load(kDir + "/README.md");
  ASSERT_FALSE(v.ok());
  EXPECT_THAT(Message(v.status()), HasSubstr("README.md is not valid JSON"));
}

struct BadTokenizer {
  const char* name;
  std::function<void(Json&)> mutate;
  const char* key;           // the key the error must name
  const char* message_part;  // and this
};

class BadTokenizerTest : public ::testing::TestWithParam<BadTokenizer> {};

TEST_P(BadTokenizerTest, ErrorNamesTheKey) {
  const BadTokenizer& bad = GetParam();
  Json j = SmallJson();
  bad.mutate(j);
  const absl::Status status = LoadError(j);
  ASSERT_FALSE(status.ok()) << bad.name << " was accepted";
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), HasSubstr(std::string("\"") + bad.key + "\"")) << bad.name;
  EXPECT_THAT(Message(status), HasSubstr(bad.message_part)) << bad.name;
}

INSTANTIATE_TEST_SUITE_P(
    Keys, BadTokenizerTest,
    ::testing::Values(
        BadTokenizer{"unknown model type", [](Json& j) { j["model"]["type"] = "WordPiece"; },
                     "model.type", "only \"BPE\""},
        BadTokenizer{"merge of an unknown token",
                     [](Json& j) { j["model"]["merges"][1] = "ĠĠ zzzunknown"; }, "model.merges[1]",
                     "unknown token \"zzzunknown\""},
        BadTokenizer{"merge into a token not in the vocab",
                     [](Json& j) { j["model"]["merges"][2] = "Ġ Ġt"; }, "model.merges[2]",
                     "\"ĠĠt\" is not in model.vocab"},
        BadTokenizer{"merge without a space", [](Json& j) { j["model"]["merges"][0] = "ĠĠ"; },
                     "model.merges[0]", "exactly one space"},
        BadTokenizer{"merge pair of three",
                     [](Json& j) {
                       j["model"]["merges"][0] = Json::array({"a", "b", "c"});
                     },
                     "model.merges[0]", "[left, right]"},
        BadTokenizer{"vocab id not an integer", [](Json& j) { j["model"]["vocab"]["a"] = "x"; },
                     "model.vocab[\"a\"]", "expected an id"},
        BadTokenizer{"normalizer",
                     [](Json& j) {
                       j["normalizer"] = {{"type", "NFC"}};
                     },
                     "normalizer", "not supported"},
        BadTokenizer{
            "split behavior",
            [](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways"; },
            "pre_tokenizer.pretokenizers[0].behavior", "Isolated"},
        BadTokenizer{
            "bad regex",
            [](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(a"; },
            "pre_tokenizer.pretokenizers[0].pattern.Regex", "PCRE2"},
        BadTokenizer{
            "regex with \\w",
            [](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+"; },
            "pre_tokenizer.pretokenizers[0].pattern.Regex", "\\w is not supported"},
        BadTokenizer{"unsupported pre-tokenizer",
                     [](Json& j) {
                       j["pre_tokenizer"] = {{"type", "Whitespace"}};
                     },
                     "pre_tokenizer.type", "Sequence and ByteLevel"},
        BadTokenizer{"no pre-tokenizer", [](Json& j) { j["pre_tokenizer"] = nullptr; },
                     "pre_tokenizer", "ByteLevel pre-tokenizer is required"},
        BadTokenizer{"decoder",
                     [](Json& j) {
                       j["decoder"] = {{"type", "WordPiece"}};
                     },
                     "decoder.type", "ByteLevel"},
        BadTokenizer{"dropout", [](Json& j) { j["model"]["dropout"] = 0.1; }, "model.dropout",
                     "not supported"},
        BadTokenizer{"unk not in vocab", [](Json& j) { j["model"]["unk_token"] = "<unk>"; },
                     "model.unk_token", "not in model.vocab"},
        BadTokenizer{"unknown model key", [](Json& j) { j["model"]["shiny"] = true; },
                     "model.shiny", "unknown key"},
        BadTokenizer{"lstrip", [](Json& j) { j["added_tokens"][2]["lstrip"] = true; },
                     "added_tokens[2].lstrip", "not supported"},
        BadTokenizer{"added id clash", [](Json& j) { j["added_tokens"][0]["id"] = 5; },
                     "added_tokens[0].id", "already used by model.vocab"},
        BadTokenizer{"truncation",
                     [](Json& j) {
                       j["truncation"] = {{"max_length", 8}};
                     },
                     "truncation", "must be null"},
        BadTokenizer{"missing byte",
                     [](Json& j) {
                       j["model"]["vocab"].erase("Ā");
                       j["model"]["merges"] = Json::array();
                     },
                     "model.vocab", "byte 0"}),
    [](const ::testing::TestParamInfo<BadTokenizer>& info) {
      std::string name;
      for (const char* c = info.param.name; *c != '\0'; ++c) {
        name += std::isalnum(static_cast<unsigned char>(*c)) ? *c : '_';
      }
      return name;
    });

// Split behaviors, on HF's documented example; a String pattern is a literal.
TEST(TokenizerOptionsTest, SplitBehaviors) {
  struct Want {
    const char* behavior;
    bool invert;
    std::vector<std::string> pieces;
  };
  const std::vector<Want> wants = {
      {"Isolated", false, {"the", "-", "final", "-", "-", "countdown"}},
      {"Removed", false, {"the", "final", "countdown"}},
      {"MergedWithPrevious", false, {"the-", "final-", "-", "countdown"}},
      {"MergedWithNext", false, {"the", "-final", "-", "-countdown"}},
      {"Contiguous", false, {"the", "-", "final", "--", "countdown"}},
      {"Removed", true, {"-", "-", "-"}},
  };
  for (const Want& want : wants) {
    SCOPED_TRACE(std::string(want.behavior) + (want.invert ? " inverted" : ""));
    Json j = SmallJson();
    Json& split = j["pre_tokenizer"]["pretokenizers"][0];
    split["pattern"] = {{"String", "-"}};
    split["behavior"] = want.behavior;
    split["invert"] = want.invert;
    auto t = Tokenizer::FromJson(j.dump());
    ASSERT_TRUE(t.ok()) << t.status();
    auto pieces = (*t)->PreTokenize("the-final--countdown");
    ASSERT_TRUE(pieces.ok()) << pieces.status();
    EXPECT_EQ(*pieces, want.pieces);
  }
}

// ByteLevel alone: the GPT-2 regex, and a prefix space for each stretch between added tokens.
TEST(TokenizerOptionsTest, ByteLevelPrefixSpaceAndRegex) {
  Json j = SmallJson();
  j["pre_tokenizer"] = {{"type", "ByteLevel"},
                        {"add_prefix_space", true},
                        {"trim_offsets", true},
                        {"use_regex", true}};
  auto t = Tokenizer::FromJson(j.dump());
  ASSERT_TRUE(t.ok()) << t.status();
  auto pieces = (*t)->PreTokenize("Hello world's 123<|mask|>x  y");
  ASSERT_TRUE(pieces.ok()) << pieces.status();
  EXPECT_EQ(*pieces, (std::vector<std::string>{" Hello", " world", "'s", " 123", "<|mask|>", " x",
                                               " ", " y"}));
}

TEST(TokenizerOptionsTest, IgnoreMergesTakesWholeWords) {
  Json j = SmallJson();
  j["model"]["merges"] = Json::array();
  j["model"]["ignore_merges"] = true;
  auto t = Tokenizer::FromJson(j.dump());
  ASSERT_TRUE(t.ok()) << t.status();
  const std::optional<int32_t> the = (*t)->TokenId("Ġthe");
  ASSERT_TRUE(the.has_value());
  auto ids = (*t)->Encode(" the thx");
  ASSERT_TRUE(ids.ok()) << ids.status();
  // " the" is a token; " thx" is not, and without merges stays bytes.
  EXPECT_EQ(*ids, (std::vector<int32_t>{*the, *(*t)->TokenId("Ġ"), *(*t)->TokenId("t"),
                                        *(*t)->TokenId("h"), *(*t)->TokenId("x")}));
}

TEST(TokenizerOptionsTest, UnknownBytesUseUnkOrByteFallback) {
  Json j = SmallJson();
  j["model"]["vocab"].erase("Ā");  // byte 0x00
  j["model"]["merges"] = Json::array();
  j["model"]["unk_token"] = "!";
  const int32_t a = 64;  // "a"
  {
    auto t = Tokenizer::FromJson(j.dump());
    ASSERT_TRUE(t.ok()) << t.status();
    auto ids = (*t)->Encode(std::string("a\0\0a", 4));
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, (std::vector<int32_t>{a, 0, 0, a}));
  }
  {
    j["model"]["fuse_unk"] = true;
    auto t = Tokenizer::FromJson(j.dump());
    ASSERT_TRUE(t.ok()) << t.status();
    auto ids = (*t)->Encode(std::string("a\0\0a", 4));
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, (std::vector<int32_t>{a, 0, a}));
  }
  {
    // HF byte fallback: <0xXX> for each UTF-8 byte of the missing character U+0100 (C4 80).
    j["model"]["byte_fallback"] = true;
    j["model"]["vocab"]["<0xC4>"] = 5000;
    j["model"]["vocab"]["<0x80>"] = 5001;
    auto t = Tokenizer::FromJson(j.dump());
    ASSERT_TRUE(t.ok()) << t.status();
    auto ids = (*t)->Encode(std::string("a\0", 2));
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, (std::vector<int32_t>{a, 5000, 5001}));
    EXPECT_EQ((*t)->vocab_size(), 5002);
  }
}

TEST(ChatTemplateTest, UnknownRoleAndEmpty) {
  const std::vector<ChatMessage> messages = {{"user", "hi"}, {"tool", "{}"}};
  auto r = RenderChat(messages, true);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(r.status()), HasSubstr("messages[1].role"));
  EXPECT_THAT(Message(r.status()), HasSubstr("\"tool\""));
  auto e = RenderChat({}, true);
  ASSERT_FALSE(e.ok());
  EXPECT_THAT(Message(e.status()), HasSubstr("messages"));
}

TEST(ChatTemplateTest, SystemMessages) {
  const std::vector<ChatMessage> messages = {
      {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello."}, {"system", "Later."}};
  auto r = RenderChat(messages, false);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r,
            "<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|>"
            "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>Hello.<|role_end|>"
            "<role>SYSTEM</role>Later.<|role_end|>");
}

TEST(DemoTokenizerTest, BytesAndSpecialTokens) {
  const auto tok = Tokenizer::ByteLevelDemo();
  EXPECT_EQ(tok->vocab_size(), 262);
  EXPECT_EQ(tok->eos_id(), 256);
  EXPECT_EQ(tok->mask_id(), 257);
  EXPECT_EQ(tok->role_end_id(), 260);
  EXPECT_EQ(tok->TokenId("<role>"), 258);
  EXPECT_EQ(tok->TokenId("</role>"), 259);
  EXPECT_EQ(tok->TokenId("<|startoftext|>"), 261);
  EXPECT_TRUE(tok->IsSpecial(257));
  EXPECT_FALSE(tok->IsSpecial(65));

  const std::string text = "<role>HUMAN</role>h\u00e9 \U0001F600<|mask|><|mask|>\n<|role_end|>";
  auto ids = tok->Encode(text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  std::vector<int32_t> want = {258};
  for (char c : std::string("HUMAN")) want.push_back(static_cast<uint8_t>(c));
  want.push_back(259);
  for (char c : std::string("h\u00e9 \U0001F600")) want.push_back(static_cast<uint8_t>(c));
  want.insert(want.end(), {257, 257, '\n', 260});
  EXPECT_EQ(*ids, want);
  auto back = tok->Decode(*ids, false);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, text);
  auto skipped = tok->Decode(*ids, true);
  ASSERT_TRUE(skipped.ok());
  EXPECT_EQ(*skipped, "HUMANh\u00e9 \U0001F600\n");

  // Invalid UTF-8: one U+FFFD per maximal invalid subsequence.
  const std::vector<int32_t> bad = {'a', 0xF0, 0x9F, 0x98, 'b', 0x80, 0x80, 0xE0, 0x80, 'c'};
  auto lossy = tok->Decode(bad, false);
  ASSERT_TRUE(lossy.ok());
  EXPECT_EQ(*lossy, "a\uFFFDb\uFFFD\uFFFD\uFFFD\uFFFDc");
  // Skipping a special token joins the bytes around it into one character.
  const std::vector<int32_t> split = {0xC3, 257, 0xA9};
  EXPECT_EQ(tok->Decode(split, true).value_or("?"), "\u00e9");
  EXPECT_EQ(tok->Decode(split, false).value_or("?"), "\uFFFD<|mask|>\uFFFD");

  const std::vector<int32_t> padded = {262};
  auto out = tok->Decode(padded, false);
  ASSERT_FALSE(out.ok());
  EXPECT_THAT(Message(out.status()), HasSubstr("262"));
  EXPECT_FALSE(tok->Encode("\xFF").ok());
}

}  // namespace
}  // namespace moeserve
