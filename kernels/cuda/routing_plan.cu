// Device routing plan: marking, the expert pass (the CSR part), the row pass (the rest). See
// routing_plan.h.
#include <algorithm>
#include <climits>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/routing_plan.h"
#include "kernels/util/status_macros.h"

namespace moeserve::cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kAlign = 256;
constexpr int64_t kMaxPlanExperts = 4096;

size_t AlignUp(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Carves consecutive aligned arrays out of one allocation.
class Carver {
 public:
  // base may be null to measure the size only (integer arithmetic, no pointer overflow).
  explicit Carver(void* base) : base_(reinterpret_cast<uintptr_t>(base)) {}
  template <typename T>
  T* Take(int64_t count) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += AlignUp(static_cast<size_t>(count) * sizeof(T));
    return p;
  }
  size_t used() const { return used_; }

 private:
  uintptr_t base_;
  size_t used_ = 0;
};

// The arrays up to `tickets` come first: one memset clears them.
struct Workspace {
  uint32_t* bitmap;       // [num_experts, words]: bit t of expert e set iff (t, e) is selected
  int32_t* row_info;      // [num_tokens]: 0 unrouted, -(i + 1) token-choice entry i, s + 1 scope s
  uint64_t* word_status;  // [words]: the row pass's published token counts (PublishCount)
  uint64_t* expert_status;  // [num_experts]: the expert pass's published expert counts
  uint32_t* tickets;        // [2]: the expert pass's next expert, the row pass's next word
  size_t cleared_bytes;     // bitmap through tickets
  int32_t* word_prefix;     // [num_experts, words]: set bits of the expert's earlier words
};

Workspace CarveWorkspace(void* base, int64_t num_tokens, int64_t num_experts, size_t* used) {
  const int64_t words = CeilDiv(num_tokens, kWarpSize);
  Carver c(base);
  Workspace w;
  w.bitmap = c.Take<uint32_t>(num_experts * words);
  w.row_info = c.Take<int32_t>(num_tokens);
  w.word_status = c.Take<uint64_t>(words);
  w.expert_status = c.Take<uint64_t>(num_experts);
  w.tickets = c.Take<uint32_t>(2);
  w.cleared_bytes = c.used();
  w.word_prefix = c.Take<int32_t>(num_experts * words);
  *used = c.used();
  return w;
}

__global__ void MarkTokenChoiceKernel(const int32_t* __restrict__ rows, int64_t num_rows, int topk,
                                      const int32_t* __restrict__ topk_idx, int64_t words,
                                      uint32_t* __restrict__ bitmap,
                                      int32_t* __restrict__ row_info) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= num_rows * topk) return;
  const int64_t i = idx / topk;
  const int32_t row = rows != nullptr ? rows[i] : static_cast<int32_t>(i);
  const int64_t e = topk_idx[idx];
  atomicOr(&bitmap[e * words + row / kWarpSize], 1u << (row % kWarpSize));
  if (idx % topk == 0) row_info[row] = -static_cast<int32_t>(i + 1);
}

// Thread idx < count marks selection idx (expert idx / total_capacity); thread p < the scopes' row
// count sets row_info[row] = scope + 1 for the scope's p-th row (a binary search finds the scope).
__global__ void MarkExpertChoiceKernel(const int32_t* __restrict__ selected, int64_t total_capacity,
                                       int64_t count, int64_t words, uint32_t* __restrict__ bitmap,
                                       const int32_t* __restrict__ row_offsets,
                                       const int32_t* __restrict__ rows, int64_t num_scopes,
                                       int32_t* __restrict__ row_info) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx < count) {
    const int64_t e = idx / total_capacity;
    const int32_t row = selected[idx];
    atomicOr(&bitmap[e * words + row / kWarpSize], 1u << (row % kWarpSize));
  }
  if (idx < row_offsets[num_scopes]) {
    int64_t lo = 0, hi = num_scopes;  // row_offsets[lo] <= idx < row_offsets[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (row_offsets[mid] <= idx) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const int32_t row = rows != nullptr ? rows[idx] : static_cast<int32_t>(idx);
    row_info[row] = static_cast<int32_t>(lo + 1);
  }
}

