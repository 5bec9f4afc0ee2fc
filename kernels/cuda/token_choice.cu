// Two kernels (token_choice.h); the group-per-lane one is described where it is defined.
// WarpPerTokenKernel: one warp per token. Lane l holds the kPerLane consecutive experts
// [l * kPerLane, ...) (one coalesced sweep over the logits row). Every selection step is a
// warp-wide (value, index) maximum by butterfly shuffles, so all lanes agree on each winner. The
// comparison (a beats b iff a.v > b.v, or equal values and a.i < b.i) is the CPU's partial_sort
// order, which makes the result independent of the reduction order.
//
// Group scores have a fast path when a group is a power-of-two run of whole lanes (LLaDA2: 32
// experts a group, 8 a lane, 4 lanes a group): each lane takes the top-2 of its own experts, then
// log2(lanes per group) shuffle merges give every group's top-2 at once. Other layouts take the
// general path: two warp-wide maxima per group.
#include <climits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/token_choice.h"

namespace moeserve::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxGroups = 32;
constexpr int kMaxTopk = 32;
constexpr int kMaxExperts = 1024;

struct Candidate {
  float v;    // choice score
  int32_t i;  // expert (or group) index; INT_MAX: none
  float s;    // unbiased sigmoid score
};

__device__ __forceinline__ bool Beats(const Candidate& a, const Candidate& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

__device__ __forceinline__ Candidate WarpBest(Candidate c) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const Candidate o{__shfl_xor_sync(kFullMask, c.v, offset),
                      __shfl_xor_sync(kFullMask, c.i, offset),
                      __shfl_xor_sync(kFullMask, c.s, offset)};
    if (Beats(o, c)) c = o;
  }
  return c;
}

// The index of the largest key over the warp, the lowest index among equal keys (two
// single-instruction warp reductions). Lanes without a candidate pass key 0 and index INT_MAX.
__device__ __forceinline__ int WarpArgMax(uint32_t key, int index) {
  const uint32_t best = __reduce_max_sync(kFullMask, key);
  return __reduce_min_sync(kFullMask, key == best ? index : INT_MAX);
}

__device__ __forceinline__ Candidate NoCandidate() { return {-INFINITY, INT_MAX, 0.0f}; }

struct Params {
  int num_experts, topk, n_group, topk_group, per_group;
  int lanes_per_group;  // > 0: the fast group path (a group is this many whole lanes)
  bool vector_loads;    // every lane's experts exist; logits rows and bias 16-byte aligned
  bool norm_topk_prob;
  float routed_scaling_factor;
};

// Merges the top-2 (b1 beats b2) of this lane with that of the lane `offset` away.
__device__ __forceinline__ void MergeTop2(Candidate& b1, Candidate& b2, int offset) {
  const Candidate o1{__shfl_xor_sync(kFullMask, b1.v, offset),
                     __shfl_xor_sync(kFullMask, b1.i, offset), 0.0f};
  const Candidate o2{__shfl_xor_sync(kFullMask, b2.v, offset),
                     __shfl_xor_sync(kFullMask, b2.i, offset), 0.0f};
  if (Beats(o1, b1)) {
    b2 = Beats(b1, o2) ? b1 : o2;
    b1 = o1;
  } else if (Beats(o1, b2)) {
    b2 = o1;
  }
}

