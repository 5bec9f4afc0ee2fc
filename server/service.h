// The moeserve.v1.MoeServe gRPC service (synchronous API: one server thread per call, which waits
// on its request's events from the scheduler).
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "grpcpp/grpcpp.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "moeserve/v1/moeserve.grpc.pb.h"
#include "server/expert_load.h"
#include "server/metrics.h"
#include "server/requests.h"
#include "server/scheduler.h"

namespace moeserve {

// What the service serves once the model is loaded and warm.
struct Backend {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<ExpertLoadTracker> expert_load;
  std::unique_ptr<ServerMetrics> metrics;  // optional; outlives the scheduler, which feeds it
  std::unique_ptr<Scheduler> scheduler;
  std::string model_name;
  bool random_weights = false;
  std::string backend = "cpu";  // DeviceName of the model's device
};

struct ServiceOptions {
  ServingDefaults defaults;
  // Non-empty: every MoeServe call needs the metadata `authorization: Bearer <token>`.
  std::string auth_token;
  int64_t max_request_bytes = 4 << 20;
  int64_t max_batch_tokens = 0;  // reported by GetModelInfo
};

class MoeServeService final : public v1::MoeServe::Service {
 public:
  explicit MoeServeService(ServiceOptions options) : options_(std::move(options)) {}

  // Serves `backend` from now on (it must outlive the service); until then every call is
  // UNAVAILABLE.
  void SetBackend(Backend* backend) { backend_.store(backend); }

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        v1::GenerateResponse* response) override;
  grpc::Status GenerateStream(grpc::ServerContext* context, const v1::GenerateRequest* request,
                              grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                            v1::ModelInfo* response) override;
  grpc::Status GetExpertLoad(grpc::ServerContext* context, const v1::GetExpertLoadRequest* request,
                             v1::ExpertLoad* response) override;

 private:
  // The backend when the caller may proceed (authenticated, model ready), else the status.
  absl::StatusOr<Backend*> Admit(const grpc::ServerContext& context) const;
  // Validates, submits and drives one generation; `on_block` sends a streamed piece (nullptr for
  // the unary call). Fills `final_response` at the end.
  grpc::Status Run(grpc::ServerContext* context, const v1::GenerateRequest& request,
                   grpc::ServerWriter<v1::GenerateResponse>* writer,
                   v1::GenerateResponse* final_response);
  // Run's work; fills `outcome` (all but the status code) for the metrics.
  grpc::Status RunGeneration(grpc::ServerContext* context, const v1::GenerateRequest& request,
                             grpc::ServerWriter<v1::GenerateResponse>* writer,
                             v1::GenerateResponse* final_response, RequestOutcome* outcome);

  const ServiceOptions options_;
  std::atomic<Backend*> backend_{nullptr};
};

}  // namespace moeserve
