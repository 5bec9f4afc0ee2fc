#include "kernels/cpu/rope.h"

#include <cmath>
#include <vector>

namespace moeserve::cpu {

void ApplyRope(const RopeArgs& args) {
  const int64_t half = args.rotary_dim / 2;
  std::vector<float> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(args.rotary_dim);
    inv_freq[i] = 1.0f / std::pow(args.theta, exponent);
  }
#pragma omp parallel for schedule(static) if (args.num_tokens > 64)
  for (int64_t t = 0; t < args.num_tokens; ++t) {
    const float pos = static_cast<float>(args.positions[t]);
    std::vector<float> cos_v(half), sin_v(half);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[i];
      cos_v[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin_v[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
    for (int64_t h = 0; h < args.num_heads; ++h) {
      float* v = args.x + (t * args.num_heads + h) * args.head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_v[i] - b * sin_v[i];
        v[i + half] = b * cos_v[i] + a * sin_v[i];
      }
    }
  }
}

}  // namespace moeserve::cpu