template <int kPerLane>
__global__ void WarpPerTokenKernel(Params p, const float* __restrict__ logits,
                                   const float* __restrict__ bias, const int32_t* __restrict__ rows,
                                   int64_t num_rows, int32_t* __restrict__ topk_idx,
                                   float* __restrict__ topk_weight) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarpSize;
  if (i >= num_rows) return;  // whole warps leave together
  const int64_t row = rows != nullptr ? rows[i] : i;
  const float* l = logits + row * p.num_experts;
  const int first = lane * kPerLane;  // this lane's first expert

  float logit[kPerLane], b[kPerLane];
  if constexpr (kPerLane % 4 == 0) {
    if (p.vector_loads) {  // 16-byte loads of this lane's experts, which all exist
#pragma unroll
      for (int q = 0; q < kPerLane / 4; ++q) {
        const float4 x = reinterpret_cast<const float4*>(l + first)[q];
        const float4 y = bias != nullptr ? reinterpret_cast<const float4*>(bias + first)[q]
                                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        logit[4 * q] = x.x, logit[4 * q + 1] = x.y, logit[4 * q + 2] = x.z, logit[4 * q + 3] = x.w;
        b[4 * q] = y.x, b[4 * q + 1] = y.y, b[4 * q + 2] = y.z, b[4 * q + 3] = y.w;
      }
    }
  }
  if (!p.vector_loads) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = first + j;
      logit[j] = e < p.num_experts ? l[e] : 0.0f;
      b[j] = e < p.num_experts && bias != nullptr ? bias[e] : 0.0f;
    }
  }
  float s[kPerLane], c[kPerLane];
  int group[kPerLane];  // group of expert first + j, counted up from one division
  {
    int g = first / p.per_group, next = (g + 1) * p.per_group;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (first + j >= next) {
        ++g;
        next += p.per_group;
      }
      group[j] = g;
      if (first + j < p.num_experts) {
        s[j] = RouterSigmoid(logit[j]);
        c[j] = __fadd_rn(s[j], b[j]);
      } else {
        s[j] = 0.0f;
        c[j] = -INFINITY;
      }
    }
  }

  if (p.topk_group < p.n_group) {
    // Group scores: the sum of each group's top-2 choice scores (0 + best + second, the CPU's
    // order); then lane g (general path) or the first lane of group g (fast path) offers it.
    Candidate offer = NoCandidate();
    if (p.lanes_per_group > 0) {
      Candidate b1 = NoCandidate(), b2 = NoCandidate();
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const Candidate cand{c[j], first + j, 0.0f};
        if (Beats(cand, b1)) {
          b2 = b1;
          b1 = cand;
        } else if (Beats(cand, b2)) {
          b2 = cand;
        }
      }
      for (int offset = 1; offset < p.lanes_per_group; offset *= 2) MergeTop2(b1, b2, offset);
      const float score = p.per_group >= 2 ? __fadd_rn(0.0f + b1.v, b2.v) : 0.0f + b1.v;
      if (lane % p.lanes_per_group == 0) offer = {score, lane / p.lanes_per_group, 0.0f};
    } else {
      for (int g = 0; g < p.n_group; ++g) {
        Candidate best = NoCandidate();
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const Candidate cand{c[j], first + j, 0.0f};
          if (group[j] == g && first + j < p.num_experts && Beats(cand, best)) best = cand;
        }
        const Candidate top1 = WarpBest(best);
        float score = 0.0f + top1.v;
        if (p.per_group >= 2) {
          best = NoCandidate();
#pragma unroll
          for (int j = 0; j < kPerLane; ++j) {
            const Candidate cand{c[j], first + j, 0.0f};
            if (group[j] == g && first + j < p.num_experts && first + j != top1.i &&
                Beats(cand, best)) {
              best = cand;
            }
          }
          score = __fadd_rn(score, WarpBest(best).v);
        }
        if (lane == g) offer = {score, g, 0.0f};
      }
    }
    uint32_t kept = 0;  // bit g: group g kept
    for (int r = 0; r < p.topk_group; ++r) {
      const int winner = WarpArgMax(offer.i != INT_MAX ? OrderedKey(offer.v) : 0u, offer.i);
      kept |= 1u << winner;
      if (offer.i == winner) offer = NoCandidate();
    }
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = first + j;
      if (e < p.num_experts && !(kept >> group[j] & 1u)) c[j] = 0.0f;
    }
  }

  // Top-k experts; lane r keeps the r-th winner. Every lane sums the winners' s in order.
  uint32_t key[kPerLane];  // order-preserving keys of c; 0: no expert
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) key[j] = first + j < p.num_experts ? OrderedKey(c[j]) : 0u;
  uint32_t taken = 0;  // bit j: expert first + j already chosen
  int32_t my_idx = 0;
  float my_s = 0.0f, sum = 0.0f;
  for (int r = 0; r < p.topk; ++r) {
    // This lane's best untaken expert: the first maximum (lowest index).
    uint32_t best_key = 0u;
    int best = INT_MAX;
    float best_s = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (!(taken >> j & 1u) && key[j] > best_key) {
        best_key = key[j];
        best = first + j;
        best_s = s[j];
      }
    }
    const int winner = WarpArgMax(best_key, best);
    const float winner_s = __shfl_sync(kFullMask, best_s, winner / kPerLane);
    if (winner / kPerLane == lane) taken |= 1u << (winner % kPerLane);
    if (lane == r) {
      my_idx = winner;
      my_s = winner_s;
    }
    sum = __fadd_rn(sum, winner_s);
  }
  const float denom = p.norm_topk_prob && p.topk > 1 ? __fadd_rn(sum, 1e-20f) : 1.0f;
  if (lane < p.topk) {
    topk_idx[i * p.topk + lane] = my_idx;
    topk_weight[i * p.topk + lane] = __fmul_rn(__fdiv_rn(my_s, denom), p.routed_scaling_factor);
  }
}

