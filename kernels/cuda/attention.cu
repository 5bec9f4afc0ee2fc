// Flash-style attention on the CUDA cores; attention.h states what it computes.
//
// Block: 256 threads, a tile of kRows = 64 query rows (row r = token r / group, head r % group of
// one KV head's group) against keys in tiles of kKeys = 32. Per key tile:
//   1. K and V rows are converted to float32 into shared memory (16-byte loads).
//   2. Scores: thread (ty, tx) computes rows {ty, ty + 32} x keys {tx, tx + 8, tx + 16, tx + 24},
//      float4 at a time over head_dim (row strides padded by 4 floats: conflict-free).
//   3. Softmax: 4 threads per row take 8 scores each, update the row's running max m and sum l,
//      and leave p = exp(s - m_new) and the rescale factor exp(m_old - m_new) in shared memory.
//   4. Output: warp w owns rows 8w .. 8w + 7, lane l owns head_dim / 32 consecutive dimensions
//      (one for head_dim 16, where lanes 16..31 idle); accumulators are rescaled, then accumulate
//      p * v over the tile's keys.
// Masked scores (keys past a row's block-causal limit, or past the cache) are -inf and give p = 0.
// The final division by l happens once per row at the end. With split keys (attention.h) a block
// takes one range of its tile's keys and leaves acc, m and l per row; MergeSplitsKernel rescales
// the ranges to their common max and divides once.
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"

namespace moeserve::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 64;
constexpr int kKeys = 32;
constexpr int kPad = 4;
constexpr int kMaxSplits = 16;

template <int kDim>
struct Layout {
  static constexpr int kQStride = kDim + kPad;
  static constexpr int kKStride = kDim + kPad;
  static constexpr int kPStride = kKeys + 1;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kRows * kQStride;
  static constexpr int kV = kK + kKeys * kKStride;
  static constexpr int kP = kV + kKeys * kDim;
  static constexpr int kAlpha = kP + kRows * kPStride;
  static constexpr int kL = kAlpha + kRows;
  static constexpr int kLimit = kL + kRows;  // int32
  static constexpr int kFloats = kLimit + kRows;
  static constexpr size_t kBytes = kFloats * sizeof(float);
};

// 4 consecutive elements of a row as float32.
__device__ __forceinline__ float4 Load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

// 8 consecutive elements (16 bytes of BF16, 32 of F32) into dst.
__device__ __forceinline__ void Load8(const float* src, float* dst) {
  *reinterpret_cast<float4*>(dst) = Load4(src);
  *reinterpret_cast<float4*>(dst + 4) = Load4(src + 4);
}
__device__ __forceinline__ void Load8(const __nv_bfloat16* src, float* dst) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    dst[2 * i] = f.x;
    dst[2 * i + 1] = f.y;
  }
}

// kN (1, 2 or 4) consecutive floats of shared memory in one load.
template <int kN>
__device__ __forceinline__ void LoadLane(const float* src, float* dst) {
  static_assert(kN == 1 || kN == 2 || kN == 4, "head_dim 16 to 128: 1 to 4 dimensions a lane");
  if constexpr (kN == 1) {
    dst[0] = *src;
  } else if constexpr (kN == 4) {
    const float4 v = Load4(src);
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
  } else {
    const float2 v = *reinterpret_cast<const float2*>(src);
    dst[0] = v.x;
    dst[1] = v.y;
  }
}

