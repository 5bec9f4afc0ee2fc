// A second stream for work that may run beside the main stream's, at the lowest priority, and
// the priorities that make that order hold.
//
// Fork(main) makes the side stream wait for what `main` has queued so far; Join(main) makes
// `main` wait for what the side stream has queued since. Both are events, so they work eagerly
// and inside a stream capture of `main` (the side stream joins the capture at Fork, and must be
// joined before the capture ends).
//
// Why priorities: the fused MoE kernels are persistent (one CTA per SM holds all its registers),
// so side-stream blocks cannot run beside them, only in the SMs they leave idle at their end. A
// main stream created with HighestStreamPriority() gets its pending blocks dispatched first, so
// side work fills those gaps instead of delaying the main stream's next kernel. A captured
// kernel keeps its stream's priority as a node attribute, which a graph honors only when
// instantiated with kGraphInstantiateFlags.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/statusor.h"

namespace moeserve::cuda {

// The numerically smallest (most urgent) stream priority of the device.
int HighestStreamPriority();

// Flags for cudaGraphInstantiate: kernel nodes keep the priority of the stream they were
// captured on.
inline constexpr unsigned long long kGraphInstantiateFlags =
    cudaGraphInstantiateFlagUseNodePriority;

class SideStream {
 public:
  SideStream() = default;  // empty: Create makes a usable one
  static absl::StatusOr<SideStream> Create();

  SideStream(SideStream&& other) noexcept;
  SideStream& operator=(SideStream&& other) noexcept;
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  ~SideStream();

  cudaStream_t stream() const { return stream_; }
  absl::Status Fork(cudaStream_t main);
  absl::Status Join(cudaStream_t main);

 private:
  void Release();
  cudaStream_t stream_ = nullptr;
  cudaEvent_t fork_ = nullptr;
  cudaEvent_t join_ = nullptr;
};

}  // namespace moeserve::cuda
