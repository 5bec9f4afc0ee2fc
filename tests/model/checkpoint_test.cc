// Checkpoint writing, loading and the loader's defences against broken files.
#include "model/checkpoint.h"

#include <omp.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace moeserve {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using Json = nlohmann::json;

ModelConfig TinyConfig() {
  auto c = LoadModelConfig(testing::TestDataDir() + "/llada2-tiny/config.json");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() / (std::string("moeserve_") + info->test_suite_name() + "_" +
                                         info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string str() const { return path_.string(); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

bool SameWeights(const ModelConfig& config, ModelWeights& a, ModelWeights& b, std::string* which) {
  auto ba = BindCheckpointTensors(config, &a), bb = BindCheckpointTensors(config, &b);
  for (size_t i = 0; i < ba.size(); ++i) {
    for (size_t p = 0; p < ba[i].parts.size(); ++p) {
      const TensorPart &x = ba[i].parts[p], &y = bb[i].parts[p];
      const size_t element = DTypeSize(x.dst->dtype());
      if (x.dst->dtype() != y.dst->dtype() ||
          std::memcmp(static_cast<const char*>(x.dst->raw()) + x.dst_offset * element,
                      static_cast<const char*>(y.dst->raw()) + y.dst_offset * element,
                      x.count * element) != 0) {
        *which = ba[i].name;
        return false;
      }
    }
  }
  return true;
}

TEST(CheckpointTest, WriteThenLoadIsBitExact) {
  const ModelConfig config = TinyConfig();
  ModelWeights written = RandomWeights(config, {.seed = 7});
  for (int shards : {1, 3}) {
    TempDir dir;
    ASSERT_TRUE(WriteCheckpoint(dir.str(), config, written, {.num_shards = shards}).ok());
    EXPECT_EQ(fs::exists(dir / "model.safetensors.index.json"), shards > 1);
    auto reloaded_config = LoadModelConfig(dir / "config.json");
    ASSERT_TRUE(reloaded_config.ok()) << reloaded_config.status();
    auto loaded = LoadCheckpointWeights(dir.str(), *reloaded_config);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    std::string which;
    EXPECT_TRUE(SameWeights(config, written, *loaded, &which))
        << shards << " shards: " << which << " differs";
  }
}

TEST(CheckpointTest, RandomWeightsDependOnSeedOnlyNotThreads) {
  const ModelConfig config = TinyConfig();
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  ModelWeights one = RandomWeights(config, {.seed = 3});
  omp_set_num_threads(std::max(2, threads));
  ModelWeights many = RandomWeights(config, {.seed = 3});
  omp_set_num_threads(threads);
  ModelWeights other = RandomWeights(config, {.seed = 4});
  std::string which;
  EXPECT_TRUE(SameWeights(config, one, many, &which)) << which;
  EXPECT_FALSE(SameWeights(config, one, other, &which));
}

TEST(CheckpointTest, F32CheckpointLoadsAsF32WithSameOutputs) {
  const ModelConfig config = TinyConfig();
  TempDir dir;
  ModelWeights weights = RandomWeights(config, {.seed = 11});
  ASSERT_TRUE(WriteCheckpoint(dir.str(), config, weights, {}).ok());
  // Rewrite every BF16 tensor as F32 (exact: BF16 values are F32 values).
  std::vector<std::vector<float>> storage;
  std::vector<SafetensorsWriteEntry> entries;
  {
    auto file = SafetensorsFile::Open(dir / "model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    for (const SafetensorsTensor& t : (*file)->tensors()) {
      storage.emplace_back(t.numel);
      for (int64_t i = 0; i < t.numel; ++i) {
        if (t.dtype == "BF16") {
          uint16_t bits;
          std::memcpy(&bits, t.data + 2 * i, 2);
          storage.back()[i] = Bf16ToFloat(bits);
        } else {
          std::memcpy(&storage.back()[i], t.data + 4 * i, 4);
        }
      }
    }
    size_t i = 0;
    for (const SafetensorsTensor& t : (*file)->tensors())
      entries.push_back({t.name, "F32", t.shape, storage[i++].data()});
  }
  ASSERT_TRUE(WriteSafetensors(dir / "model.safetensors", entries).ok());
  auto f32 = Model::Load(dir.str());
  ASSERT_TRUE(f32.ok()) << f32.status();
  EXPECT_EQ((*f32)->weights().embedding.dtype(), DType::kF32);
  auto bf16 = Model::FromWeights(config, std::move(weights));
  const std::vector<int32_t> ids = {1, 2, 3, 4, 5};
  std::vector<float> logits[2];
  int m = 0;
  for (const Model* model : {f32->get(), bf16.get()}) {
    KvCache cache(config);
    std::vector<SequenceInput> in(1);
    in[0].token_ids = ids;
    in[0].cache = &cache;
    in[0].logit_rows = {0, 4};
    auto out = model->Forward(in);
    ASSERT_TRUE(out.ok()) << out.status();
    logits[m++] = out->logits;
  }
  EXPECT_EQ(logits[0], logits[1]);
}

// ---- Broken checkpoints -------------------------------------------------------------------

// Writes a file of [8-byte length][header][data].
void WriteRaw(const std::string& path, const std::string& header, size_t data_bytes,
              uint64_t claimed_len = 0) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const uint64_t len = claimed_len ? claimed_len : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\0');
}

absl::Status OpenStatus(const std::string& path) { return SafetensorsFile::Open(path).status(); }

TEST(SafetensorsTest, RejectsMalformedFiles) {
  TempDir dir;
  const std::string p = dir / "x.safetensors";
  struct Case {
    const char* what;
    std::function<void()> write;
    const char* message_part;
  };
  const Case cases[] = {
      {"shorter than 8 bytes", [&] { std::ofstream(p, std::ios::binary) << "abc"; }, "too short"},
      {"header longer than file", [&] { WriteRaw(p, "{}", 0, 1000); }, "exceeds the file size"},
      {"header not JSON", [&] { WriteRaw(p, "{\"a\": [1,", 0); }, "not valid JSON"},
      {"header not an object", [&] { WriteRaw(p, "[1, 2]", 0); }, "not a JSON object"},
      {"entry not an object", [&] { WriteRaw(p, R"({"t": 5})", 0); }, "entry is not an object"},
      {"missing dtype", [&] { WriteRaw(p, R"({"t": {"shape": [1], "data_offsets": [0, 4]}})", 4); },
       "\"dtype\""},
      {"unknown dtype",
       [&] { WriteRaw(p, R"({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}})", 4); },
       "unknown dtype \"Q4\""},
      {"negative dimension",
       [&] { WriteRaw(p, R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4); },
       "negative"},
      {"offsets end before begin",
       [&] { WriteRaw(p, R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", 4); },
       "end before"},
      {"offsets past the data (truncated)",
       [&] { WriteRaw(p, R"({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8); },
       "run past the data section"},
      {"size does not match shape",
       [&] { WriteRaw(p, R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8); },
       "needs 12"},
      {"overlapping tensors",
       [&] {
         WriteRaw(p,
                  R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                  12);
       },
       "overlap"},
      {"huge shape overflows",
       [&] {
         WriteRaw(
             p,
             R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})",
             4);
       },
       "overflows"},
      {"bad metadata", [&] { WriteRaw(p, R"({"__metadata__": {"format": 1}})", 0); },
       "__metadata__"},
  };
  for (const Case& c : cases) {
    c.write();
    const absl::Status s = OpenStatus(p);
    EXPECT_FALSE(s.ok()) << c.what;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message_part)) << c.what;
    EXPECT_THAT(std::string(s.message()), HasSubstr(p)) << c.what << ": message must name the file";
  }
}

TEST(SafetensorsTest, ReadsWhatItWrites) {
  TempDir dir;
  const float a[3] = {1.5f, -2.0f, 3.25f};
  const int64_t b[2] = {7, -9};
  ASSERT_TRUE(
      WriteSafetensors(dir / "t.safetensors", {{"a", "F32", {3}, a}, {"b", "I64", {1, 2}, b}})
          .ok());
  auto file = SafetensorsFile::Open(dir / "t.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsTensor* ta = (*file)->Find("a");
  ASSERT_NE(ta, nullptr);
  EXPECT_EQ(ta->shape, (std::vector<int64_t>{3}));
  EXPECT_EQ(std::memcmp(ta->data, a, sizeof(a)), 0);
  const SafetensorsTensor* tb = (*file)->Find("b");
  ASSERT_NE(tb, nullptr);
  EXPECT_EQ(tb->dtype, "I64");
  EXPECT_EQ(std::memcmp(tb->data, b, sizeof(b)), 0);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  EXPECT_EQ((*file)->Find("c"), nullptr);
}

// A valid tiny checkpoint, then one change to its tensors.
class BrokenCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = TinyConfig();
    ASSERT_TRUE(WriteCheckpoint(dir_.str(), config_, RandomWeights(config_, {.seed = 1}), {}).ok());
  }
  // Rewrites model.safetensors after `edit` changed the list of entries.
  void Rewrite(const std::function<void(std::vector<SafetensorsWriteEntry>&)>& edit) {
    auto file = SafetensorsFile::Open(dir_ / "model.safetensors");
    ASSERT_TRUE(file.ok());
    std::vector<std::vector<std::byte>> copies;
    std::vector<SafetensorsWriteEntry> entries;
    for (const SafetensorsTensor& t : (*file)->tensors())
      copies.emplace_back(t.data, t.data + t.numel * t.element_size);
    size_t i = 0;
    for (const SafetensorsTensor& t : (*file)->tensors())
      entries.push_back({t.name, t.dtype, t.shape, copies[i++].data()});
    file->reset();
    edit(entries);
    ASSERT_TRUE(WriteSafetensors(dir_ / "model.safetensors", entries).ok());
  }
  std::string LoadError() {
    auto w = LoadCheckpointWeights(dir_.str(), config_);
    EXPECT_FALSE(w.ok());
    return std::string(w.status().message());
  }
  static SafetensorsWriteEntry& Named(std::vector<SafetensorsWriteEntry>& entries,
                                      const std::string& name) {
    for (auto& e : entries)
      if (e.name == name) return e;
    ADD_FAILURE() << "no " << name;
    return entries[0];
  }
  TempDir dir_;
  ModelConfig config_;
};

TEST_F(BrokenCheckpointTest, ValidCheckpointLoads) {
  EXPECT_TRUE(LoadCheckpointWeights(dir_.str(), config_).ok());
}

TEST_F(BrokenCheckpointTest, MissingTensor) {
  Rewrite([](auto& e) {
    std::erase_if(e,
                  [](auto& x) { return x.name == "model.layers.2.mlp.experts.5.up_proj.weight"; });
  });
  const std::string err = LoadError();
  EXPECT_THAT(err, HasSubstr("missing tensor \"model.layers.2.mlp.experts.5.up_proj.weight\""));
  EXPECT_THAT(err, HasSubstr("BF16 [32, 64]"));
}

TEST_F(BrokenCheckpointTest, UnexpectedTensor) {
  static const float extra[2] = {1, 2};
  Rewrite([](auto& e) { e.push_back({"model.layers.9.extra.weight", "F32", {2}, extra}); });
  EXPECT_THAT(LoadError(), HasSubstr("unexpected tensor \"model.layers.9.extra.weight\" in " +
                                     dir_ / "model.safetensors"));
}

TEST_F(BrokenCheckpointTest, MisShapedTensor) {
  Rewrite([](auto& e) { Named(e, "model.layers.0.attention.dense.weight").shape = {32, 128}; });
  EXPECT_THAT(LoadError(),
              HasSubstr("tensor \"model.layers.0.attention.dense.weight\" in " +
                        dir_ / "model.safetensors" + ": shape [32, 128], expected [64, 64]"));
}

TEST_F(BrokenCheckpointTest, UnsupportedDtype) {
  Rewrite([](auto& e) {
    auto& t = Named(e, "model.norm.weight");  // 64 BF16 = 128 bytes = 16 I64
    t.dtype = "I64";
    t.shape = {16};
  });
  const std::string err = LoadError();
  EXPECT_THAT(err, HasSubstr("\"model.norm.weight\""));
  EXPECT_THAT(err, HasSubstr("dtype I64 is not supported"));
}

TEST_F(BrokenCheckpointTest, ReportsSeveralProblemsAtOnce) {
  Rewrite([](auto& e) {
    std::erase_if(e, [](auto& x) { return x.name.starts_with("model.layers.1.mlp.experts.3."); });
  });
  EXPECT_THAT(LoadError(), HasSubstr("(3 problems)"));
}

TEST_F(BrokenCheckpointTest, TruncatedFile) {
  const std::string path = dir_ / "model.safetensors";
  fs::resize_file(path, fs::file_size(path) - 100);
  const std::string err = LoadError();
  EXPECT_THAT(err, HasSubstr(path));
  EXPECT_THAT(err, HasSubstr("truncated file?"));
}

TEST_F(BrokenCheckpointTest, NoCheckpointFiles) {
  fs::remove(dir_ / "model.safetensors");
  auto w = LoadCheckpointWeights(dir_.str(), config_);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("neither model.safetensors nor"));
}