template <int kDim, typename KV>
__global__ void __launch_bounds__(kThreads)
    AttentionKernel(const float* __restrict__ q, const AttentionSequence* __restrict__ sequences,
                    int num_heads, int num_kv_heads, float scale, float* __restrict__ out,
                    __nv_bfloat16* __restrict__ out_bf16, int num_splits, int64_t num_tokens,
                    float* __restrict__ part_acc, float2* __restrict__ part_ml) {
  using L = Layout<kDim>;
  constexpr int kDimsPerLane = kDim >= kWarpSize ? kDim / kWarpSize : 1;
  static_assert(kDim % 16 == 0 && kDim <= 128, "head_dim 16, 32, 64 or 128");
  extern __shared__ float smem[];
  float* qs = smem + L::kQ;
  float* ks = smem + L::kK;
  float* vs = smem + L::kV;
  float* ps = smem + L::kP;
  float* row_alpha = smem + L::kAlpha;
  float* row_l = smem + L::kL;
  int* row_limit = reinterpret_cast<int*>(smem + L::kLimit);

  const AttentionSequence seq = sequences[blockIdx.z];
  const int kv = blockIdx.y;
  const int group = num_heads / num_kv_heads;
  const int tokens_per_tile = kRows / group;
  const int split = blockIdx.x % num_splits;
  const int first_token = blockIdx.x / num_splits * tokens_per_tile;  // chunk-relative
  if (first_token >= seq.num_queries) return;
  const int tile_tokens = min(tokens_per_tile, seq.num_queries - first_token);
  const int num_keys = seq.query_start + seq.num_queries;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const bool lane_has_dims = lane * kDimsPerLane < kDim;

  // Query rows (zeros past the chunk) and their visible-key limits.
  for (int idx = tid; idx < kRows * (kDim / 4); idx += kThreads) {
    const int r = idx / (kDim / 4), d = (idx % (kDim / 4)) * 4;
    const int t = r / group;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (t < tile_tokens) {
      const int64_t row = seq.first_row + first_token + t;
      v = Load4(q + (row * num_heads + kv * group + r % group) * kDim + d);
    }
    *reinterpret_cast<float4*>(qs + r * L::kQStride + d) = v;
  }
  for (int r = tid; r < kRows; r += kThreads) {
    const int t = r / group;
    const int pos = seq.query_start + first_token + t;
    row_limit[r] =
        t < tile_tokens ? min(num_keys, (pos / seq.block_length + 1) * seq.block_length) : 0;
  }
  const int last_pos = seq.query_start + first_token + tile_tokens - 1;
  const int tile_keys = min(num_keys, (last_pos / seq.block_length + 1) * seq.block_length);
  // This block's keys: one of num_splits ranges of whole key tiles.
  const int range = static_cast<int>(CeilDiv(CeilDiv(tile_keys, num_splits), kKeys)) * kKeys;
  const int key_begin = min(tile_keys, split * range);
  const int key_end = min(tile_keys, key_begin + range);

  const KV* k_cache = static_cast<const KV*>(seq.k_cache);
  const KV* v_cache = static_cast<const KV*>(seq.v_cache);
  // Softmax role: row tid / 4, quarter tid % 4 of the key tile.
  const int sm_row = tid / 4, sm_part = tid % 4;
  float m = -INFINITY, l = 0.0f;
  // Output role: rows 8 * warp + i, dims lane * kDimsPerLane + j.
  float acc[8][kDimsPerLane];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) acc[i][j] = 0.0f;
  }
  // Score role.
  const int ty = tid / 8, tx = tid % 8;

  for (int key0 = key_begin; key0 < key_end; key0 += kKeys) {
    for (int idx = tid; idx < kKeys * (kDim / 8); idx += kThreads) {
      const int j = idx / (kDim / 8), d = (idx % (kDim / 8)) * 8;
      const int key = key0 + j;
      float kf[8], vf[8];
      if (key < num_keys) {
        const int64_t off = (static_cast<int64_t>(key) * num_kv_heads + kv) * kDim + d;
        Load8(k_cache + off, kf);
        Load8(v_cache + off, vf);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) kf[i] = vf[i] = 0.0f;
      }
      float* kd = ks + j * L::kKStride + d;
      float* vd = vs + j * kDim + d;
      *reinterpret_cast<float4*>(kd) = make_float4(kf[0], kf[1], kf[2], kf[3]);
      *reinterpret_cast<float4*>(kd + 4) = make_float4(kf[4], kf[5], kf[6], kf[7]);
      *reinterpret_cast<float4*>(vd) = make_float4(vf[0], vf[1], vf[2], vf[3]);
      *reinterpret_cast<float4*>(vd + 4) = make_float4(vf[4], vf[5], vf[6], vf[7]);
    }
    __syncthreads();

    float s[2][4];
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
      for (int c = 0; c < 4; ++c) s[a][c] = 0.0f;
    }
