#include "model/golden.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/util/status_macros.h"
#include "model/decoder.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace moeserve {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

absl::StatusOr<const SafetensorsTensor*> Need(const SafetensorsFile& file, const std::string& name,
                                              const std::string& dtype, int64_t numel) {
  const SafetensorsTensor* t = file.Find(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat(file.path(), ": no tensor ", name));
  if (t->dtype != dtype || t->numel != numel) {
    return absl::InvalidArgumentError(absl::StrCat(file.path(), ": tensor ", name, " is ", t->dtype,
                                                   " with ", t->numel, " elements, expected ",
                                                   dtype, " with ", numel));
  }
  return t;
}

const float* F32(const SafetensorsTensor* t) { return reinterpret_cast<const float*>(t->data); }

// max|a - b| / max|ref| with the first mismatches (|a - b| > tol * max|ref|) described.
GoldenCheck CompareFloats(std::string name, const float* actual, const float* ref, int64_t n,
                          int64_t row_width, double tolerance) {
  GoldenCheck check{std::move(name)};
  double max_ref = 0, max_err = 0;
  for (int64_t i = 0; i < n; ++i)
    max_ref = std::max(max_ref, std::abs(static_cast<double>(ref[i])));
  const double scale = max_ref > 0 ? max_ref : 1.0;
  int shown = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double err = std::abs(static_cast<double>(actual[i]) - ref[i]);
    if (!(err <= max_err)) max_err = std::isnan(err) ? INFINITY : err;
    if (!(err <= tolerance * scale) && shown < 3) {
      absl::StrAppend(&check.detail, shown ? "; " : "",
                      absl::StrFormat("[%d, %d] expected %.7g got %.7g", i / row_width,
                                      i % row_width, ref[i], actual[i]));
      ++shown;
    }
  }
  check.max_rel_err = max_err / scale;
  check.ok = check.max_rel_err <= tolerance;
  return check;
}

absl::StatusOr<Json> ReadGoldenJson(const std::string& golden_dir, const char* cases_key) {
  const fs::path json_path = fs::path(golden_dir) / "golden.json";
  std::ifstream in(json_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", json_path.string()));
  std::stringstream text;
  text << in.rdbuf();
  Json meta = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded() || !meta.is_object() || !meta.contains(cases_key) ||
      !meta[cases_key].is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(json_path.string(), ": expected an object with ", cases_key));
  }
  return meta;
}

}  // namespace

absl::StatusOr<GoldenReport> VerifyGoldenForward(const Model& model, const std::string& golden_dir,
                                                 double tolerance) {
  const ModelConfig& c = model.config();
  const fs::path json_path = fs::path(golden_dir) / "golden.json";
  ASSIGN_OR_RETURN(Json meta, ReadGoldenJson(golden_dir, "forward_cases"));
  const int64_t golden_block = meta.value("block_length", int64_t{0});
  ASSIGN_OR_RETURN(auto file,
                   SafetensorsFile::Open((fs::path(golden_dir) / "golden.safetensors").string()));

  GoldenReport report;
  for (const Json& fc : meta["forward_cases"]) {
    const int64_t case_id = fc.value("case", int64_t{-1});
    const int64_t batch = fc.value("batch", int64_t{0}), length = fc.value("length", int64_t{0});
    const std::string mask = fc.value("mask", std::string());
    if (case_id < 0 || batch <= 0 || length <= 0 || (mask != "block_causal" && mask != "none")) {
      return absl::InvalidArgumentError(
          absl::StrCat(json_path.string(), ": malformed forward case ", fc.dump()));
    }
    if (mask == "block_causal" && golden_block <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(json_path.string(), ": block_causal case without block_length"));
    }
    const std::string prefix = absl::StrCat("fwd", case_id);
    const int64_t n = batch * length;
    ASSIGN_OR_RETURN(const SafetensorsTensor* ids_t, Need(*file, prefix + ".input_ids", "I64", n));
    const int64_t* ids64 = reinterpret_cast<const int64_t*>(ids_t->data);

    // One sequence per batch row, each with a fresh cache, all rows' logits.
    std::vector<std::vector<int32_t>> ids(batch);
    std::vector<KvCache> caches;
    for (int64_t i = 0; i < batch; ++i) caches.emplace_back(c);
    std::vector<SequenceInput> inputs(batch);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < length; ++i)
        ids[b].push_back(static_cast<int32_t>(ids64[b * length + i]));
      inputs[b].token_ids = ids[b];
      inputs[b].cache = &caches[b];
      inputs[b].block_length = mask == "block_causal" ? golden_block : 0;
      for (int32_t i = 0; i < length; ++i) inputs[b].logit_rows.push_back(i);
    }
    ForwardTrace trace;
    ASSIGN_OR_RETURN(ForwardOutput out, model.Forward(inputs, &trace));

    GoldenCaseReport cr{prefix};
    ASSIGN_OR_RETURN(const SafetensorsTensor* logits,
                     Need(*file, prefix + ".logits", "F32", n * c.vocab_size));
    cr.checks.push_back(CompareFloats(prefix + ".logits", out.logits.data(), F32(logits),
                                      n * c.vocab_size, c.vocab_size, tolerance));
    for (int64_t l = 0; l <= c.num_hidden_layers; ++l) {
      const std::string name = absl::StrCat(prefix, ".hidden_in.", l);
      ASSIGN_OR_RETURN(const SafetensorsTensor* t, Need(*file, name, "F32", n * c.hidden_size));
      cr.checks.push_back(CompareFloats(name, trace.hidden_in[l].data(), F32(t), n * c.hidden_size,
                                        c.hidden_size, tolerance));
    }
    for (int64_t l = c.first_k_dense_replace; l < c.num_hidden_layers; ++l) {
      const std::string base = absl::StrCat(prefix, ".router.", l);
      const int64_t e = c.num_experts, k = c.num_experts_per_tok;
      ASSIGN_OR_RETURN(const SafetensorsTensor* lt, Need(*file, base + ".logits", "F32", n * e));
      cr.checks.push_back(CompareFloats(base + ".logits", trace.router_logits[l].data(), F32(lt),
                                        n * e, e, tolerance));
      ASSIGN_OR_RETURN(const SafetensorsTensor* it, Need(*file, base + ".topk_idx", "I64", n * k));
      ASSIGN_OR_RETURN(const SafetensorsTensor* wt,
                       Need(*file, base + ".topk_weight", "F32", n * k));
      // Compare as sets of (expert, weight) pairs: sort each token's k entries by expert.
      std::vector<float> ours(n * k), ref(n * k);
      GoldenCheck sets{base + ".topk_experts", 0, true, ""};
      const int64_t* ref_idx = reinterpret_cast<const int64_t*>(it->data);
      int mismatched_tokens = 0;
      for (int64_t t = 0; t < n; ++t) {
        std::vector<std::pair<int64_t, float>> a, b;
        for (int64_t j = 0; j < k; ++j) {
          a.emplace_back(trace.topk_idx[l][t * k + j], trace.topk_weight[l][t * k + j]);
          b.emplace_back(ref_idx[t * k + j], F32(wt)[t * k + j]);
        }
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        bool same = true;
        for (int64_t j = 0; j < k; ++j) {
          same = same && a[j].first == b[j].first;
          ours[t * k + j] = a[j].second;
          ref[t * k + j] = b[j].second;
        }
        if (!same) {
          if (mismatched_tokens++ < 3) {
            absl::StrAppend(&sets.detail, sets.detail.empty() ? "" : "; ", "token ", t,
                            " expert sets differ");
          }
        }
      }
      sets.ok = mismatched_tokens == 0;
      sets.max_rel_err = mismatched_tokens;  // count of tokens whose sets differ (exact check)
      cr.checks.push_back(sets);
      if (sets.ok)
        cr.checks.push_back(
            CompareFloats(base + ".topk_weight", ours.data(), ref.data(), n * k, k, tolerance));
    }
    for (const GoldenCheck& check : cr.checks) {
      cr.ok = cr.ok && check.ok;
      if (check.name.ends_with("topk_experts")) continue;
      cr.worst_rel_err = std::max(cr.worst_rel_err, check.max_rel_err);
    }
    report.ok = report.ok && cr.ok;
    report.cases.push_back(std::move(cr));
  }
  return report;
}

