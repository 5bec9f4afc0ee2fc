#include "kernels/cpu/matmul.h"

#include <algorithm>
#include <vector>

namespace moeserve::cpu {

void ToFloat(DType dtype, const void* src, int64_t count, float* dst) {
  switch (dtype) {
    case DType::kF32:
      std::copy_n(static_cast<const float*>(src), count, dst);
      return;
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = Bf16ToFloat(s[i]);
      return;
    }
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void Matmul(const MatmulArgs& args) {
  const int64_t m = args.w.rows, k = args.w.cols, n = args.num_rows;
  if (n == 0 || m == 0) return;
  // Tiles of weight rows, converted to float32 once per tile and reused for every x row.
  constexpr int64_t kTileRows = 32;
  const int64_t num_tiles = (m + kTileRows - 1) / kTileRows;
#pragma omp parallel
  {
    std::vector<float> tile(args.w.dtype == DType::kF32 ? 0 : kTileRows * k);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < num_tiles; ++t) {
      const int64_t row0 = t * kTileRows;
      const int64_t rows = std::min(kTileRows, m - row0);
      const float* w;
      if (args.w.dtype == DType::kF32) {
        w = static_cast<const float*>(args.w.data) + row0 * k;
      } else {
        ToFloat(args.w.dtype, args.w.Rows(row0, rows).data, rows * k, tile.data());
        w = tile.data();
      }
      for (int64_t i = 0; i < n; ++i) {
        const float* xi = args.x + i * args.x_stride;
        float* yi = args.y + i * args.y_stride + row0;
        for (int64_t r = 0; r < rows; ++r) yi[r] = Dot(xi, w + r * k, k);
      }
    }
  }
}

}  // namespace moeserve::cpu
