#include "kernels/cuda/side_stream.h"

#include <utility>

#include "kernels/cuda/cuda_check.h"

namespace moeserve::cuda {

int HighestStreamPriority() {
  int least = 0, greatest = 0;
  if (cudaDeviceGetStreamPriorityRange(&least, &greatest) != cudaSuccess) {
    cudaGetLastError();  // not sticky; the default priority then
    return 0;
  }
  return greatest;
}

absl::StatusOr<SideStream> SideStream::Create() {
  int least = 0, greatest = 0;
  CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  SideStream s;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&s.stream_, cudaStreamNonBlocking, least));
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.fork_, cudaEventDisableTiming));
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.join_, cudaEventDisableTiming));
  return s;
}

SideStream::SideStream(SideStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)),
      fork_(std::exchange(other.fork_, nullptr)),
      join_(std::exchange(other.join_, nullptr)) {}

SideStream& SideStream::operator=(SideStream&& other) noexcept {
  if (this != &other) {
    Release();
    stream_ = std::exchange(other.stream_, nullptr);
    fork_ = std::exchange(other.fork_, nullptr);
    join_ = std::exchange(other.join_, nullptr);
  }
  return *this;
}

SideStream::~SideStream() { Release(); }

void SideStream::Release() {
  if (join_ != nullptr) cudaEventDestroy(join_);
  if (fork_ != nullptr) cudaEventDestroy(fork_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  stream_ = nullptr;
  fork_ = join_ = nullptr;
}

absl::Status SideStream::Fork(cudaStream_t main) {
  CUDA_RETURN_IF_ERROR(cudaEventRecord(fork_, main));
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_, fork_, 0));
  return absl::OkStatus();
}

absl::Status SideStream::Join(cudaStream_t main) {
  CUDA_RETURN_IF_ERROR(cudaEventRecord(join_, stream_));
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(main, join_, 0));
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