// The group-per-lane layout (LLaDA2: 256 experts, 8 groups of 32, top-4 groups, top-8): four
// tokens per warp, eight lanes per token, lane g of a token holding group g's kPerLane experts.
// Group scores and the local top-k are then lane-local loops; only the group ranking (8 values)
// and the topk rounds of the final merge cross lanes, three shuffle levels inside the token's
// eight lanes. Same decisions and the same operation order as WarpPerTokenKernel.
constexpr int kLanesPerToken = 8;
constexpr int kTokensPerWarp = kWarpSize / kLanesPerToken;
constexpr int kLaneTopk = 8;  // the longest local list, so topk <= 8 here

template <int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    TokenChoiceGroupLaneKernel(Params p, const float* __restrict__ logits,
                               const float* __restrict__ bias, const int32_t* __restrict__ rows,
                               int64_t num_rows, int32_t* __restrict__ topk_idx,
                               float* __restrict__ topk_weight) {
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane % kLanesPerToken;  // this lane's group
  const int base = lane - g;            // first lane of this token
  const int64_t i = (blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarpSize) *
                        kTokensPerWarp +
                    lane / kLanesPerToken;
  const bool active = i < num_rows;  // idle slots compute on row 0 and write nothing
  const int64_t row = !active ? 0 : rows != nullptr ? rows[i] : i;
  const int first = g * kPerLane;
  const float4* l4 = reinterpret_cast<const float4*>(logits + row * p.num_experts + first);
  const float4* b4 = reinterpret_cast<const float4*>(bias + first);

  float s[kPerLane], c[kPerLane];
  float b1 = -INFINITY, b2 = -INFINITY;  // the group's two largest choice scores
#pragma unroll
  for (int q = 0; q < kPerLane / 4; ++q) {
    const float4 x = l4[q];
    const float4 y = bias != nullptr ? b4[q] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = 4 * q + k;
      s[j] = RouterSigmoid(xs[k]);
      c[j] = __fadd_rn(s[j], ys[k]);
      if (c[j] > b1) {
        b2 = b1;
        b1 = c[j];
      } else if (c[j] > b2) {
        b2 = c[j];
      }
    }
  }

  if (p.topk_group < p.n_group) {
    // Group g is kept when fewer than topk_group groups beat it (higher score, or equal at a lower
    // index): the CPU's top-topk_group by score.
    const float score = kPerLane >= 2 ? __fadd_rn(0.0f + b1, b2) : 0.0f + b1;
    int beaten_by = 0;
#pragma unroll
    for (int h = 0; h < kLanesPerToken; ++h) {
      const float other = __shfl_sync(kFullMask, score, base + h);
      beaten_by += other > score || (other == score && h < g);
    }
    if (beaten_by >= p.topk_group) {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) c[j] = 0.0f;
    }
  }

  // This lane's top kLaneTopk, descending; equal scores keep the lower expert first.
  float lv[kLaneTopk], ls[kLaneTopk];
  int li[kLaneTopk];
