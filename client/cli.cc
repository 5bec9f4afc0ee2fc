// moeserve-cli: a command-line client of the moeserve.v1.MoeServe API.
//
//   moeserve-cli generate --prompt TEXT [--chat] [routing and decoding flags]
//   moeserve-cli stream   --prompt TEXT ...        prints each block as it arrives
//   moeserve-cli info                              the model, routing defaults and limits
//   moeserve-cli expert-load [--window recent]     tokens per expert as a heat table
//   moeserve-cli bench --concurrency N --duration_seconds S [--expert_choice_fraction F]
//
// Connection: --target host:port; --tls_ca_file (TLS), --tls_cert_file/--tls_key_file (mutual
// TLS), --auth_token_file (bearer token).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "moeserve/v1/moeserve.grpc.pb.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, target, "localhost:50051", "The server, host:port.");
ABSL_FLAG(std::string, tls_ca_file, "", "PEM CA bundle to verify the server with (enables TLS).");
ABSL_FLAG(std::string, tls_cert_file, "", "PEM client certificate (mutual TLS).");
ABSL_FLAG(std::string, tls_key_file, "", "PEM key of --tls_cert_file.");
ABSL_FLAG(std::string, tls_server_name, "", "Expected server name in its certificate.");
ABSL_FLAG(std::string, auth_token_file, "", "File with the bearer token to send.");
ABSL_FLAG(double, timeout_seconds, 600, "Deadline of each call.");

ABSL_FLAG(std::string, prompt, "", "The prompt (raw text, or the user message with --chat).");
ABSL_FLAG(bool, chat, false, "Send --prompt as a user message (the server applies the template).");
ABSL_FLAG(std::string, routing, "", "token_choice or expert_choice (empty: the server default).");
ABSL_FLAG(double, capacity_factor, 0, "Expert-choice capacity factor (0: the server default).");
ABSL_FLAG(std::string, scope, "", "Expert-choice scope, request or batch.");
ABSL_FLAG(int32_t, max_new_tokens, 0, "Tokens to generate at most (0: the server default).");
ABSL_FLAG(int32_t, block_length, 0, "Denoising block length (0: the server default).");
ABSL_FLAG(std::string, policy, "", "threshold or scheduled (empty: the server default).");
ABSL_FLAG(double, threshold, -1, "Commit threshold in [0, 1] (negative: the server default).");
ABSL_FLAG(int32_t, steps, 0, "Scheduled policy: steps per block.");
ABSL_FLAG(double, temperature, 0, "0: greedy.");
ABSL_FLAG(int32_t, top_k, 0, "Sampling: top-k (0: off).");
ABSL_FLAG(double, top_p, 0, "Sampling: top-p (0: off).");
ABSL_FLAG(uint64_t, seed, 0, "Sampling seed.");
ABSL_FLAG(std::vector<std::string>, stop, {}, "Stop strings, comma-separated.");
ABSL_FLAG(std::string, request_id, "", "Request id (empty: the server makes one).");
ABSL_FLAG(bool, token_ids, false, "Ask for the generated token ids too.");
ABSL_FLAG(bool, json, false, "Print responses as JSON.");

ABSL_FLAG(std::string, window, "since_start", "expert-load: since_start or recent.");

ABSL_FLAG(int, concurrency, 8, "bench: concurrent streams.");
ABSL_FLAG(double, duration_seconds, 30, "bench: how long to run (0: until --requests).");
ABSL_FLAG(int64_t, requests, 0, "bench: requests to send in all (0: until the duration ends).");
ABSL_FLAG(double, expert_choice_fraction, 0.5,
          "bench: share of requests sent with expert-choice routing (the rest token-choice).");
ABSL_FLAG(std::string, report, "", "bench: also write the report as JSON to this file.");

