#include "model/config.h"

#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/weights.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace moeserve {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

const std::string kTinyConfig = testing::TestDataDir() + "/llada2-tiny/config.json";
const std::string kMiniConfig = testing::SourceDir() + "/model/configs/LLaDA2.0-mini-preview.json";
const std::string kFlashConfig = testing::SourceDir() + "/model/configs/LLaDA2.0-flash.json";

TEST(ConfigTest, ParsesTinyGoldenConfigIgnoringUnusedKeys) {
  auto c = LoadModelConfig(kTinyConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 512);
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->num_hidden_layers, 3);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->rotary_dim, 8);
  EXPECT_EQ(c->num_experts, 16);
  EXPECT_EQ(c->num_experts_per_tok, 4);
  EXPECT_EQ(c->n_group, 4);
  EXPECT_EQ(c->topk_group, 2);
  EXPECT_EQ(c->first_k_dense_replace, 1);
  EXPECT_DOUBLE_EQ(c->rope_theta, 600000.0);
  EXPECT_DOUBLE_EQ(c->routed_scaling_factor, 2.5);
  EXPECT_EQ(c->pad_token_id, 500);
}

TEST(ConfigTest, MiniParameterCountIsExact) {
  auto c = LoadModelConfig(kMiniConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(ParameterCount(*c), int64_t{16'255'643'392});
  EXPECT_EQ(BindCheckpointTensors(*c, nullptr).size(), 14'813u);
  EXPECT_EQ(c->rotary_dim, 64);
  EXPECT_EQ(c->num_moe_layers(), 19);
}

TEST(ConfigTest, FlashConfigParses) {
  auto c = LoadModelConfig(kFlashConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(ParameterCount(*c), int64_t{102'889'705'216});
  EXPECT_EQ(BindCheckpointTensors(*c, nullptr).size(), 24'161u);
}

TEST(ConfigTest, JsonRoundTrip) {
  for (const std::string& path : {kTinyConfig, kMiniConfig, kFlashConfig}) {
    auto c = LoadModelConfig(path);
    ASSERT_TRUE(c.ok()) << c.status();
    auto again = ParseModelConfig(ModelConfigToJson(*c));
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(ModelConfigToJson(*again), ModelConfigToJson(*c));
    EXPECT_EQ(ParameterCount(*again), ParameterCount(*c));
  }
  auto demo = ParseModelConfig(ModelConfigToJson(DemoModelConfig()));
  EXPECT_TRUE(demo.ok()) << demo.status();
}

struct BadConfig {
  const char* key;
  Json value;  // null: remove the key
  const char* message_part;
};

class BadConfigTest : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigTest, ErrorNamesKeyAndValue) {
  const BadConfig& bad = GetParam();
  Json j = Json::parse(ReadFile(kTinyConfig));
  if (bad.value.is_null()) {
    j.erase(bad.key);
  } else {
    j[bad.key] = bad.value;
  }
  auto c = ParseModelConfig(j.dump());
  ASSERT_FALSE(c.ok()) << "accepted " << bad.key << " = " << bad.value.dump();
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(std::string("\"") + bad.key + "\""));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(bad.message_part));
}

INSTANTIATE_TEST_SUITE_P(
    Keys, BadConfigTest,
    ::testing::Values(
        BadConfig{"hidden_size", 0, "must be positive"}, BadConfig{"hidden_size", -64, "-64"},
        BadConfig{"hidden_size", "64", "expected an integer"},
        BadConfig{"vocab_size", nullptr, "missing key"},
        BadConfig{"num_hidden_layers", 2.5, "expected an integer"},
        BadConfig{"num_key_value_heads", 3, "must divide num_attention_heads"},
        BadConfig{"n_group", 3, "must divide num_experts"},
        BadConfig{"topk_group", 5, "must be <= n_group"},
        BadConfig{"num_experts_per_tok", 9, "kept groups"},
        BadConfig{"rotary_dim", 18, "within [0, head_dim"}, BadConfig{"rotary_dim", 7, "even"},
        BadConfig{"rope_theta", -1.0, "must be positive"}, BadConfig{"rms_norm_eps", 0.0, "(0, 1)"},
        BadConfig{"first_k_dense_replace", 4, "num_hidden_layers"},
        BadConfig{"num_experts", 0, "must be positive"},
        BadConfig{"model_type", "llama", "llada2_moe"},
        BadConfig{"use_qkv_bias", true, "not supported"},
        BadConfig{"score_function", "softmax", "sigmoid"},
        BadConfig{"norm_topk_prob", 1, "true or false"},
        BadConfig{"routed_scaling_factor", 0.0, "must be positive"},
        BadConfig{"partial_rotary_factor", 1.5, "(0, 1]"},
        BadConfig{"rope_scaling", Json{{"type", "yarn"}}, "not supported"}));

TEST(ConfigTest, RejectsNonJsonAndNonObjects) {
  auto a = ParseModelConfig("{\"vocab_size\": 5,");
  ASSERT_FALSE(a.ok());
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("not valid JSON"));
  auto b = ParseModelConfig("[1, 2]");
  ASSERT_FALSE(b.ok());
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("JSON object"));
  auto missing = LoadModelConfig("/nonexistent/config.json");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(ConfigTest, PartialRotaryFactorWithoutRotaryDim) {
  Json j = Json::parse(ReadFile(kTinyConfig));
  j.erase("rotary_dim");
  j["partial_rotary_factor"] = 0.25;
  auto c = ParseModelConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rotary_dim, 4);
}

}  // namespace
}  // namespace moeserve
