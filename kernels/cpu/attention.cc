#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/matmul.h"

namespace moeserve::cpu {

void Attention(const AttentionArgs& a) {
  const int64_t group = a.num_heads / a.num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(a.head_dim));
  const int64_t work = a.num_queries * a.num_heads;
#pragma omp parallel
  {
    std::vector<float> scores(a.num_keys);
#pragma omp for schedule(static)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t i = w / a.num_heads, h = w % a.num_heads, kv = h / group;
      const int64_t pos = a.query_start + i;
      // Keys visible to this query: every position whose block is not after the query's block.
      const int64_t visible = std::min(a.num_keys, (pos / a.block_length + 1) * a.block_length);
      const float* qv = a.q + (i * a.num_heads + h) * a.head_dim;
      float max_score = -INFINITY;
      for (int64_t j = 0; j < visible; ++j) {
        scores[j] = Dot(qv, a.k + (j * a.num_kv_heads + kv) * a.head_dim, a.head_dim) * scale;
        max_score = std::max(max_score, scores[j]);
      }
      float denom = 0.0f;
      for (int64_t j = 0; j < visible; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        denom += scores[j];
      }
      float* o = a.out + (i * a.num_heads + h) * a.head_dim;
      std::fill_n(o, a.head_dim, 0.0f);
      for (int64_t j = 0; j < visible; ++j) {
        const float p = scores[j] / denom;
        const float* vv = a.v + (j * a.num_kv_heads + kv) * a.head_dim;
        for (int64_t d = 0; d < a.head_dim; ++d) o[d] += p * vv[d];
      }
    }
  }
}

}  // namespace moeserve::cpu
