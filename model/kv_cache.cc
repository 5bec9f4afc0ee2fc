#include "model/kv_cache.h"

#include <algorithm>

namespace moeserve {

KvCache::KvCache(const ModelConfig& config)
    : kv_size_(config.kv_size()),
      keys_(config.num_hidden_layers),
      values_(config.num_hidden_layers) {}

void KvCache::Reserve(int64_t num_positions) {
  if (num_positions <= capacity_) return;
  // Grow geometrically so that block-by-block decoding reallocates O(log n) times.
  capacity_ = std::max(num_positions, capacity_ + capacity_ / 2);
  for (auto& k : keys_) k.resize(capacity_ * kv_size_);
  for (auto& v : values_) v.resize(capacity_ * kv_size_);
}

void KvCache::Clear() {
  length_ = 0;
  capacity_ = 0;
  for (auto& k : keys_) std::vector<float>().swap(k);
  for (auto& v : values_) std::vector<float>().swap(v);
  device_state_.reset();
}

}  // namespace moeserve