#pragma unroll
  for (int q = 0; q < kLaneTopk; ++q) {
    lv[q] = -INFINITY;
    ls[q] = 0.0f;
    li[q] = INT_MAX;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const float v = c[j];
    if (!(v > lv[kLaneTopk - 1])) continue;
#pragma unroll
    for (int q = kLaneTopk - 1; q >= 0; --q) {
      if (q > 0 && lv[q - 1] < v) {  // shift down past every smaller entry
        lv[q] = lv[q - 1];
        ls[q] = ls[q - 1];
        li[q] = li[q - 1];
      } else if (lv[q] < v) {  // lv[q - 1] >= v > lv[q]: v goes here
        lv[q] = v;
        ls[q] = s[j];
        li[q] = first + j;
      }
    }
  }

  // topk rounds: the best head among the token's eight lanes wins and is popped.
  int32_t my_idx = 0;
  float my_s = 0.0f, sum = 0.0f;
  for (int r = 0; r < p.topk; ++r) {
    float bv = lv[0];
    int bi = li[0];
#pragma unroll
    for (int offset = kLanesPerToken / 2; offset > 0; offset /= 2) {
      const float ov = __shfl_xor_sync(kFullMask, bv, offset);
      const int oi = __shfl_xor_sync(kFullMask, bi, offset);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    const int owner = bi / kPerLane;
    const float winner_s = __shfl_sync(kFullMask, ls[0], base + owner);
    if (owner == g) {
#pragma unroll
      for (int q = 0; q + 1 < kLaneTopk; ++q) {
        lv[q] = lv[q + 1];
        ls[q] = ls[q + 1];
        li[q] = li[q + 1];
      }
      lv[kLaneTopk - 1] = -INFINITY;
      li[kLaneTopk - 1] = INT_MAX;
    }
    if (g == r) {
      my_idx = bi;
      my_s = winner_s;
    }
    sum = __fadd_rn(sum, winner_s);
  }
  const float denom = p.norm_topk_prob && p.topk > 1 ? __fadd_rn(sum, 1e-20f) : 1.0f;
  if (active && g < p.topk) {
    topk_idx[i * p.topk + g] = my_idx;
    topk_weight[i * p.topk + g] = __fmul_rn(__fdiv_rn(my_s, denom), p.routed_scaling_factor);
  }
}

}  // namespace

bool GroupPerLaneFits(const cpu::TokenChoiceParams& tp, const TokenChoiceArgs& a) {
  const int64_t lane_experts = tp.num_experts / kLanesPerToken;
  return tp.num_experts % kLanesPerToken == 0 && (lane_experts == 16 || lane_experts == 32) &&
         (tp.n_group == kLanesPerToken || tp.topk_group >= tp.n_group) && tp.topk >= 1 &&
         tp.topk <= kLaneTopk && IsAligned(a.logits, 16) && IsAligned(a.expert_bias, 16);
}

absl::Status TokenChoiceRoute(const cpu::TokenChoiceParams& tp, const TokenChoiceArgs& a,
                              cudaStream_t stream) {
  return TokenChoiceRoute(tp, a, TokenChoiceKernel::kAuto, stream);
}

