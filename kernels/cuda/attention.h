// Attention of a packed batch of sequence chunks over their cached K/V, on the GPU: for every
// sequence what cpu::Attention computes (grouped-query attention, block-causal visibility:
// a query at position p sees key position j iff j / block_length <= p / block_length,
// scale 1/sqrt(head_dim), float32 softmax), all sequences in one launch.
//
// A fused flash-style kernel: per (query tile, KV head, sequence) block, keys stream through
// shared memory 32 at a time with an online softmax (running max and sum per query row); no
// [queries, keys] matrix is ever stored. The query rows of one tile are (token, head) pairs of
// the KV head's query-head group, so every K/V tile loaded serves the whole group (GQA).
// Arithmetic is float32 on the CUDA cores (K/V from a F32 or BF16 cache, converted on load):
// results agree with the CPU to float32 rounding. Tensor-core (mma/wgmma) variants are not
// written yet: see docs/CUDA.md.
//
// Split keys: when the (query tile, KV head, sequence) blocks are too few to fill the GPU (a few
// sequences: 8 blocks for one 32-token block of LLaDA2.0-mini) and a workspace is given, every
// block's visible keys are cut into AttentionSplits ranges (multiples of the 32-key tile), one
// block each; each leaves its unnormalized output with its running max and sum in the workspace,
// and a merge kernel combines the ranges in a fixed order (deterministic). The split count
// depends only on the launch shape (sequence count, longest chunk, heads), never on the cached
// lengths, so a CUDA graph captured for a shape stays valid as caches grow.
//
// Limits: head_dim 16, 32, 64 or 128; num_heads / num_kv_heads divides 64; at most 65535 sequences.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/tensor.h"

namespace moeserve::cuda {

// One sequence's chunk and its cache, as the kernels read it (device memory, an array of these).
struct AttentionSequence {
  // This layer's cache, [capacity, num_kv_heads, head_dim] of the kv dtype. Keys cover positions
  // [0, query_start + num_queries); the chunk's own K/V sit at [query_start, +num_queries)
  // (AppendKv writes them).
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int32_t first_row = 0;     // the chunk's first row in the packed q, k, v and out
  int32_t num_queries = 0;   // rows of the chunk
  int32_t query_start = 0;   // absolute position of the chunk's first row
  int32_t block_length = 0;  // > 0; >= query_start + num_queries makes it bidirectional
};

struct AttentionArgs {
  const float* q = nullptr;                      // [num_tokens, num_heads, head_dim]
  const AttentionSequence* sequences = nullptr;  // device [num_sequences]
  int64_t num_sequences = 0;
  int64_t max_queries = 0;  // host copy: the longest chunk's num_queries
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  DType kv_dtype = DType::kF32;
  float* out = nullptr;               // [num_tokens, num_heads, head_dim], or null
  __nv_bfloat16* out_bf16 = nullptr;  // same shape, or null
  // Split keys (above): rows of q (the chunks' num_queries summed) and AttentionWorkspaceBytes of
  // device memory. workspace null: one range per block.
  int64_t num_tokens = 0;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};
absl::Status Attention(const AttentionArgs& args, cudaStream_t stream);

// Key ranges per block for this launch shape when a workspace is given (1: no split).
int64_t AttentionSplits(const AttentionArgs& args);
// Workspace for AttentionSplits ranges (0 when that is 1).
size_t AttentionWorkspaceBytes(const AttentionArgs& args);

// Copies each chunk's K and V rows (float32, packed like q) into its cache at positions
// [query_start, query_start + num_queries), converting to the cache's dtype.
struct KvAppendArgs {
  const float* k = nullptr;                      // [num_tokens, num_kv_heads * head_dim]
  const float* v = nullptr;                      // [num_tokens, num_kv_heads * head_dim]
  const AttentionSequence* sequences = nullptr;  // device [num_sequences]
  int64_t num_sequences = 0;
  int64_t max_queries = 0;
  int64_t kv_size = 0;  // num_kv_heads * head_dim
  DType kv_dtype = DType::kF32;
};
absl::Status AppendKv(const KvAppendArgs& args, cudaStream_t stream);

}  // namespace moeserve::cuda