class BrokenIndexTest : public BrokenCheckpointTest {
 protected:
  void SetUp() override {
    config_ = TinyConfig();
    ASSERT_TRUE(
        WriteCheckpoint(dir_.str(), config_, RandomWeights(config_, {.seed = 1}), {.num_shards = 2})
            .ok());
    std::ifstream in(dir_ / "model.safetensors.index.json");
    index_ = Json::parse(in);
  }
  void WriteIndex() { std::ofstream(dir_ / "model.safetensors.index.json") << index_.dump(); }
  Json index_;
};

TEST_F(BrokenIndexTest, ValidShardedCheckpointLoads) {
  EXPECT_TRUE(LoadCheckpointWeights(dir_.str(), config_).ok());
}

TEST_F(BrokenIndexTest, MissingShardFile) {
  fs::remove(dir_ / "model-00002-of-00002.safetensors");
  EXPECT_THAT(LoadError(), HasSubstr("lists shard \"model-00002-of-00002.safetensors\""));
}

TEST_F(BrokenIndexTest, TensorMappedToWrongShard) {
  index_["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors";
  WriteIndex();
  EXPECT_THAT(
      LoadError(),
      HasSubstr("maps tensor \"lm_head.weight\" to model-00001-of-00002.safetensors, which does "
                "not contain it"));
}

TEST_F(BrokenIndexTest, ShardNameEscapingTheDirectory) {
  index_["weight_map"]["lm_head.weight"] = "../model-00002-of-00002.safetensors";
  WriteIndex();
  EXPECT_THAT(LoadError(), HasSubstr("is not a file name"));
}

TEST_F(BrokenIndexTest, IndexNotJson) {
  std::ofstream(dir_ / "model.safetensors.index.json") << "{\"weight_map\": ";
  EXPECT_THAT(LoadError(), HasSubstr("not a JSON object"));
}

TEST_F(BrokenIndexTest, IndexWithoutWeightMap) {
  index_.erase("weight_map");
  WriteIndex();
  EXPECT_THAT(LoadError(), HasSubstr("missing object \"weight_map\""));
}

TEST_F(BrokenIndexTest, TensorMissingFromIndex) {
  index_["weight_map"].erase("model.norm.weight");
  std::string shard;
  WriteIndex();
  // Still found in its shard (tensors outside the index are read too), so this loads.
  EXPECT_TRUE(LoadCheckpointWeights(dir_.str(), config_).ok());
}

// ---- Full-size shapes ---------------------------------------------------------------------

int64_t AvailableMemoryBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024;
  }
  return 0;
}

