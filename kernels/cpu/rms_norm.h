// RMSNorm in float32: out = x / sqrt(mean(x^2) + eps) * weight, one row at a time.
// Also used per attention head (QK-norm): a row is then one head of head_dim values.
// In-place use (out == x) is allowed.
#pragma once

#include <cstdint>

namespace moeserve::cpu {

// x, out: [num_rows, dim]; weight: [dim].
void RmsNorm(const float* x, int64_t num_rows, int64_t dim, const float* weight, float eps,
             float* out);

}  // namespace moeserve::cpu
