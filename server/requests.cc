#include "server/requests.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/util/status_macros.h"

namespace moeserve {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

absl::Status ToRouting(const v1::RoutingOptions& in, const RoutingOptions& defaults,
                       RoutingOptions* out) {
  *out = defaults;
  switch (in.mode()) {
    case v1::ROUTING_MODE_UNSPECIFIED:
      break;
    case v1::ROUTING_MODE_TOKEN_CHOICE:
      out->mode = RoutingMode::kTokenChoice;
      break;
    case v1::ROUTING_MODE_EXPERT_CHOICE:
      out->mode = RoutingMode::kExpertChoice;
      break;
    default:
      return Invalid("routing.mode", absl::StrCat(in.mode(), " is not a RoutingMode"));
  }
  // 0 means the default; anything else (negative, NaN, over the limit) is checked as given.
  if (in.capacity_factor() != 0.0) out->capacity_factor = in.capacity_factor();
  switch (in.scope()) {
    case v1::ROUTING_SCOPE_UNSPECIFIED:
      break;
    case v1::ROUTING_SCOPE_REQUEST:
      out->scope = RoutingScope::kRequest;
      break;
    case v1::ROUTING_SCOPE_BATCH:
      out->scope = RoutingScope::kBatch;
      break;
    default:
      return Invalid("routing.scope", absl::StrCat(in.scope(), " is not a RoutingScope"));
  }
  switch (in.weighting()) {
    case v1::WEIGHTING_UNSPECIFIED:
      break;
    case v1::WEIGHTING_RENORMALIZED:
      out->weighting = ExpertChoiceWeighting::kRenormalized;
      break;
    case v1::WEIGHTING_RAW:
      out->weighting = ExpertChoiceWeighting::kRaw;
      break;
    default:
      return Invalid("routing.weighting", absl::StrCat(in.weighting(), " is not a Weighting"));
  }
  if (absl::Status s = ValidateRoutingOptions(*out); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("routing.", s.message()));
  }
  return absl::OkStatus();
}

absl::Status ToDecode(const v1::DecodingOptions& in, const DecodeOptions& defaults,
                      DecodeOptions* out) {
  *out = defaults;
  if (in.max_new_tokens() != 0) out->max_new_tokens = in.max_new_tokens();
  if (in.block_length() != 0) out->block_length = in.block_length();
  switch (in.policy()) {
    case v1::COMMIT_POLICY_UNSPECIFIED:
      break;
    case v1::COMMIT_POLICY_THRESHOLD:
      out->policy = CommitPolicy::kThreshold;
      break;
    case v1::COMMIT_POLICY_SCHEDULED:
      out->policy = CommitPolicy::kScheduled;
      break;
    default:
      return Invalid("decoding.policy", absl::StrCat(in.policy(), " is not a CommitPolicy"));
  }
  if (in.has_threshold()) out->threshold = in.threshold();
  out->steps = in.steps();
  out->sampling.temperature = in.temperature();
  out->sampling.top_k = in.top_k();
  if (in.top_p() != 0.0) out->sampling.top_p = in.top_p();
  out->seed = in.seed();
  if (in.stop_size() > kMaxStopStrings) {
    return Invalid("decoding.stop", absl::StrCat(in.stop_size(), " strings, at most ",
                                                 kMaxStopStrings, " are allowed"));
  }
  out->stop.clear();
  for (int i = 0; i < in.stop_size(); ++i) {
    if (in.stop(i).size() > kMaxStopBytes) {
      return Invalid(absl::StrCat("decoding.stop[", i, "]"),
                     absl::StrCat(in.stop(i).size(), " bytes, at most ", kMaxStopBytes));
    }
    out->stop.push_back(in.stop(i));
  }
  return ValidateDecodeOptions(*out);
}

absl::Status CheckRequestId(absl::string_view id) {
  if (id.size() > kMaxRequestIdLength) {
    return Invalid("request_id",
                   absl::StrCat(id.size(), " characters, at most ", kMaxRequestIdLength));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    if (id[i] < 0x21 || id[i] > 0x7e) {
      return Invalid("request_id", absl::StrCat("byte ", i, " is not printable ASCII"));
    }
  }
  return absl::OkStatus();
}

