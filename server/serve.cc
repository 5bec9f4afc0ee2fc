// `moeserve serve`: the gRPC server's lifecycle.
//
// 1. Listen at once (health NOT_SERVING, MoeServe calls UNAVAILABLE), so that a Kubernetes startup
//    probe sees a live process while a large checkpoint loads.
// 2. Load the model and tokenizer, start the scheduler, warm up with one short generation; then
//    health turns SERVING.
// 3. On SIGTERM or SIGINT: health NOT_SERVING, stop accepting (UNAVAILABLE), let in-flight and
//    queued requests finish within --drain_grace_seconds, end what is left with UNAVAILABLE, shut
//    the gRPC server down and exit 0. A signal during loading exits 0 at once (nothing was
//    accepted).
#include <signal.h>

#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "kernels/util/logging.h"
#include "kernels/util/status_macros.h"
#include "prometheus/exposer.h"
#include "server/commands.h"
#include "server/flags.h"
#include "server/metrics.h"
#include "server/service.h"
#include "server/text_model.h"

namespace moeserve {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read ", path));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials() {
  const std::string cert = absl::GetFlag(FLAGS_tls_cert_file);
  const std::string key = absl::GetFlag(FLAGS_tls_key_file);
  const std::string client_ca = absl::GetFlag(FLAGS_tls_client_ca_file);
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--tls_cert_file and --tls_key_file go together");
  }
  if (cert.empty()) {
    if (!client_ca.empty()) {
      return absl::InvalidArgumentError("--tls_client_ca_file needs --tls_cert_file");
    }
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions options;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  ASSIGN_OR_RETURN(pair.cert_chain, ReadFile("tls_cert_file", cert));
  ASSIGN_OR_RETURN(pair.private_key, ReadFile("tls_key_file", key));
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!client_ca.empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, ReadFile("tls_client_ca_file", client_ca));
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<ServiceOptions> ServiceOptionsFromFlags() {
  ServiceOptions options;
  ASSIGN_OR_RETURN(options.defaults.routing, RoutingOptionsFromFlags());
  ASSIGN_OR_RETURN(options.defaults.decode, DecodeOptionsFromFlags());
  if (!options.defaults.decode.stop.empty()) {
    return absl::InvalidArgumentError("--stop: serve takes stop strings per request only");
  }
  const std::string token_file = absl::GetFlag(FLAGS_auth_token_file);
  if (!token_file.empty()) {
    ASSIGN_OR_RETURN(std::string token, ReadFile("auth_token_file", token_file));
    options.auth_token = std::string(absl::StripAsciiWhitespace(token));
    if (options.auth_token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--auth_token_file: ", token_file, " holds no token"));
    }
  }
  options.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  options.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  if (options.max_request_bytes < 1024 || options.max_request_bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("--max_request_bytes must be in [1024, 2^30]");
  }
  if (options.max_batch_tokens < 1) {
    return absl::InvalidArgumentError("--max_batch_tokens must be at least 1");
  }
  return options;
}

absl::StatusOr<SchedulerOptions> SchedulerOptionsFromFlags() {
  SchedulerOptions options;
  options.max_queue_length = absl::GetFlag(FLAGS_max_queue_length);
  options.max_concurrent_sequences = absl::GetFlag(FLAGS_max_concurrent_sequences);
  const double gib = absl::GetFlag(FLAGS_kv_cache_gib);
  if (options.max_queue_length < 0) {
    return absl::InvalidArgumentError("--max_queue_length must be >= 0");
  }
  if (options.max_concurrent_sequences < 1) {
    return absl::InvalidArgumentError("--max_concurrent_sequences must be >= 1");
  }
  if (!(gib > 0 && gib <= 1 << 20)) {
    return absl::InvalidArgumentError("--kv_cache_gib must be in (0, 2^20]");
  }
  options.kv_cache_bytes = static_cast<int64_t>(gib * (int64_t{1} << 30));
  return options;
}

// Compares without an early exit (the /metrics basic-auth password).
bool SamePassword(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// The /metrics endpoint on --metrics_port (nullptr for 0), protected by basic auth with the bearer
// token as password when --auth_token_file is set. Serves nothing until the model is loaded.
absl::StatusOr<std::unique_ptr<prometheus::Exposer>> StartExposer(const std::string& token) {
  const int port = absl::GetFlag(FLAGS_metrics_port);
  if (port == 0) return nullptr;
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError("--metrics_port must be in [0, 65535]");
  }
  const std::string address = absl::StrCat(absl::GetFlag(FLAGS_host), ":", port);
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    exposer = std::make_unique<prometheus::Exposer>(address, 2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("--metrics_port: cannot listen on ", address, ": ", e.what()));
  }
  if (!token.empty()) {
    exposer->RegisterAuth([token](const std::string&, const std::string& password) {
      return SamePassword(password, token);
    });
  }
  return exposer;
}

