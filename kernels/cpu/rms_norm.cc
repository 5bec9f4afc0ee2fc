#include "kernels/cpu/rms_norm.h"

#include <cmath>

#include "kernels/cpu/matmul.h"

namespace moeserve::cpu {

void RmsNorm(const float* x, int64_t num_rows, int64_t dim, const float* weight, float eps,
             float* out) {
#pragma omp parallel for schedule(static) if (num_rows * dim > 65536)
  for (int64_t r = 0; r < num_rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = out + r * dim;
    const float mean_sq = Dot(xr, xr, dim) / static_cast<float>(dim);
    const float scale = 1.0f / std::sqrt(mean_sq + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * scale);
  }
}

}  // namespace moeserve::cpu
