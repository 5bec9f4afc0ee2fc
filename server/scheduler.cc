#include "server/scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/util/logging.h"
#include "kernels/util/status_macros.h"

namespace moeserve {

std::optional<RequestEvent> RequestHandle::Next(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return !events_.empty(); };
  if (!mu_.AwaitWithTimeout(absl::Condition(&ready), timeout)) return std::nullopt;
  RequestEvent event = std::move(events_.front());
  events_.pop_front();
  return event;
}

void RequestHandle::Cancel() {
  absl::MutexLock lock(&mu_);
  cancelled_ = true;
}

bool RequestHandle::cancelled() const {
  absl::MutexLock lock(&mu_);
  return cancelled_;
}

void RequestHandle::Push(RequestEvent event) {
  absl::MutexLock lock(&mu_);
  events_.push_back(std::move(event));
}

Scheduler::Scheduler(const Model* model, EngineOptions engine, SchedulerOptions options,
                     StepObserver observer)
    : model_(model),
      options_(options),
      engine_(model, std::move(engine)),
      observer_(std::move(observer)) {
  // Keys and values of every layer, in the cache's dtype (Model::kv_bytes_per_position).
  kv_bytes_per_position_ = model->kv_bytes_per_position();
  {
    absl::MutexLock lock(&mu_);
    stats_.kv_budget_bytes = options_.kv_cache_bytes;
  }
  thread_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

int64_t Scheduler::KvBytesNeeded(const GenerationRequest& request) const {
  return SequencePositions(static_cast<int64_t>(request.prompt.size()), request.decode) *
         kv_bytes_per_position_;
}

absl::Status Scheduler::Validate(const GenerationRequest& request) const {
  RETURN_IF_ERROR(ValidateSequence(model_->config(), request.prompt, request.decode,
                                   request.routing, engine_.can_detokenize()));
  const int64_t need = KvBytesNeeded(request);
  if (need > options_.kv_cache_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "prompt (%d tokens) + decoding.max_new_tokens (%d) need %d bytes of KV cache, over this "
        "server's whole KV budget of %d bytes",
        request.prompt.size(), request.decode.max_new_tokens, need, options_.kv_cache_bytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<RequestHandle>> Scheduler::Submit(GenerationRequest request) {
  RETURN_IF_ERROR(Validate(request));
  if (request.deadline <= absl::Now()) {
    return absl::DeadlineExceededError("the request's deadline passed before it was queued");
  }
  auto handle = std::make_shared<RequestHandle>(std::move(request));
  absl::MutexLock lock(&mu_);
  if (failed_) return absl::UnavailableError("the engine failed; this server serves no more");
  if (draining_ || stop_) return absl::UnavailableError("the server is shutting down");
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queue_length) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the queue is full (", options_.max_queue_length, " requests waiting); retry later"));
  }
  handle->submit_order_ = submitted_++;
  queue_.push_back(handle);
  stats_.queue_length = static_cast<int64_t>(queue_.size());
  return handle;
}

void Scheduler::Drain() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  stats_.draining = true;
}

bool Scheduler::WaitIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto idle = [this]()
                  ABSL_SHARED_LOCKS_REQUIRED(mu_) { return queue_.empty() && running_.empty(); };
  return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

void Scheduler::AbortAll(const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  abort_ = status;
}

SchedulerStats Scheduler::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

void Scheduler::Finish(RequestHandle& handle, absl::Status status, FinishReason finish,
                       const DecodeStats& stats, SequenceRoutingStats routing,
                       std::vector<int32_t> last_block) {
  const absl::Time now = absl::Now();
  const GenerationRequest& r = handle.request();
  RequestEvent event;
  event.final = true;
  event.tokens = std::move(last_block);
  event.status = std::move(status);
  event.finish = finish;
  event.stats = stats;
  event.routing = std::move(routing);
  const absl::Time admitted = handle.admitted_ == absl::Time() ? now : handle.admitted_;
  event.queue_time = admitted - r.arrival;
  event.first_block_time =
      handle.first_block_ == absl::Time() ? absl::ZeroDuration() : handle.first_block_ - r.arrival;
  event.total_time = now - r.arrival;
  event.engine_time = handle.engine_time_;
  if (event.status.ok()) {
    MOESERVE_LOG(INFO) << absl::StrFormat(
        "request_id=%s finished reason=%s prompt_tokens=%d completion_tokens=%d forwards=%d "
        "queue=%.3fs total=%.3fs",
        r.request_id, FinishReasonName(finish), stats.prompt_tokens, stats.generated_tokens,
        stats.forwards, absl::ToDoubleSeconds(event.queue_time),
        absl::ToDoubleSeconds(event.total_time));
  } else {
    MOESERVE_LOG(INFO) << absl::StrFormat(
        "request_id=%s ended status=%s after %.3fs: %s", r.request_id,
        absl::StatusCodeToString(event.status.code()), absl::ToDoubleSeconds(event.total_time),
        event.status.message());
  }
  handle.Push(std::move(event));
}

