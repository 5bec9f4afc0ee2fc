// Expert-choice selection kernels; expert_choice.h describes the paths.
//
// Floats (scores on the warp path, logits on the radix paths) become 32-bit keys whose unsigned
// order is the float order (OrderedKey), so "top C by score, ties to the lower row" is "the C
// largest keys, ties to the lower position in the scope" (scope rows are ascending, so position
// order is row order); the radix paths then widen the boundary to the run of logits that share
// the boundary's score.
#include <algorithm>
#include <climits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/expert_choice.h"
#include "kernels/util/status_macros.h"

namespace moeserve::cuda {
namespace {

constexpr int kTransposeTile = 32;
constexpr int kTransposeRowsPerPass = 8;
constexpr int kWarpRankThreads = 256;
constexpr int kDigitBits = 12;
constexpr int kBins = 1 << kDigitBits;
// Radix blocks: 256 threads for scopes of up to 4096 rows, 512 above (two blocks of 512 fit an
// SM in registers and, up to 16384 rows, in shared memory: one wave for 256 experts).
constexpr int kSmallRadixThreads = 256;
constexpr int kLargeRadixThreads = 512;
constexpr int64_t kSmallRadixMaxRows = 4096;

constexpr int kMaxLiveKeys = 2048;

// The sum of v over the threads before this one (thread order); *total gets the block's sum.
// scratch holds kWarps words. Contains two __syncthreads: call from every thread.
template <int kWarps>
__device__ __forceinline__ uint32_t BlockExclusiveSum(uint32_t v, uint32_t* scratch,
                                                      uint32_t* total) {
  static_assert(kWarps <= kWarpSize, "one scratch word per lane");
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  uint32_t inclusive = v;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const uint32_t other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  __syncthreads();  // earlier readers of scratch are done
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  const uint32_t other = lane < kWarps ? scratch[lane] : 0u;
  *total = __reduce_add_sync(kFullMask, other);
  return inclusive - v + __reduce_add_sync(kFullMask, lane < warp ? other : 0u);
}

__device__ __forceinline__ float KeyToFloat(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Scope arrays, passed by value.
struct Scopes {
  const int32_t* row_offsets;
  const int32_t* rows;
  const int32_t* capacity;
  const int32_t* selected_offsets;
};

// One (expert, scope) problem: the expert's column of logits and the scope's rows.
struct Problem {
  const float* column;  // logits of one expert, indexed by row
  const int32_t* rows;  // the scope's rows, or null: rows begin + i
  int32_t begin;
  int32_t size;
  int32_t capacity;
  int64_t out;  // first output slot

  __device__ __forceinline__ int32_t Row(int i) const {
    return rows != nullptr ? rows[i] : begin + i;
  }
};

__device__ __forceinline__ Problem MakeProblem(const float* logits_t, int64_t ld, int num_experts,
                                               int64_t pair, const Scopes& scopes,
                                               int64_t total_capacity) {
  const int e = static_cast<int>(pair) % num_experts;  // pair < 2^31 (checked at launch)
  const int s = static_cast<int>(pair) / num_experts;
  Problem p;
  p.column = logits_t + e * ld;
  p.begin = scopes.row_offsets[s];
  p.size = scopes.row_offsets[s + 1] - p.begin;
  p.rows = scopes.rows != nullptr ? scopes.rows + p.begin : nullptr;
  p.capacity = scopes.capacity[s];
  p.out = e * total_capacity + scopes.selected_offsets[s];
  return p;
}

// [rows, cols] -> [cols, rows] through a shared-memory tile (padded against bank conflicts).
__global__ void TransposeKernel(const float* __restrict__ in, int64_t rows, int64_t cols,
                                float* __restrict__ out) {
  __shared__ float tile[kTransposeTile][kTransposeTile + 1];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTransposeTile;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTransposeTile;
  for (int y = threadIdx.y; y < kTransposeTile; y += kTransposeRowsPerPass) {
    const int64_t r = r0 + y, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[y][threadIdx.x] = in[r * cols + c];
  }
  __syncthreads();
  for (int y = threadIdx.y; y < kTransposeTile; y += kTransposeRowsPerPass) {
    const int64_t c = c0 + y, r = r0 + threadIdx.x;
    if (c < cols && r < rows) out[c * rows + r] = tile[threadIdx.x][y];
  }
}

// Reads logits in either layout.
struct LogitsView {
  const float* data;
  int64_t num_tokens;
  int num_experts;
  bool token_major;

  __device__ __forceinline__ float At(int32_t row, int e) const {
    return token_major ? data[static_cast<int64_t>(row) * num_experts + e]
                       : data[static_cast<int64_t>(e) * num_tokens + row];
  }
};

struct RankedKey {
  uint32_t key;
  int pos;  // INT_MAX: none
};
__device__ __forceinline__ bool Outranks(const RankedKey& a, const RankedKey& b) {
  return a.key > b.key || (a.key == b.key && a.pos < b.pos);
}

// kWarpRank: blockIdx.x picks 8 experts (a warp each), blockIdx.y strides over scopes; lane l
// holds positions l, l + 32, ... of the scope with the exact scores' keys. Selection takes
// `capacity` rounds of a warp-wide maximum when that is cheaper, else counts every position's
// rank (the positions whose key is larger, or equal at a lower position; rank < capacity).
// With token-major logits the block's 8 experts of a row share one 32-byte sector.
template <int kPerLane>
__global__ void __launch_bounds__(kWarpRankThreads)
    WarpRankKernel(LogitsView logits, int64_t num_scopes, Scopes scopes, int64_t total_capacity,
                   int32_t* __restrict__ selected, float* __restrict__ selected_scores) {
  const int lane = threadIdx.x % kWarpSize;
  const int e = blockIdx.x * (kWarpRankThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (e >= logits.num_experts) return;  // whole warps leave together
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t s = blockIdx.y; s < num_scopes; s += gridDim.y) {
    const int32_t begin = scopes.row_offsets[s];
    const int size = scopes.row_offsets[s + 1] - begin;
    const int capacity = scopes.capacity[s];
    const int32_t* rows = scopes.rows != nullptr ? scopes.rows + begin : nullptr;
    uint32_t key[kPerLane];
    int32_t row[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int pos = j * kWarpSize + lane;
      row[j] = pos < size ? (rows != nullptr ? rows[pos] : begin + pos) : -1;
      key[j] = pos < size ? OrderedKey(RouterSigmoid(logits.At(row[j], e))) : 0u;
    }
    uint32_t take = 0;  // bit j: position j * 32 + lane is selected
    // Rounds cost about capacity * (4 * kPerLane + 40) instructions, ranks size * 6 * kPerLane.
    if (capacity * (4 * kPerLane + 40) < size * 6 * kPerLane) {
      for (int r = 0; r < capacity; ++r) {
        RankedKey best{0u, INT_MAX};
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const RankedKey mine{key[j], j * kWarpSize + lane};
          if (mine.pos < size && !(take >> j & 1u) && Outranks(mine, best)) best = mine;
        }
        // The largest key, then the lowest position holding it: two warp reductions.
        const uint32_t top = __reduce_max_sync(kFullMask, best.key);
        const int pos = __reduce_min_sync(kFullMask, best.key == top ? best.pos : INT_MAX);
        if (pos % kWarpSize == lane) take |= 1u << (pos / kWarpSize);
      }
    } else {
      int rank[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) rank[j] = 0;
#pragma unroll
      for (int sj = 0; sj < kPerLane; ++sj) {
        if (sj * kWarpSize >= size) break;
        for (int src = 0; src < kWarpSize; ++src) {
          const uint32_t other_key = __shfl_sync(kFullMask, key[sj], src);
          const int other = sj * kWarpSize + src;
          if (other >= size) break;
#pragma unroll
          for (int j = 0; j < kPerLane; ++j) {
            const int pos = j * kWarpSize + lane;
            rank[j] += other_key > key[j] || (other_key == key[j] && other < pos);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (j * kWarpSize + lane < size && rank[j] < capacity) take |= 1u << j;
      }
    }
    const int64_t out = e * total_capacity + scopes.selected_offsets[s];
    int written = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const bool mine = take >> j & 1u;
      const unsigned ballot = __ballot_sync(kFullMask, mine);
      if (mine) {
        const int64_t slot = out + written + __popc(ballot & lanes_below);
        selected[slot] = row[j];
        if (selected_scores != nullptr) selected_scores[slot] = KeyToFloat(key[j]);
      }
      written += __popc(ballot);
    }
  }
}

// The keys around `center` (the key of a logit x) whose logits have the same RouterSigmoid as x:
// RouterSigmoid is monotone, so they form one run of keys; one warp finds its far end in direction
// `up` (+1 or -1), stopping at `limit`. The lanes first test offsets 1 .. 32 (enough for most
// runs), then offsets 64 * 2^l, then each round tests 32 evenly spaced keys of the bracket left,
// so a run of any length takes a handful of rounds.
__device__ uint32_t SameScoreEnd(uint32_t center, bool up, uint32_t limit) {
  const int lane = threadIdx.x % kWarpSize;
  const float score = RouterSigmoid(KeyToFloat(center));
  const uint64_t room = up ? (center < limit ? limit - center : 0u)  // keys we may move
                           : (center > limit ? center - limit : 0u);
  auto same = [&](uint64_t d) {
    const uint32_t k = up ? center + static_cast<uint32_t>(d) : center - static_cast<uint32_t>(d);
    return RouterSigmoid(KeyToFloat(k)) == score;
  };
  // Offsets 1 .. 32 first: a run is usually a few keys wide (the sigmoid's rounding), and then one
  // round finds its end. The offsets that keep the score are a prefix (monotone).
  {
    const uint64_t d = lane + 1;
    const unsigned pass = __ballot_sync(kFullMask, d <= room && same(d));
    const int first_fail = __ffs(~pass) - 1;  // -1: every lane passed
    if (first_fail >= 0) {
      return up ? center + static_cast<uint32_t>(first_fail)
                : center - static_cast<uint32_t>(first_fail);
    }
  }
  // Bracket: offset lo keeps the score, offset hi does not (hi = room + 1: the limit keeps it).
  // Lane l tests offset 64 * 2^l.
  uint64_t lo = kWarpSize, hi = room + 1;
  {
    const uint64_t d = uint64_t{2 * kWarpSize} << lane;
    const unsigned pass = __ballot_sync(kFullMask, d <= room && same(d));
    const int first_fail = __ffs(~pass) - 1;  // -1: every lane passed (not for 32-bit keys)
    if (first_fail > 0) lo = uint64_t{2 * kWarpSize} << (first_fail - 1);
    if (first_fail >= 0) {
      const uint64_t fail = uint64_t{2 * kWarpSize} << first_fail;
      hi = fail < room + 1 ? fail : room + 1;
    }
  }
  while (hi - lo > 1) {
    const uint64_t base = lo,
                   step = (hi - lo) / (kWarpSize + 1) > 0 ? (hi - lo) / (kWarpSize + 1) : 1;
    const uint64_t d = base + (lane + 1) * step;
    const unsigned pass = __ballot_sync(kFullMask, d < hi && same(d));
    const int last_pass = 31 - __clz(pass);  // -1 when none; passes are a prefix of the lanes
    if (last_pass >= 0) lo = base + (last_pass + 1) * step;
    if (last_pass < kWarpSize - 1) {  // the next lane's offset was tested and failed (or >= hi)
      const uint64_t fail = base + (last_pass + 2) * step;
      if (fail < hi) hi = fail;
    }
  }
  return up ? center + static_cast<uint32_t>(lo) : center - static_cast<uint32_t>(lo);
}

// kBlockRadixShared / kBlockRadixGlobal: one block per (expert, scope), on the logits' own keys
// (RouterSigmoid is monotone, so logit order is score order up to ties in the score).
//   1. Radix select finds K, the key of the capacity-th largest logit, by 12-bit digits from the
//      top: the load sweep counts the first digit; the second pass's sweep also gathers the keys
//      still in the running into shared memory when they are few (<= 2048), and later passes
//      read only those. The large shared-memory block gathers through per-word bitmaps, which
//      also mark the keys above the running prefix.
//   2. Two warps find [key_lo, key_hi], the keys whose logits share K's score (usually a few ulps
//      wide; wide where the sigmoid saturates).
//   3. Selected: every key above key_hi, then the lowest positions of [key_lo, key_hi] up to
//      capacity, written in ascending position: for the large shared-memory block, per-word
//      bitmaps (step 1's, completed from the gathered keys, or one sweep when the run leaves the
//      gathered prefix) and scans over the threads; otherwise two sweeps (count per warp, scan,
//      write).
// Only the selected keys' scores are ever evaluated.
template <int kRadixThreads, bool kShared>
__global__ void __launch_bounds__(kRadixThreads, 1024 / kRadixThreads)
    BlockRadixKernel(const float* __restrict__ logits_t, int64_t ld, int num_experts, Scopes scopes,
                     int64_t total_capacity, int32_t* __restrict__ selected,
                     float* __restrict__ selected_scores) {
  constexpr int kRadixWarps = kRadixThreads / kWarpSize;
  constexpr int kBinsPerThread = kBins / kRadixThreads;
  static_assert(kBins % kRadixThreads == 0, "each thread scans a whole run of bins");
  // The large shared-memory block marks keys in per-word bitmaps (steps 1 and 3).
  constexpr bool kBitmaps = kShared && kRadixThreads == kLargeRadixThreads;
  constexpr int kMaxWords = kBitmaps ? static_cast<int>(kSharedRadixMaxRows / kWarpSize) : 1;
  extern __shared__ uint32_t column_keys[];       // [size] (kShared only)
  __shared__ __align__(16) uint32_t hist[kBins];  // read 16 bytes at a time by the scans
  __shared__ uint32_t warp_a[kRadixWarps], warp_b[kRadixWarps];
  __shared__ uint32_t found_bin, found_above, found_count, only_key, key_lo, key_hi;
  // The keys still in the running after the first digit, when few (later passes read these).
  __shared__ uint32_t live_keys[kMaxLiveKeys];
  __shared__ int live_count;
  // Their positions (the large shared-memory block: step 3 completes its marks from them).
  __shared__ int32_t live_pos[kBitmaps ? kMaxLiveKeys : 1];
  // kBitmaps: per 32 positions, the bits of keys above the tie run and in it (step 3), and before
  // that of the keys above the running prefix and in it (step 1).
  __shared__ uint32_t greater_bits[kMaxWords], equal_bits[kMaxWords];

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const Problem p = MakeProblem(logits_t, ld, num_experts, blockIdx.x, scopes, total_capacity);
  auto key_at = [&](int i) -> uint32_t {
    if constexpr (kShared) {
      return column_keys[i];
    } else {
      return OrderedKey(p.column[p.Row(i)]);
    }
  };

  // The load sweep also counts the first digit (the top kDigitBits bits of every key).
  for (int b = tid; b < kBins; b += kRadixThreads) hist[b] = 0;
  __syncthreads();
  auto take_key = [&](int i, float logit) {
    const uint32_t k = OrderedKey(logit);
    if constexpr (kShared) column_keys[i] = k;
    atomicAdd(&hist[k >> (32 - kDigitBits)], 1u);
  };
  int scalar_from = 0;
  const float* contiguous = p.column + p.begin;
  if (p.rows == nullptr && IsAligned(contiguous, 16)) {
    // A contiguous column: 16-byte loads, several in flight per thread.
    const int vectors = p.size / 4;
#pragma unroll 8
    for (int v = tid; v < vectors; v += kRadixThreads) {
      const float4 x = reinterpret_cast<const float4*>(contiguous)[v];
      const uint4 k = {OrderedKey(x.x), OrderedKey(x.y), OrderedKey(x.z), OrderedKey(x.w)};
      if constexpr (kShared) reinterpret_cast<uint4*>(column_keys)[v] = k;
      atomicAdd(&hist[k.x >> (32 - kDigitBits)], 1u);
      atomicAdd(&hist[k.y >> (32 - kDigitBits)], 1u);
      atomicAdd(&hist[k.z >> (32 - kDigitBits)], 1u);
      atomicAdd(&hist[k.w >> (32 - kDigitBits)], 1u);
    }
    scalar_from = 4 * vectors;
  }
  for (int i = scalar_from + tid; i < p.size; i += kRadixThreads) take_key(i, p.column[p.Row(i)]);
  __syncthreads();

  // 1. prefix grows digit by digit to K. Invariant: fewer than `remaining` of the keys that match
  // prefix under mask are above K, at least `remaining` are >= K.
  uint32_t prefix = 0;
  // The prefix and mask of the keys the bitmaps marked as in the running (mask 0: none).
  uint32_t marked_prefix = 0, marked_mask = 0;
  constexpr int kWordsPerThread = kBitmaps ? kMaxWords / kRadixThreads : 1;
  const int words = static_cast<int>(CeilDiv(p.size, kWarpSize));
  const int w0 = tid * kWordsPerThread;  // thread tid owns words [w0, w0 + kWordsPerThread)
  {
    uint32_t mask = 0;
    int remaining = p.capacity;
    int low = 32;           // bits [0, low) are still open
    bool gathered = false;  // the keys in the running are in live_keys (else: read the column)
    auto each_live = [&](auto&& f) {
      if (gathered) {
        for (int c = tid; c < live_count; c += kRadixThreads) f(live_keys[c]);
      } else {
#pragma unroll 4
        for (int i = tid; i < p.size; i += kRadixThreads) f(key_at(i));
      }
    };
    for (int pass = 0; low > 0; ++pass) {
      const int width = min(kDigitBits, low), shift = low - width;
      const uint32_t digit_mask = (1u << width) - 1u;
      // From the second pass on, the column sweep also gathers the keys still in the running.
      const bool collect = pass > 0 && !gathered;
      if (pass > 0) {  // the first digit was counted while loading
        for (int b = tid; b < kBins; b += kRadixThreads) hist[b] = 0;
        if (tid == 0 && collect) live_count = 0;
        __syncthreads();
        if (collect && kBitmaps) {
          // A ballot sweep marks, per 32 positions, the keys in the running (equal_bits) and the
          // keys above them (greater_bits); then each thread takes its words' marked keys to
          // live_keys at an exclusive scan, with their positions, counting them as it goes.
          // Step 3 reuses the marks instead of sweeping the column again. Measured on the H200,
          // per column of 16384 keys: this takes about 9.6k cycles against 7.4k for gathering
          // with one counter update per key, and step 3 then 0.9k instead of 3.5k.
          const uint32_t above_prefix = prefix | ~mask;
#pragma unroll 4
          for (int w = warp; w < words; w += kRadixWarps) {
            const int i = w * kWarpSize + lane;
            const uint32_t k = i < p.size ? column_keys[i] : 0u;
            const unsigned above = __ballot_sync(kFullMask, i < p.size && k > above_prefix);
            const unsigned in = __ballot_sync(kFullMask, i < p.size && (k & mask) == prefix);
            if (lane == 0) {
              greater_bits[w] = above;
              equal_bits[w] = in;
            }
          }
          __syncthreads();
          uint32_t mine = 0;
#pragma unroll
          for (int q = 0; q < kWordsPerThread; ++q) {
            if (w0 + q < words) mine += __popc(equal_bits[w0 + q]);
          }
          uint32_t total = 0;
          uint32_t slot = BlockExclusiveSum<kRadixWarps>(mine, warp_a, &total);
          gathered = total <= kMaxLiveKeys;  // the same in every thread
          if (gathered) {
#pragma unroll
            for (int q = 0; q < kWordsPerThread; ++q) {
              if (w0 + q >= words) continue;
              for (uint32_t t = equal_bits[w0 + q]; t != 0; t &= t - 1u) {
                const int i = (w0 + q) * kWarpSize + __ffs(t) - 1;
                const uint32_t k = column_keys[i];
                live_keys[slot] = k;
                live_pos[slot++] = i;
                atomicAdd(&hist[(k >> shift) & digit_mask], 1u);
              }
            }
            if (tid == 0) live_count = static_cast<int>(total);
            marked_prefix = prefix;
            marked_mask = mask;
          } else {
            each_live([&](uint32_t k) {
              if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & digit_mask], 1u);
            });
          }
        } else {
          each_live([&](uint32_t k) {
            if ((k & mask) != prefix) return;
            atomicAdd(&hist[(k >> shift) & digit_mask], 1u);
            if (collect) {
              const int slot = atomicAdd(&live_count, 1);
              if (slot < kMaxLiveKeys) live_keys[slot] = k;
            }
          });
        }
        __syncthreads();
        if (collect && !kBitmaps) gathered = live_count <= kMaxLiveKeys;
      }
      // Counts of keys above each thread's run of bins: a suffix scan over the block.
      const int first_bin = tid * kBinsPerThread;
      static_assert(kBinsPerThread % 4 == 0, "16-byte loads of the bins");
      uint32_t local = 0;
#pragma unroll
      for (int b = 0; b < kBinsPerThread; b += 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(&hist[first_bin + b]);
        local += v.x + v.y + v.z + v.w;
      }
      uint32_t suffix = local;  // inclusive suffix sum within the warp
#pragma unroll
      for (int offset = 1; offset < kWarpSize; offset *= 2) {
        const uint32_t v = __shfl_down_sync(kFullMask, suffix, offset);
        if (lane + offset < kWarpSize) suffix += v;
      }
      if (lane == 0) warp_a[warp] = suffix;  // the warp's total
      __syncthreads();
      // Plus the totals of the warps after this one.
      uint32_t above =
          suffix - local +
          __reduce_add_sync(kFullMask, lane > warp && lane < kRadixWarps ? warp_a[lane] : 0u);
      if (above < static_cast<uint32_t>(remaining) &&
          above + local >= static_cast<uint32_t>(remaining)) {
        for (int b = first_bin + kBinsPerThread - 1; b >= first_bin; --b) {
          if (above + hist[b] >= static_cast<uint32_t>(remaining)) {
            found_bin = b;
            found_above = above;
            found_count = hist[b];
            break;
          }
          above += hist[b];
        }
      }
      __syncthreads();
      remaining -= static_cast<int>(found_above);
      prefix |= found_bin << shift;
      mask |= digit_mask << shift;
      low = shift;
      if (found_count == 1 && low > 0) {
        // One key left in the running (the usual case after two digits): it is K.
        each_live([&](uint32_t k) {
          if ((k & mask) == prefix) only_key = k;
        });
        __syncthreads();
        prefix = only_key;
        break;
      }
      __syncthreads();  // found_* and warp_a are rewritten by the next pass
    }
  }

