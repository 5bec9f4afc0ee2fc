#include "server/flags.h"

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kernels/util/status_macros.h"
#include "model/golden.h"

ABSL_FLAG(std::string, model_dir, "",
          "Hugging Face checkpoint directory (config.json, model.safetensors[.index.json], "
          "tokenizer.json). Empty: the built-in random-weight demo model.");
ABSL_FLAG(std::string, tokenizer, "",
          "tokenizer.json to use. Empty: --model_dir's tokenizer.json, or the demo's built-in "
          "byte-level tokenizer.");
ABSL_FLAG(uint64_t, seed, 0, "Random seed of the demo model, write-checkpoint and route-stats.");
ABSL_FLAG(std::string, device, "auto",
          "serve, generate, verify: where the model runs: cuda, cpu, or auto (cuda when this "
          "binary has the CUDA backend and a GPU is present, else cpu).");
ABSL_FLAG(std::string, gpu_dtype, "",
          "GPU weight matrices and GEMM inputs: bf16 (fast) or f32 (float32 like the CPU "
          "reference). Empty: bf16, except for verify, which checks float32 goldens with f32.");
ABSL_FLAG(bool, cuda_graphs, true,
          "GPU: replay the layers of a batch shape seen before as one CUDA graph (BF16 with the "
          "fused experts; the first forward of a shape runs eagerly, the second is captured). "
          "false: launch every kernel each forward.");
ABSL_FLAG(std::string, demo_config, "",
          "serve, generate without --model_dir: config.json whose shape the random-weight demo "
          "model takes (e.g. model/configs/LLaDA2.0-mini-preview.json for full-size benchmarks). "
          "Empty: the small built-in demo.");

ABSL_FLAG(std::string, golden_dir, "",
          "verify: directory with golden.json and golden.safetensors.");
ABSL_FLAG(double, tolerance, moeserve::kGoldenF32Tolerance,
          "verify: largest max|a-b|/max|ref| accepted per tensor.");
ABSL_FLAG(std::string, config, "",
          "write-checkpoint, route-stats: config.json to take the shape from (write-checkpoint: "
          "empty = the demo model's config).");
ABSL_FLAG(std::string, out_dir, "", "write-checkpoint: directory to write the checkpoint into.");
ABSL_FLAG(int, shards, 1, "write-checkpoint: number of safetensors shards (> 1 adds an index).");
ABSL_FLAG(int64_t, tokens, 4096, "route-stats: tokens to route.");
ABSL_FLAG(int64_t, sequences, 1,
          "route-stats: sequences the tokens are split into (request scopes).");
ABSL_FLAG(double, skew, 0.0,
          "route-stats: Zipf exponent of a per-expert router-logit offset (0: none).");
ABSL_FLAG(bool, json, false, "route-stats, generate: print JSON instead of text.");
ABSL_FLAG(std::string, prompt, "", "generate: the prompt.");
ABSL_FLAG(bool, chat, false,
          "generate: render the prompt as a user message with the chat template (plus the "
          "assistant turn's header) instead of using it raw.");
ABSL_FLAG(bool, decode, false,
          "tokenize: read {\"ids\": [...]} lines and write {\"text\": ...} lines instead.");

ABSL_FLAG(std::string, routing, "token_choice",
          "Routing mode, token_choice or expert_choice: of the request (generate, route-stats) "
          "or the server's default (serve).");
ABSL_FLAG(double, capacity_factor, 1.25, "Expert-choice capacity factor, in (0, 64].");
ABSL_FLAG(std::string, scope, "request", "Expert-choice scope, request or batch.");
ABSL_FLAG(std::string, ec_weighting, "renormalized", "Expert-choice weights, renormalized or raw.");

ABSL_FLAG(int64_t, max_new_tokens, 128,
          "Tokens to generate at most (generate; serve: the default of requests that leave it 0).");
ABSL_FLAG(int64_t, block_length, 32, "Positions per denoising block (generate; serve: default).");
ABSL_FLAG(std::string, policy, "threshold",
          "Commit policy, threshold or scheduled (generate; serve: default).");
ABSL_FLAG(double, threshold, 0.95, "Commit confidence threshold (generate; serve: default).");
ABSL_FLAG(int64_t, steps, 0,
          "Scheduled policy: denoising steps per block, 0 = block_length (generate; serve: "
          "default).");
ABSL_FLAG(double, temperature, 0.0, "0: greedy; > 0: sampling (generate; serve: default).");
ABSL_FLAG(int64_t, top_k, 0, "Sampling: keep the k most likely tokens, 0 = all.");
ABSL_FLAG(double, top_p, 1.0, "Sampling: nucleus probability in (0, 1].");
ABSL_FLAG(uint64_t, sampling_seed, 0, "generate: sampling seed.");
ABSL_FLAG(std::vector<std::string>, stop, {}, "generate: stop strings, comma-separated.");

