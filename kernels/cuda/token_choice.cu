// One warp per token. Lane l holds the kPerLane consecutive experts [l * kPerLane, ...) (one
// coalesced sweep over the logits row). Every selection step is a warp-wide (value, index) maximum
// by butterfly shuffles, so all lanes agree on each winner. The comparison (a beats b iff
// a.v > b.v, or equal values and a.i < b.i) is the CPU's partial_sort order, which makes the
// result independent of the reduction order.
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
__global__ void TokenChoiceKernel(Params p, const float* __restrict__ logits,
                                  const float* __restrict__ bias, const int32_t* __restrict__ rows,
                                  int64_t num_rows, int32_t* __restrict__ topk_idx,
                                  float* __restrict__ topk_weight) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarpSize;
  if (i >= num_rows) return;  // whole warps leave together
  const int64_t row = rows != nullptr ? rows[i] : i;
  const float* l = logits + row * p.num_experts;
  const int first = lane * kPerLane;  // this lane's first expert

  float s[kPerLane], c[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = first + j;
    if (e < p.num_experts) {
      s[j] = RouterSigmoid(l[e]);
      c[j] = __fadd_rn(s[j], bias != nullptr ? bias[e] : 0.0f);
    } else {
      s[j] = 0.0f;
      c[j] = -INFINITY;
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
      int group[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) group[j] = (first + j) / p.per_group;
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
      if (e < p.num_experts && !(kept >> (e / p.per_group) & 1u)) c[j] = 0.0f;
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

}  // namespace

absl::Status TokenChoiceRoute(const cpu::TokenChoiceParams& tp, const TokenChoiceArgs& a,
                              cudaStream_t stream) {
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
  const Params p{static_cast<int>(tp.num_experts),
                 static_cast<int>(tp.topk),
                 static_cast<int>(tp.n_group),
                 static_cast<int>(tp.topk_group),
                 per_group,
                 fast ? lanes : 0,
                 tp.norm_topk_prob,
                 tp.routed_scaling_factor};
  const int64_t blocks = CeilDiv(a.num_rows, kWarpsPerBlock);
  const int threads = kWarpsPerBlock * kWarpSize;
  // Experts per lane: the smallest instantiated size that holds num_experts.
  switch (per_lane) {
    case 2:
      TokenChoiceKernel<2><<<blocks, threads, 0, stream>>>(p, a.logits, a.expert_bias, a.rows,
                                                           a.num_rows, a.topk_idx, a.topk_weight);
      break;
    case 8:
      TokenChoiceKernel<8><<<blocks, threads, 0, stream>>>(p, a.logits, a.expert_bias, a.rows,
                                                           a.num_rows, a.topk_idx, a.topk_weight);
      break;
    default:
      TokenChoiceKernel<32><<<blocks, threads, 0, stream>>>(p, a.logits, a.expert_bias, a.rows,
                                                            a.num_rows, a.topk_idx, a.topk_weight);
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
