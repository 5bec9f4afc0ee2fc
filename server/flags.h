// The flags of the moeserve binary, defined in one place (flags.cc) and shared by its commands,
// and the options built from them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "model/decoder.h"
#include "model/routing.h"
#include "server/text_model.h"

// Model.
ABSL_DECLARE_FLAG(std::string, model_dir);
ABSL_DECLARE_FLAG(std::string, tokenizer);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, gpu_dtype);
ABSL_DECLARE_FLAG(bool, cuda_graphs);
ABSL_DECLARE_FLAG(std::string, demo_config);
// Offline commands.
ABSL_DECLARE_FLAG(std::string, golden_dir);
ABSL_DECLARE_FLAG(double, tolerance);
ABSL_DECLARE_FLAG(std::string, config);
ABSL_DECLARE_FLAG(std::string, out_dir);
ABSL_DECLARE_FLAG(int, shards);
ABSL_DECLARE_FLAG(int64_t, tokens);
ABSL_DECLARE_FLAG(int64_t, sequences);
ABSL_DECLARE_FLAG(double, skew);
ABSL_DECLARE_FLAG(bool, json);
ABSL_DECLARE_FLAG(std::string, prompt);
ABSL_DECLARE_FLAG(bool, chat);
ABSL_DECLARE_FLAG(bool, decode);
// Routing: a request's options (generate, route-stats) or the server's defaults (serve).
ABSL_DECLARE_FLAG(std::string, routing);
ABSL_DECLARE_FLAG(double, capacity_factor);
ABSL_DECLARE_FLAG(std::string, scope);
ABSL_DECLARE_FLAG(std::string, ec_weighting);
// Decoding: a request's options (generate) or the server's defaults (serve).
ABSL_DECLARE_FLAG(int64_t, max_new_tokens);
ABSL_DECLARE_FLAG(int64_t, block_length);
ABSL_DECLARE_FLAG(std::string, policy);
ABSL_DECLARE_FLAG(double, threshold);
ABSL_DECLARE_FLAG(int64_t, steps);
ABSL_DECLARE_FLAG(double, temperature);
ABSL_DECLARE_FLAG(int64_t, top_k);
ABSL_DECLARE_FLAG(double, top_p);
ABSL_DECLARE_FLAG(uint64_t, sampling_seed);
ABSL_DECLARE_FLAG(std::vector<std::string>, stop);
// Serving.
ABSL_DECLARE_FLAG(std::string, host);
ABSL_DECLARE_FLAG(int, port);
ABSL_DECLARE_FLAG(int, metrics_port);
ABSL_DECLARE_FLAG(int64_t, max_batch_tokens);
ABSL_DECLARE_FLAG(int64_t, max_concurrent_sequences);
ABSL_DECLARE_FLAG(int64_t, max_queue_length);
ABSL_DECLARE_FLAG(double, kv_cache_gib);
ABSL_DECLARE_FLAG(int64_t, max_request_bytes);
ABSL_DECLARE_FLAG(int64_t, expert_load_window);
ABSL_DECLARE_FLAG(std::string, expert_metrics);
ABSL_DECLARE_FLAG(double, drain_grace_seconds);
ABSL_DECLARE_FLAG(std::string, tls_cert_file);
ABSL_DECLARE_FLAG(std::string, tls_key_file);
ABSL_DECLARE_FLAG(std::string, tls_client_ca_file);
ABSL_DECLARE_FLAG(std::string, auth_token_file);

namespace moeserve {

// The routing flags as options; errors name the flag.
absl::StatusOr<RoutingOptions> RoutingOptionsFromFlags();
// The decoding flags as options; errors name the flag.
absl::StatusOr<DecodeOptions> DecodeOptionsFromFlags();
// --device, --gpu_dtype and --cuda_graphs; errors name the flag.
absl::StatusOr<ModelOptions> ModelOptionsFromFlags();
// --model_dir, --tokenizer, --seed, --demo_config, --device, --gpu_dtype, --cuda_graphs.
absl::StatusOr<TextModelOptions> TextModelOptionsFromFlags();

}  // namespace moeserve
