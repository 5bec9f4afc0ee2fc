#include "server/commands.h"

#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "kernels/util/logging.h"
#include "model/checkpoint.h"
#include "model/golden.h"
#include "model/model.h"
#include "model/route_stats.h"
#include "nlohmann/json.hpp"
#include "server/flags.h"
#include "server/text_model.h"

namespace moeserve {

int RunVerify() {
  const std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  const std::string golden_dir = absl::GetFlag(FLAGS_golden_dir);
  if (model_dir.empty() || golden_dir.empty()) {
    std::fprintf(stderr, "verify needs --model_dir and --golden_dir\n");
    return 2;
  }
  auto model_options = ModelOptionsFromFlags();
  if (!model_options.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model_options.status().message()).c_str());
    return 2;
  }
  // The goldens are float32 references: on the GPU verify runs the float32 path unless
  // --gpu_dtype asks for another (BF16 is far off on tiny random models, see the golden README).
  if (absl::GetFlag(FLAGS_gpu_dtype).empty()) {
    model_options->gpu_matrix_dtype = DType::kF32;
  }
  auto model = Model::Load(model_dir, *model_options);
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
  auto routing = RoutingOptionsFromFlags();
  if (!routing.ok()) return fail(routing.status());
  options.routing = *routing;
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

int RunGenerate() {
  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "generate: %s\n", std::string(s.message()).c_str());
    return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  };
  const std::string prompt = absl::GetFlag(FLAGS_prompt);
  if (prompt.empty()) return fail(absl::InvalidArgumentError("--prompt is empty"));
  auto routing = RoutingOptionsFromFlags();
  if (!routing.ok()) return fail(routing.status());
  auto decode = DecodeOptionsFromFlags();
  if (!decode.ok()) return fail(decode.status());
  auto text_options = TextModelOptionsFromFlags();
  if (!text_options.ok()) return fail(text_options.status());
  auto text_model = LoadTextModel(*text_options);
  if (!text_model.ok()) return fail(text_model.status());
  LogModelSummary(*text_model);
  const Tokenizer& tokenizer = *text_model->tokenizer;
  std::string prompt_text = prompt;
  if (absl::GetFlag(FLAGS_chat)) {
    const ChatMessage message{"user", prompt};
    auto rendered = RenderChat({&message, 1}, /*add_generation_prompt=*/true);
    if (!rendered.ok()) return fail(rendered.status());
    prompt_text = *rendered;
  }
  auto ids = tokenizer.Encode(prompt_text);
  if (!ids.ok())
    return fail(absl::InvalidArgumentError(absl::StrCat("--prompt: ", ids.status().message())));
  auto engine = MakeEngineOptions(tokenizer, absl::GetFlag(FLAGS_max_batch_tokens));
  if (!engine.ok()) return fail(engine.status());
  const absl::Time start = absl::Now();
  auto result = GenerateOne(*text_model->model, *engine, *ids, *decode, *routing);
  if (!result.ok()) return fail(result.status());
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  auto text = tokenizer.Decode(result->tokens, /*skip_special_tokens=*/true);
  if (!text.ok()) return fail(text.status());
  std::string out = *text;
  if (result->finish == FinishReason::kStop)
    out.resize(std::min(out.size(), FindStop(out, decode->stop)));
  const DecodeStats& s = result->stats;
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = {{"text", out},
                        {"token_ids", result->tokens},
                        {"finish_reason", FinishReasonName(result->finish)},
                        {"routing", RoutingModeName(routing->mode)},
                        {"prompt_tokens", ids->size()},
                        {"completion_tokens", s.generated_tokens},
                        {"forwards", s.forwards},
                        {"denoising_steps", s.denoising_steps},
                        {"blocks", s.blocks},
                        {"tokens_per_forward", s.tokens_per_forward()},
                        {"forwards_per_block", s.forwards_per_block()},
                        {"seconds", seconds}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s\n", out.c_str());
    std::fprintf(stderr,
                 "finish %s, routing %s, %zu prompt tokens, %lld generated in %.3f s; %lld "
                 "forwards, %lld denoising steps, %lld blocks: %.2f tokens per forward, %.2f "
                 "forwards per block\n",
                 FinishReasonName(result->finish), RoutingModeName(routing->mode), ids->size(),
                 static_cast<long long>(s.generated_tokens), seconds,
                 static_cast<long long>(s.forwards), static_cast<long long>(s.denoising_steps),
                 static_cast<long long>(s.blocks), s.tokens_per_forward(), s.forwards_per_block());
  }
  return 0;
}

int RunTokenize() {
  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "tokenize: %s\n", std::string(s.message()).c_str());
    return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  };
  std::unique_ptr<Tokenizer> tokenizer;
  const std::string path = absl::GetFlag(FLAGS_tokenizer);
  if (path.empty()) {
    tokenizer = Tokenizer::ByteLevelDemo();
  } else {
    auto loaded = Tokenizer::Load(path);
    if (!loaded.ok()) return fail(loaded.status());
    tokenizer = *std::move(loaded);
  }
  const bool decode = absl::GetFlag(FLAGS_decode);
  std::string line;
  int64_t line_number = 0;
  while (std::getline(std::cin, line)) {
    ++line_number;
    if (line.empty()) continue;
    const nlohmann::json in = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    const char* key = decode ? "ids" : "text";
    if (in.is_discarded() || !in.is_object() || !in.contains(key)) {
      return fail(absl::InvalidArgumentError(
          absl::StrCat("stdin line ", line_number, ": expected a JSON object with \"", key, "\"")));
    }
    nlohmann::json out;
    if (decode) {
      std::vector<int32_t> ids;
      for (const nlohmann::json& id : in["ids"]) {
        if (!id.is_number_integer()) {
          return fail(absl::InvalidArgumentError(
              absl::StrCat("stdin line ", line_number, ": \"ids\" must hold integers")));
        }
        ids.push_back(id.get<int32_t>());
      }
      auto text = tokenizer->Decode(ids, in.value("skip_special_tokens", false));
      if (!text.ok())
        return fail(absl::InvalidArgumentError(
            absl::StrCat("stdin line ", line_number, ": ", text.status().message())));
      out["text"] = *text;
    } else {
      if (!in["text"].is_string()) {
        return fail(absl::InvalidArgumentError(
            absl::StrCat("stdin line ", line_number, ": \"text\" must be a string")));
      }
      auto ids = tokenizer->Encode(in["text"].get<std::string>());
      if (!ids.ok())
        return fail(absl::InvalidArgumentError(
            absl::StrCat("stdin line ", line_number, ": ", ids.status().message())));
      out["ids"] = *ids;
    }
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  }
  return 0;
}

}  // namespace moeserve
