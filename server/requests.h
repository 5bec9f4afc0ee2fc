// Between the public API (moeserve.v1 messages) and the engine's types: request validation with
// errors that name the field, server defaults, and responses. absl::Status becomes a gRPC status
// in one place (ToGrpcStatus).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/support/status.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/routing.h"
#include "model/tokenizer.h"
#include "moeserve/v1/moeserve.pb.h"
#include "server/expert_load.h"
#include "server/scheduler.h"

namespace moeserve {

inline constexpr int kMaxStopStrings = 16;
inline constexpr int kMaxStopBytes = 256;
inline constexpr int kMaxRequestIdLength = 128;
inline constexpr int kMaxPriority = 100;

// What a request gets when it leaves a field at zero.
struct ServingDefaults {
  RoutingOptions routing;
  DecodeOptions decode;
};

// INVALID_ARGUMENT naming the field for anything wrong; the prompt tokenized (a chat rendered
// with the template). Checks against the model and budgets follow in Scheduler::Submit.
absl::StatusOr<GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& request,
                                                      const ServingDefaults& defaults,
                                                      const Tokenizer& tokenizer);

v1::RoutingMode ToProto(RoutingMode mode);
v1::RoutingScope ToProto(RoutingScope scope);
v1::Weighting ToProto(ExpertChoiceWeighting weighting);
v1::CommitPolicy ToProto(CommitPolicy policy);
v1::FinishReason ToProto(FinishReason reason);
// Usage, routing statistics and timings of a final event.
void FillFinal(const ModelConfig& config, const GenerationRequest& request,
               const RequestEvent& final_event, v1::GenerateResponse* response);
void FillExpertLoad(const ExpertLoadSnapshot& snapshot, v1::ExpertLoad* out);

// The one place where an absl::Status becomes a gRPC status (the codes coincide).
grpc::Status ToGrpcStatus(const absl::Status& status);

// Turns a growing list of generated ids into text pieces for streaming. A piece never ends in the
// middle of a UTF-8 character (a trailing U+FFFD from bytes still incomplete is held back), and
// with stop strings the last (longest stop - 1) bytes are held back until the end, so that text
// already sent never has to be taken back when a stop string completes in a later block.
class TextStreamer {
 public:
  TextStreamer(const Tokenizer& tokenizer, std::vector<std::string> stops)
      : tokenizer_(tokenizer), stops_(std::move(stops)) {}
  // Adds a block's ids; returns the text that can be sent now.
  absl::StatusOr<std::string> Add(const std::vector<int32_t>& ids);
  // Adds the last block's ids (the caller then calls Finish).
  void AddLast(const std::vector<int32_t>& ids) { ids_.insert(ids_.end(), ids.begin(), ids.end()); }
  // The rest of the text at the end; with `stopped`, cut before the first stop string.
  absl::StatusOr<std::string> Finish(bool stopped);
  const std::vector<int32_t>& ids() const { return ids_; }

 private:
  absl::StatusOr<std::string> Text() const;
  const Tokenizer& tokenizer_;
  const std::vector<std::string> stops_;
  std::vector<int32_t> ids_;
  size_t sent_ = 0;  // bytes of the text already returned
};

}  // namespace moeserve
