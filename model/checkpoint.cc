#include "model/checkpoint.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kernels/util/logging.h"
#include "kernels/util/status_macros.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace moeserve {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

struct Source {
  const SafetensorsFile* file;
  const SafetensorsTensor* tensor;
};

// Opens model.safetensors or every shard of the index; fills `sources` with name -> location.
absl::Status OpenCheckpointFiles(const std::string& dir,
                                 std::vector<std::unique_ptr<SafetensorsFile>>* files,
                                 std::map<std::string, Source, std::less<>>* sources) {
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  std::error_code ec;
  if (!fs::exists(index_path, ec)) {
    if (!fs::exists(single_path, ec)) {
      return absl::NotFoundError(
          absl::StrCat("no checkpoint in ", dir,
                       ": neither model.safetensors nor model.safetensors.index.json"));
    }
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single_path.string()));
    for (const SafetensorsTensor& t : file->tensors())
      sources->emplace(t.name, Source{file.get(), &t});
    files->push_back(std::move(file));
    return absl::OkStatus();
  }

  std::ifstream in(index_path);
  std::stringstream text;
  text << in.rdbuf();
  Json index = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  const std::string where = index_path.string();
  if (index.is_discarded() || !index.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": not a JSON object"));
  }
  auto map = index.find("weight_map");
  if (map == index.end() || !map->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": missing object \"weight_map\""));
  }
  std::map<std::string, const SafetensorsFile*> shards;
  for (auto it = map->begin(); it != map->end(); ++it) {
    if (!it.value().is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": weight_map[\"", it.key(), "\"] is not a file name"));
    }
    const std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      return absl::InvalidArgumentError(absl::StrCat(where, ": weight_map[\"", it.key(), "\"] = \"",
                                                     shard, "\" is not a file name in ", dir));
    }
    auto found = shards.find(shard);
    if (found == shards.end()) {
      auto opened = SafetensorsFile::Open((fs::path(dir) / shard).string());
      if (!opened.ok()) {
        return absl::Status(
            opened.status().code(),
            absl::StrCat(where, " lists shard \"", shard, "\": ", opened.status().message()));
      }
      files->push_back(std::move(opened).value());
      found = shards.emplace(shard, files->back().get()).first;
    }
    const SafetensorsTensor* t = found->second->Find(it.key());
    if (t == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(where, " maps tensor \"", it.key(), "\" to ",
                                                     shard, ", which does not contain it"));
    }
    sources->emplace(it.key(), Source{found->second, t});
  }
  // Tensors present in a shard but absent from the index are unexpected too.
  for (const auto& file : *files) {
    for (const SafetensorsTensor& t : file->tensors()) {
      if (!sources->contains(t.name)) sources->emplace(t.name, Source{file.get(), &t});
    }
  }
  return absl::OkStatus();
}

// Copies (and converts) `count` elements of a checkpoint tensor into a compute-layout tensor.
void ConvertInto(const SafetensorsTensor& src, int64_t src_offset, int64_t count, HostTensor* dst,
                 int64_t dst_offset) {
  const std::byte* in = src.data + src_offset * static_cast<int64_t>(src.element_size);
  if (dst->dtype() == DType::kBF16) {  // only when the source is BF16 too
    std::memcpy(dst->data<uint16_t>() + dst_offset, in, count * 2);
    return;
  }
  float* out = dst->data<float>() + dst_offset;
  if (src.dtype == "F32") {
    std::memcpy(out, in, count * 4);
    return;
  }
  const uint16_t* h = reinterpret_cast<const uint16_t*>(in);
  if (src.dtype == "BF16") {
    for (int64_t i = 0; i < count; ++i) out[i] = Bf16ToFloat(h[i]);
  } else {  // F16
    for (int64_t i = 0; i < count; ++i) out[i] = F16ToFloat(h[i]);
  }
}

// splitmix64: the counter-based generator behind RandomWeights.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t HashName(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