ABSL_FLAG(std::string, host, "0.0.0.0", "serve: address to listen on for gRPC.");
ABSL_FLAG(int, port, 50051, "serve: gRPC port.");
ABSL_FLAG(int, metrics_port, 9464, "serve: Prometheus /metrics port (0: no metrics endpoint).");
ABSL_FLAG(int64_t, max_batch_tokens, 4096, "serve, generate: tokens per forward at most.");
ABSL_FLAG(int64_t, max_concurrent_sequences, 64, "serve: requests in the batch at once.");
ABSL_FLAG(int64_t, max_queue_length, 256,
          "serve: requests waiting at most; beyond it, RESOURCE_EXHAUSTED at once.");
ABSL_FLAG(double, kv_cache_gib, 4.0, "serve: KV cache budget over all admitted requests, GiB.");
ABSL_FLAG(int64_t, max_request_bytes, 4 << 20, "serve: largest request message accepted, bytes.");
ABSL_FLAG(int64_t, expert_load_window, 100,
          "serve: forwards covered by GetExpertLoad's recent window and by the "
          "moeserve_expert_load_max_over_mean / moeserve_expert_load_cv gauges.");
ABSL_FLAG(std::string, expert_metrics, "per_expert",
          "serve: expert-load metrics, per_expert (adds moeserve_expert_tokens_total{layer, "
          "expert, routing}), per_layer or off. See docs/METRICS.md for the series counts.");
ABSL_FLAG(double, drain_grace_seconds, 30,
          "serve: on SIGTERM, how long in-flight requests may take to finish before they end "
          "with UNAVAILABLE.");
ABSL_FLAG(std::string, tls_cert_file, "", "serve: PEM server certificate chain (enables TLS).");
ABSL_FLAG(std::string, tls_key_file, "", "serve: PEM private key of --tls_cert_file.");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "serve: PEM CA bundle; clients must present a certificate it signed (mutual TLS).");
ABSL_FLAG(std::string, auth_token_file, "",
          "serve: file holding a bearer token every MoeServe call must send as `authorization: "
          "Bearer <token>` (health checks excepted), and the password of HTTP basic auth on "
          "/metrics (any user name). Empty: no token.");

namespace moeserve {

absl::StatusOr<ModelOptions> ModelOptionsFromFlags() {
  ModelOptions options;
  auto device = ParseDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok())
    return absl::InvalidArgumentError(absl::StrCat("--", device.status().message()));
  options.device = *device;
  const std::string dtype = absl::GetFlag(FLAGS_gpu_dtype);
  if (dtype == "bf16" || dtype.empty()) {
    options.gpu_matrix_dtype = DType::kBF16;
  } else if (dtype == "f32") {
    options.gpu_matrix_dtype = DType::kF32;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--gpu_dtype \"", dtype, "\" is unknown: bf16 or f32"));
  }
  options.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  return options;
}

absl::StatusOr<TextModelOptions> TextModelOptionsFromFlags() {
  TextModelOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model_dir);
  options.tokenizer_path = absl::GetFlag(FLAGS_tokenizer);
  options.demo_seed = absl::GetFlag(FLAGS_seed);
  options.demo_config = absl::GetFlag(FLAGS_demo_config);
  ASSIGN_OR_RETURN(options.model, ModelOptionsFromFlags());
  return options;
}
namespace {

absl::Status FlagError(absl::string_view flag, const absl::Status& status) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", status.message()));
}

}  // namespace

absl::StatusOr<RoutingOptions> RoutingOptionsFromFlags() {
  RoutingOptions options;
  auto mode = ParseRoutingMode(absl::GetFlag(FLAGS_routing));
  if (!mode.ok()) return FlagError("routing", mode.status());
  auto scope = ParseRoutingScope(absl::GetFlag(FLAGS_scope));
  if (!scope.ok()) return FlagError("scope", scope.status());
  auto weighting = ParseExpertChoiceWeighting(absl::GetFlag(FLAGS_ec_weighting));
  if (!weighting.ok()) return FlagError("ec_weighting", weighting.status());
  options = {*mode, absl::GetFlag(FLAGS_capacity_factor), *scope, *weighting};
  // The message starts with the option's name, which is the flag's.
  if (absl::Status s = ValidateRoutingOptions(options); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--", s.message()));
  }
  return options;
}

absl::StatusOr<DecodeOptions> DecodeOptionsFromFlags() {
  DecodeOptions options;
  options.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  options.block_length = absl::GetFlag(FLAGS_block_length);
  auto policy = ParseCommitPolicy(absl::GetFlag(FLAGS_policy));
  if (!policy.ok()) return FlagError("policy", policy.status());
  options.policy = *policy;
  options.threshold = absl::GetFlag(FLAGS_threshold);
  options.steps = absl::GetFlag(FLAGS_steps);
  options.sampling.temperature = absl::GetFlag(FLAGS_temperature);
  options.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  options.sampling.top_p = absl::GetFlag(FLAGS_top_p);
  options.seed = absl::GetFlag(FLAGS_sampling_seed);
  options.stop = absl::GetFlag(FLAGS_stop);
  if (absl::Status s = ValidateDecodeOptions(options); !s.ok()) {
    // "decoding.threshold = ...": the flag is the part after "decoding.".
    std::string message(s.message());
    if (absl::StartsWith(message, "decoding.")) message = "--" + message.substr(9);
    return absl::InvalidArgumentError(message);
  }
  return options;
}

}  // namespace moeserve