// Loads everything the service needs and warms the engine up with one short generation.
absl::StatusOr<std::unique_ptr<Backend>> LoadBackend(const SchedulerOptions& scheduler_options,
                                                     ExpertMetricsLevel expert_metrics) {
  ASSIGN_OR_RETURN(const TextModelOptions options, TextModelOptionsFromFlags());
  ASSIGN_OR_RETURN(TextModel text_model, LoadTextModel(options));
  LogModelSummary(text_model);
  auto backend = std::make_unique<Backend>();
  backend->model = std::move(text_model.model);
  backend->backend = DeviceName(backend->model->device());
  backend->tokenizer = std::move(text_model.tokenizer);
  backend->model_name = text_model.random_weights ? "demo (random weights)" : text_model.name;
  backend->random_weights = text_model.random_weights;
  ASSIGN_OR_RETURN(EngineOptions engine,
                   MakeEngineOptions(*backend->tokenizer, absl::GetFlag(FLAGS_max_batch_tokens)));

  const absl::Time start = absl::Now();
  ASSIGN_OR_RETURN(std::vector<int32_t> warm_prompt, backend->tokenizer->Encode("warm-up"));
  DecodeOptions warm;
  warm.max_new_tokens = 1;
  warm.block_length = 1;
  RETURN_IF_ERROR(GenerateOne(*backend->model, engine, warm_prompt, warm, {}).status());
  MOESERVE_LOG(INFO) << absl::StrFormat("warm-up generation took %.3f s",
                                        absl::ToDoubleSeconds(absl::Now() - start));

  backend->expert_load = std::make_unique<ExpertLoadTracker>(
      backend->model->config(), absl::GetFlag(FLAGS_expert_load_window));
  ExpertLoadTracker* load = backend->expert_load.get();
  ServerMetricsOptions metrics_options;
  metrics_options.expert_level = expert_metrics;
  metrics_options.load_window = absl::GetFlag(FLAGS_expert_load_window);
  metrics_options.version = MOESERVE_VERSION;
  metrics_options.model = backend->model_name;
  metrics_options.backend = backend->backend;
  backend->metrics = std::make_unique<ServerMetrics>(backend->model->config(), metrics_options);
  ServerMetrics* metrics = backend->metrics.get();
  backend->scheduler = std::make_unique<Scheduler>(
      backend->model.get(), std::move(engine), scheduler_options,
      [load, metrics](const StepResult& step, absl::Duration step_time) {
        load->Add(step.layer_load);
        metrics->ObserveStep(step, step_time);
      });
  const Scheduler* scheduler = backend->scheduler.get();
  metrics->SetQueueStatsSource([scheduler] {
    const SchedulerStats s = scheduler->stats();
    QueueStats q;
    q.waiting = s.queue_length;
    q.running = s.running_sequences;
    q.waiting_limit = scheduler->options().max_queue_length;
    q.kv_cache_usage_ratio = s.kv_budget_bytes > 0 ? static_cast<double>(s.kv_reserved_bytes) /
                                                         static_cast<double>(s.kv_budget_bytes)
                                                   : 0.0;
    return q;
  });
  return backend;
}

}  // namespace

