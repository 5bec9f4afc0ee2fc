// y = x @ w^T on the CPU, float32 accumulation over BF16 or F32 weights.
//
// Every output element is one dot product over the whole inner dimension in a fixed order, so a
// row's result is bit-identical whatever other rows share the call (batch invariance: a request's
// output never depends on what it is batched with). Threads (OpenMP) split the weight rows.
#pragma once

#include <cstdint>

#include "kernels/tensor.h"

namespace moeserve::cpu {

// x: [num_rows, w.cols] float32, row stride x_stride (>= w.cols)
// y: [num_rows, w.rows] float32, row stride y_stride (>= w.rows)
struct MatmulArgs {
  const float* x = nullptr;
  int64_t x_stride = 0;
  int64_t num_rows = 0;
  MatrixView w;
  float* y = nullptr;
  int64_t y_stride = 0;
};
void Matmul(const MatmulArgs& args);

// Convenience for dense, unstrided operands: y[num_rows, w.rows] = x[num_rows, w.cols] @ w^T.
inline void Matmul(const float* x, int64_t num_rows, const MatrixView& w, float* y) {
  Matmul({x, w.cols, num_rows, w, y, w.rows});
}

// Converts `count` weights of `dtype` at `src` to float32.
void ToFloat(DType dtype, const void* src, int64_t count, float* dst);

// The dot product every CPU op uses: fixed summation order (8 interleaved partial sums).
float Dot(const float* a, const float* b, int64_t n);

}  // namespace moeserve::cpu