// A block's entry in a status array (the row pass's over words, the expert pass's over experts):
// its count in the low 32 bits, and in the high ones kAggregate (that count alone) or kInclusive
// (the sum of the counts up to and including it). 0: not yet published.
constexpr uint64_t kAggregate = 1, kInclusive = 2;
__device__ __forceinline__ void PublishCount(uint64_t* status, uint64_t flag, uint32_t count) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(status), "l"(flag << 32 | count)
               : "memory");
}
__device__ __forceinline__ uint64_t ReadCount(const uint64_t* status) {
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(status) : "memory");
  return v;
}

// Warp 0: the sum of the counts before entry `i`, from the entries before it (decoupled
// look-back): the 32 entries below a window end are read at once, each lane waiting until its
// entry has published; the nearest inclusive count ends the walk, else the 32 aggregates are
// added and the window moves down. Entries are taken in ticket order, so every entry below is held
// by a block that runs and publishes without waiting for this one.
__device__ __forceinline__ uint32_t CountBefore(const uint64_t* status, int64_t i) {
  const int lane = threadIdx.x % kWarpSize;
  uint32_t before = 0;
  for (int64_t end = i - 1; end >= 0; end -= kWarpSize) {
    const int64_t w = end - lane;
    uint64_t v = uint64_t{kInclusive} << 32;  // below entry 0: an inclusive count of 0
    if (w >= 0) {
      do {
        v = ReadCount(&status[w]);
      } while ((v >> 32) == 0);
    }
    const unsigned inclusive = __ballot_sync(kFullMask, (v >> 32) == kInclusive);
    // Lane j holds entry end - j: with an inclusive count at the lowest such lane, only the lanes
    // up to it count.
    const int stop = inclusive != 0 ? __ffs(inclusive) - 1 : kWarpSize - 1;
    uint32_t c = lane <= stop ? static_cast<uint32_t>(v) : 0u;
    for (int o = kWarpSize / 2; o > 0; o /= 2) c += __shfl_xor_sync(kFullMask, c, o);
    before += c;
    if (inclusive != 0) break;
  }
  return before;
}

// Warp 0 of the block holding entry i (taken in ticket order) with `count`: publishes it, looks
// back, publishes the inclusive sum, and returns the sum before it.
__device__ __forceinline__ uint32_t ScanByLookBack(uint64_t* status, int64_t i, uint32_t count) {
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) PublishCount(&status[i], i == 0 ? kInclusive : kAggregate, count);
  const uint32_t before = i == 0 ? 0u : CountBefore(status, i);
  if (lane == 0 && i > 0) PublishCount(&status[i], kInclusive, before + count);
  return before;
}

// One block per expert, the experts taken in ticket order: word_prefix of its bitmap row and its
// count, its offset from the experts before it (ScanByLookBack), then its CSR entries: each set
// bit's token at offset + word prefix + rank inside the word. So the plan's CSR part is complete
// after this kernel, without the row pass.
__global__ void ExpertPassKernel(const uint32_t* __restrict__ bitmap, int64_t words,
                                 int num_experts, int32_t* __restrict__ word_prefix,
                                 uint64_t* __restrict__ expert_status,
                                 uint32_t* __restrict__ ticket,
                                 int32_t* __restrict__ expert_offsets,
                                 int32_t* __restrict__ token_idx) {
  __shared__ int scratch[kWarpSize];
  __shared__ uint32_t expert_shared;
  __shared__ int32_t offset_shared;
  if (threadIdx.x == 0) expert_shared = atomicAdd(ticket, 1u);
  __syncthreads();
  const int64_t e = expert_shared;
  const uint32_t* row_bits = bitmap + e * words;
  int32_t* row_prefix = word_prefix + e * words;
  int carry = 0;
  for (int64_t base = 0; base < words; base += blockDim.x) {
    const int64_t w = base + threadIdx.x;
    const int count = w < words ? __popc(row_bits[w]) : 0;
    int total;
    const int before = BlockExclusiveScan(count, scratch, &total);
    if (w < words) row_prefix[w] = carry + before;
    carry += total;
  }
  if (threadIdx.x < kWarpSize) {
    const int32_t offset =
        static_cast<int32_t>(ScanByLookBack(expert_status, e, static_cast<uint32_t>(carry)));
    if (threadIdx.x == 0) {
      expert_offsets[e] = offset;
      if (e == num_experts - 1) expert_offsets[num_experts] = offset + carry;
      offset_shared = offset;
    }
  }
  __syncthreads();
  const int32_t offset = offset_shared;
  // Each thread reads back the words it scanned.
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) {
    int32_t a = offset + row_prefix[w];
    for (uint32_t bits = row_bits[w]; bits != 0; bits &= bits - 1) {
      token_idx[a++] = static_cast<int32_t>(w * kWarpSize + __ffs(bits) - 1);
    }
  }
}