namespace moeserve::cli {
namespace {

namespace v1 = ::moeserve::v1;

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(2);
  }
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

std::unique_ptr<v1::MoeServe::Stub> Connect() {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  const std::string ca = absl::GetFlag(FLAGS_tls_ca_file);
  if (ca.empty()) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = ReadFileOrDie(ca);
    if (!absl::GetFlag(FLAGS_tls_cert_file).empty()) {
      options.pem_cert_chain = ReadFileOrDie(absl::GetFlag(FLAGS_tls_cert_file));
      options.pem_private_key = ReadFileOrDie(absl::GetFlag(FLAGS_tls_key_file));
    }
    credentials = grpc::SslCredentials(options);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  if (!absl::GetFlag(FLAGS_tls_server_name).empty()) {
    args.SetSslTargetNameOverride(absl::GetFlag(FLAGS_tls_server_name));
  }
  return v1::MoeServe::NewStub(
      grpc::CreateCustomChannel(absl::GetFlag(FLAGS_target), credentials, args));
}

void PrepareContext(grpc::ClientContext* context) {
  context->set_deadline(
      absl::ToChronoTime(absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_timeout_seconds))));
  static const std::string token = [] {
    const std::string path = absl::GetFlag(FLAGS_auth_token_file);
    return path.empty() ? std::string()
                        : std::string(absl::StripAsciiWhitespace(ReadFileOrDie(path)));
  }();
  if (!token.empty()) context->AddMetadata("authorization", "Bearer " + token);
}

int Fail(const grpc::Status& status) {
  std::fprintf(stderr, "error: %s: %s\n",
               absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())).c_str(),
               status.error_message().c_str());
  return 1;
}

v1::RoutingMode ParseMode(const std::string& text) {
  if (text.empty()) return v1::ROUTING_MODE_UNSPECIFIED;
  if (text == "token_choice") return v1::ROUTING_MODE_TOKEN_CHOICE;
  if (text == "expert_choice") return v1::ROUTING_MODE_EXPERT_CHOICE;
  std::fprintf(stderr, "--routing: \"%s\" is not token_choice or expert_choice\n", text.c_str());
  std::exit(2);
}

v1::GenerateRequest RequestFromFlags() {
  v1::GenerateRequest request;
  const std::string prompt = absl::GetFlag(FLAGS_prompt);
  if (absl::GetFlag(FLAGS_chat)) {
    v1::ChatMessage* m = request.mutable_messages()->add_messages();
    m->set_role("user");
    m->set_content(prompt);
  } else {
    request.set_prompt(prompt);
  }
  v1::RoutingOptions* routing = request.mutable_routing();
  routing->set_mode(ParseMode(absl::GetFlag(FLAGS_routing)));
  routing->set_capacity_factor(absl::GetFlag(FLAGS_capacity_factor));
  const std::string scope = absl::GetFlag(FLAGS_scope);
  if (scope == "request") routing->set_scope(v1::ROUTING_SCOPE_REQUEST);
  if (scope == "batch") routing->set_scope(v1::ROUTING_SCOPE_BATCH);
  if (!scope.empty() && scope != "request" && scope != "batch") {
    std::fprintf(stderr, "--scope: \"%s\" is not request or batch\n", scope.c_str());
    std::exit(2);
  }
  v1::DecodingOptions* d = request.mutable_decoding();
  d->set_max_new_tokens(absl::GetFlag(FLAGS_max_new_tokens));
  d->set_block_length(absl::GetFlag(FLAGS_block_length));
  const std::string policy = absl::GetFlag(FLAGS_policy);
  if (policy == "threshold") d->set_policy(v1::COMMIT_POLICY_THRESHOLD);
  if (policy == "scheduled") d->set_policy(v1::COMMIT_POLICY_SCHEDULED);
  if (!policy.empty() && policy != "threshold" && policy != "scheduled") {
    std::fprintf(stderr, "--policy: \"%s\" is not threshold or scheduled\n", policy.c_str());
    std::exit(2);
  }
  if (absl::GetFlag(FLAGS_threshold) >= 0) d->set_threshold(absl::GetFlag(FLAGS_threshold));
  d->set_steps(absl::GetFlag(FLAGS_steps));
  d->set_temperature(absl::GetFlag(FLAGS_temperature));
  d->set_top_k(absl::GetFlag(FLAGS_top_k));
  d->set_top_p(absl::GetFlag(FLAGS_top_p));
  d->set_seed(absl::GetFlag(FLAGS_seed));
  for (const std::string& s : absl::GetFlag(FLAGS_stop)) d->add_stop(s);
  request.set_request_id(absl::GetFlag(FLAGS_request_id));
  request.set_return_token_ids(absl::GetFlag(FLAGS_token_ids));
  return request;
}

