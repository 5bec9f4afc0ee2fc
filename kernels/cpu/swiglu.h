// SwiGLU activation over a fused gate/up projection: h = silu(gate) * up, silu(g) = g / (1 + e^-g).
#pragma once

#include <cstdint>

namespace moeserve::cpu {

// gate_up: [num_rows, 2 * width] (gate in the first `width` columns, up in the next);
// out: [num_rows, width].
void SwiGlu(const float* gate_up, int64_t num_rows, int64_t width, float* out);

}  // namespace moeserve::cpu