struct RowPassParams {
  int64_t num_tokens;
  int num_experts;
  int64_t words;
  const uint32_t* bitmap;
  const int32_t* word_prefix;
  const int32_t* row_info;
  uint64_t* word_status;
  uint32_t* ticket;
  // Token-choice selections.
  int topk;
  const int32_t* topk_idx;
  const float* topk_weight;
  // Expert-choice weighting.
  const float* logits;
  const uint8_t* renormalize;
  float scale;
  // The plan: its CSR part (from the expert pass), then what this pass writes.
  const int32_t* expert_offsets;
  int32_t* token_offsets;
  float* weight;
  int32_t* token_assignments;
};

// One block per 32 tokens (one bitmap word), the words taken in ticket order:
//   1. the block stages that word of every expert's bitmap in shared memory, and every expert's
//      first assignment for these tokens: its offset plus the word's prefix in its bitmap row;
//   2. each warp takes every (blockDim.x / 32)-th row and counts its assignments (token-choice:
//      topk; expert-choice: its selected experts);
//   3. warp 0 scans the 32 counts, finds the count before the word (ScanByLookBack) and writes
//      the rows' token_offsets;
//   4. the warps walk their rows' experts in ascending order, 32 at a time, sum expert-choice
//      denominators in that order and write the weights and the token-major index.
// So the tokens' counts need no separate scan.
__global__ void RowPassKernel(RowPassParams p) {
  extern __shared__ uint32_t staged[];  // bits [num_experts], then base [num_experts]
  uint32_t* word_bits = staged;
  int32_t* base = reinterpret_cast<int32_t*>(staged + p.num_experts);
  __shared__ int32_t row_count[kWarpSize], row_first[kWarpSize];
  __shared__ uint32_t word_shared;
  if (threadIdx.x == 0) word_shared = atomicAdd(p.ticket, 1u);
  __syncthreads();
  const int64_t word = word_shared;
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) {
    word_bits[e] = p.bitmap[e * p.words + word];
    base[e] = p.expert_offsets[e] + p.word_prefix[e * p.words + word];
  }
  if (word == 0 && threadIdx.x == 0) p.token_offsets[0] = 0;
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;

  for (int t = threadIdx.x / kWarpSize; t < kWarpSize; t += warps) {
    const int64_t row = word * kWarpSize + t;
    int count = 0;
    if (row < p.num_tokens) {
      const int32_t info = p.row_info[row];
      if (info < 0) {
        count = p.topk;
      } else if (info > 0) {
        const uint32_t bit = 1u << t;
        for (int e0 = 0; e0 < p.num_experts; e0 += kWarpSize) {
          const int e = e0 + lane;
          count += __popc(__ballot_sync(kFullMask, e < p.num_experts && (word_bits[e] & bit) != 0));
        }
      }
    }
    if (lane == 0) row_count[t] = count;
  }
  __syncthreads();
  if (threadIdx.x < kWarpSize) {
    const int count = row_count[lane];
    int inclusive = count;
    for (int o = 1; o < kWarpSize; o *= 2) {
      const int v = __shfl_up_sync(kFullMask, inclusive, o);
      if (lane >= o) inclusive += v;
    }
    const uint32_t word_total = __shfl_sync(kFullMask, inclusive, kWarpSize - 1);
    const uint32_t before = ScanByLookBack(p.word_status, word, word_total);
    row_first[lane] = static_cast<int32_t>(before) + inclusive - count;
    const int64_t row = word * kWarpSize + lane;
    if (row < p.num_tokens) p.token_offsets[row + 1] = static_cast<int32_t>(before) + inclusive;
  }
  __syncthreads();

  for (int t = threadIdx.x / kWarpSize; t < kWarpSize; t += warps) {
    const int64_t row = word * kWarpSize + t;
    if (row >= p.num_tokens) break;
    const int32_t info = p.row_info[row];
    const int32_t first = row_first[t];
    if (info < 0) {
      // Token-choice rows: lane j places entry j; its rank among the row's experts (ascending)
      // is its slot in the token-major index.
      const int64_t i = -static_cast<int64_t>(info) - 1;
      const int e = lane < p.topk ? p.topk_idx[i * p.topk + lane] : INT_MAX;
      int rank = 0;
      for (int j = 0; j < p.topk; ++j) rank += __shfl_sync(kFullMask, e, j) < e;
      if (lane < p.topk) {
        const int32_t a = base[e] + __popc(word_bits[e] & ((1u << t) - 1u));
        p.weight[a] = p.topk_weight[i * p.topk + lane];
        p.token_assignments[first + rank] = a;
      }
      continue;
    }
    const uint32_t bit = 1u << t;
    // Selected experts are walked kGroup chunks of 32 at a time, their logits loaded before
    // any is used (a row waits for one round of loads per group, not one per chunk). Only
    // expert-choice rows get here with selections, and their logits are not null.
    constexpr int kGroup = 8;
    auto load_group = [&](int g, float(&logit)[kGroup]) {
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
        const int e = g + c * kWarpSize + lane;
        const bool selected = e < p.num_experts && (word_bits[e] & bit) != 0;
        logit[c] = selected ? p.logits[row * p.num_experts + e] : 0.0f;
      }
    };
    const bool one_group = p.num_experts <= kGroup * kWarpSize;
    float logit[kGroup];
    if (one_group) load_group(0, logit);
    const bool renormalize = info > 0 && p.renormalize[info - 1] != 0;
    // Calls fn(logit, e, bits, selected, ballot) for the row's experts in ascending order, 32 at
    // a time: lane e % 32 holds expert e, its bitmap word and its logit (if selected).
    auto walk = [&](auto&& fn) {
      for (int g = 0; g < p.num_experts; g += kGroup * kWarpSize) {
        if (!one_group) load_group(g, logit);
#pragma unroll
        for (int c = 0; c < kGroup; ++c) {
          const int e = g + c * kWarpSize + lane;
          if (g + c * kWarpSize >= p.num_experts) break;
          const uint32_t bits = e < p.num_experts ? word_bits[e] : 0u;
          const bool selected = (bits & bit) != 0;
          fn(logit[c], e, bits, selected, __ballot_sync(kFullMask, selected));
        }
      }
    };
    // The scores s = RouterSigmoid(logit) of the row's selected experts and their weights. With
    // at most 32 selected (nearly every row) their logits are first gathered into lanes 0.. in
    // ascending expert order, so that the warp evaluates RouterSigmoid (a double-precision exp)
    // and the weight's division once for the row (EC row pass at N = 16384 42-44 -> 31-32 us under
    // ncu); otherwise once per chunk of 32 experts, in each walk.
    const int num_selected = row_count[t];
    const bool gathered = num_selected <= kWarpSize;
    float score = 0.0f;  // gathered: lane j holds the j-th selected expert's
    if (gathered) {
      float logit_j = 0.0f;
      int j = 0;
      walk([&](float logit_e, int, uint32_t, bool, unsigned ballot) {
        for (unsigned m = ballot; m != 0; m &= m - 1, ++j) {
          const float v = __shfl_sync(kFullMask, logit_e, __ffs(m) - 1);
          if (lane == j) logit_j = v;
        }
      });
      if (lane < num_selected) score = RouterSigmoid(logit_j);
    }
    // The renormalization denominator: the selected scores summed in ascending expert order.
    float denom = 0.0f;
    if (renormalize && gathered) {
      for (int j = 0; j < num_selected; ++j) {
        denom = __fadd_rn(denom, __shfl_sync(kFullMask, score, j));
      }
    } else if (renormalize) {
      walk([&](float logit_e, int, uint32_t, bool selected, unsigned ballot) {
        const float s = selected ? RouterSigmoid(logit_e) : 0.0f;
        for (unsigned m = ballot; m != 0; m &= m - 1) {
          denom = __fadd_rn(denom, __shfl_sync(kFullMask, s, __ffs(m) - 1));
        }
      });
    }
    // A selected expert of an unrouted row cannot happen; its weight would be 0.
    auto weight_of = [&](float s) {
      if (info <= 0) return 0.0f;
      return renormalize ? __fmul_rn(__fdiv_rn(s, denom), p.scale) : __fmul_rn(s, p.scale);
    };
    const float gathered_weight = gathered && lane < num_selected ? weight_of(score) : 0.0f;
    int count = 0;
    walk([&](float logit_e, int e, uint32_t bits, bool selected, unsigned ballot) {
      const int slot = count + __popc(ballot & lanes_below);
      const float w = __shfl_sync(kFullMask, gathered_weight, slot % kWarpSize);
      if (selected) {
        const int32_t a = base[e] + __popc(bits & (bit - 1u));
        p.weight[a] = gathered ? w : weight_of(RouterSigmoid(logit_e));
        p.token_assignments[first + slot] = a;
      }
      count += __popc(ballot);
    });
  }
}