  // 2. The run of keys with K's score: its upper end on warp 0, its lower end on warp 1.
  if (warp < 2) {
    const uint32_t end = warp == 0 ? SameScoreEnd(prefix, true, OrderedKey(INFINITY))
                                   : SameScoreEnd(prefix, false, OrderedKey(-INFINITY));
    if (lane == 0) (warp == 0 ? key_hi : key_lo) = end;
  }
  __syncthreads();
  const uint32_t run_lo = key_lo, run_hi = key_hi;

  if constexpr (kBitmaps) {
    // 3. Per 32 positions, the bits of the keys above the run and in it; thread t owns words
    // [t kWordsPerThread, ...). Scans over the threads give each word the run keys before it (the
    // run's lowest positions are taken up to capacity) and its output slot. When the run lies
    // inside the marked prefix, step 1's bits of the keys above it stand, and the gathered keys
    // (the rest of any that can be selected) complete them; otherwise one sweep sets them all.
    if (marked_mask != 0 && (run_lo & marked_mask) == marked_prefix &&
        (run_hi & marked_mask) == marked_prefix) {
#pragma unroll
      for (int q = 0; q < kWordsPerThread; ++q) {
        if (w0 + q < words) equal_bits[w0 + q] = 0;
      }
      __syncthreads();
      for (int c = tid; c < live_count; c += kRadixThreads) {
        const uint32_t k = live_keys[c];
        const int i = live_pos[c];
        const uint32_t bit = 1u << (i % kWarpSize);
        if (k > run_hi) {
          atomicOr(&greater_bits[i / kWarpSize], bit);
        } else if (k >= run_lo) {
          atomicOr(&equal_bits[i / kWarpSize], bit);
        }
      }
    } else {
#pragma unroll 4
      for (int w = warp; w < words; w += kRadixWarps) {
        const int i = w * kWarpSize + lane;
        const uint32_t k = i < p.size ? column_keys[i] : 0u;
        const unsigned gt = __ballot_sync(kFullMask, i < p.size && k > run_hi);
        const unsigned eq = __ballot_sync(kFullMask, i < p.size && k >= run_lo && k <= run_hi);
        if (lane == 0) {
          greater_bits[w] = gt;
          equal_bits[w] = eq;
        }
      }
    }
    __syncthreads();
    uint32_t my_greater = 0, my_equal = 0;
#pragma unroll
    for (int q = 0; q < kWordsPerThread; ++q) {
      if (w0 + q < words) {
        my_greater += __popc(greater_bits[w0 + q]);
        my_equal += __popc(equal_bits[w0 + q]);
      }
    }
    // Both counts in one scan: each total is <= kSharedRadixMaxRows < 2^16.
    static_assert(kSharedRadixMaxRows < (1 << 16), "packed counts");
    uint32_t total_packed = 0, total_taken = 0;
    const uint32_t before_packed =
        BlockExclusiveSum<kRadixWarps>(my_greater << 16 | my_equal, warp_a, &total_packed);
    int equal_rank = static_cast<int>(before_packed & 0xffffu);
    const int remaining = p.capacity - static_cast<int>(total_packed >> 16);
    uint32_t take[kWordsPerThread];
    uint32_t my_taken = 0;
#pragma unroll
    for (int q = 0; q < kWordsPerThread; ++q) {
      take[q] = 0;
      if (w0 + q >= words) continue;
      const uint32_t eq = equal_bits[w0 + q];
      const int count = __popc(eq), want = max(0, min(remaining - equal_rank, count));
      uint32_t eq_taken = eq;
      if (want < count) {  // the lowest `want` positions of the run in this word
        eq_taken = 0;
        uint32_t rest = eq;
        for (int b = 0; b < want; ++b) {
          eq_taken |= rest & (0u - rest);
          rest &= rest - 1u;
        }
      }
      take[q] = greater_bits[w0 + q] | eq_taken;
      equal_rank += count;
      my_taken += __popc(take[q]);
    }
    int slot = static_cast<int>(BlockExclusiveSum<kRadixWarps>(my_taken, warp_a, &total_taken));
#pragma unroll
    for (int q = 0; q < kWordsPerThread; ++q) {
      for (uint32_t t = take[q]; t != 0; t &= t - 1u) {
        const int i = (w0 + q) * kWarpSize + __ffs(t) - 1;
        const int64_t out = p.out + slot++;
        selected[out] = p.Row(i);
        if (selected_scores != nullptr) {
          selected_scores[out] = RouterSigmoid(KeyToFloat(column_keys[i]));
        }
      }
    }
    return;
  }

