#include "server/commands.h"

#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "kernels/util/logging.h"
#include "model/checkpoint.h"
#include "model/golden.h"
#include "model/model.h"

ABSL_FLAG(std::string, model_dir, "",
          "Hugging Face checkpoint directory (config.json + model.safetensors[.index.json]). "
          "Empty: the built-in random-weight demo model.");
ABSL_FLAG(std::string, golden_dir, "",
          "verify: directory with golden.json and golden.safetensors.");
ABSL_FLAG(double, tolerance, moeserve::kGoldenF32Tolerance,
          "verify: largest max|a-b|/max|ref| accepted per tensor.");
ABSL_FLAG(std::string, config, "",
          "write-checkpoint: config.json to take the shape from. Empty: the demo model's config.");
ABSL_FLAG(std::string, out_dir, "", "write-checkpoint: directory to write the checkpoint into.");
ABSL_FLAG(int, shards, 1, "write-checkpoint: number of safetensors shards (> 1 adds an index).");
ABSL_FLAG(uint64_t, seed, 0, "Random seed of the demo model and of write-checkpoint.");

namespace moeserve {
namespace {

absl::StatusOr<std::unique_ptr<Model>> LoadOrDemo() {
  const std::string dir = absl::GetFlag(FLAGS_model_dir);
  if (!dir.empty()) {
    MOESERVE_LOG(INFO) << "loading checkpoint " << dir;
    return Model::Load(dir);
  }
  MOESERVE_LOG(WARNING) << "**************************************************************";
  MOESERVE_LOG(WARNING) << "* No --model_dir given: serving the BUILT-IN RANDOM-WEIGHT DEMO *";
  MOESERVE_LOG(WARNING) << "* model. Its output is noise; use it to try the API only.      *";
  MOESERVE_LOG(WARNING) << "**************************************************************";
  const ModelConfig config = DemoModelConfig();
  return Model::FromWeights(config, RandomWeights(config, {.seed = absl::GetFlag(FLAGS_seed)}));
}

void LogModelSummary(const Model& model) {
  const ModelConfig& c = model.config();
  MOESERVE_LOG(INFO) << absl::StrFormat(
      "model: %s, %.3f B parameters, %d layers (%d dense, %d MoE), hidden %d, %d experts (top-%d, "
      "%d groups / top-%d), expert width %d, %d shared, vocab %d, context %d",
      c.model_type, ParameterCount(c) / 1e9, c.num_hidden_layers, c.first_k_dense_replace,
      c.num_moe_layers(), c.hidden_size, c.num_experts, c.num_experts_per_tok, c.n_group,
      c.topk_group, c.moe_intermediate_size, c.num_shared_experts, c.vocab_size,
      c.max_position_embeddings);
}

}  // namespace

int RunServe(const sigset_t& signals) {
  auto model = LoadOrDemo();
  if (!model.ok()) {
    MOESERVE_LOG(ERROR) << "cannot load the model: " << model.status().message();
    return 1;
  }
  LogModelSummary(**model);
  MOESERVE_LOG(INFO) << "model ready; waiting for SIGINT or SIGTERM";
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  MOESERVE_LOG(INFO) << "received " << (signal_number == SIGINT ? "SIGINT" : "SIGTERM")
                     << ", shutting down";
  return 0;
}

int RunVerify() {
  const std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  const std::string golden_dir = absl::GetFlag(FLAGS_golden_dir);
  if (model_dir.empty() || golden_dir.empty()) {
    std::fprintf(stderr, "verify needs --model_dir and --golden_dir\n");
    return 2;
  }
  auto model = Model::Load(model_dir);
  if (!model.ok()) {
    std::fprintf(stderr, "cannot load %s: %s\n", model_dir.c_str(),
                 std::string(model.status().message()).c_str());
    return 1;
  }
  const double tolerance = absl::GetFlag(FLAGS_tolerance);
  auto report = VerifyGoldenForward(**model, golden_dir, tolerance);
  if (!report.ok()) {
    std::fprintf(stderr, "cannot verify: %s\n", std::string(report.status().message()).c_str());
    return 1;
  }
  for (const GoldenCaseReport& c : report->cases) {
    std::printf("%-6s %-4s max rel err %.3e (tolerance %.1e)\n", c.name.c_str(),
                c.ok ? "ok" : "FAIL", c.worst_rel_err, tolerance);
    for (const GoldenCheck& check : c.checks) {
      if (check.name.ends_with("topk_experts")) {
        std::printf("    %-28s %s\n", check.name.c_str(),
                    check.ok ? "identical expert sets" : ("DIFFER: " + check.detail).c_str());
      } else {
        std::printf("    %-28s %.3e%s%s\n", check.name.c_str(), check.max_rel_err,
                    check.ok ? "" : "  FAIL: ", check.detail.c_str());
      }
    }
  }
  if (report->num_generate_cases > 0) {
    std::printf(
        "generate cases: %d present, not checked by this build (block-diffusion decoding is not "
        "built yet)\n",
        report->num_generate_cases);
  }
  std::printf("%s\n", report->ok ? "PASS" : "FAIL");
  return report->ok ? 0 : 1;
}

int RunWriteCheckpoint() {
  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  if (out_dir.empty()) {
    std::fprintf(stderr, "write-checkpoint needs --out_dir\n");
    return 2;
  }
  ModelConfig config = DemoModelConfig();
  if (!absl::GetFlag(FLAGS_config).empty()) {
    auto loaded = LoadModelConfig(absl::GetFlag(FLAGS_config));
    if (!loaded.ok()) {
      std::fprintf(stderr, "%s\n", std::string(loaded.status().message()).c_str());
      return 1;
    }
    config = *loaded;
  }
  MOESERVE_LOG(INFO) << absl::StrFormat("generating %.3f B random parameters (seed %d)",
                                        ParameterCount(config) / 1e9, absl::GetFlag(FLAGS_seed));
  const ModelWeights weights = RandomWeights(config, {.seed = absl::GetFlag(FLAGS_seed)});
  const absl::Status status =
      WriteCheckpoint(out_dir, config, weights, {.num_shards = absl::GetFlag(FLAGS_shards)});
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", std::string(status.message()).c_str());
    return 1;
  }
  MOESERVE_LOG(INFO) << "wrote " << out_dir;
  return 0;
}

}  // namespace moeserve