std::string ToJson(const google::protobuf::Message& message) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

void PrintStatistics(const v1::GenerateResponse& r) {
  const v1::Usage& u = r.usage();
  const v1::Timings& t = r.timings();
  int64_t dropped = 0;
  double capacity = 0;
  for (const v1::LayerRoutingStats& l : r.routing_stats().layers()) {
    dropped += l.dropped_tokens();
    capacity += l.effective_capacity_factor();
  }
  const int layers = r.routing_stats().layers_size();
  std::fprintf(stderr,
               "[%s] finish %s, routing %s: %d prompt + %d completion tokens, %d forwards, %d "
               "denoising steps, %.2f tokens/forward; queue %.3f s, first block %.3f s, total "
               "%.3f s; %lld dropped token-layers, effective capacity factor %.3f\n",
               r.request_id().c_str(), v1::FinishReason_Name(r.finish_reason()).c_str(),
               v1::RoutingMode_Name(r.routing_stats().routing().mode()).c_str(), u.prompt_tokens(),
               u.completion_tokens(), u.forwards(), u.denoising_steps(), u.tokens_per_forward(),
               t.queue_seconds(), t.first_block_seconds(), t.total_seconds(),
               static_cast<long long>(dropped), layers ? capacity / layers : 0.0);
}

int Generate() {
  auto stub = Connect();
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::GenerateResponse response;
  grpc::Status status = stub->Generate(&context, RequestFromFlags(), &response);
  if (!status.ok()) return Fail(status);
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", ToJson(response).c_str());
  } else {
    std::printf("%s\n", response.text().c_str());
    PrintStatistics(response);
  }
  return 0;
}

int Stream() {
  auto stub = Connect();
  grpc::ClientContext context;
  PrepareContext(&context);
  auto reader = stub->GenerateStream(&context, RequestFromFlags());
  v1::GenerateResponse message, last;
  while (reader->Read(&message)) {
    if (absl::GetFlag(FLAGS_json)) {
      std::printf("%s\n", ToJson(message).c_str());
    } else {
      std::printf("%s", message.text().c_str());
    }
    std::fflush(stdout);
    last = message;
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return Fail(status);
  if (!absl::GetFlag(FLAGS_json)) {
    std::printf("\n");
    PrintStatistics(last);
  }
  return 0;
}

int Info() {
  auto stub = Connect();
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::ModelInfo info;
  grpc::Status status = stub->GetModelInfo(&context, {}, &info);
  if (!status.ok()) return Fail(status);
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", ToJson(info).c_str());
    return 0;
  }
  std::printf("model       %s%s (%s, %.3f B parameters), backend %s, server %s\n",
              info.model_name().c_str(), info.random_weights() ? " [RANDOM WEIGHTS]" : "",
              info.architecture().c_str(), info.parameters() / 1e9, info.backend().c_str(),
              info.server_version().c_str());
  std::printf("shape       %d layers (%d MoE from layer %d), hidden %d, vocab %d\n",
              info.num_layers(), info.num_moe_layers(), info.first_moe_layer(), info.hidden_size(),
              info.vocab_size());
  std::printf("experts     %d routed (top-%d) + %d shared\n", info.num_experts(),
              info.num_experts_per_token(), info.num_shared_experts());
  const v1::RoutingDefaults& r = info.routing_defaults();
  std::printf("routing     default %s; expert-choice capacity factor %.2f, scope %s, %s\n",
              v1::RoutingMode_Name(r.mode()).c_str(), r.capacity_factor(),
              v1::RoutingScope_Name(r.scope()).c_str(), v1::Weighting_Name(r.weighting()).c_str());
  const v1::DecodingOptions& d = info.decoding_defaults();
  std::printf("decoding    max_new_tokens %d, block_length %d, %s, threshold %.2f\n",
              d.max_new_tokens(), d.block_length(), v1::CommitPolicy_Name(d.policy()).c_str(),
              d.threshold());
  const v1::Limits& l = info.limits();
  std::printf(
      "limits      context %d, max_new_tokens %d, block %d, queue %d, sequences %d, batch tokens "
      "%d, KV cache %.2f GiB, request %lld bytes\n",
      l.context_length(), l.max_new_tokens(), l.max_block_length(), l.max_queue_length(),
      l.max_concurrent_sequences(), l.max_batch_tokens(), l.kv_cache_bytes() / 1073741824.0,
      static_cast<long long>(l.max_request_bytes()));
  return 0;
}

