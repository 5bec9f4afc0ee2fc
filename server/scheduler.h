// The scheduler: one engine loop thread owns the model and the DiffusionEngine. RPC threads
// Submit() requests into a bounded priority queue; each engine step admits queued requests (up to
// the concurrent-sequence and KV-cache budgets), runs one forward over the prefill chunks and
// current blocks of all admitted requests (continuous batching at step granularity), and hands
// every finished block to its request at once. Cancellation and deadlines free a request's slot
// and cache within one step. Every accepted request ends with exactly one final event, carrying
// an OK or an error status: nothing accepted is dropped silently.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "model/decoder.h"
#include "model/model.h"
#include "model/routing.h"

namespace moeserve {

struct GenerationRequest {
  std::string request_id;
  std::vector<int32_t> prompt;
  DecodeOptions decode;
  RoutingOptions routing;
  int32_t priority = 0;  // higher first
  absl::Time arrival = absl::Now();
  absl::Time deadline = absl::InfiniteFuture();
};

// What a request receives: its finished blocks, then one final event (which carries the last
// block, so that text cut at a stop string is never streamed first).
struct RequestEvent {
  std::vector<int32_t> tokens;  // a finished block's generated tokens (after cuts)
  bool final = false;
  // Final only.
  absl::Status status;  // OK, or why the request ended without finishing
  FinishReason finish = FinishReason::kNone;
  DecodeStats stats;
  SequenceRoutingStats routing;
  absl::Duration queue_time;        // arrival to admission into the batch
  absl::Duration first_block_time;  // arrival to the first block (0 if none)
  absl::Duration total_time;        // arrival to the final event
  absl::Duration engine_time;       // engine steps while the request was in the batch
};

// A submitted request, shared by the scheduler and the RPC thread that waits on it.
class RequestHandle {
 public:
  explicit RequestHandle(GenerationRequest request) : request_(std::move(request)) {}
  const GenerationRequest& request() const { return request_; }
  // The next event, waiting at most `timeout`; nullopt on timeout.
  std::optional<RequestEvent> Next(absl::Duration timeout);
  // The caller has gone (client cancelled, deadline): the scheduler frees the slot at its next
  // step and ends the request with CANCELLED.
  void Cancel();
  bool cancelled() const;

 private:
  friend class Scheduler;
  void Push(RequestEvent event);

  const GenerationRequest request_;
  mutable absl::Mutex mu_;
  std::deque<RequestEvent> events_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  // Engine loop only.
  int64_t submit_order_ = 0;
  SequenceId sequence_ = 0;
  int64_t kv_reserved_bytes_ = 0;
  absl::Time admitted_;
  absl::Time first_block_;
  absl::Duration engine_time_;
};

struct SchedulerOptions {
  int64_t max_queue_length = 256;             // waiting requests; over it, RESOURCE_EXHAUSTED
  int64_t max_concurrent_sequences = 64;      // requests in the batch at once
  int64_t kv_cache_bytes = int64_t{4} << 30;  // K/V budget over all admitted requests
  // Called once, on the engine thread, when a step fails (a device error, say), before the
  // running requests end with INTERNAL: the scheduler then serves nothing more, and the server
  // turns its health NOT_SERVING so that Kubernetes restarts it. Must not call the scheduler.
  std::function<void(const absl::Status&)> on_engine_failure;
};

// A point-in-time view for metrics and health.
struct SchedulerStats {
  int64_t queue_length = 0;
  int64_t running_sequences = 0;
  int64_t kv_reserved_bytes = 0;
  int64_t kv_budget_bytes = 0;
  int64_t last_batch_tokens = 0;
  int64_t last_batch_sequences = 0;
  int64_t steps = 0;
  bool draining = false;
  bool failed = false;  // a fatal engine error: nothing more is served
};

class Scheduler {
 public:
  // Called on the engine thread after every step (expert load, metrics). Must be quick.
  using StepObserver = std::function<void(const StepResult&, absl::Duration step_time)>;

  // `model` must outlive the scheduler. Starts the engine loop thread.
  Scheduler(const Model* model, EngineOptions engine, SchedulerOptions options,
            StepObserver observer = nullptr);
  // Stops the loop; requests still open end with UNAVAILABLE.
  ~Scheduler();

  // K/V bytes a request may hold at most (prompt + max_new_tokens, whole blocks).
  int64_t KvBytesNeeded(const GenerationRequest& request) const;
  // Checks what can be checked before queueing (the engine's own validation, the KV budget).
  // INVALID_ARGUMENT naming the field.
  absl::Status Validate(const GenerationRequest& request) const;
  // Validates and queues. UNAVAILABLE when draining or failed, RESOURCE_EXHAUSTED when the queue
  // is full, DEADLINE_EXCEEDED when the deadline has passed.
  absl::StatusOr<std::shared_ptr<RequestHandle>> Submit(GenerationRequest request);

  // Stops accepting; queued and running requests go on.
  void Drain();
  // Waits until no request is queued or running, or `deadline`; true when idle.
  bool WaitIdle(absl::Time deadline);
  // Ends every queued and running request with `status` (after a drain's grace period).
  void AbortAll(const absl::Status& status);

  SchedulerStats stats() const;
  const SchedulerOptions& options() const { return options_; }

 private:
  void Loop();
  // Engine thread: ends a request with a final event.
  void Finish(RequestHandle& handle, absl::Status status, FinishReason finish,
              const DecodeStats& stats, SequenceRoutingStats routing,
              std::vector<int32_t> last_block = {});
  void Admit(absl::Time now);
  void SweepRunning(absl::Time now);
  void FailEverything(const absl::Status& status);

  const Model* model_;
  const SchedulerOptions options_;
  DiffusionEngine engine_;  // engine thread only
  StepObserver observer_;
  int64_t kv_bytes_per_position_;

  mutable absl::Mutex mu_;
  // Waiting requests in arrival order; the highest priority (then the earliest) is admitted first.
  // The loop sleeps only when nothing is queued or running, so a cancelled request is seen within
  // one step without a wake-up.
  std::vector<std::shared_ptr<RequestHandle>> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<absl::Status> abort_ ABSL_GUARDED_BY(mu_);
  int64_t submitted_ ABSL_GUARDED_BY(mu_) = 0;
  SchedulerStats stats_ ABSL_GUARDED_BY(mu_);
  // Running requests by engine sequence id; engine thread writes, guarded for stats readers.
  std::map<SequenceId, std::shared_ptr<RequestHandle>> running_ ABSL_GUARDED_BY(mu_);
  absl::Duration step_estimate_;  // engine thread: moving average of step time

  std::thread thread_;
};

}  // namespace moeserve
