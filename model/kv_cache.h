// One sequence's cached keys and values, every layer: float32 on the host for the CPU forward, or
// device memory that the GPU forward keeps in device_state() (model/gpu_model.h).
//
// Positions [0, length()) are committed. A forward over a chunk at positions
// [length(), length() + n) writes the chunk's K/V right after them; committing (a prefill chunk, a
// finished block's refresh) advances length(), otherwise (a denoising step) the next forward
// overwrites them. Not thread-safe: one forward uses a cache at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/config.h"

namespace moeserve {

class KvCache {
 public:
  // What a non-CPU backend keeps for this cache (its device buffers); freed with the cache.
  class DeviceState {
   public:
    virtual ~DeviceState() = default;
    virtual int64_t bytes() const = 0;
  };

  explicit KvCache(const ModelConfig& config);

  int64_t length() const { return length_; }
  int64_t kv_size() const { return kv_size_; }
  // Makes room for positions [0, num_positions) in every layer.
  void Reserve(int64_t num_positions);
  // Marks positions [0, new_length) committed; new_length must be within the room the forward
  // made (Reserve on the CPU, the device state's capacity on the GPU).
  void Commit(int64_t new_length) { length_ = new_length; }
  // Drops everything (the sequence is done), device state included.
  void Clear();
  DeviceState* device_state() const { return device_state_.get(); }
  void set_device_state(std::unique_ptr<DeviceState> state) { device_state_ = std::move(state); }
  // [capacity, kv_size] of layer `layer`.
  float* keys(int64_t layer) { return keys_[layer].data(); }
  float* values(int64_t layer) { return values_[layer].data(); }
  int64_t capacity() const { return capacity_; }
  // Bytes held, on the host and on the device.
  int64_t bytes() const {
    return 2 * static_cast<int64_t>(keys_.size()) * capacity_ * kv_size_ * 4 +
           (device_state_ ? device_state_->bytes() : 0);
  }

 private:
  int64_t kv_size_;
  int64_t length_ = 0;
  int64_t capacity_ = 0;
  std::vector<std::vector<float>> keys_;    // [num_layers][capacity * kv_size]
  std::vector<std::vector<float>> values_;  // [num_layers][capacity * kv_size]
  std::unique_ptr<DeviceState> device_state_;
};

}  // namespace moeserve