// Engine thread, mu_ held by the caller: moves queued requests into the engine while the budgets
// allow, highest priority first.
void Scheduler::Admit(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
  // Drop what no longer needs serving.
  for (auto it = queue_.begin(); it != queue_.end();) {
    RequestHandle& h = **it;
    if (h.cancelled()) {
      Finish(h, absl::CancelledError("cancelled by the client while queued"), FinishReason::kNone,
             {}, {});
    } else if (h.request().deadline <= now + step_estimate_) {
      Finish(h,
             absl::DeadlineExceededError(
                 "the deadline would pass before the request's first step; not started"),
             FinishReason::kNone, {}, {});
    } else {
      ++it;
      continue;
    }
    it = queue_.erase(it);
  }
  while (!queue_.empty() &&
         static_cast<int64_t>(running_.size()) < options_.max_concurrent_sequences) {
    auto best = std::min_element(queue_.begin(), queue_.end(), [](const auto& a, const auto& b) {
      if (a->request().priority != b->request().priority)
        return a->request().priority > b->request().priority;
      return a->submit_order_ < b->submit_order_;
    });
    RequestHandle& h = **best;
    const int64_t need = KvBytesNeeded(h.request());
    if (stats_.kv_reserved_bytes + need > options_.kv_cache_bytes) break;  // waits for room
    auto id = engine_.Add(h.request().prompt, h.request().decode, h.request().routing);
    if (!id.ok()) {
      Finish(h, id.status(), FinishReason::kNone, {}, {});
    } else {
      h.sequence_ = *id;
      h.kv_reserved_bytes_ = need;
      h.admitted_ = now;
      stats_.kv_reserved_bytes += need;
      running_.emplace(*id, *best);
      MOESERVE_LOG(DEBUG) << absl::StrFormat(
          "request_id=%s admitted prompt_tokens=%d routing=%s queue=%.3fs", h.request().request_id,
          h.request().prompt.size(), RoutingModeName(h.request().routing.mode),
          absl::ToDoubleSeconds(now - h.request().arrival));
    }
    queue_.erase(best);
  }
  stats_.queue_length = static_cast<int64_t>(queue_.size());
  stats_.running_sequences = static_cast<int64_t>(running_.size());
}

// Engine thread, mu_ held: ends running requests that were cancelled or ran out of time.
void Scheduler::SweepRunning(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
  for (auto it = running_.begin(); it != running_.end();) {
    RequestHandle& h = *it->second;
    absl::Status status;
    if (h.cancelled()) {
      status = absl::CancelledError("cancelled by the client");
    } else if (h.request().deadline <= now) {
      status = absl::DeadlineExceededError("the request's deadline passed while generating");
    } else {
      ++it;
      continue;
    }
    engine_.Cancel(it->first);
    stats_.kv_reserved_bytes -= h.kv_reserved_bytes_;
    Finish(h, status, FinishReason::kNone, {}, {});
    it = running_.erase(it);
  }
}

void Scheduler::FailEverything(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
  for (auto& h : queue_) Finish(*h, status, FinishReason::kNone, {}, {});
  queue_.clear();
  for (auto& [id, h] : running_) {
    engine_.Cancel(id);
    Finish(*h, status, FinishReason::kNone, {}, {});
  }
  running_.clear();
  stats_.kv_reserved_bytes = 0;
  stats_.queue_length = 0;
  stats_.running_sequences = 0;
}

void Scheduler::Loop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      auto work = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        return stop_ || abort_.has_value() || !queue_.empty() || !running_.empty();
      };
      mu_.Await(absl::Condition(&work));
      if (abort_.has_value()) {
        FailEverything(*abort_);
        abort_.reset();
      }
      if (stop_) {
        FailEverything(absl::UnavailableError("the server stopped before the request finished"));
        return;
      }
      const absl::Time now = absl::Now();
      SweepRunning(now);
      Admit(now);
      if (running_.empty()) continue;
    }

    const absl::Time start = absl::Now();
    absl::StatusOr<StepResult> step = engine_.Step();
    const absl::Duration step_time = absl::Now() - start;
    step_estimate_ =
        step_estimate_ == absl::ZeroDuration() ? step_time : 0.9 * step_estimate_ + 0.1 * step_time;

    {
      absl::MutexLock lock(&mu_);
      if (!step.ok()) {
        MOESERVE_LOG(ERROR) << "engine step failed; the server stops serving: " << step.status();
        failed_ = true;
        stats_.failed = true;
        // Reported before the requests end, so that health is NOT_SERVING by the time a client
        // sees the error.
        if (options_.on_engine_failure) options_.on_engine_failure(step.status());
        FailEverything(absl::InternalError(absl::StrCat(
            "the engine failed while running this request: ", step.status().message())));
        continue;
      }
      ++stats_.steps;
      stats_.last_batch_tokens = step->batch_tokens;
      stats_.last_batch_sequences = step->batch_sequences;
      for (auto& [id, h] : running_) h->engine_time_ += step_time;
      const absl::Time now = absl::Now();
      for (SequenceEvent& e : step->events) {
        auto it = running_.find(e.id);
        if (it == running_.end()) continue;
        RequestHandle& h = *it->second;
        if (h.first_block_ == absl::Time()) h.first_block_ = now;
        if (e.finish != FinishReason::kNone) {
          stats_.kv_reserved_bytes -= h.kv_reserved_bytes_;
          Finish(h, absl::OkStatus(), e.finish, e.stats, std::move(e.routing),
                 std::move(e.new_tokens));
          running_.erase(it);
        } else if (!e.new_tokens.empty()) {
          RequestEvent block;
          block.tokens = std::move(e.new_tokens);
          h.Push(std::move(block));
        }
      }
      stats_.running_sequences = static_cast<int64_t>(running_.size());
    }
    if (step.ok() && observer_) observer_(*step, step_time);
  }
}

}  // namespace moeserve