absl::Status TokenChoiceRoute(const cpu::TokenChoiceParams& tp, const TokenChoiceArgs& a,
                              TokenChoiceKernel kernel, cudaStream_t stream) {
  if (tp.num_experts < 1 || tp.num_experts > kMaxExperts) {
    return absl::InvalidArgumentError("token_choice: num_experts must be in [1, 1024]");
  }
  if (tp.n_group < 1 || tp.n_group > kMaxGroups || tp.num_experts % tp.n_group != 0) {
    return absl::InvalidArgumentError(
        "token_choice: n_group must be in [1, 32] and divide num_experts");
  }
  if (tp.topk_group < 1 || tp.topk_group > tp.n_group) {
    return absl::InvalidArgumentError("token_choice: topk_group must be in [1, n_group]");
  }
  if (tp.topk < 1 || tp.topk > tp.num_experts || tp.topk > kMaxTopk) {
    return absl::InvalidArgumentError("token_choice: topk must be in [1, min(num_experts, 32)]");
  }
  if (a.num_rows < 0) return absl::InvalidArgumentError("token_choice: num_rows is negative");
  if (a.num_rows == 0) return absl::OkStatus();
  const int per_lane = tp.num_experts <= 2 * kWarpSize   ? 2
                       : tp.num_experts <= 8 * kWarpSize ? 8
                                                         : 32;
  const int per_group = static_cast<int>(tp.num_experts / tp.n_group);
  // The fast group path: a group is a power-of-two number of whole lanes.
  const int lanes = per_group / per_lane;
  const bool fast = per_group % per_lane == 0 && lanes >= 1 && (lanes & (lanes - 1)) == 0 &&
                    tp.num_experts == kWarpSize * per_lane;
  const bool vector_loads = per_lane % 4 == 0 && tp.num_experts == kWarpSize * per_lane &&
                            IsAligned(a.logits, 16) && IsAligned(a.expert_bias, 16);
  const Params p{static_cast<int>(tp.num_experts),
                 static_cast<int>(tp.topk),
                 static_cast<int>(tp.n_group),
                 static_cast<int>(tp.topk_group),
                 per_group,
                 fast ? lanes : 0,
                 vector_loads,
                 tp.norm_topk_prob,
                 tp.routed_scaling_factor};
  const int threads = kWarpsPerBlock * kWarpSize;
  if (kernel == TokenChoiceKernel::kGroupPerLane && !GroupPerLaneFits(tp, a)) {
    return absl::InvalidArgumentError("token_choice: the group-per-lane kernel does not fit");
  }
  if (kernel == TokenChoiceKernel::kAuto && GroupPerLaneFits(tp, a) &&
      a.num_rows >= kGroupPerLaneMinRows) {
    kernel = TokenChoiceKernel::kGroupPerLane;
  }
  if (kernel == TokenChoiceKernel::kGroupPerLane) {
    const int64_t lane_experts = tp.num_experts / kLanesPerToken;
    const int64_t lane_blocks = CeilDiv(a.num_rows, kWarpsPerBlock * kTokensPerWarp);
    if (lane_experts == 32) {
      TokenChoiceGroupLaneKernel<32><<<lane_blocks, threads, 0, stream>>>(
          p, a.logits, a.expert_bias, a.rows, a.num_rows, a.topk_idx, a.topk_weight);
    } else {
      TokenChoiceGroupLaneKernel<16><<<lane_blocks, threads, 0, stream>>>(
          p, a.logits, a.expert_bias, a.rows, a.num_rows, a.topk_idx, a.topk_weight);
    }
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  }
  const int64_t blocks = CeilDiv(a.num_rows, kWarpsPerBlock);
  // Experts per lane: the smallest instantiated size that holds num_experts.
  switch (per_lane) {
    case 2:
      WarpPerTokenKernel<2><<<blocks, threads, 0, stream>>>(p, a.logits, a.expert_bias, a.rows,
                                                            a.num_rows, a.topk_idx, a.topk_weight);
      break;
    case 8:
      WarpPerTokenKernel<8><<<blocks, threads, 0, stream>>>(p, a.logits, a.expert_bias, a.rows,
                                                            a.num_rows, a.topk_idx, a.topk_weight);
      break;
    default:
      WarpPerTokenKernel<32><<<blocks, threads, 0, stream>>>(p, a.logits, a.expert_bias, a.rows,
                                                             a.num_rows, a.topk_idx, a.topk_weight);
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