// Threads per block of the row pass over `blocks` words: 32 warps (one row each) when the whole
// grid is resident at once, else 16. (On the H200: N = 4096, 128 blocks, expert-choice plan 33 ->
// 28 us; at N = 16384 blocks of 8 warps, one wave, measured slower than two waves of 16.)
// Occupancy is asked once per staged size.
int RowPassThreads(int64_t blocks, size_t staged_bytes) {
  static absl::Mutex mu;
  static size_t cached_bytes ABSL_GUARDED_BY(mu) = SIZE_MAX;
  static int64_t resident ABSL_GUARDED_BY(mu) = 0;  // 32-warp blocks resident at once
  absl::MutexLock lock(&mu);
  if (cached_bytes != staged_bytes) {
    int device = 0, sms = 0, per_sm = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, RowPassKernel, 32 * kWarpSize,
                                                      staged_bytes) != cudaSuccess) {
      cudaGetLastError();
      per_sm = 0;
    }
    resident = int64_t{per_sm} * sms;
    cached_bytes = staged_bytes;
  }
  return (blocks <= resident ? 32 : 16) * kWarpSize;
}

}  // namespace

absl::StatusOr<DeviceRoutingPlanStorage> DeviceRoutingPlanStorage::Allocate(
    int64_t num_tokens, int64_t num_experts, int64_t num_assignments) {
  if (num_tokens < 0 || num_experts < 1 || num_assignments < 0 || num_assignments > INT32_MAX) {
    return absl::InvalidArgumentError("routing plan: bad sizes");
  }
  DeviceRoutingPlanStorage s;
  const size_t bytes =
      AlignUp((num_experts + 1) * sizeof(int32_t)) + AlignUp(num_assignments * sizeof(int32_t)) +
      AlignUp(num_assignments * sizeof(float)) + AlignUp((num_tokens + 1) * sizeof(int32_t)) +
      AlignUp(num_assignments * sizeof(int32_t));
  ASSIGN_OR_RETURN(s.buffer_, DeviceBuffer::Allocate(bytes));
  Carver c(s.buffer_.data());
  DeviceRoutingPlan& plan = s.plan_;
  plan.num_tokens = num_tokens;
  plan.num_experts = num_experts;
  plan.num_assignments = num_assignments;
  plan.expert_offsets = c.Take<int32_t>(num_experts + 1);
  plan.token_idx = c.Take<int32_t>(num_assignments);
  plan.weight = c.Take<float>(num_assignments);
  plan.token_offsets = c.Take<int32_t>(num_tokens + 1);
  plan.token_assignments = c.Take<int32_t>(num_assignments);
  return s;
}