// Tokens per expert as a compact heat table: one row per MoE layer, one character per group of
// experts, shaded by load relative to the layer's mean.
int ExpertLoad() {
  auto stub = Connect();
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::GetExpertLoadRequest request;
  const std::string window = absl::GetFlag(FLAGS_window);
  if (window == "recent") {
    request.set_window(v1::GetExpertLoadRequest::WINDOW_RECENT);
  } else if (window != "since_start") {
    std::fprintf(stderr, "--window: \"%s\" is not since_start or recent\n", window.c_str());
    return 2;
  }
  v1::ExpertLoad load;
  grpc::Status status = stub->GetExpertLoad(&context, request, &load);
  if (!status.ok()) return Fail(status);
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", ToJson(load).c_str());
    return 0;
  }
  static constexpr absl::string_view kShades = " .:-=+*#%@";
  std::printf(
      "%lld forwards; shade = tokens per expert / layer mean: ' ' 0, '.' < 0.25, ... "
      "'@' >= 2\n",
      static_cast<long long>(load.forwards()));
  for (const v1::ExpertLoadMatrix& m : load.matrices()) {
    const int experts = m.num_experts();
    const int group = std::max(1, (experts + 63) / 64);
    std::printf("\n%s\n%-6s %-*s %9s %8s %6s %9s\n", v1::RoutingMode_Name(m.mode()).c_str(),
                "layer", (experts + group - 1) / group, "experts", "tokens", "max/mean", "cv",
                "dropped");
    for (int row = 0; row < m.num_layers(); ++row) {
      const auto* counts = m.tokens_per_expert().data() + int64_t{row} * experts;
      double sum = 0, sum_sq = 0, max = 0;
      for (int e = 0; e < experts; ++e) {
        sum += counts[e];
        sum_sq += double(counts[e]) * counts[e];
        max = std::max<double>(max, counts[e]);
      }
      const double mean = experts ? sum / experts : 0;
      std::string cells;
      for (int e0 = 0; e0 < experts; e0 += group) {
        double cell = 0;
        for (int e = e0; e < std::min(experts, e0 + group); ++e)
          cell = std::max<double>(cell, counts[e]);
        const double ratio = mean > 0 ? cell / mean : 0;
        const int shade = cell == 0 ? 0 : std::clamp(1 + static_cast<int>(ratio * 4), 1, 9);
        cells += kShades[shade];
      }
      const double cv =
          mean > 0 ? std::sqrt(std::max(0.0, sum_sq / experts - mean * mean)) / mean : 0;
      std::printf("%-6d %s %9lld %8.2f %6.3f %9lld\n", m.layers(row), cells.c_str(),
                  static_cast<long long>(m.tokens(row)), mean > 0 ? max / mean : 0.0, cv,
                  static_cast<long long>(m.dropped_tokens(row)));
    }
  }
  return 0;
}

// --- bench ---

struct Sample {
  bool ok = false;
  std::string code;        // status code name when not ok
  double first_block = 0;  // seconds, client-side
  double total = 0;        // seconds, client-side
  int64_t completion_tokens = 0;
  double server_total = 0;  // the server's timings
  double server_queue = 0;
  double server_engine = 0;
};

double Percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double pos = q * (values.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (pos - lo) * (values[hi] - values[lo]);
}