#pragma unroll 4
    for (int d = 0; d < kDim; d += 4) {
      const float4 q0 = Load4(qs + ty * L::kQStride + d);
      const float4 q1 = Load4(qs + (ty + 32) * L::kQStride + d);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float4 kk = Load4(ks + (tx + 8 * c) * L::kKStride + d);
        s[0][c] += q0.x * kk.x + q0.y * kk.y + q0.z * kk.z + q0.w * kk.w;
        s[1][c] += q1.x * kk.x + q1.y * kk.y + q1.z * kk.z + q1.w * kk.w;
      }
    }
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      const int r = ty + 32 * a;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int j = tx + 8 * c;
        ps[r * L::kPStride + j] = key0 + j < row_limit[r] ? s[a][c] * scale : -INFINITY;
      }
    }
    __syncthreads();

    {
      float* pr = ps + sm_row * L::kPStride + sm_part * 8;
      float tile_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < 8; ++i) tile_max = fmaxf(tile_max, pr[i]);
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
      const float m_new = fmaxf(m, tile_max);
      float alpha = 1.0f, tile_sum = 0.0f;
      if (m_new != -INFINITY) {
        alpha = expf(m - m_new);  // 0 while m is -inf
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float p = expf(pr[i] - m_new);
          pr[i] = p;
          tile_sum += p;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) pr[i] = 0.0f;
      }
      tile_sum += __shfl_xor_sync(kFullMask, tile_sum, 1);
      tile_sum += __shfl_xor_sync(kFullMask, tile_sum, 2);
      l = l * alpha + tile_sum;
      m = m_new;
      if (sm_part == 0) row_alpha[sm_row] = alpha;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float alpha = row_alpha[warp * 8 + i];
#pragma unroll
      for (int j = 0; j < kDimsPerLane; ++j) acc[i][j] *= alpha;
    }
    const int keys_here = min(kKeys, key_end - key0);
    for (int j = 0; j < keys_here && lane_has_dims; ++j) {
      float v[kDimsPerLane];
      LoadLane<kDimsPerLane>(vs + j * kDim + lane * kDimsPerLane, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float p = ps[(warp * 8 + i) * L::kPStride + j];
#pragma unroll
        for (int d = 0; d < kDimsPerLane; ++d) acc[i][d] += p * v[d];
      }
    }
    __syncthreads();  // ks, vs, ps are rewritten by the next tile
  }

  if (sm_part == 0) {
    row_l[sm_row] = l;
    row_alpha[sm_row] = m;  // the running max (no rescale factor is read past the loop)
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = warp * 8 + i;
    const int t = r / group;
    if (t >= tile_tokens || !lane_has_dims) continue;
    const int64_t row = seq.first_row + first_token + t;
    const int64_t head_row = row * num_heads + kv * group + r % group;
    if (num_splits > 1) {
      // This range's share: acc unnormalized, with m and l (rows with no visible key here:
      // l = 0, which the merge skips).
      const int64_t slot = split * num_tokens * num_heads + head_row;
      if (lane == 0) part_ml[slot] = make_float2(row_alpha[r], row_l[r]);
      if (row_l[r] == 0.0f) continue;
#pragma unroll
      for (int d = 0; d < kDimsPerLane; ++d)
        part_acc[slot * kDim + lane * kDimsPerLane + d] = acc[i][d];
      continue;
    }
    const int64_t base = head_row * kDim + lane * kDimsPerLane;
    const float inv_l = 1.0f / row_l[r];
#pragma unroll
    for (int d = 0; d < kDimsPerLane; ++d) {
      const float o = acc[i][d] * inv_l;
      if (out != nullptr) out[base + d] = o;
      if (out_bf16 != nullptr) out_bf16[base + d] = __float2bfloat16_rn(o);
    }
  }
}