absl::StatusOr<DeviceRoutingPlanStorage> UploadRoutingPlan(const RoutingPlan& host) {
  const int64_t n = host.num_assignments();
  ASSIGN_OR_RETURN(DeviceRoutingPlanStorage storage,
                   DeviceRoutingPlanStorage::Allocate(host.num_tokens, host.num_experts, n));
  // Token-major index: assignments are in ascending expert order, so filling per token in that
  // order lists each token's experts ascending.
  std::vector<int32_t> token_offsets(host.num_tokens + 1, 0), token_assignments(n);
  for (int64_t a = 0; a < n; ++a) ++token_offsets[host.token_idx[a] + 1];
  for (int64_t t = 0; t < host.num_tokens; ++t) token_offsets[t + 1] += token_offsets[t];
  std::vector<int32_t> fill(token_offsets.begin(), token_offsets.end() - 1);
  for (int64_t a = 0; a < n; ++a) token_assignments[fill[host.token_idx[a]]++] = a;
  const DeviceRoutingPlan& p = storage.plan();
  RETURN_IF_ERROR(CopyToDevice(host.expert_offsets.data(),
                               host.expert_offsets.size() * sizeof(int32_t), p.expert_offsets));
  RETURN_IF_ERROR(CopyToDevice(host.token_idx.data(), n * sizeof(int32_t), p.token_idx));
  RETURN_IF_ERROR(CopyToDevice(host.weight.data(), n * sizeof(float), p.weight));
  RETURN_IF_ERROR(
      CopyToDevice(token_offsets.data(), token_offsets.size() * sizeof(int32_t), p.token_offsets));
  RETURN_IF_ERROR(CopyToDevice(token_assignments.data(), n * sizeof(int32_t), p.token_assignments));
  return storage;
}

