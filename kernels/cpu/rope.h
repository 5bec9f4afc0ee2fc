// Partial rotary position embedding (rotate-half, as in the LLaDA2/Ling reference): the first
// `rotary_dim` of each head's `head_dim` values are rotated, the rest pass through.
//
// For pair i < rotary_dim/2 at position p: angle = p * theta^(-2i/rotary_dim),
//   x'[i]              = x[i] * cos - x[i + rotary_dim/2] * sin
//   x'[i + rotary/2]   = x[i + rotary_dim/2] * cos + x[i] * sin
// inv_freq and the angle are computed in float32 as the reference does; cos/sin of that float32
// angle are then exact to float32 rounding.
#pragma once

#include <cstdint>

namespace moeserve::cpu {

struct RopeArgs {
  float* x = nullptr;                  // [num_tokens, num_heads, head_dim], rotated in place
  const int32_t* positions = nullptr;  // [num_tokens]
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  int64_t rotary_dim = 0;  // even, <= head_dim
  float theta = 10000.0f;
};
void ApplyRope(const RopeArgs& args);

}  // namespace moeserve::cpu
