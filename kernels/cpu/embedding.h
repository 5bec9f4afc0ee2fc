// Embedding lookup: out[i] = float32(table[token_ids[i]]). Ids must be in [0, table.rows): the
// caller validates them (the model does, before any kernel runs).
#pragma once

#include <cstdint>

#include "kernels/tensor.h"

namespace moeserve::cpu {

// table: [vocab_size, hidden_size]; token_ids: [num_tokens]; out: [num_tokens, hidden_size].
void Embedding(const MatrixView& table, const int32_t* token_ids, int64_t num_tokens, float* out);

}  // namespace moeserve::cpu
