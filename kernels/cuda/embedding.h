// Embedding lookup on the GPU: out[i] = float32(table[token_ids[i]]), as cpu::Embedding.
// Ids must be in [0, table.rows): the caller validates them before any kernel runs (the model
// does); the kernel does not check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/tensor.h"

namespace moeserve::cuda {

// table: device [vocab_size, hidden_size], BF16 or F32; token_ids: device [num_tokens];
// out: device [num_tokens, hidden_size].
absl::Status Embedding(const MatrixView& table, const int32_t* token_ids, int64_t num_tokens,
                       float* out, cudaStream_t stream);

}  // namespace moeserve::cuda