absl::StatusOr<std::vector<GoldenGenerateReport>> VerifyGoldenGenerate(
    const Model& model, const std::string& golden_dir) {
  ASSIGN_OR_RETURN(Json meta, ReadGoldenJson(golden_dir, "generate_cases"));
  auto get_int = [&](const Json& j, const char* key) -> absl::StatusOr<int64_t> {
    auto it = j.find(key);
    if (it == j.end() || !it->is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(golden_dir, "/golden.json: missing integer \"", key, "\""));
    }
    return it->get<int64_t>();
  };
  EngineOptions engine;
  ASSIGN_OR_RETURN(int64_t mask_id, get_int(meta, "mask_id"));
  ASSIGN_OR_RETURN(int64_t eos_id, get_int(meta, "eos_id"));
  ASSIGN_OR_RETURN(int64_t block_length, get_int(meta, "block_length"));
  engine.mask_id = static_cast<int32_t>(mask_id);
  engine.stop_ids = {static_cast<int32_t>(eos_id)};
  std::vector<GoldenGenerateReport> reports;
  for (const Json& gc : meta["generate_cases"]) {
    GoldenGenerateReport r;
    ASSIGN_OR_RETURN(int64_t case_id, get_int(gc, "case"));
    ASSIGN_OR_RETURN(int64_t gen_length, get_int(gc, "gen_length"));
    ASSIGN_OR_RETURN(int64_t steps, get_int(gc, "steps"));
    if (!gc.contains("prompt") || !gc["prompt"].is_array() || !gc.contains("output") ||
        !gc["output"].is_array() || !gc.contains("threshold") || !gc["threshold"].is_number()) {
      return absl::InvalidArgumentError(
          absl::StrCat(golden_dir, "/golden.json: malformed generate case ", case_id));
    }
    if (gc.value("temperature", 0.0) != 0.0) {
      return absl::InvalidArgumentError(
          absl::StrCat("generate case ", case_id, ": only temperature 0 is reproducible"));
    }
    r.name = absl::StrCat("gen", case_id);
    std::vector<int32_t> prompt = gc["prompt"].get<std::vector<int32_t>>();
    r.expected = gc["output"].get<std::vector<int32_t>>();
    DecodeOptions decode;
    decode.max_new_tokens = gen_length;
    decode.block_length = block_length;
    decode.policy = CommitPolicy::kScheduled;
    decode.steps = steps;
    decode.threshold = gc["threshold"].get<double>();
    ASSIGN_OR_RETURN(GenerateResult out,
                     GenerateOne(model, engine, prompt, decode, RoutingOptions()));
    r.actual = std::move(out.tokens);
    r.ok = r.actual == r.expected;
    reports.push_back(std::move(r));
  }
  return reports;
}

}  // namespace moeserve