  // 3. Warp w walks a contiguous segment twice: counting, then (after a scan over warps) writing.
  const int segment =
      static_cast<int>(CeilDiv(CeilDiv(p.size, kRadixWarps), kWarpSize)) * kWarpSize;
  const int seg_begin = min(p.size, warp * segment), seg_end = min(p.size, seg_begin + segment);
  uint32_t greater = 0, equal = 0;
  for (int base = seg_begin; base < seg_end; base += kWarpSize) {
    const int i = base + lane;
    const uint32_t k = i < seg_end ? key_at(i) : 0u;
    greater += __popc(__ballot_sync(kFullMask, i < seg_end && k > run_hi));
    equal += __popc(__ballot_sync(kFullMask, i < seg_end && k >= run_lo && k <= run_hi));
  }
  __syncthreads();  // warp_a / warp_b reuse
  if (lane == 0) {
    warp_a[warp] = greater;
    warp_b[warp] = equal;
  }
  __syncthreads();
  int total_greater = 0;
  for (int w = 0; w < kRadixWarps; ++w) total_greater += static_cast<int>(warp_a[w]);
  const int remaining = p.capacity - total_greater;  // taken from the run, lowest positions first
  int equal_rank = 0, out_pos = 0;
  for (int w = 0; w < warp; ++w) {
    const int equal_taken = max(0, min(remaining - equal_rank, static_cast<int>(warp_b[w])));
    out_pos += static_cast<int>(warp_a[w]) + equal_taken;
    equal_rank += static_cast<int>(warp_b[w]);
  }
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = seg_begin; base < seg_end; base += kWarpSize) {
    const int i = base + lane;
    const uint32_t key = i < seg_end ? key_at(i) : 0u;
    const bool is_greater = i < seg_end && key > run_hi;
    const bool is_equal = i < seg_end && key >= run_lo && key <= run_hi;
    const unsigned equal_ballot = __ballot_sync(kFullMask, is_equal);
    const int my_equal_rank = equal_rank + __popc(equal_ballot & lanes_below);
    const bool take = is_greater || (is_equal && my_equal_rank < remaining);
    const unsigned take_ballot = __ballot_sync(kFullMask, take);
    if (take) {
      const int64_t slot = p.out + out_pos + __popc(take_ballot & lanes_below);
      selected[slot] = p.Row(i);
      if (selected_scores != nullptr) selected_scores[slot] = RouterSigmoid(KeyToFloat(key));
    }
    equal_rank += __popc(equal_ballot);
    out_pos += __popc(take_ballot);
  }
}