absl::StatusOr<RoutingPlan> DownloadRoutingPlan(const DeviceRoutingPlan& p) {
  RoutingPlan host;
  host.num_tokens = p.num_tokens;
  host.num_experts = p.num_experts;
  ASSIGN_OR_RETURN(host.expert_offsets, Download(p.expert_offsets, p.num_experts + 1));
  ASSIGN_OR_RETURN(host.token_idx, Download(p.token_idx, p.num_assignments));
  ASSIGN_OR_RETURN(host.weight, Download(p.weight, p.num_assignments));
  return host;
}

DeviceRoutingPlan SelectionPlan(const ExpertChoiceSelections& ec, int64_t num_tokens,
                                int64_t num_experts, const int32_t* expert_offsets) {
  DeviceRoutingPlan plan;
  plan.num_tokens = num_tokens;
  plan.num_experts = num_experts;
  plan.num_assignments = num_experts * ec.scopes.total_capacity;
  // Only read through this plan (the expert GEMMs and the gather take it as input).
  plan.expert_offsets = const_cast<int32_t*>(expert_offsets);
  plan.token_idx = const_cast<int32_t*>(ec.selected);
  return plan;
}

std::vector<int32_t> UniformExpertOffsets(int64_t num_experts, int64_t per_expert) {
  std::vector<int32_t> offsets(num_experts + 1);
  for (int64_t e = 0; e <= num_experts; ++e) offsets[e] = static_cast<int32_t>(e * per_expert);
  return offsets;
}

bool ScopesInRowOrder(const std::vector<int32_t>& scope_rows) {
  return std::adjacent_find(scope_rows.begin(), scope_rows.end(),
                            [](int32_t a, int32_t b) { return a >= b; }) == scope_rows.end();
}

int64_t PlanAssignments(const TokenChoiceSelections* tc, const ExpertChoiceSelections* ec,
                        int64_t num_experts) {
  return (tc != nullptr ? tc->num_rows * tc->topk : 0) +
         (ec != nullptr ? num_experts * ec->scopes.total_capacity : 0);
}

size_t BuildRoutingPlanWorkspaceBytes(int64_t num_tokens, int64_t num_experts) {
  size_t used = 0;
  CarveWorkspace(nullptr, num_tokens, num_experts, &used);
  return used;
}

namespace {

absl::Status CheckPlanArgs(const BuildRoutingPlanArgs& a) {
  const DeviceRoutingPlan& plan = a.plan;
  const int64_t num_tokens = plan.num_tokens, num_experts = plan.num_experts;
  if (num_tokens < 0 || num_tokens > INT32_MAX || num_experts < 1 ||
      num_experts > kMaxPlanExperts) {
    return absl::InvalidArgumentError(
        "routing plan: num_tokens must be in [0, 2^31), num_experts in [1, 4096] (the row pass "
        "stages one bitmap word per expert in shared memory)");
  }
  const int64_t want = PlanAssignments(a.token_choice, a.expert_choice, num_experts);
  if (plan.num_assignments != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "routing plan: num_assignments is ", plan.num_assignments, ", the selections make ", want));
  }
  if (a.workspace_bytes < BuildRoutingPlanWorkspaceBytes(num_tokens, num_experts)) {
    return absl::InvalidArgumentError(
        absl::StrCat("routing plan: workspace of ", a.workspace_bytes, " bytes, need ",
                     BuildRoutingPlanWorkspaceBytes(num_tokens, num_experts)));
  }
  if (a.token_choice != nullptr && (a.token_choice->topk < 1 || a.token_choice->num_rows < 0)) {
    return absl::InvalidArgumentError("routing plan: token-choice topk must be >= 1");
  }
  return absl::OkStatus();
}

bool HasTokenChoice(const BuildRoutingPlanArgs& a) {
  return a.token_choice != nullptr && a.token_choice->num_rows > 0;
}
bool HasExpertChoice(const BuildRoutingPlanArgs& a) {
  return a.expert_choice != nullptr && a.expert_choice->scopes.num_scopes > 0 &&
         a.expert_choice->scopes.total_capacity > 0;
}

}  // namespace