std::string NewRequestId() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t salt = static_cast<uint64_t>(absl::ToUnixMicros(absl::Now()));
  return absl::StrCat("req-", absl::Hex(salt & 0xffffff, absl::kZeroPad6), "-", ++counter);
}

}  // namespace

absl::StatusOr<GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& request,
                                                      const ServingDefaults& defaults,
                                                      const Tokenizer& tokenizer) {
  GenerationRequest out;
  RETURN_IF_ERROR(CheckRequestId(request.request_id()));
  out.request_id = request.request_id().empty() ? NewRequestId() : request.request_id();
  if (request.priority() < -kMaxPriority || request.priority() > kMaxPriority) {
    return Invalid("priority", absl::StrCat(request.priority(), " is outside [-", kMaxPriority,
                                            ", ", kMaxPriority, "]"));
  }
  out.priority = request.priority();
  RETURN_IF_ERROR(ToRouting(request.routing(), defaults.routing, &out.routing));
  RETURN_IF_ERROR(ToDecode(request.decoding(), defaults.decode, &out.decode));
  switch (request.input_case()) {
    case v1::GenerateRequest::kPrompt: {
      if (request.prompt().empty()) return Invalid("prompt", "is empty");
      auto ids = tokenizer.Encode(request.prompt());
      if (!ids.ok()) return Invalid("prompt", ids.status().message());
      out.prompt = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kMessages: {
      const auto& messages = request.messages().messages();
      if (messages.empty()) return Invalid("messages", "is empty");
      std::vector<ChatMessage> chat;
      for (const v1::ChatMessage& m : messages) chat.push_back({m.role(), m.content()});
      auto text = RenderChat(chat, /*add_generation_prompt=*/true);
      if (!text.ok()) return absl::InvalidArgumentError(text.status().message());
      auto ids = tokenizer.Encode(*text);
      if (!ids.ok()) return Invalid("messages", ids.status().message());
      out.prompt = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kPromptTokenIds:
      if (request.prompt_token_ids().ids().empty()) return Invalid("prompt_token_ids", "is empty");
      out.prompt.assign(request.prompt_token_ids().ids().begin(),
                        request.prompt_token_ids().ids().end());
      break;
    default:
      return Invalid("prompt", "one of prompt, messages or prompt_token_ids is required");
  }
  return out;
}

v1::RoutingMode ToProto(RoutingMode mode) {
  return mode == RoutingMode::kExpertChoice ? v1::ROUTING_MODE_EXPERT_CHOICE
                                            : v1::ROUTING_MODE_TOKEN_CHOICE;
}
v1::RoutingScope ToProto(RoutingScope scope) {
  return scope == RoutingScope::kBatch ? v1::ROUTING_SCOPE_BATCH : v1::ROUTING_SCOPE_REQUEST;
}
v1::Weighting ToProto(ExpertChoiceWeighting weighting) {
  return weighting == ExpertChoiceWeighting::kRaw ? v1::WEIGHTING_RAW : v1::WEIGHTING_RENORMALIZED;
}
v1::CommitPolicy ToProto(CommitPolicy policy) {
  return policy == CommitPolicy::kScheduled ? v1::COMMIT_POLICY_SCHEDULED
                                            : v1::COMMIT_POLICY_THRESHOLD;
}
v1::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    default:
      return v1::FINISH_REASON_UNSPECIFIED;
  }
}