template <int kThreads, bool kShared>
absl::Status LaunchRadix(int64_t num_pairs, int64_t max_rows, const float* logits_t, int64_t ld,
                         int num_experts, const Scopes& scopes, const ExpertChoiceSelectArgs& a,
                         cudaStream_t stream) {
  size_t smem = 0;
  if constexpr (kShared) {
    static const cudaError_t attribute_error = cudaFuncSetAttribute(
        BlockRadixKernel<kThreads, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(kSharedRadixMaxRows * sizeof(uint32_t)));
    CUDA_RETURN_IF_ERROR(attribute_error);
    smem = max_rows * sizeof(uint32_t);
  }
  BlockRadixKernel<kThreads, kShared><<<num_pairs, kThreads, smem, stream>>>(
      logits_t, ld, num_experts, scopes, a.scopes.total_capacity, a.selected, a.selected_scores);
  return absl::OkStatus();
}

}  // namespace

ExpertChoicePath ChooseExpertChoicePath(int64_t max_scope_rows) {
  if (max_scope_rows <= kWarpRankMaxRows) return ExpertChoicePath::kWarpRank;
  if (max_scope_rows <= kSharedRadixMaxRows) return ExpertChoicePath::kBlockRadixShared;
  return ExpertChoicePath::kBlockRadixGlobal;
}