// Checks names, shapes and dtypes of `expected` against the files before anything is allocated;
// with `whole_checkpoint`, tensors that nothing expects are problems too. All problems are
// reported together.
absl::Status CheckTensors(const std::string& dir,
                          const std::map<std::string, Source, std::less<>>& sources,
                          const std::vector<TensorBinding>& expected, bool whole_checkpoint,
                          bool* all_matrices_bf16) {
  std::vector<std::string> problems;
  *all_matrices_bf16 = true;
  std::map<std::string, bool, std::less<>> seen;
  for (const TensorBinding& b : expected) {
    seen[b.name] = true;
    auto it = sources.find(b.name);
    if (it == sources.end()) {
      problems.push_back(absl::StrCat("missing tensor \"", b.name, "\" (expected ", b.disk_dtype,
                                      " ", ShapeString(b.shape), ")"));
      continue;
    }
    const SafetensorsTensor& t = *it->second.tensor;
    const std::string& file = it->second.file->path();
    if (t.dtype != "BF16" && t.dtype != "F16" && t.dtype != "F32") {
      problems.push_back(absl::StrCat("tensor \"", b.name, "\" in ", file, ": dtype ", t.dtype,
                                      " is not supported (BF16, F16 or F32)"));
    }
    if (t.shape != b.shape) {
      problems.push_back(absl::StrCat("tensor \"", b.name, "\" in ", file, ": shape ",
                                      ShapeString(t.shape), ", expected ", ShapeString(b.shape)));
    }
    if (b.shape.size() == 2 && t.dtype != "BF16") *all_matrices_bf16 = false;
  }
  if (whole_checkpoint) {
    for (const auto& [name, source] : sources) {
      if (!seen.contains(name)) {
        problems.push_back(absl::StrCat("unexpected tensor \"", name, "\" in ", source.file->path(),
                                        " (not part of a llada2_moe model with this config)"));
      }
    }
  }
  if (problems.empty()) return absl::OkStatus();
  constexpr size_t kShown = 20;
  const size_t total = problems.size();
  if (total > kShown) problems.resize(kShown);
  return absl::InvalidArgumentError(
      absl::StrCat("checkpoint ", dir, " does not match its config (", total, " problem",
                   total == 1 ? "" : "s", total > kShown ? absl::StrCat(", first ", kShown) : "",
                   "):\n  ", absl::StrJoin(problems, "\n  ")));
}

// Copies every bound tensor from its source, in parallel; logs progress every 10% of the bytes
// when there are enough of them to take a while.
void CopyTensors(const std::map<std::string, Source, std::less<>>& sources,
                 const std::vector<TensorBinding>& bindings) {
  uint64_t total_bytes = 0;
  for (const TensorBinding& b : bindings) {
    const SafetensorsTensor& t = *sources.find(b.name)->second.tensor;
    total_bytes += t.numel * t.element_size;
  }
  const auto start = std::chrono::steady_clock::now();
  auto seconds = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  std::atomic<uint64_t> done_bytes{0};
  std::atomic<int> next_report{1};
  const int64_t n = static_cast<int64_t>(bindings.size());
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < n; ++i) {
    const SafetensorsTensor& t = *sources.find(bindings[i].name)->second.tensor;
    for (const TensorPart& part : bindings[i].parts)
      ConvertInto(t, part.src_offset, part.count, part.dst, part.dst_offset);
    const uint64_t done = done_bytes += t.numel * t.element_size;
    if (total_bytes < (uint64_t{1} << 30)) continue;
    const int decile = static_cast<int>(10 * done / total_bytes);
    int expected = next_report.load();
    if (decile >= expected && next_report.compare_exchange_strong(expected, decile + 1)) {
      MOESERVE_LOG(INFO) << absl::StrFormat("loaded %.2f / %.2f GB (%d%%) in %.1f s, %.2f GB/s",
                                            done / 1e9, total_bytes / 1e9, 10 * decile, seconds(),
                                            done / 1e9 / std::max(seconds(), 1e-9));
    }
  }
  MOESERVE_LOG(INFO) << absl::StrFormat("loaded %d tensors (%.2f GB) in %.2f s", n,
                                        total_bytes / 1e9, seconds());
}

// Fills bound tensors with the counter-based random values described at RandomWeights.
void FillRandom(const std::vector<TensorBinding>& bindings, const RandomInitOptions& options) {
  // Uniform in [-a, a] has standard deviation a / sqrt(3).
  const float matrix_amp = static_cast<float>(options.init_std * std::sqrt(3.0));
  const int64_t n = static_cast<int64_t>(bindings.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) {
    const TensorBinding& b = bindings[i];
    const bool is_norm = b.shape.size() == 1 && b.name.find("norm") != std::string::npos;
    const bool is_bias = b.name.ends_with("expert_bias");
    const float center = is_norm ? 1.0f : 0.0f;
    const float amp = is_norm ? 0.1f : (is_bias ? 0.01f : matrix_amp);
    const uint64_t key = Mix(options.seed ^ HashName(b.name));
    for (const TensorPart& part : b.parts) {
      for (int64_t j = 0; j < part.count; ++j) {
        const uint64_t r = Mix(key + static_cast<uint64_t>(part.src_offset + j));
        const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        float value = center + amp * (2.0f * u - 1.0f);
        if (!is_bias) value = Bf16ToFloat(FloatToBf16(value));  // BF16-representable
        if (part.dst->dtype() == DType::kBF16) {
          part.dst->data<uint16_t>()[part.dst_offset + j] = FloatToBf16(value);
        } else {
          part.dst->data<float>()[part.dst_offset + j] = value;
        }
      }
    }
  }
}

}  // namespace

