// An owning block of device memory (cudaMalloc / cudaFree), and synchronous host <-> device copies
// for setup code and tests. The ops themselves never allocate: callers pass buffers in.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace moeserve::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // `bytes` of uninitialized device memory on the current device; 0 gives an empty buffer.
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);

  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  DeviceBuffer(void* data, size_t bytes) : data_(data), bytes_(bytes) {}
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Copies `bytes` between host and device memory and waits for the copy.
absl::Status CopyToDevice(const void* host, size_t bytes, void* device);
absl::Status CopyToHost(const void* device, size_t bytes, void* host);

// A new device buffer holding a copy of `host`.
template <typename T>
absl::StatusOr<DeviceBuffer> Upload(std::span<const T> host) {
  absl::StatusOr<DeviceBuffer> buffer = DeviceBuffer::Allocate(host.size_bytes());
  if (!buffer.ok()) return buffer.status();
  if (absl::Status s = CopyToDevice(host.data(), host.size_bytes(), buffer->data()); !s.ok()) {
    return s;
  }
  return buffer;
}

// `count` elements of T copied from device memory.
template <typename T>
absl::StatusOr<std::vector<T>> Download(const T* device, size_t count) {
  std::vector<T> host(count);
  if (absl::Status s = CopyToHost(device, count * sizeof(T), host.data()); !s.ok()) return s;
  return host;
}

}  // namespace moeserve::cuda
