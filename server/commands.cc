#include "server/commands.h"

#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kernels/util/logging.h"
#include "model/checkpoint.h"
#include "model/golden.h"
#include "model/model.h"
#include "model/route_stats.h"

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
ABSL_FLAG(uint64_t, seed, 0, "Random seed of the demo model, write-checkpoint and route-stats.");
ABSL_FLAG(std::string, routing, "token_choice", "route-stats: token_choice or expert_choice.");
ABSL_FLAG(double, capacity_factor, 1.25, "route-stats: expert-choice capacity factor, in (0, 64].");
ABSL_FLAG(std::string, scope, "request", "route-stats: expert-choice scope, request or batch.");
ABSL_FLAG(std::string, ec_weighting, "renormalized",
          "route-stats: expert-choice weights, renormalized or raw.");
ABSL_FLAG(int64_t, tokens, 4096, "route-stats: tokens to route.");
ABSL_FLAG(int64_t, sequences, 1,
          "route-stats: sequences the tokens are split into (request scopes).");
ABSL_FLAG(double, skew, 0.0,
          "route-stats: Zipf exponent of a per-expert router-logit offset (0: none).");
ABSL_FLAG(bool, json, false, "route-stats: print JSON instead of a table.");

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
  auto generated = VerifyGoldenGenerate(**model, golden_dir);
  if (!generated.ok()) {
    std::fprintf(stderr, "cannot verify generate cases: %s\n",
                 std::string(generated.status().message()).c_str());
    return 1;
  }
  bool generate_ok = true;
  for (const GoldenGenerateReport& g : *generated) {
    std::printf("%-6s %-4s %zu generated ids %s\n", g.name.c_str(), g.ok ? "ok" : "FAIL",
                g.actual.size(), g.ok ? "identical to the reference" : "differ from the reference");
    if (!g.ok) {
      std::printf("    expected %s\n    actual   %s\n", absl::StrJoin(g.expected, " ").c_str(),
                  absl::StrJoin(g.actual, " ").c_str());
    }
    generate_ok = generate_ok && g.ok;
  }
  report->ok = report->ok && generate_ok;
  std::printf("%s\n", report->ok ? "PASS" : "FAIL");
  return report->ok ? 0 : 1;
}

int RunRouteStats() {
  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "route-stats: %s\n", std::string(s.message()).c_str());
    return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  };
  RouteStatsOptions options;
  auto mode = ParseRoutingMode(absl::GetFlag(FLAGS_routing));
  if (!mode.ok())
    return fail(absl::InvalidArgumentError(absl::StrCat("--routing: ", mode.status().message())));
  auto scope = ParseRoutingScope(absl::GetFlag(FLAGS_scope));
  if (!scope.ok())
    return fail(absl::InvalidArgumentError(absl::StrCat("--scope: ", scope.status().message())));
  auto weighting = ParseExpertChoiceWeighting(absl::GetFlag(FLAGS_ec_weighting));
  if (!weighting.ok()) {
    return fail(
        absl::InvalidArgumentError(absl::StrCat("--ec_weighting: ", weighting.status().message())));
  }
  options.routing = {*mode, absl::GetFlag(FLAGS_capacity_factor), *scope, *weighting};
  if (absl::Status s = ValidateRoutingOptions(options.routing); !s.ok()) {
    return fail(absl::InvalidArgumentError(absl::StrCat("--", s.message())));
  }
  options.num_tokens = absl::GetFlag(FLAGS_tokens);
  options.num_sequences = absl::GetFlag(FLAGS_sequences);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.skew = absl::GetFlag(FLAGS_skew);

  const std::string model_dir = absl::GetFlag(FLAGS_model_dir),
                    config_path = absl::GetFlag(FLAGS_config);
  if (model_dir.empty() == config_path.empty()) {
    return fail(
        absl::InvalidArgumentError("give exactly one of --model_dir (a checkpoint) or --config "
                                   "(a config.json, with random router weights)"));
  }
  auto config = LoadModelConfig(model_dir.empty() ? config_path : model_dir + "/config.json");
  if (!config.ok()) return fail(config.status());
  std::vector<RouterWeights> routers;
  if (!model_dir.empty()) {
    auto loaded = LoadRouterWeights(model_dir, *config);
    if (!loaded.ok()) return fail(loaded.status());
    routers = std::move(loaded).value();
  } else {
    routers = RandomRouterWeights(*config, {.seed = options.seed});
  }
  auto layers = RunRouteStats(*config, routers, options);
  if (!layers.ok()) return fail(layers.status());
  std::printf("%s\n", absl::GetFlag(FLAGS_json)
                          ? RouteStatsJson(*config, options, *layers).c_str()
                          : RouteStatsTable(*config, options, *layers).c_str());
  return 0;
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