// One warp per (row, head): the split ranges rescaled to their common max, summed in range
// order, divided by the summed l. Every range's (m, l) and then every range's partial output are
// loaded before any is used (loops unrolled over kMaxSplits, loads predicated), so a warp waits
// for memory twice, not once per range: a one-block forward's 20 merges took 162 us (ncu) with
// the loads of 4 ranges in flight.
template <int kDim>
__global__ void __launch_bounds__(kThreads)
    MergeSplitsKernel(const float* __restrict__ part_acc, const float2* __restrict__ part_ml,
                      int num_splits, int64_t slots, float* __restrict__ out,
                      __nv_bfloat16* __restrict__ out_bf16) {
  constexpr int kDimsPerLane = kDim >= kWarpSize ? kDim / kWarpSize : 1;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t slot =
      static_cast<int64_t>(blockIdx.x) * (kThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (slot >= slots) return;
  float2 ml[kMaxSplits];
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) {
    ml[s] = s < num_splits ? part_ml[s * slots + slot] : make_float2(-INFINITY, 0.0f);
  }
  float m = -INFINITY;
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) {
    if (ml[s].y > 0.0f) m = fmaxf(m, ml[s].x);
  }
  const bool active = lane * kDimsPerLane < kDim;
  float a[kMaxSplits][kDimsPerLane] = {};
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) {
    const float* src = part_acc + (s * slots + slot) * kDim + lane * kDimsPerLane;
    if (active && ml[s].y != 0.0f) {
      if constexpr (kDimsPerLane == 4) {
        const float4 v = *reinterpret_cast<const float4*>(src);
        a[s][0] = v.x, a[s][1] = v.y, a[s][2] = v.z, a[s][3] = v.w;
      } else {
#pragma unroll
        for (int d = 0; d < kDimsPerLane; ++d) a[s][d] = src[d];
      }
    }
  }
  float l = 0.0f, o[kDimsPerLane] = {};
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) {
    if (ml[s].y == 0.0f) continue;  // also every s >= num_splits
    const float w = expf(ml[s].x - m);
    l += ml[s].y * w;
#pragma unroll
    for (int d = 0; d < kDimsPerLane; ++d) o[d] += w * a[s][d];
  }
  if (!active) return;
  const float inv_l = 1.0f / l;
#pragma unroll
  for (int d = 0; d < kDimsPerLane; ++d) {
    const int64_t at = slot * kDim + lane * kDimsPerLane + d;
    const float v = o[d] * inv_l;
    if (out != nullptr) out[at] = v;
    if (out_bf16 != nullptr) out_bf16[at] = __float2bfloat16_rn(v);
  }
}

template <typename KV>
__global__ void AppendKvKernel(const float* __restrict__ k, const float* __restrict__ v,
                               const AttentionSequence* __restrict__ sequences, int64_t kv_size) {
  const AttentionSequence seq = sequences[blockIdx.y];
  const int t = blockIdx.x;
  if (t >= seq.num_queries) return;
  const int64_t src = (static_cast<int64_t>(seq.first_row) + t) * kv_size;
  const int64_t dst = (static_cast<int64_t>(seq.query_start) + t) * kv_size;
  KV* k_cache = static_cast<KV*>(seq.k_cache);
  KV* v_cache = static_cast<KV*>(seq.v_cache);
  for (int64_t i = threadIdx.x; i < kv_size; i += blockDim.x) {
    k_cache[dst + i] = FromFloat<KV>(k[src + i]);
    v_cache[dst + i] = FromFloat<KV>(v[src + i]);
  }
}

template <int kDim, typename KV>
absl::Status Launch(const AttentionArgs& a, cudaStream_t stream) {
  using L = Layout<kDim>;
  static const cudaError_t attribute_error =
      cudaFuncSetAttribute(AttentionKernel<kDim, KV>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(L::kBytes));
  CUDA_RETURN_IF_ERROR(attribute_error);
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int splits = a.workspace != nullptr ? static_cast<int>(AttentionSplits(a)) : 1;
  float* part_acc = nullptr;
  float2* part_ml = nullptr;
  const int64_t slots = a.num_tokens * a.num_heads;
  if (splits > 1) {
    if (a.num_tokens < 1 || a.workspace_bytes < AttentionWorkspaceBytes(a)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "attention: split keys need num_tokens >= 1 and ", AttentionWorkspaceBytes(a),
          " bytes of workspace, got num_tokens ", a.num_tokens, " and ", a.workspace_bytes));
    }
    part_acc = static_cast<float*>(a.workspace);
    part_ml = reinterpret_cast<float2*>(part_acc + splits * slots * kDim);
  }
  const dim3 grid(CeilDiv(a.max_queries, kRows / group) * splits, a.num_kv_heads, a.num_sequences);
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  AttentionKernel<kDim, KV><<<grid, kThreads, L::kBytes, stream>>>(
      a.q, a.sequences, static_cast<int>(a.num_heads), static_cast<int>(a.num_kv_heads), scale,
      a.out, a.out_bf16, splits, a.num_tokens, part_acc, part_ml);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (splits > 1) {
    constexpr int kWarps = kThreads / kWarpSize;
    MergeSplitsKernel<kDim><<<CeilDiv(slots, kWarps), kThreads, 0, stream>>>(
        part_acc, part_ml, splits, slots, a.out, a.out_bf16);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

template <int kDim>
absl::Status LaunchForDim(const AttentionArgs& a, cudaStream_t stream) {
  switch (a.kv_dtype) {
    case DType::kF32:
      return Launch<kDim, float>(a, stream);
    case DType::kBF16:
      return Launch<kDim, __nv_bfloat16>(a, stream);
  }
  return absl::InternalError("attention: unknown kv dtype");
}

}  // namespace