// The in-memory random initialisation builds every shipped config's full shape; run where
// memory allows (the mini needs ~33 GB: on the GPU machine's host, not on CI).
TEST(FullSizeTest, RandomInitOfShippedConfigsWhereMemoryAllows) {
  int built = 0;
  for (const char* name : {"LLaDA2.0-mini-preview.json", "LLaDA2.0-flash.json"}) {
    auto config = LoadModelConfig(testing::SourceDir() + "/model/configs/" + name);
    ASSERT_TRUE(config.ok()) << config.status();
    const int64_t need = ParameterCount(*config) * 2 + (int64_t{4} << 30);
    if (AvailableMemoryBytes() < need) {
      std::printf("[ SKIPPED  ] %s needs %.1f GB, %.1f GB available\n", name, need / 1e9,
                  AvailableMemoryBytes() / 1e9);
      continue;
    }
    auto model = Model::FromWeights(*config, RandomWeights(*config, {.seed = 1}));
    KvCache cache(*config);
    const std::vector<int32_t> ids = {1, 100, 1000, 10000};
    std::vector<SequenceInput> in(1);
    in[0].token_ids = ids;
    in[0].cache = &cache;
    in[0].logit_rows = {3};
    auto out = model->Forward(in);
    ASSERT_TRUE(out.ok()) << out.status();
    for (float v : out->logits) ASSERT_TRUE(std::isfinite(v));
    std::printf("built %s in memory: %.3f B parameters, forward of 4 tokens ok\n", name,
                ParameterCount(*config) / 1e9);
    ++built;
  }
  if (built == 0) GTEST_SKIP() << "not enough memory for any full-size shipped config here";
}

}  // namespace
}  // namespace moeserve
