#include "kernels/cpu/embedding.h"

#include "kernels/cpu/matmul.h"

namespace moeserve::cpu {

void Embedding(const MatrixView& table, const int32_t* token_ids, int64_t num_tokens, float* out) {
  for (int64_t i = 0; i < num_tokens; ++i) {
    ToFloat(table.dtype, table.Rows(token_ids[i], 1).data, table.cols, out + i * table.cols);
  }
}

}  // namespace moeserve::cpu