int64_t AttentionSplits(const AttentionArgs& a) {
  if (a.num_kv_heads < 1 || a.num_heads < a.num_kv_heads || a.num_sequences < 1 ||
      a.max_queries < 1) {
    return 1;
  }
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int64_t blocks = CeilDiv(a.max_queries, std::max<int64_t>(1, kRows / group)) *
                         a.num_kv_heads * a.num_sequences;
  // Split only where the blocks leave SMs idle, into about two blocks per SM (the 76 KB of shared
  // memory of head_dim 128 fits two). From one block per SM up the ranges do not pay for the
  // merge: LLaDA2.0-mini at 32 blocks of 32 tokens (256 blocks, 2 ranges each) took 17.7 ms a
  // forward against 16.7 without ranges (two device calls, docs/BENCHMARKS.md).
  const int sms = MultiprocessorCount();
  if (blocks >= sms) return 1;
  return std::clamp<int64_t>(CeilDiv(2 * sms, blocks), 1, kMaxSplits);
}

size_t AttentionWorkspaceBytes(const AttentionArgs& a) {
  const int64_t splits = AttentionSplits(a);
  if (splits == 1) return 0;
  const int64_t slots = splits * a.num_tokens * a.num_heads;
  return static_cast<size_t>(slots * (a.head_dim + 2)) * sizeof(float);
}

absl::Status Attention(const AttentionArgs& a, cudaStream_t stream) {
  if (a.num_heads < 1 || a.num_kv_heads < 1 || a.num_heads % a.num_kv_heads != 0 ||
      kRows % (a.num_heads / a.num_kv_heads) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention: num_heads ", a.num_heads, " / num_kv_heads ", a.num_kv_heads,
                     " must be a whole group size that divides ", kRows));
  }
  if (a.num_sequences < 0 || a.num_sequences > 65535 || a.max_queries < 0 ||
      a.num_kv_heads > 65535) {
    return absl::InvalidArgumentError(
        "attention: num_sequences and num_kv_heads must be <= 65535, max_queries >= 0");
  }
  if (a.out == nullptr && a.out_bf16 == nullptr) {
    return absl::InvalidArgumentError("attention: neither out nor out_bf16 is set");
  }
  if (a.num_sequences == 0 || a.max_queries == 0) return absl::OkStatus();
  switch (a.head_dim) {
    case 16:
      return LaunchForDim<16>(a, stream);
    case 32:
      return LaunchForDim<32>(a, stream);
    case 64:
      return LaunchForDim<64>(a, stream);
    case 128:
      return LaunchForDim<128>(a, stream);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("attention: head_dim ", a.head_dim, " is not 16, 32, 64 or 128"));
  }
}

absl::Status AppendKv(const KvAppendArgs& a, cudaStream_t stream) {
  if (a.num_sequences < 0 || a.num_sequences > 65535 || a.max_queries < 0 || a.kv_size < 1) {
    return absl::InvalidArgumentError("append_kv: bad sizes");
  }
  if (a.num_sequences == 0 || a.max_queries == 0) return absl::OkStatus();
  const dim3 grid(a.max_queries, a.num_sequences);
  constexpr int kAppendThreads = 256;
  switch (a.kv_dtype) {
    case DType::kF32:
      AppendKvKernel<float><<<grid, kAppendThreads, 0, stream>>>(a.k, a.v, a.sequences, a.kv_size);
      break;
    case DType::kBF16:
      AppendKvKernel<__nv_bfloat16>
          <<<grid, kAppendThreads, 0, stream>>>(a.k, a.v, a.sequences, a.kv_size);
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