absl::Status BuildRoutingPlanCsr(const BuildRoutingPlanArgs& a, cudaStream_t stream) {
  RETURN_IF_ERROR(CheckPlanArgs(a));
  const DeviceRoutingPlan& plan = a.plan;
  const int64_t num_tokens = plan.num_tokens, num_experts = plan.num_experts;
  size_t used = 0;
  const Workspace ws = CarveWorkspace(a.workspace, num_tokens, num_experts, &used);
  const int64_t words = CeilDiv(num_tokens, kWarpSize);
  if (num_tokens == 0) {  // no rows: the offsets are all zero
    CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(plan.expert_offsets, 0, (num_experts + 1) * sizeof(int32_t), stream));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(plan.token_offsets, 0, sizeof(int32_t), stream));
    return absl::OkStatus();
  }
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws.bitmap, 0, ws.cleared_bytes, stream));
  if (HasTokenChoice(a)) {
    const TokenChoiceSelections& tc = *a.token_choice;
    const int64_t count = tc.num_rows * tc.topk;
    MarkTokenChoiceKernel<<<CeilDiv(count, kThreads), kThreads, 0, stream>>>(
        tc.rows, tc.num_rows, static_cast<int>(tc.topk), tc.topk_idx, words, ws.bitmap,
        ws.row_info);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (HasExpertChoice(a)) {
    const ExpertChoiceSelections& ec = *a.expert_choice;
    // Threads for every selection and every row of the scopes (at most num_tokens of them).
    const int64_t count = num_experts * ec.scopes.total_capacity;
    MarkExpertChoiceKernel<<<CeilDiv(std::max(count, num_tokens), kThreads), kThreads, 0, stream>>>(
        ec.selected, ec.scopes.total_capacity, count, words, ws.bitmap, ec.scopes.row_offsets,
        ec.scopes.rows, ec.scopes.num_scopes, ws.row_info);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  ExpertPassKernel<<<num_experts, kThreads, 0, stream>>>(
      ws.bitmap, words, static_cast<int>(num_experts), ws.word_prefix, ws.expert_status,
      &ws.tickets[0], plan.expert_offsets, plan.token_idx);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status FinishRoutingPlan(const BuildRoutingPlanArgs& a, cudaStream_t stream) {
  RETURN_IF_ERROR(CheckPlanArgs(a));
  const DeviceRoutingPlan& plan = a.plan;
  const int64_t num_tokens = plan.num_tokens, num_experts = plan.num_experts;
  if (num_tokens == 0) return absl::OkStatus();  // BuildRoutingPlanCsr wrote token_offsets[0]
  size_t used = 0;
  const Workspace ws = CarveWorkspace(a.workspace, num_tokens, num_experts, &used);
  const int64_t words = CeilDiv(num_tokens, kWarpSize);
  RowPassParams p{};
  p.num_tokens = num_tokens;
  p.num_experts = static_cast<int>(num_experts);
  p.words = words;
  p.bitmap = ws.bitmap;
  p.word_prefix = ws.word_prefix;
  p.row_info = ws.row_info;
  p.word_status = ws.word_status;
  p.ticket = &ws.tickets[1];
  p.expert_offsets = plan.expert_offsets;
  p.token_offsets = plan.token_offsets;
  p.weight = plan.weight;
  p.token_assignments = plan.token_assignments;
  if (HasTokenChoice(a)) {
    p.topk = static_cast<int>(a.token_choice->topk);
    p.topk_idx = a.token_choice->topk_idx;
    p.topk_weight = a.token_choice->topk_weight;
  }
  if (HasExpertChoice(a)) {
    p.logits = a.expert_choice->logits;
    p.renormalize = a.expert_choice->renormalize;
    p.scale = a.expert_choice->routed_scaling_factor;
  }
  const size_t staged_bytes = 2 * num_experts * sizeof(uint32_t);
  RowPassKernel<<<words, RowPassThreads(words, staged_bytes), staged_bytes, stream>>>(p);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status BuildRoutingPlan(const BuildRoutingPlanArgs& a, cudaStream_t stream) {
  RETURN_IF_ERROR(BuildRoutingPlanCsr(a, stream));
  return FinishRoutingPlan(a, stream);
}

}  // namespace moeserve::cuda