int RunServe(const sigset_t& signals) {
  auto service_options = ServiceOptionsFromFlags();
  auto scheduler_options = SchedulerOptionsFromFlags();
  auto credentials = Credentials();
  auto expert_metrics = ParseExpertMetricsLevel(absl::GetFlag(FLAGS_expert_metrics));
  if (!expert_metrics.ok()) {
    expert_metrics = absl::InvalidArgumentError(
        absl::StrCat("--expert_metrics: ", expert_metrics.status().message()));
  }
  for (const absl::Status& s : {service_options.status(), scheduler_options.status(),
                                credentials.status(), expert_metrics.status()}) {
    if (!s.ok()) {
      std::fprintf(stderr, "serve: %s\n", std::string(s.message()).c_str());
      return 2;
    }
  }
  const bool tls = !absl::GetFlag(FLAGS_tls_cert_file).empty();
  const bool auth = !service_options->auth_token.empty();
  MoeServeService service(*service_options);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string address =
      absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_port));
  int bound_port = 0;
  builder.AddListeningPort(address, *credentials, &bound_port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(service_options->max_request_bytes));
  builder.SetMaxSendMessageSize(64 << 20);
  // One server thread per call in flight: enough for every queued and running request, plus
  // room for health checks, info calls and calls that are about to be refused.
  grpc::ResourceQuota quota("moeserve");
  quota.SetMaxThreads(static_cast<int>(scheduler_options->max_queue_length +
                                       scheduler_options->max_concurrent_sequences + 32));
  builder.SetResourceQuota(quota);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    MOESERVE_LOG(ERROR) << "cannot listen on " << address << " (in use, or a bad --host)";
    return 1;
  }
  auto exposer = StartExposer(service_options->auth_token);
  if (!exposer.ok()) {
    MOESERVE_LOG(ERROR) << exposer.status().message();
    server->Shutdown(absl::ToChronoTime(absl::Now()));
    return 1;
  }
  if (*exposer != nullptr) {
    MOESERVE_LOG(INFO) << absl::StrFormat(
        "metrics on http://%s:%d/metrics (expert metrics %s%s)", absl::GetFlag(FLAGS_host),
        absl::GetFlag(FLAGS_metrics_port), ExpertMetricsLevelName(*expert_metrics),
        auth ? ", basic auth with the bearer token as password" : "");
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(false);
  MOESERVE_LOG(INFO) << absl::StrFormat(
      "listening on %s:%d (gRPC%s%s%s); health NOT_SERVING until the model is loaded",
      absl::GetFlag(FLAGS_host), bound_port, tls ? ", TLS" : ", plaintext",
      absl::GetFlag(FLAGS_tls_client_ca_file).empty() ? "" : ", client certificates required",
      auth ? ", bearer token required" : "");

  // Load in the background; the main thread waits for signals.
  std::unique_ptr<Backend> backend;
  absl::Status load_status;
  scheduler_options->on_engine_failure = [health](const absl::Status&) {
    health->SetServingStatus(false);
    MOESERVE_LOG(ERROR) << "health NOT_SERVING after a fatal engine error";
  };
  absl::Notification loaded;
  std::thread loader([&] {
    auto result = LoadBackend(*scheduler_options, *expert_metrics);
    if (result.ok()) {
      backend = *std::move(result);
      service.SetBackend(backend.get());
      if (*exposer != nullptr) (*exposer)->RegisterCollectable(backend->metrics->collectable());
      health->SetServingStatus(true);
      // An engine failure during the warm-up would otherwise be overwritten by SERVING.
      if (backend->scheduler->stats().failed) health->SetServingStatus(false);
      MOESERVE_LOG(INFO) << "ready: health SERVING";
    } else {
      load_status = result.status();
    }
    loaded.Notify();
    // Wake the signal wait on failure, so that the process exits.
    if (!load_status.ok()) kill(getpid(), SIGTERM);
  });

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  if (!loaded.HasBeenNotified()) {
    MOESERVE_LOG(INFO) << "received " << strsignal(signal_number)
                       << " while loading the model; exiting";
    server->Shutdown(absl::ToChronoTime(absl::Now()));
    std::_Exit(0);
  }
  loader.join();
  if (!load_status.ok()) {
    MOESERVE_LOG(ERROR) << "cannot start: " << load_status.message();
    server->Shutdown(absl::ToChronoTime(absl::Now()));
    return 1;
  }

  const absl::Duration grace = absl::Seconds(absl::GetFlag(FLAGS_drain_grace_seconds));
  const SchedulerStats at_signal = backend->scheduler->stats();
  MOESERVE_LOG(INFO) << absl::StrFormat(
      "received %s: draining (health NOT_SERVING, new requests UNAVAILABLE); %d running, %d "
      "queued; grace %s",
      strsignal(signal_number), at_signal.running_sequences, at_signal.queue_length,
      absl::FormatDuration(grace));
  health->SetServingStatus(false);
  backend->scheduler->Drain();
  if (!backend->scheduler->WaitIdle(absl::Now() + grace)) {
    const SchedulerStats left = backend->scheduler->stats();
    MOESERVE_LOG(WARNING) << absl::StrFormat(
        "drain grace period over: ending %d running and %d queued requests with UNAVAILABLE",
        left.running_sequences, left.queue_length);
    backend->scheduler->AbortAll(
        absl::UnavailableError("the server is shutting down and its drain grace period is over"));
    backend->scheduler->WaitIdle(absl::Now() + absl::Seconds(10));
  }
  // Calls have their final events; give their threads a moment to send them.
  server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  server->Wait();
  exposer->reset();  // no scrape may reach the metrics once the backend is gone
  backend.reset();
  MOESERVE_LOG(INFO) << "drained; exiting";
  return 0;
}

}  // namespace moeserve