void FillFinal(const ModelConfig& config, const GenerationRequest& request,
               const RequestEvent& final_event, v1::GenerateResponse* response) {
  response->set_finish_reason(ToProto(final_event.finish));
  const DecodeStats& s = final_event.stats;
  v1::Usage* usage = response->mutable_usage();
  usage->set_prompt_tokens(static_cast<int32_t>(request.prompt.size()));
  usage->set_completion_tokens(static_cast<int32_t>(s.generated_tokens));
  usage->set_forwards(static_cast<int32_t>(s.forwards));
  usage->set_denoising_steps(static_cast<int32_t>(s.denoising_steps));
  usage->set_tokens_per_forward(s.tokens_per_forward());

  v1::RoutingStats* routing = response->mutable_routing_stats();
  v1::RoutingOptions* options = routing->mutable_routing();
  options->set_mode(ToProto(request.routing.mode));
  if (request.routing.mode == RoutingMode::kExpertChoice) {
    options->set_capacity_factor(request.routing.capacity_factor);
    options->set_scope(ToProto(request.routing.scope));
    options->set_weighting(ToProto(request.routing.weighting));
  }
  const SequenceRoutingStats& r = final_event.routing;
  for (size_t l = 0; l < r.experts_per_token.size(); ++l) {
    if (!config.IsMoeLayer(static_cast<int64_t>(l))) continue;
    v1::LayerRoutingStats* layer = routing->add_layers();
    layer->set_layer(static_cast<int32_t>(l));
    layer->set_dropped_tokens(l < r.dropped_tokens.size() ? r.dropped_tokens[l] : 0);
    int64_t tokens = 0, assignments = 0;
    for (size_t j = 0; j < r.experts_per_token[l].size(); ++j) {
      layer->add_experts_per_token_histogram(r.experts_per_token[l][j]);
      tokens += r.experts_per_token[l][j];
      assignments += static_cast<int64_t>(j) * r.experts_per_token[l][j];
    }
    layer->set_effective_capacity_factor(
        tokens ? static_cast<double>(assignments) /
                     (static_cast<double>(tokens) * config.num_experts_per_tok)
               : 0.0);
  }

  v1::Timings* t = response->mutable_timings();
  t->set_queue_seconds(absl::ToDoubleSeconds(final_event.queue_time));
  t->set_first_block_seconds(absl::ToDoubleSeconds(final_event.first_block_time));
  t->set_total_seconds(absl::ToDoubleSeconds(final_event.total_time));
  t->set_engine_seconds(absl::ToDoubleSeconds(final_event.engine_time));
}

void FillExpertLoad(const ExpertLoadSnapshot& snapshot, v1::ExpertLoad* out) {
  out->set_forwards(snapshot.forwards);
  for (int m = 0; m < kNumRoutingModes; ++m) {
    const ExpertLoadCounts& counts = snapshot.by_mode[m];
    v1::ExpertLoadMatrix* matrix = out->add_matrices();
    matrix->set_mode(ToProto(static_cast<RoutingMode>(m)));
    matrix->set_num_layers(static_cast<int32_t>(snapshot.layers.size()));
    matrix->set_num_experts(static_cast<int32_t>(snapshot.num_experts));
    matrix->mutable_layers()->Add(snapshot.layers.begin(), snapshot.layers.end());
    matrix->mutable_tokens_per_expert()->Add(counts.tokens_per_expert.begin(),
                                             counts.tokens_per_expert.end());
    matrix->mutable_tokens()->Add(counts.tokens.begin(), counts.tokens.end());
    matrix->mutable_dropped_tokens()->Add(counts.dropped_tokens.begin(),
                                          counts.dropped_tokens.end());
  }
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::StatusOr<std::string> TextStreamer::Text() const {
  return tokenizer_.Decode(ids_, /*skip_special_tokens=*/true);
}

absl::StatusOr<std::string> TextStreamer::Add(const std::vector<int32_t>& ids) {
  ids_.insert(ids_.end(), ids.begin(), ids.end());
  ASSIGN_OR_RETURN(std::string text, Text());
  size_t end = text.size();
  // Hold back trailing replacement characters: their bytes may complete in the next block.
  static constexpr absl::string_view kReplacement = "\xEF\xBF\xBD";
  while (end >= sent_ + kReplacement.size() &&
         absl::string_view(text).substr(end - kReplacement.size(), kReplacement.size()) ==
             kReplacement) {
    end -= kReplacement.size();
  }
  size_t hold = 0;
  for (const std::string& stop : stops_) hold = std::max(hold, stop.size() - 1);
  end = end > sent_ + hold ? end - hold : sent_;
  while (end > sent_ && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  std::string piece = text.substr(sent_, end - sent_);
  sent_ = end;
  return piece;
}

absl::StatusOr<std::string> TextStreamer::Finish(bool stopped) {
  ASSIGN_OR_RETURN(std::string text, Text());
  size_t end = text.size();
  if (stopped) end = std::min(end, FindStop(text, stops_));
  if (end <= sent_) return std::string();
  std::string piece = text.substr(sent_, end - sent_);
  sent_ = end;
  return piece;
}

}  // namespace moeserve