absl::StatusOr<ModelWeights> LoadCheckpointWeights(const std::string& dir,
                                                   const ModelConfig& config) {
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, Source, std::less<>> sources;
  RETURN_IF_ERROR(OpenCheckpointFiles(dir, &files, &sources));
  bool all_matrices_bf16;
  RETURN_IF_ERROR(CheckTensors(dir, sources, BindCheckpointTensors(config, nullptr),
                               /*whole_checkpoint=*/true, &all_matrices_bf16));
  const DType matrix_dtype = all_matrices_bf16 ? DType::kBF16 : DType::kF32;
  uint64_t file_bytes = 0;
  for (const auto& file : files) file_bytes += file->file_size();
  MOESERVE_LOG(INFO) << "loading " << sources.size() << " tensors from " << files.size() << " file"
                     << (files.size() == 1 ? "" : "s") << " in " << dir << " ("
                     << absl::StrFormat("%.2f", file_bytes / 1e9) << " GB), matrices as "
                     << DTypeName(matrix_dtype);
  ModelWeights weights = AllocateWeights(config, matrix_dtype);
  CopyTensors(sources, BindCheckpointTensors(config, &weights));
  return weights;
}

absl::StatusOr<std::vector<RouterWeights>> LoadRouterWeights(const std::string& dir,
                                                             const ModelConfig& config) {
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, Source, std::less<>> sources;
  RETURN_IF_ERROR(OpenCheckpointFiles(dir, &files, &sources));
  std::vector<RouterWeights> routers;
  for (int64_t l = 0; l < config.num_moe_layers(); ++l) routers.push_back(AllocateRouter(config));
  const std::vector<TensorBinding> bindings = BindRouterTensors(config, &routers);
  bool unused;
  RETURN_IF_ERROR(CheckTensors(dir, sources, bindings, /*whole_checkpoint=*/false, &unused));
  CopyTensors(sources, bindings);
  return routers;
}

ModelWeights RandomWeights(const ModelConfig& config, const RandomInitOptions& options) {
  ModelWeights weights = AllocateWeights(config, options.matrix_dtype);
  FillRandom(BindCheckpointTensors(config, &weights), options);
  return weights;
}

std::vector<RouterWeights> RandomRouterWeights(const ModelConfig& config,
                                               const RandomInitOptions& options) {
  std::vector<RouterWeights> routers;
  for (int64_t l = 0; l < config.num_moe_layers(); ++l) routers.push_back(AllocateRouter(config));
  FillRandom(BindRouterTensors(config, &routers), options);
  return routers;
}

absl::Status WriteCheckpoint(const std::string& dir, const ModelConfig& config,
                             const ModelWeights& weights, const WriteCheckpointOptions& options) {
  if (options.num_shards < 1) return absl::InvalidArgumentError("num_shards must be >= 1");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    return absl::PermissionDeniedError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  {
    std::ofstream out(fs::path(dir) / "config.json");
    out << ModelConfigToJson(config) << "\n";
    if (!out) return absl::DataLossError(absl::StrCat("cannot write ", dir, "/config.json"));
  }
  // Gather every tensor back into its checkpoint form (the reverse of loading).
  std::vector<TensorBinding> bindings =
      BindCheckpointTensors(config, const_cast<ModelWeights*>(&weights));
  std::vector<std::vector<std::byte>> buffers(bindings.size());
  uint64_t total_bytes = 0;
  for (size_t i = 0; i < bindings.size(); ++i) {
    const TensorBinding& b = bindings[i];
    const size_t element = SafetensorsElementSize(b.disk_dtype);
    buffers[i].resize(b.numel() * element);
    for (const TensorPart& part : b.parts) {
      for (int64_t j = 0; j < part.count; ++j) {
        const float value = part.dst->dtype() == DType::kBF16
                                ? Bf16ToFloat(part.dst->data<uint16_t>()[part.dst_offset + j])
                                : part.dst->data<float>()[part.dst_offset + j];
        std::byte* at = buffers[i].data() + (part.src_offset + j) * element;
        if (element == 2) {
          const uint16_t bits = FloatToBf16(value);
          std::memcpy(at, &bits, 2);
        } else {
          std::memcpy(at, &value, 4);
        }
      }
    }
    total_bytes += buffers[i].size();
  }
  const int shards = options.num_shards;
  const uint64_t per_shard = (total_bytes + shards - 1) / shards;
  Json weight_map = Json::object();
  size_t next = 0;
  for (int s = 0; s < shards; ++s) {
    const std::string name = shards == 1
                                 ? "model.safetensors"
                                 : absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards);
    std::vector<SafetensorsWriteEntry> entries;
    uint64_t bytes = 0;
    while (next < bindings.size() && (s == shards - 1 || bytes < per_shard)) {
      entries.push_back({bindings[next].name, bindings[next].disk_dtype, bindings[next].shape,
                         buffers[next].data()});
      weight_map[bindings[next].name] = name;
      bytes += buffers[next].size();
      ++next;
    }
    RETURN_IF_ERROR(WriteSafetensors((fs::path(dir) / name).string(), entries));
  }
  if (shards > 1) {
    Json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    std::ofstream out(fs::path(dir) / "model.safetensors.index.json");
    out << index.dump(2) << "\n";
    if (!out) return absl::DataLossError(absl::StrCat("cannot write the index in ", dir));
  } else {
    fs::remove(fs::path(dir) / "model.safetensors.index.json", ec);
  }
  return absl::OkStatus();
}

}  // namespace moeserve
