// Grouped-query attention of one sequence's chunk of queries over that sequence's keys, on the CPU.
//
// Keys and values cover absolute positions [0, num_keys); queries sit at positions
// [query_start, query_start + num_queries), with query_start + num_queries <= num_keys (the
// chunk's own K/V are the last entries). Visibility is block-causal: a query at position p sees
// key position q iff q / block_length <= p / block_length. block_length >= num_keys makes the
// attention fully bidirectional; block_length 1 is causal. Query head h reads KV head
// h / (num_heads / num_kv_heads). Softmax in float32 with max subtraction; scale 1/sqrt(head_dim).
#pragma once

#include <cstdint>

namespace moeserve::cpu {

struct AttentionArgs {
  const float* q = nullptr;  // [num_queries, num_heads, head_dim]
  const float* k = nullptr;  // [num_keys, num_kv_heads, head_dim]
  const float* v = nullptr;  // [num_keys, num_kv_heads, head_dim]
  float* out = nullptr;      // [num_queries, num_heads, head_dim]
  int64_t num_queries = 0;
  int64_t num_keys = 0;
  int64_t query_start = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_length = 0;  // > 0
};
void Attention(const AttentionArgs& args);

}  // namespace moeserve::cpu