int Bench() {
  const int concurrency = absl::GetFlag(FLAGS_concurrency);
  const double duration = absl::GetFlag(FLAGS_duration_seconds);
  const int64_t max_requests = absl::GetFlag(FLAGS_requests);
  const double ec_fraction = absl::GetFlag(FLAGS_expert_choice_fraction);
  if (concurrency < 1 || (duration <= 0 && max_requests <= 0) || ec_fraction < 0 ||
      ec_fraction > 1) {
    std::fprintf(stderr,
                 "bench: needs --concurrency >= 1, --duration_seconds > 0 or --requests > 0, and "
                 "--expert_choice_fraction in [0, 1]\n");
    return 2;
  }
  if (absl::GetFlag(FLAGS_prompt).empty()) {
    std::fprintf(stderr, "bench: --prompt is empty\n");
    return 2;
  }
  auto stub = Connect();
  const v1::GenerateRequest base = RequestFromFlags();
  const absl::Time start = absl::Now();
  const absl::Time end = duration > 0 ? start + absl::Seconds(duration) : absl::InfiniteFuture();
  std::atomic<int64_t> issued{0};
  std::mutex mu;
  std::map<std::string, std::vector<Sample>> samples;  // by routing mode
  std::atomic<int64_t> done{0}, tokens{0}, errors{0};

  auto worker = [&](int w) {
    while (absl::Now() < end) {
      const int64_t n = issued.fetch_add(1);
      if (max_requests > 0 && n >= max_requests) break;
      // Deterministic, evenly spread mix: request n is expert-choice when the running count
      // floor(n * fraction) steps up at it.
      const bool ec = std::floor((n + 1) * ec_fraction) > std::floor(n * ec_fraction);
      v1::GenerateRequest request = base;
      request.mutable_routing()->set_mode(ec ? v1::ROUTING_MODE_EXPERT_CHOICE
                                             : v1::ROUTING_MODE_TOKEN_CHOICE);
      request.mutable_decoding()->set_seed(static_cast<uint64_t>(n));
      grpc::ClientContext context;
      PrepareContext(&context);
      Sample s;
      const absl::Time t0 = absl::Now();
      auto reader = stub->GenerateStream(&context, request);
      v1::GenerateResponse message;
      bool first = true;
      while (reader->Read(&message)) {
        if (first) {
          s.first_block = absl::ToDoubleSeconds(absl::Now() - t0);
          first = false;
        }
        if (message.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
          s.completion_tokens = message.usage().completion_tokens();
          s.server_total = message.timings().total_seconds();
          s.server_queue = message.timings().queue_seconds();
          s.server_engine = message.timings().engine_seconds();
        }
      }
      const grpc::Status status = reader->Finish();
      s.total = absl::ToDoubleSeconds(absl::Now() - t0);
      s.ok = status.ok();
      if (!s.ok) {
        s.code = absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()));
        ++errors;
        // Overloaded, draining or unreachable: back off instead of spinning.
        if (status.error_code() == grpc::StatusCode::UNAVAILABLE ||
            status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
          absl::SleepFor(absl::Milliseconds(100));
        }
      } else {
        tokens += s.completion_tokens;
      }
      ++done;
      std::lock_guard<std::mutex> lock(mu);
      samples[ec ? "expert_choice" : "token_choice"].push_back(std::move(s));
    }
  };
  std::vector<std::thread> threads;
  for (int w = 0; w < concurrency; ++w) threads.emplace_back(worker, w);
  std::atomic<bool> finished{false};
  std::thread progress([&] {
    while (!finished.load()) {
      absl::SleepFor(absl::Seconds(1));
      const double t = absl::ToDoubleSeconds(absl::Now() - start);
      std::fprintf(stderr, "\r[bench] %5.1f s  %lld done  %lld errors  %.1f req/s  %.1f tok/s   ",
                   t, static_cast<long long>(done.load()), static_cast<long long>(errors.load()),
                   done.load() / t, tokens.load() / t);
    }
    std::fprintf(stderr, "\n");
  });
  for (std::thread& t : threads) t.join();
  finished = true;
  progress.join();
  const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);

  nlohmann::json report = {{"target", absl::GetFlag(FLAGS_target)},
                           {"concurrency", concurrency},
                           {"seconds", elapsed},
                           {"max_new_tokens", base.decoding().max_new_tokens()},
                           {"modes", nlohmann::json::object()}};
  int64_t all_ok = 0, all_tokens = 0;
  double in_batch = 0, overhead = 0;
  std::printf("%-14s %6s %6s %8s %9s %9s %9s %9s %9s %9s\n", "routing", "ok", "errors", "req/s",
              "tok/s", "first p50", "first p99", "total p50", "total p90", "total p99");
  for (const auto& [mode, list] : samples) {
    std::vector<double> first, total;
    int64_t ok = 0, toks = 0;
    std::map<std::string, int64_t> codes;
    for (const Sample& s : list) {
      if (!s.ok) {
        ++codes[s.code];
        continue;
      }
      ++ok;
      toks += s.completion_tokens;
      first.push_back(s.first_block);
      total.push_back(s.total);
      in_batch += s.server_total - s.server_queue;
      overhead += std::max(0.0, s.server_total - s.server_queue - s.server_engine);
    }
    all_ok += ok;
    all_tokens += toks;
    const auto errs = static_cast<int64_t>(list.size()) - ok;
    std::printf("%-14s %6lld %6lld %8.2f %9.1f %9.3f %9.3f %9.3f %9.3f %9.3f\n", mode.c_str(),
                static_cast<long long>(ok), static_cast<long long>(errs), ok / elapsed,
                toks / elapsed, Percentile(first, 0.5), Percentile(first, 0.99),
                Percentile(total, 0.5), Percentile(total, 0.9), Percentile(total, 0.99));
    report["modes"][mode] = {{"ok", ok},
                             {"errors", codes},
                             {"requests_per_second", ok / elapsed},
                             {"tokens_per_second", toks / elapsed},
                             {"first_block_seconds",
                              {{"p50", Percentile(first, 0.5)},
                               {"p90", Percentile(first, 0.9)},
                               {"p99", Percentile(first, 0.99)}}},
                             {"total_seconds",
                              {{"p50", Percentile(total, 0.5)},
                               {"p90", Percentile(total, 0.9)},
                               {"p99", Percentile(total, 0.99)}}}};
  }
  const double overhead_share = in_batch > 0 ? overhead / in_batch : 0;
  std::printf(
      "all: %lld ok in %.1f s: %.2f req/s, %.1f generated tok/s; server overhead (time in "
      "the batch outside engine steps) %.2f%% of in-batch time\n",
      static_cast<long long>(all_ok), elapsed, all_ok / elapsed, all_tokens / elapsed,
      100 * overhead_share);
  report["requests_per_second"] = all_ok / elapsed;
  report["tokens_per_second"] = all_tokens / elapsed;
  report["server_overhead_share"] = overhead_share;
  if (!absl::GetFlag(FLAGS_report).empty()) {
    std::ofstream(absl::GetFlag(FLAGS_report)) << report.dump(2) << "\n";
  }
  return errors.load() > 0 && all_ok == 0 ? 1 : 0;
}

}  // namespace
}  // namespace moeserve::cli

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "moeserve client.\n"
      "usage: moeserve-cli generate|stream|info|expert-load|bench [--flags]\n"
      "  generate     one request; prints the text, statistics on stderr\n"
      "  stream       one streamed request; prints blocks as they arrive\n"
      "  info         the model, routing modes and defaults, limits\n"
      "  expert-load  tokens per expert per MoE layer and routing mode (--window recent)\n"
      "  bench        load test: --concurrency streams for --duration_seconds (or --requests),\n"
      "               a mix of routing modes (--expert_choice_fraction); throughput, latency");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::fprintf(stderr, "usage: moeserve-cli generate|stream|info|expert-load|bench [--flags]\n");
    return 2;
  }
  const std::string command = args[1];
  using namespace moeserve::cli;
  if (command == "generate") return Generate();
  if (command == "stream") return Stream();
  if (command == "info") return Info();
  if (command == "expert-load") return ExpertLoad();
  if (command == "bench") return Bench();
  std::fprintf(stderr, "unknown command \"%s\"; see moeserve-cli --help\n", command.c_str());
  return 2;
}
