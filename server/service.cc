#include "server/service.h"

#include <chrono>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kernels/util/logging.h"
#include "model/config.h"

namespace moeserve {
namespace {

// How often a waiting call checks whether its client went away.
constexpr absl::Duration kPollInterval = absl::Milliseconds(20);

// Compares without an early exit, so the time taken does not reveal how much of a guess matched.
bool SameToken(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

absl::Time DeadlineOf(const grpc::ServerContext& context) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

}  // namespace

absl::StatusOr<Backend*> MoeServeService::Admit(const grpc::ServerContext& context) const {
  if (!options_.auth_token.empty()) {
    const auto& metadata = context.client_metadata();
    auto it = metadata.find("authorization");
    if (it == metadata.end()) {
      return absl::UnauthenticatedError("missing metadata `authorization: Bearer <token>`");
    }
    const absl::string_view value(it->second.data(), it->second.size());
    if (!absl::StartsWithIgnoreCase(value, "bearer ") ||
        !SameToken(value.substr(7), options_.auth_token)) {
      return absl::UnauthenticatedError("wrong bearer token");  // never echo the token
    }
  }
  Backend* backend = backend_.load();
  if (backend == nullptr) return absl::UnavailableError("the model is still loading");
  return backend;
}

grpc::Status MoeServeService::Run(grpc::ServerContext* context, const v1::GenerateRequest& request,
                                  grpc::ServerWriter<v1::GenerateResponse>* writer,
                                  v1::GenerateResponse* final_response) {
  const absl::Time arrival = absl::Now();
  // The request's routing mode where it names one, else the server's default (until validated).
  RequestOutcome outcome;
  outcome.routing = options_.defaults.routing.mode;
  if (request.routing().mode() == v1::ROUTING_MODE_TOKEN_CHOICE) {
    outcome.routing = RoutingMode::kTokenChoice;
  } else if (request.routing().mode() == v1::ROUTING_MODE_EXPERT_CHOICE) {
    outcome.routing = RoutingMode::kExpertChoice;
  }
  grpc::Status status = RunGeneration(context, request, writer, final_response, &outcome);
  Backend* backend = backend_.load();
  if (backend != nullptr && backend->metrics != nullptr) {
    outcome.code = static_cast<int>(status.error_code());
    outcome.total_time = absl::Now() - arrival;
    backend->metrics->ObserveRequest(outcome);
  }
  return status;
}

grpc::Status MoeServeService::RunGeneration(grpc::ServerContext* context,
                                            const v1::GenerateRequest& request,
                                            grpc::ServerWriter<v1::GenerateResponse>* writer,
                                            v1::GenerateResponse* final_response,
                                            RequestOutcome* outcome) {
  const absl::Time arrival = absl::Now();
  auto backend = Admit(*context);
  if (!backend.ok()) return ToGrpcStatus(backend.status());
  Backend& b = **backend;
  auto generation = ToGenerationRequest(request, options_.defaults, *b.tokenizer);
  if (!generation.ok()) {
    MOESERVE_LOG(INFO) << "request_id=" << request.request_id()
                       << " rejected: " << generation.status().message();
    return ToGrpcStatus(generation.status());
  }
  outcome->routing = generation->routing.mode;
  generation->arrival = arrival;
  generation->deadline = DeadlineOf(*context);
  const std::string request_id = generation->request_id;
  auto handle = b.scheduler->Submit(*std::move(generation));
  if (!handle.ok()) {
    MOESERVE_LOG(INFO) << "request_id=" << request_id << " not queued: " << handle.status();
    return ToGrpcStatus(handle.status());
  }
  RequestHandle& h = **handle;
  // However this call ends, the request must not keep its batch slot (a no-op once finished).
  absl::Cleanup release = [&h] { h.Cancel(); };
  TextStreamer text(*b.tokenizer, h.request().decode.stop);
  while (true) {
    std::optional<RequestEvent> event = h.Next(kPollInterval);
    if (!event.has_value()) {
      if (context->IsCancelled()) {
        return grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled");
      }
      continue;
    }
    if (!event->final) {
      auto piece = text.Add(event->tokens);
      if (!piece.ok()) return ToGrpcStatus(piece.status());
      if (writer != nullptr) {
        v1::GenerateResponse block;
        block.set_request_id(request_id);
        block.set_text(*std::move(piece));
        if (request.return_token_ids()) {
          block.mutable_token_ids()->Add(event->tokens.begin(), event->tokens.end());
        }
        if (!writer->Write(block)) {
          return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
        }
      }
      continue;
    }
    outcome->queued = true;
    outcome->queue_time = event->queue_time;
    outcome->first_block_time = event->first_block_time;
    outcome->prompt_tokens = event->stats.prompt_tokens;
    outcome->generated_tokens = event->stats.generated_tokens;
    if (!event->status.ok()) return ToGrpcStatus(event->status);
    text.AddLast(event->tokens);
    auto rest = text.Finish(event->finish == FinishReason::kStop);
    if (!rest.ok()) return ToGrpcStatus(rest.status());
    final_response->set_request_id(request_id);
    if (writer != nullptr) {
      final_response->set_text(*std::move(rest));
      if (request.return_token_ids()) {
        final_response->mutable_token_ids()->Add(event->tokens.begin(), event->tokens.end());
      }
    } else {
      auto all = b.tokenizer->Decode(text.ids(), /*skip_special_tokens=*/true);
      if (!all.ok()) return ToGrpcStatus(all.status());
      std::string whole = *std::move(all);
      if (event->finish == FinishReason::kStop) {
        whole.resize(std::min(whole.size(), FindStop(whole, h.request().decode.stop)));
      }
      final_response->set_text(std::move(whole));
      if (request.return_token_ids()) {
        final_response->mutable_token_ids()->Add(text.ids().begin(), text.ids().end());
      }
    }
    FillFinal(b.model->config(), h.request(), *event, final_response);
    return grpc::Status::OK;
  }
}

grpc::Status MoeServeService::Generate(grpc::ServerContext* context,
                                       const v1::GenerateRequest* request,
                                       v1::GenerateResponse* response) {
  return Run(context, *request, nullptr, response);
}

grpc::Status MoeServeService::GenerateStream(grpc::ServerContext* context,
                                             const v1::GenerateRequest* request,
                                             grpc::ServerWriter<v1::GenerateResponse>* writer) {
  v1::GenerateResponse final_response;
  grpc::Status status = Run(context, *request, writer, &final_response);
  if (!status.ok()) return status;
  writer->Write(final_response);
  return grpc::Status::OK;
}

grpc::Status MoeServeService::GetModelInfo(grpc::ServerContext* context,
                                           const v1::GetModelInfoRequest* request,
                                           v1::ModelInfo* response) {
  auto backend = Admit(*context);
  if (!backend.ok()) return ToGrpcStatus(backend.status());
  const Backend& b = **backend;
  const ModelConfig& c = b.model->config();
  response->set_architecture(c.model_type);
  response->set_model_name(b.model_name);
  response->set_random_weights(b.random_weights);
  response->set_parameters(ParameterCount(c));
  response->set_vocab_size(static_cast<int32_t>(c.vocab_size));
  response->set_hidden_size(static_cast<int32_t>(c.hidden_size));
  response->set_num_layers(static_cast<int32_t>(c.num_hidden_layers));
  response->set_num_moe_layers(static_cast<int32_t>(c.num_moe_layers()));
  response->set_first_moe_layer(static_cast<int32_t>(c.first_k_dense_replace));
  response->set_num_experts(static_cast<int32_t>(c.num_experts));
  response->set_num_experts_per_token(static_cast<int32_t>(c.num_experts_per_tok));
  response->set_num_shared_experts(static_cast<int32_t>(c.num_shared_experts));
  if (auto mask = b.tokenizer->mask_id()) response->set_mask_token_id(*mask);
  for (auto id : {b.tokenizer->eos_id(), b.tokenizer->role_end_id()}) {
    if (id.has_value()) response->add_stop_token_ids(*id);
  }
  response->add_routing_modes(v1::ROUTING_MODE_TOKEN_CHOICE);
  response->add_routing_modes(v1::ROUTING_MODE_EXPERT_CHOICE);
  const RoutingOptions& r = options_.defaults.routing;
  v1::RoutingDefaults* rd = response->mutable_routing_defaults();
  rd->set_mode(ToProto(r.mode));
  rd->set_capacity_factor(r.capacity_factor);
  rd->set_scope(ToProto(r.scope));
  rd->set_weighting(ToProto(r.weighting));
  const DecodeOptions& d = options_.defaults.decode;
  v1::DecodingOptions* dd = response->mutable_decoding_defaults();
  dd->set_max_new_tokens(static_cast<int32_t>(d.max_new_tokens));
  dd->set_block_length(static_cast<int32_t>(d.block_length));
  dd->set_policy(ToProto(d.policy));
  dd->set_threshold(d.threshold);
  dd->set_steps(static_cast<int32_t>(d.steps));
  dd->set_temperature(d.sampling.temperature);
  dd->set_top_k(static_cast<int32_t>(d.sampling.top_k));
  dd->set_top_p(d.sampling.top_p);
  v1::Limits* limits = response->mutable_limits();
  limits->set_max_new_tokens(static_cast<int32_t>(kMaxNewTokensLimit));
  limits->set_max_block_length(static_cast<int32_t>(kMaxBlockLength));
  limits->set_context_length(static_cast<int32_t>(c.max_position_embeddings));
  limits->set_max_stop_strings(kMaxStopStrings);
  const SchedulerOptions& s = b.scheduler->options();
  limits->set_max_queue_length(static_cast<int32_t>(s.max_queue_length));
  limits->set_max_concurrent_sequences(static_cast<int32_t>(s.max_concurrent_sequences));
  limits->set_max_batch_tokens(static_cast<int32_t>(options_.max_batch_tokens));
  limits->set_kv_cache_bytes(s.kv_cache_bytes);
  limits->set_max_request_bytes(options_.max_request_bytes);
  limits->set_max_capacity_factor(kMaxCapacityFactor);
  response->set_backend(b.backend);
  response->set_server_version(MOESERVE_VERSION);
  return grpc::Status::OK;
}

grpc::Status MoeServeService::GetExpertLoad(grpc::ServerContext* context,
                                            const v1::GetExpertLoadRequest* request,
                                            v1::ExpertLoad* response) {
  auto backend = Admit(*context);
  if (!backend.ok()) return ToGrpcStatus(backend.status());
  const ExpertLoadTracker& load = *(*backend)->expert_load;
  switch (request->window()) {
    case v1::GetExpertLoadRequest::WINDOW_UNSPECIFIED:
    case v1::GetExpertLoadRequest::WINDOW_SINCE_START:
      response->set_window(v1::GetExpertLoadRequest::WINDOW_SINCE_START);
      FillExpertLoad(load.SinceStart(), response);
      break;
    case v1::GetExpertLoadRequest::WINDOW_RECENT:
      response->set_window(v1::GetExpertLoadRequest::WINDOW_RECENT);
      FillExpertLoad(load.Recent(), response);
      break;
    default:
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("window: ", request->window(), " is not a Window"));
  }
  return grpc::Status::OK;
}

}  // namespace moeserve
