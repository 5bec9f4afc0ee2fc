// Greedy proposals from logit rows on the GPU: per row the argmax token (the first maximum, never
// `excluded_token`) and its probability under softmax of the whole row, excluded token included
// in the normalization: what model/sampling.h's Propose does at temperature 0.
// The softmax sum runs in a different order than on the CPU: the probability agrees to float32
// rounding of a sum over vocab_size terms; the token is exact.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace moeserve::cuda {

struct ArgmaxArgs {
  const float* logits = nullptr;  // [num_rows, vocab_size]
  int64_t num_rows = 0;
  int64_t vocab_size = 0;       // ids considered: [0, vocab_size); >= 2 when one is excluded
  int32_t excluded_token = -1;  // the mask token; -1: none
  int32_t* token = nullptr;     // [num_rows]
  float* prob = nullptr;        // [num_rows]
  int64_t row_stride = 0;       // elements between rows, >= vocab_size; 0: vocab_size
};
absl::Status ArgmaxWithProb(const ArgmaxArgs& args, cudaStream_t stream);

}  // namespace moeserve::cuda