size_t ExpertChoiceWorkspaceBytes(LogitsLayout layout, int64_t num_tokens, int64_t num_experts) {
  switch (layout) {
    case LogitsLayout::kTokenMajor:
      return static_cast<size_t>(num_tokens) * num_experts * sizeof(float);
    case LogitsLayout::kExpertMajor:
      return 0;
  }
  return 0;
}

absl::Status ExpertChoiceSelect(const ExpertChoiceSelectArgs& a, cudaStream_t stream) {
  return ExpertChoiceSelect(a, ChooseExpertChoicePath(a.scopes.max_scope_rows), stream);
}

absl::Status ExpertChoiceSelect(const ExpertChoiceSelectArgs& a, ExpertChoicePath path,
                                cudaStream_t stream) {
  const ExpertChoiceScopes& sc = a.scopes;
  if (a.num_experts < 1 || a.num_experts > INT_MAX || a.num_tokens < 0 || a.num_tokens > INT_MAX) {
    return absl::InvalidArgumentError(
        "expert_choice: num_experts must be in [1, 2^31) and num_tokens in [0, 2^31)");
  }
  if (sc.num_scopes < 0 || sc.max_scope_rows < 0 || sc.max_scope_rows > a.num_tokens ||
      sc.total_capacity < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expert_choice: bad scope sizes (num_scopes ", sc.num_scopes, ", max_scope_rows ",
        sc.max_scope_rows, ", total_capacity ", sc.total_capacity, ")"));
  }
  if (sc.num_scopes == 0 || sc.total_capacity == 0) return absl::OkStatus();
  const int64_t num_pairs = sc.num_scopes * a.num_experts;
  if (num_pairs > INT_MAX) {
    return absl::InvalidArgumentError("expert_choice: num_scopes * num_experts must be < 2^31");
  }
  const int64_t max_rows = sc.max_scope_rows;
  switch (path) {
    case ExpertChoicePath::kWarpRank:
      if (max_rows > kWarpRankMaxRows) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert_choice: the warp-rank path holds scopes of <= ", kWarpRankMaxRows,
                         " rows, the largest has ", max_rows));
      }
      break;
    case ExpertChoicePath::kBlockRadixShared:
      if (max_rows > kSharedRadixMaxRows) {
        return absl::InvalidArgumentError(absl::StrCat(
            "expert_choice: the shared-memory radix path holds scopes of <= ", kSharedRadixMaxRows,
            " rows, the largest has ", max_rows));
      }
      break;
    case ExpertChoicePath::kBlockRadixGlobal:
      break;
  }

  const Scopes scopes{sc.row_offsets, sc.rows, sc.capacity, sc.selected_offsets};
  const int num_experts = static_cast<int>(a.num_experts);
  if (path == ExpertChoicePath::kWarpRank) {
    // Reads either layout directly.
    const LogitsView view{a.logits, a.num_tokens, num_experts,
                          a.layout == LogitsLayout::kTokenMajor};
    const dim3 grid(CeilDiv(num_experts, kWarpRankThreads / kWarpSize),
                    std::min<int64_t>(sc.num_scopes, 65535));
    if (max_rows <= kWarpSize) {
      WarpRankKernel<1><<<grid, kWarpRankThreads, 0, stream>>>(
          view, sc.num_scopes, scopes, sc.total_capacity, a.selected, a.selected_scores);
    } else if (max_rows <= 4 * kWarpSize) {
      WarpRankKernel<4><<<grid, kWarpRankThreads, 0, stream>>>(
          view, sc.num_scopes, scopes, sc.total_capacity, a.selected, a.selected_scores);
    } else {
      WarpRankKernel<8><<<grid, kWarpRankThreads, 0, stream>>>(
          view, sc.num_scopes, scopes, sc.total_capacity, a.selected, a.selected_scores);
    }
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  }

  // The radix paths read expert-major columns: the caller's, or a transposed copy.
  const float* logits_t = a.logits;
  switch (a.layout) {
    case LogitsLayout::kTokenMajor: {
      const size_t need = ExpertChoiceWorkspaceBytes(a.layout, a.num_tokens, a.num_experts);
      if (a.workspace_bytes < need) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert_choice: workspace of ", a.workspace_bytes, " bytes, need ", need));
      }
      if (CeilDiv(a.num_tokens, kTransposeTile) > 65535) {
        return absl::InvalidArgumentError("expert_choice: num_tokens must be < 2^21");
      }
      const dim3 grid(CeilDiv(a.num_experts, kTransposeTile),
                      CeilDiv(a.num_tokens, kTransposeTile));
      TransposeKernel<<<grid, dim3(kTransposeTile, kTransposeRowsPerPass), 0, stream>>>(
          a.logits, a.num_tokens, a.num_experts, static_cast<float*>(a.workspace));
      CUDA_RETURN_IF_ERROR(cudaGetLastError());
      logits_t = static_cast<const float*>(a.workspace);
      break;
    }
    case LogitsLayout::kExpertMajor:
      break;
  }
  const int64_t ld = a.num_tokens;
  switch (path) {
    case ExpertChoicePath::kWarpRank:
      break;  // launched above
    case ExpertChoicePath::kBlockRadixShared:
      if (max_rows <= kSmallRadixMaxRows) {
        RETURN_IF_ERROR((LaunchRadix<kSmallRadixThreads, true>(num_pairs, max_rows, logits_t, ld,
                                                               num_experts, scopes, a, stream)));
      } else {
        RETURN_IF_ERROR((LaunchRadix<kLargeRadixThreads, true>(num_pairs, max_rows, logits_t, ld,
                                                               num_experts, scopes, a, stream)));
      }
      break;
    case ExpertChoicePath::kBlockRadixGlobal:
      RETURN_IF_ERROR((LaunchRadix<kLargeRadixThreads, false>(num_pairs, max_rows, logits_t, ld,
                                                              num_experts, scopes, a, stream)));
      break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
