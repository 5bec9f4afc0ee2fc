// Hopper kernels of moe_gemm.h. CTAs of 384 threads, one per SM, persistent, in clusters of two
// that walk the same work units (WorkOf):
//   - a pair unit: two row tiles of one expert (tile list slots 2 i, 2 i + 1) against the same
//     column tile of its weights. Each CTA copies one of B's two 128-row boxes into both CTAs'
//     shared memory (TMA multicast), so B leaves L2 once for 256 rows of A;
//   - a single unit: an expert's odd last row tile against two column tiles, one per CTA, each
//     copying all of its B itself.
// A tile may be tall: up to kTallRows rows more than kBM, which the consumers compute as a
// swapped product beside the tile's own (Consume); an expert's remainder rows join its single
// last tile or the two tiles of a pair that way instead of taking a tile of their own
// (SplitExpert).
// Each CTA:
//   warpgroup 0: producer. It waits until both CTAs' consumers have freed a stage of the ring (the
//                peer writes into it too), then fills it:
//                B always by tensor copies (TMA, cp.async.bulk.tensor) that complete their bytes
//                on the stage's full barrier of every CTA they write to. A:
//                - down kernel: the activations are in assignment order, so one thread issues
//                  the tensor copies of A beside B's, and one arrival with the byte count. A single
//                  unit's two CTAs share A: each copies one 64-row half to both;
//                - up kernel: x rows gathered through the plan's token_idx by all 128 threads with
//                  cp.async; each thread arrives once its copies for the stage have landed and are
//                  fenced over to the async proxy (checked after issuing the next stage).
//   warpgroups 1, 2: consumers, rows 0-63 and 64-127 of the A tile against all 256 rows of the B
//                tile. They wait on full[s], run 4 wgmma k16 steps, and once the previous stage's
//                wgmma has retired release it on empty[s - 1] of both CTAs (one arrival per
//                consumer warp on each).
// Shared-memory tiles are K-major with the 128-byte swizzle (16-byte chunk c of row r stored at
// chunk c ^ (r % 8)), 1024-byte aligned, one 64-element K slab per stage; a wgmma descriptor
// advances 32 bytes per k16 step inside the slab. The tensor copies write the same swizzle.
// Outputs (up: 128 x 128 BF16 activations per tile, down: 128 x 256) leave through shared memory:
// each consumer warp writes its rows there and bulk-copies them out row by row (cp.async.bulk), so
// a tile's stores overlap the next tile's multiplies; with two staging passes the second waits,
// packed in registers, until the next tile's multiplies are issued (Consume); rows past
// the tile's end are never written.
#include <cuda.h>          // CUtensorMap
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/moe_gemm.h"
#include "kernels/util/status_macros.h"

namespace moeserve::cuda {
namespace {

constexpr int kBM = 128;  // A rows (assignments) per tile
constexpr int kBN = 256;  // B rows (weight rows) per tile
constexpr int kThreads = 384;
constexpr int kConsumerWarps = 8;

// The ring: stages of one 64-element K slab each (one 128-byte swizzle row per tile row). Slabs
// of 32 elements with the 64-byte swizzle and 8 or 9 stages measured 10-40% slower on the H200
// (docs/CUDA.md).
constexpr int kBK = 64;
constexpr int kRowBytes = kBK * 2;
constexpr int kATileBytes = kBM * kRowBytes;
constexpr int kBTileBytes = kBN * kRowBytes;
// A tall tile: a full tile plus up to kTallRows of its expert's remainder rows, which the same
// CTA computes as a swapped product (the B tile's rows as wgmma's 64-row operand, the
// remainder's rows as its n8, n16 or n32 operand, the narrowest that holds them), so that a
// remainder costs at most a quarter more multiplies on one or two tiles instead of a row tile of
// its own (see Consume, SplitExpert). The remainder's rows follow the tile's 128 in the stage.
constexpr int kTallRows = 32;
constexpr int kTallBytes = kTallRows * kRowBytes;
// The three kernels. Every output tile leaves through shared memory (StagePass), each consumer
// warp staging its 16 rows at once or 8 at a time:
//   - up (K = hidden: 32 slabs per tile, 128 x 128 SwiGLU outputs): 4 stages, 8 rows. Against
//     stores from registers 6-7 us faster for expert-choice at N = 4096 and 18-20 at N = 16384
//     (the bulk copies overlap the next tile's multiplies); with 3 stages and 16 rows 1-17% slower;
//   - down (K = expert width: 8 slabs per tile, 128 x 256 outputs): 3 stages and 16 rows (kDown3)
//     or 4 stages and 8 rows (kDown4: 4 stages and 16 rows do not fit).
// On the H200 kDown4 was up to 35 us faster at N = 8192 and 16384 (several row tiles per expert,
// the tensor cores the limit) and 13 us slower for expert-choice at N = 4096 (one tile per
// expert, DRAM the limit); with 8 rows and 3 stages the layer was as fast as kDown3. So the
// launch picks kDown4 from two row tiles per expert on average (MoeGemm).
enum class Kind { kUp, kDown3, kDown4 };
__host__ __device__ constexpr bool IsUp(Kind k) { return k == Kind::kUp; }
__host__ __device__ constexpr int Stages(Kind k) { return k == Kind::kDown3 ? 3 : 4; }
// Tall tiles need room for their remainder in every stage, which kDown4 has not (4 stages and 8
// staging rows fill shared memory): with kDown4 the tile list has none.
__host__ __device__ constexpr bool HasTall(Kind k) { return k != Kind::kDown4; }
// A stage: A (the tile's rows, then a tall tile's remainder), then B.
__host__ __device__ constexpr int AStageBytes(Kind k) {
  return kATileBytes + (HasTall(k) ? kTallBytes : 0);
}
__host__ __device__ constexpr int StageBytes(Kind k) { return AStageBytes(k) + kBTileBytes; }
__host__ __device__ constexpr int StagedRows(Kind k) { return k == Kind::kDown3 ? 16 : 8; }
// Output columns of a tile: the up kernel's SwiGLU halves its 256 accumulator columns.
__host__ __device__ constexpr int OutCols(Kind k) { return IsUp(k) ? kBN / 2 : kBN; }
// A staging row: the tile row's BF16 outputs, padded by 16 bytes so that the accumulator
// fragment's stores hit 32 different banks.
__host__ __device__ constexpr int StagingRowBytes(Kind k) { return OutCols(k) * 2 + 16; }
__host__ __device__ constexpr int StagingWarpBytes(Kind k) {
  return StagedRows(k) * StagingRowBytes(k);
}
constexpr size_t SmemBytes(Kind k) {
  return size_t{1024} + size_t(Stages(k)) * StageBytes(k) +
         size_t{kConsumerWarps} * StagingWarpBytes(k) + 2 * Stages(k) * sizeof(uint64_t);
}
static_assert(SmemBytes(Kind::kUp) <= 227 * 1024 && SmemBytes(Kind::kDown3) <= 227 * 1024 &&
                  SmemBytes(Kind::kDown4) <= 227 * 1024,
              "shared memory");
// The up kernel's producer publishes a stage one stage late: with fewer than 3 stages it would
// wait for a slot that only its own late arrival can free.
static_assert(Stages(Kind::kUp) >= 3, "ring depth");
constexpr int kMaxExperts = 1024;

// How a row tile shares its expert's weight tiles with the other CTA of its cluster: tiles 2 i and
// 2 i + 1 of an expert form a pair (the two CTAs take one row tile each, same columns, and each
// copies half of B to both); an expert's last tile, when its count is odd, is single (the two CTAs
// take the same rows, different columns, each copies all of its own B).
enum MoeTilePair : int32_t { kSingle = 0, kPairFirst = 1, kPairSecond = 2 };

// 16-byte aligned: the tile-list kernel writes a tile with one store and the GEMMs read it with
// one load.
struct alignas(16) MoeTile {
  int32_t row_begin;  // first assignment of the tile
  int32_t rows;       // 1..kBM, or up to kBM + kTallRows for a tall tile (0: see WorkOf)
  int32_t expert;
  int32_t pair;  // MoeTilePair
};

// How expert e's `count` rows become tiles (TileListKernel). Plain: ceil(count / kBM) tiles of kBM
// rows, the last one short. A remainder of r rows past f full tiles may join full tiles instead
// of taking a tile of its own:
//   - tall single: f odd, r <= kTallRows: the last (single) tile takes all r rows;
//   - tall pair (kSinglesAndPairs): r <= 2 kTallRows and a pair of full tiles to take them: the
//     last two for f even, the two before the single last one for f odd >= 3. The pair's first
//     tile takes ceil(r / 2) rows, its second the rest, so both CTAs of the pair run the same
//     longer K loop (with the remainder on one tile only, the other CTA waited for it at every
//     stage: token-choice skew N = 1024 196 -> 208 us).
// An expert's tiles are contiguous: each begins where the one before ends.
struct TileSplit {
  int32_t tiles;     // number of tiles
  int32_t tall_at;   // first tile holding extra rows, or -1
  int32_t extra[2];  // extra rows of tiles tall_at and tall_at + 1
};
enum class TallTiles { kNone, kSingles, kSinglesAndPairs };
__device__ __forceinline__ TileSplit SplitExpert(int32_t count, TallTiles tall) {
  const int32_t f = count / kBM, r = count % kBM;
  TileSplit s{(count + kBM - 1) / kBM, -1, {0, 0}};
  if (tall == TallTiles::kNone || r == 0) return s;
  if (f % 2 == 1 && r <= kTallRows) {
    s = {f, f - 1, {r, 0}};
  } else if (tall == TallTiles::kSinglesAndPairs && r <= 2 * kTallRows && f >= 2) {
    const int32_t first = f % 2 == 0 ? f - 2 : f - 3;
    if (first >= 0) s = {f, first, {(r + 1) / 2, r / 2}};
  }
  return s;
}

// The order of a tile list. Units go round-robin to the clusters, and the last round leaves
// clusters idle when the units do not divide evenly over them. When no expert has more than two
// row tiles (every unit bound by DRAM: an expert's weights serve few rows), the experts of one
// tall tile (kBM + 1 to kBM + kTallRows rows: up to a quarter more multiplies and gathers than a
// plain tile) come first, so that the last round holds cheaper units; otherwise, and within
// each group, experts go by index. Each expert's tiles stay together. Token-choice at N = 4096
// (about half of the experts with one tall tile, the rest one plain tile): 580-590 -> 573-576
// us. Tall experts first also when others have more tiles bunched the DRAM-bound units of
// lightly loaded experts, which had run between the compute-bound ones of heavily loaded
// experts: token-choice skew N = 4096 480-484 -> 502-504 us.
__device__ __forceinline__ bool OneTallTile(const TileSplit& s) {
  return s.tiles == 1 && s.tall_at == 0;
}

// One block, a thread per expert (a whole number of warps), once per list (the up kernel's with
// `up_tall`, then, when its tiles are not null, the down kernel's without tall tiles): thread e
// emits expert e's tiles (SplitExpert) at their place in the list's order (above); thread 0
// writes the number of tiles. (1024 threads whatever the experts, and four 4-byte stores a
// tile: 4.7-6.1 us at N = 4096, 13-16 us at 16384 under ncu; now 2.8-4.0 and 5.1-9.9.)
struct TileList {
  MoeTile* tiles;
  int32_t* num_tiles;
};
__global__ void TileListKernel(const int32_t* __restrict__ expert_offsets, int num_experts,
                               TallTiles up_tall, TileList up_list, TileList down_list) {
  __shared__ int scratch[kWarpSize];
  const int e = threadIdx.x;
  const int32_t begin = e < num_experts ? expert_offsets[e] : 0;
  const int32_t count = e < num_experts ? expert_offsets[e + 1] - begin : 0;
  for (int l = 0; l < 2; ++l) {
    const TileList list = l == 0 ? up_list : down_list;
    if (list.tiles == nullptr) break;
    const TileSplit split = SplitExpert(count, l == 0 ? up_tall : TallTiles::kNone);
    const int32_t mine = split.tiles;
    const bool many_tiles = __syncthreads_or(mine > 2);
    const bool first_group = !many_tiles && OneTallTile(split);
    int in_first = 0, in_rest = 0;
    const int before_first = BlockExclusiveScan(first_group ? mine : 0, scratch, &in_first);
    const int before_rest = BlockExclusiveScan(first_group ? 0 : mine, scratch, &in_rest);
    const int32_t first = first_group ? before_first : in_first + before_rest;
    int32_t row = begin;
    for (int32_t i = 0; i < mine; ++i) {
      const int32_t pair = i % 2 == 1 ? kPairSecond : (i + 1 < mine ? kPairFirst : kSingle);
      const int32_t j = i - split.tall_at;
      const int32_t rows = split.tall_at >= 0 && (j == 0 || j == 1) ? kBM + split.extra[j]
                                                                    : min(kBM, begin + count - row);
      list.tiles[first + i] = {row, rows, e, pair};
      row += rows;
    }
    if (e == 0) *list.num_tiles = in_first + in_rest;
  }
}

struct KernelParams {
  CUtensorMap a_map;         // down: act [assignments, k], 64-row boxes (up: unused)
  CUtensorMap a_tall_map;    // down: the same with kTallRows-row boxes (a tall tile's remainder)
  CUtensorMap b_map;         // the weights [experts * b_rows_per_expert, k], 128-row boxes
  const __nv_bfloat16* x;    // up: [tokens, k], gathered with cp.async; down: null
  const int32_t* token_idx;  // up: the plan's token_idx; down: null (rows are assignments)
  int32_t b_rows_per_expert;
  // A column tile's B is two 128-row boxes: rows b_row and b_row + b_box1_offset, where b_row =
  // expert * b_rows_per_expert + column tile * b_tile_step. Up: the gate rows and the matching up
  // rows (offset expert_width, step 128); down: 256 consecutive rows (offset 128, step 256).
  int32_t b_box1_offset;
  int32_t b_tile_step;
  int32_t k;         // multiple of kBK
  int32_t n_tiles;   // output column tiles per row tile
  int32_t out_cols;  // up: expert_width; down: hidden
  const MoeTile* tiles;
  const int32_t* num_tiles;
  __nv_bfloat16* out;  // [assignments, out_cols]
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOESERVE_SM90A 1
#endif

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#ifdef MOESERVE_SM90A
__device__ __forceinline__ void MbarInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SmemAddr(bar)), "r"(count));
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n"
      "@!P bra WAIT;\n}\n" ::"r"(SmemAddr(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(SmemAddr(bar)) : "memory");
}
// The one arrival a stage's full barrier waits for, with the bytes its tensor copies will bring.
__device__ __forceinline__ void MbarArriveExpectBytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}
// A 2-D box of `map` at (column c0, row c1) into shared memory; completes bytes on `bar`.
__device__ __forceinline__ void TmaLoad(uint32_t dst, const CUtensorMap* map, int32_t c0,
                                        int32_t c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(SmemAddr(bar))
      : "memory");
}
// The same box into this offset of every CTA of the cluster in `mask`, completing bytes on each
// one's barrier at `bar`'s offset.
__device__ __forceinline__ void TmaLoadMulticast(uint32_t dst, const CUtensorMap* map, int32_t c0,
                                                 int32_t c1, uint64_t* bar, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(SmemAddr(bar)), "h"(mask)
      : "memory");
}
__device__ __forceinline__ uint32_t ClusterRank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
// A shared-memory address of this CTA as the same offset in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t PeerAddr(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
// An arrival on a barrier of another CTA of the cluster (a consumer freeing a stage the peer's
// producer writes into). Default semantics, as CUTLASS's cluster pipelines use: an explicit
// .release.cluster made every layer 10-15% slower on the H200 (it orders all of the thread's
// earlier memory operations at cluster scope before the arrival).
__device__ __forceinline__ void MbarArrivePeer(uint32_t cluster_addr) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(cluster_addr) : "memory");
}
// Every thread of both CTAs: barrier inits visible cluster-wide before use, and no CTA leaves
// while its peer may still arrive on its barriers.
__device__ __forceinline__ void ClusterSync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}
// Every cp.async group but the newest kPending has landed: make their writes visible to the
// async proxy that wgmma reads through (each writing thread fences its own writes).
template <int kPending>
__device__ __forceinline__ void LandedAndFenced() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// 16 bytes global -> shared, through L2 only; src_bytes 0 fills zeros.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

// wgmma shared-memory descriptor: K-major, 128-byte rows with the 128-byte swizzle, 8-row groups
// 1024 bytes apart.
__device__ __forceinline__ uint64_t SmemDesc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// D[64 x 256] (+)= A[64 x 16] B[256 x 16]^T, both from shared memory; scale_d 0 overwrites D.
__device__ __forceinline__ void Wgmma256(float (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                         int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, "
      "%127"
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// D[64 x kN] (+)= A[64 x 16] B[kN x 16]^T, kN = 8, 16 or 32: a tall tile's remainder, swapped
// (A: 64 rows of the B tile, B: the remainder's first kN rows), in d[0, kN / 2) (the layout of
// the n32 product's first kN / 2 registers).
template <int kN>
__device__ __forceinline__ void WgmmaTall(float (&d)[16], uint64_t desc_a, uint64_t desc_b,
                                          int scale_d) {
  if constexpr (kN == 32) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
        "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else if constexpr (kN == 16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7"
        "}, %8, %9, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else {
    static_assert(kN == 8);
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3"
        "}, %4, %5, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
}

// The swapped product's width for a tall tile's `extra` rows (1..kTallRows).
__device__ __forceinline__ int TallWidth(int extra) {
  return extra <= 8 ? 8 : extra <= 16 ? 16 : 32;
}

template <int kN>
__device__ __forceinline__ void FenceOperands(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Work unit u of a cluster (the two CTAs walk the same units): each tile-list slot b owns
// h = ceil(n_tiles / 2) units. A pair's 2 h units (slots b0, b0 + 1) are its column tiles, the
// CTA of rank r taking row tile b0 + r; a single tile's h units are column pairs, rank r taking
// column 2 q + r. A column past the end (odd n_tiles) leaves the CTA rows = 0 on a valid column:
// it copies and passes stages like the others but computes and stores nothing.
struct TileWork {
  MoeTile mt;
  int nt;        // output column tile
  bool share_b;  // a pair: this CTA copies B box `rank` to both CTAs
  bool share_a;  // a single unit: both CTAs read the same A rows
  bool tall;     // mt is a tall tile (even where rows was set to 0: its peer copies its remainder)
};
__device__ __forceinline__ int UnitCount(const KernelParams& p) {
  return *p.num_tiles * ((p.n_tiles + 1) / 2);
}
__device__ __forceinline__ TileWork WorkOf(const KernelParams& p, int u, uint32_t rank) {
  const int h = (p.n_tiles + 1) / 2;
  const int b = u / h, q = u % h;
  TileWork w{p.tiles[b], 0, false, false, false};
  if (w.mt.pair == kSingle) {
    w.nt = 2 * q + static_cast<int>(rank);
    w.share_a = true;
  } else {
    const int b0 = w.mt.pair == kPairFirst ? b : b - 1;
    w.nt = (b - b0) * h + q;
    w.mt = p.tiles[b0 + rank];
    w.share_b = true;
  }
  w.tall = w.mt.rows > kBM;
  if (w.nt >= p.n_tiles) {
    w.nt = p.n_tiles - 1;
    w.mt.rows = 0;
  }
  return w;
}
// Calls fn(work) for each unit of this CTA's cluster, in order. (Loading the next unit's tile
// ahead of the current unit's work measured no faster.)
template <typename Fn>
__device__ __forceinline__ void ForEachUnit(const KernelParams& p, uint32_t rank, Fn&& fn) {
  const int total = UnitCount(p);
  for (int u = blockIdx.x / 2; u < total; u += gridDim.x / 2) fn(WorkOf(p, u, rank));
}
__device__ __forceinline__ int32_t BRow(const KernelParams& p, const TileWork& w) {
  return w.mt.expert * p.b_rows_per_expert + w.nt * p.b_tile_step;
}
// B's two 128-row boxes of K slab kt into sb: a pair's CTA copies its box to both CTAs, a single
// tile's copies both boxes to itself. Either way every CTA's barrier receives kBTileBytes.
__device__ __forceinline__ void LoadB(const KernelParams& p, const TileWork& w, uint32_t rank,
                                      int32_t b_row, int kt, uint32_t sb, uint64_t* bar) {
  if (w.share_b) {
    TmaLoadMulticast(sb + rank * (kBTileBytes / 2), &p.b_map, kt * kBK,
                     b_row + static_cast<int32_t>(rank) * p.b_box1_offset, bar, 0x3);
  } else {
    TmaLoad(sb, &p.b_map, kt * kBK, b_row, bar);
    TmaLoad(sb + kBTileBytes / 2, &p.b_map, kt * kBK, b_row + p.b_box1_offset, bar);
  }
}

// The down kernel's producer: one thread, tensor copies only. Stage s is full once its one
// arrival (with the byte count) is in and the copies' bytes have landed.
template <Kind kKind>
__device__ __forceinline__ void ProduceTiles(const KernelParams& p, uint32_t smem_base,
                                             uint64_t* full, uint64_t* empty) {
  constexpr int kStages = Stages(kKind);
  const uint32_t rank = ClusterRank();
  const int k_tiles = p.k / kBK;
  int it = 0;
  ForEachUnit(p, rank, [&](const TileWork& w) {
    const int32_t b_row = BRow(p, w);
    const bool tall = HasTall(kKind) && w.tall;
    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
      const int stage = it % kStages;
      MbarWait(&empty[stage], ((it / kStages) & 1) ^ 1);
      const uint32_t sa = smem_base + stage * StageBytes(kKind);
      MbarArriveExpectBytes(&full[stage], kATileBytes + kBTileBytes + (tall ? kTallBytes : 0));
      if (w.share_a) {  // each CTA copies one half of the rows to both, the first the remainder
        TmaLoadMulticast(sa + rank * (kATileBytes / 2), &p.a_map, kt * kBK,
                         w.mt.row_begin + static_cast<int32_t>(rank) * (kBM / 2), &full[stage],
                         0x3);
        if (tall && rank == 0) {
          TmaLoadMulticast(sa + kATileBytes, &p.a_tall_map, kt * kBK, w.mt.row_begin + kBM,
                           &full[stage], 0x3);
        }
      } else {
        TmaLoad(sa, &p.a_map, kt * kBK, w.mt.row_begin, &full[stage]);
        TmaLoad(sa + kATileBytes / 2, &p.a_map, kt * kBK, w.mt.row_begin + kBM / 2, &full[stage]);
        if (tall) {
          TmaLoad(sa + kATileBytes, &p.a_tall_map, kt * kBK, w.mt.row_begin + kBM, &full[stage]);
        }
      }
      LoadB(p, w, rank, b_row, kt, sa + AStageBytes(kKind), &full[stage]);
    }
  });
}

// The up kernel's producer: the whole warpgroup. B (128 gate rows, then the matching 128 up rows)
// comes by two tensor copies that thread 0 issues, with one arrival carrying their byte count.
// A is gathered: thread t copies 16-byte chunk t % 8 of rows t / 8 + 16 i through the plan's
// token_idx with cp.async (tensor copies of single 128-byte rows measured 4x slower), and arrives
// once that stage's group has landed and been fenced over to the async proxy, which it checks
// after issuing the next stage. So stage s is full after 129 arrivals and B's bytes.
template <int kStages>
__device__ __forceinline__ void ProduceGather(const KernelParams& p, uint32_t smem_base,
                                              uint64_t* full, uint64_t* empty) {
  constexpr int kChunks = kRowBytes / 16, kRowStep = 128 / kChunks;
  constexpr int kRows = kBM / kRowStep, kTallRowsEach = kTallRows / kRowStep;
  const int t = threadIdx.x;  // 0..127
  const int chunk = t % kChunks, row0 = t / kChunks;
  // Rows row0 + kRowStep i all sit at the same place in the swizzle pattern.
  const uint32_t swz = static_cast<uint32_t>((chunk ^ (row0 % 8)) * 16);
  const uint32_t rank = ClusterRank();
  const int k_tiles = p.k / kBK;
  int it = 0;
  ForEachUnit(p, rank, [&](const TileWork& w) {
    const MoeTile& mt = w.mt;
    // Rows kBM and up (a tall tile's remainder) are copied only for tall tiles.
    const __nv_bfloat16* a_row[kRows + kTallRowsEach];
    uint32_t a_bytes[kRows + kTallRowsEach];
#pragma unroll
    for (int i = 0; i < kRows + kTallRowsEach; ++i) {
      const int r = row0 + kRowStep * i;
      const bool valid = r < mt.rows;
      a_row[i] = p.x + (valid ? int64_t{p.token_idx[mt.row_begin + r]} : 0) * p.k + chunk * 8;
      a_bytes[i] = valid ? 16 : 0;
    }
    const bool tall = mt.rows > kBM;
    const int32_t b_row = BRow(p, w);
    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
      const int stage = it % kStages;
      MbarWait(&empty[stage], ((it / kStages) & 1) ^ 1);
      const uint32_t sa = smem_base + stage * StageBytes(Kind::kUp);
      const uint32_t sb = sa + AStageBytes(Kind::kUp);
      if (t == 0) {
        MbarArriveExpectBytes(&full[stage], kBTileBytes);
        LoadB(p, w, rank, b_row, kt, sb, &full[stage]);
      }
      const uint32_t dst = sa + row0 * kRowBytes + swz;
#pragma unroll
      for (int i = 0; i < kRows + kTallRowsEach; ++i) {
        if (i >= kRows && !tall) break;
        CpAsync16(dst + i * kRowStep * kRowBytes, a_row[i] + kt * kBK, a_bytes[i]);
      }
      asm volatile("cp.async.commit_group;" ::: "memory");
      if (it > 0) {
        LandedAndFenced<1>();
        MbarArrive(&full[(it - 1) % kStages]);
      }
    }
  });
  LandedAndFenced<0>();
  if (it > 0) MbarArrive(&full[(it - 1) % kStages]);
}

// Output column pair j of fragment row `half` of one warp's 16 rows, as two BF16. (The accumulator
// fragment: register 4 j + q holds row warp * 16 + lane / 4 + 8 (q / 2), column 8 j + 2 (lane % 4)
// + q % 2 of the warpgroup's 64 x 256 block.) The up kernel's SwiGLU uses the hardware exp and
// divide (__expf, __fdividef): their float error, a few ulps, is far below the BF16 rounding that
// follows, and they made the layer 2-3% faster at N >= 4096 tokens than IEEE expf and division.
__device__ __forceinline__ float Swiglu(float g, float u) {
  return __fdividef(g, 1.0f + __expf(-g)) * u;
}
template <Kind kKind>
__device__ __forceinline__ __nv_bfloat162 OutPair(const float (&acc)[128], int j, int half) {
  if constexpr (IsUp(kKind)) {
    float h[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      h[q] = Swiglu(acc[4 * j + 2 * half + q], acc[64 + 4 * j + 2 * half + q]);
    }
    return __floats2bfloat162_rn(h[0], h[1]);
  } else {
    return __floats2bfloat162_rn(acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
  }
}

// A warp's 16 output rows leave through its staging rows in passes: one of 16 rows (kDown3) or
// two of 8 (StagedRows). A pass's outputs, packed as BF16 pairs, are PassWords words a thread.
__host__ __device__ constexpr int Passes(Kind k) { return 16 / StagedRows(k); }
__host__ __device__ constexpr int PassWords(Kind k) { return StagedRows(k) / 8 * OutCols(k) / 8; }

// Fragment rows lane / 4 (half 0) and lane / 4 + 8 (half 1) of pass `pass`, packed.
template <Kind kKind>
__device__ __forceinline__ uint32_t PassWord(const float (&acc)[128], int pass, int h, int j) {
  const __nv_bfloat162 v = OutPair<kKind>(acc, j, StagedRows(kKind) == 16 ? h : pass);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One pass through the warp's staging rows: every lane writes its fragment (word(h, j): half h,
// column pair j), then one lane per row bulk-copies it out. The copies run on while the warp
// goes on; the next write to the staging rows first waits until they have been read.
template <Kind kKind, typename Word>
__device__ __forceinline__ void StagePass(const KernelParams& p, const MoeTile& mt, int nt,
                                          int warp_row0, uint32_t staging, int pass, Word&& word) {
  constexpr int kRows = StagedRows(kKind), kCols = OutCols(kKind);
  constexpr int kRowBytes = StagingRowBytes(kKind);
  static_assert(kRows == 8 || kRows == 16, "staging rows");
  const int lane = threadIdx.x % kWarpSize;
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  __syncwarp();
#pragma unroll
  for (int h = 0; h < kRows / 8; ++h) {
    const uint32_t row = staging + (lane / 4 + 8 * h) * kRowBytes + 4 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) {
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(row + 16 * j), "r"(word(h, j)) : "memory");
    }
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the bulk copies
  __syncwarp();
  const int r = warp_row0 + kRows * pass + lane;
  if (lane < kRows && r < mt.rows) {
    const __nv_bfloat16* dst =
        p.out + static_cast<int64_t>(mt.row_begin + r) * p.out_cols + nt * kCols;
    asm volatile(
        "cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n"
        "cp.async.bulk.commit_group;" ::"l"(reinterpret_cast<uint64_t>(dst)),
        "r"(staging + lane * kRowBytes), "n"(kCols * 2)
        : "memory");
  }
}

// The B tile rows of warpgroup cw's two remainder blocks: up, gate rows 64 cw .. and the matching
// up rows 128 + 64 cw .. (so SwiGLU pairs registers of one thread); down, rows 128 cw .. + 128.
template <Kind kKind>
__device__ __forceinline__ int RemainderRow(int cw, int block) {
  return IsUp(kKind) ? 128 * block + 64 * cw : 128 * cw + 64 * block;
}

// A tall tile's remainder rows, from the swapped accumulators: register 4 j + q of block b holds
// output column RemainderRow(cw, b) + warp * 16 + lane / 4 + 8 (q / 2) of remainder row
// 8 j + 2 (lane % 4) + q % 2 (registers of rows past the product's width, and so past `extra`,
// are not read). Few and scattered: plain 2-byte stores.
template <Kind kKind>
__device__ __forceinline__ void StoreRemainder(const KernelParams& p, const MoeTile& mt, int nt,
                                               int cw, int warp, int lane,
                                               const float (&rem)[2][16]) {
  const int extra = mt.rows - kBM;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int row = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    if (row >= extra) continue;
    const int col = warp * 16 + lane / 4 + 8 * ((i % 4) / 2);
    __nv_bfloat16* out =
        p.out + static_cast<int64_t>(mt.row_begin + kBM + row) * p.out_cols + nt * OutCols(kKind);
    if constexpr (IsUp(kKind)) {
      out[RemainderRow<kKind>(cw, 0) + col] = __float2bfloat16_rn(Swiglu(rem[0][i], rem[1][i]));
    } else {
      out[RemainderRow<kKind>(cw, 0) + col] = __float2bfloat16_rn(rem[0][i]);
      out[RemainderRow<kKind>(cw, 1) + col] = __float2bfloat16_rn(rem[1][i]);
    }
  }
}

template <Kind kKind>
__device__ __forceinline__ void Consume(const KernelParams& p, uint32_t smem_base, uint64_t* full,
                                        uint64_t* empty) {
  constexpr bool kUp = IsUp(kKind);
  constexpr int kStages = Stages(kKind);
  const int ct = threadIdx.x - 128;  // 0..255
  const int cw = ct / 128;           // consumer warpgroup: A rows 64 cw ..
  const int warp = (ct % 128) / kWarpSize, lane = ct % kWarpSize;
  const uint32_t staging =
      smem_base + kStages * StageBytes(kKind) + (ct / kWarpSize) * StagingWarpBytes(kKind);
  const uint32_t rank = ClusterRank();
  // A stage is free once both CTAs' consumers are done with it: the peer's producer writes into
  // this CTA's stage too (its half of B).
  const uint32_t peer_empty = PeerAddr(SmemAddr(empty), rank ^ 1);
  auto release = [&](int stage) {
    if (lane == 0) {
      MbarArrive(&empty[stage]);
      MbarArrivePeer(peer_empty + stage * sizeof(uint64_t));
    }
  };
  const int k_tiles = p.k / kBK;
  float acc[128];
  float rem[2][16];  // a tall tile's remainder (StoreRemainder)
  // With two staging passes, a tile's second one is staged once the next tile's second K slab is
  // issued, so that the tensor cores need not wait for the first pass's copies to read the
  // staging rows (kUp: 16 registers a thread, kDown4: 32). Against staging it at once on the
  // H200: token-choice N = 16384 1851-1860 -> 1807-1810 us, expert-choice cf 1.25 2121-2162 ->
  // 2068-2079, N <= 4096 within the spread. Deferring both of kDown4's passes (64 registers)
  // was 1% slower; both of kUp's spill.
  constexpr bool kDefer = Passes(kKind) == 2;
  uint32_t deferred[PassWords(kKind)] = {};
  MoeTile deferred_mt{0, 0, 0, 0};  // rows 0: nothing deferred
  int deferred_nt = 0, deferred_row0 = 0;
  auto stage_deferred = [&] {
    if constexpr (kDefer) {
      if (deferred_mt.rows > 0) {
        StagePass<kKind>(p, deferred_mt, deferred_nt, deferred_row0, staging, 1,
                         [&](int h, int j) { return deferred[h * (OutCols(kKind) / 8) + j]; });
      }
      deferred_mt.rows = 0;
    }
  };
  int it = 0;
  ForEachUnit(p, rank, [&](const TileWork& w) {
    const MoeTile& mt = w.mt;
    const int nt = w.nt;
    const bool tall = HasTall(kKind) && mt.rows > kBM;
    if (cw * 64 >= mt.rows) {
      // No rows for this warpgroup (a tile of <= 64 rows, or none): pass the stages through and
      // leave the tensor cores to the other one.
      stage_deferred();
      for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int stage = it % kStages;
        MbarWait(&full[stage], (it / kStages) & 1);
        release(stage);
      }
      return;
    }
    // The K loop, once per width of a tall tile's swapped remainder (0: none): one loop with the
    // remainder's multiplies under a branch made ptxas serialize every wgmma (C7520).
    auto multiply = [&](auto remainder_width) {
      constexpr int kTallN = decltype(remainder_width)::value;
      constexpr bool kTall = kTallN > 0;
      // Once the wgmma groups reading `stage` have completed: their accumulators are final for
      // the compiler, and the stage goes back to the producers.
      auto retired = [&](int stage) {
        FenceOperands(acc);
        if constexpr (kTall) {
          FenceOperands(rem[0]);
          FenceOperands(rem[1]);
        }
        release(stage);
      };
      int prev_stage = 0;
      for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int stage = it % kStages;
        MbarWait(&full[stage], (it / kStages) & 1);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        const uint32_t st = smem_base + stage * StageBytes(kKind);
        const uint32_t sb = st + AStageBytes(kKind);
        const uint64_t da = SmemDesc(st + cw * 64 * kRowBytes), db = SmemDesc(sb);
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk) Wgmma256(acc, da + 2 * kk, db + 2 * kk, kt | kk);
        if constexpr (kTall) {
          const uint64_t dr = SmemDesc(st + kATileBytes);
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            const uint64_t dw = SmemDesc(sb + RemainderRow<kKind>(cw, b) * kRowBytes);
#pragma unroll
            for (int kk = 0; kk < kBK / 16; ++kk) {
              WgmmaTall<kTallN>(rem[b], dw + 2 * kk, dr + 2 * kk, kt | kk);
            }
          }
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        // The previous tile's deferred pass while these multiplies run (k_tiles >= 2: the
        // narrowest K, an expert width of 128, is two slabs).
        if (kt == 1) stage_deferred();
        if (kt > 0) {
          asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
          retired(prev_stage);
        }
        prev_stage = stage;
      }
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      retired(prev_stage);
    };
    switch (tall ? TallWidth(mt.rows - kBM) : 0) {
      case 0:
        multiply(std::integral_constant<int, 0>{});
        break;
      case 8:
        multiply(std::integral_constant<int, 8>{});
        break;
      case 16:
        multiply(std::integral_constant<int, 16>{});
        break;
      default:
        multiply(std::integral_constant<int, 32>{});
        break;
    }

    const int warp_row0 = cw * 64 + warp * 16;
    StagePass<kKind>(p, mt, nt, warp_row0, staging, 0,
                     [&](int h, int j) { return PassWord<kKind>(acc, 0, h, j); });
    if constexpr (kDefer) {
#pragma unroll
      for (int j = 0; j < PassWords(kKind); ++j) deferred[j] = PassWord<kKind>(acc, 1, 0, j);
      deferred_mt = mt;
      deferred_nt = nt;
      deferred_row0 = warp_row0;
    }
    if (tall) StoreRemainder<kKind>(p, mt, nt, cw, warp, lane, rem);
  });
  stage_deferred();
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
#endif  // MOESERVE_SM90A

template <Kind kKind>
__global__ void __launch_bounds__(kThreads, 1)
    MoeGemmKernel(const __grid_constant__ KernelParams p) {
#ifdef MOESERVE_SM90A
  constexpr bool kUp = IsUp(kKind);
  constexpr int kStages = Stages(kKind);
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem =
      reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * StageBytes(kKind) +
                                               kConsumerWarps * StagingWarpBytes(kKind));
  uint64_t* empty = full + kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbarInit(&full[s], kUp ? 129 : 1);        // see ProduceGather / ProduceTiles
      MbarInit(&empty[s], 2 * kConsumerWarps);  // this CTA's consumer warps and the peer's
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    if constexpr (!kUp) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&p.a_map))
                   : "memory");
    }
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&p.b_map)) : "memory");
  }
  ClusterSync();
  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;");
    if constexpr (kUp) {
      ProduceGather<kStages>(p, SmemAddr(smem), full, empty);
    } else if (threadIdx.x == 0) {
      ProduceTiles<kKind>(p, SmemAddr(smem), full, empty);
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;");
    Consume<kKind>(p, SmemAddr(smem), full, empty);
  }
  ClusterSync();
#else
  __trap();  // MoeGemmAvailable() keeps the host from launching this
#endif
}

__global__ void ProbeKernel(int32_t* has_sm90a) {
#ifdef MOESERVE_SM90A
  *has_sm90a = 1;
#else
  *has_sm90a = 0;
#endif
}

// A row-major BF16 matrix [rows, cols] as a tensor map with boxes of box_rows x 64 and the
// 128-byte swizzle. The driver's encoder is looked up once through the runtime (no libcuda link).
// L2 promotion stays at the box row's 128 bytes. With 256 (each copy also pulls the row's next
// K slab into L2) every layer up to N = 1024 tokens and expert-choice at N = 4096 ran 4-12 us
// slower on the H200 (the weights' maps; the activations' made no difference), token-choice at
// N = 4096 within its spread.
absl::Status EncodeRows(CUtensorMap* map, const void* base, int64_t rows, int64_t cols,
                        int box_rows) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) {
    return absl::FailedPreconditionError("moe_gemm: the driver has no cuTensorMapEncodeTiled");
  }
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * sizeof(__nv_bfloat16)};
  const cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r =
      encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box,
             element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return absl::InternalError(absl::StrCat("moe_gemm: cuTensorMapEncodeTiled failed (", r,
                                            ") for a [", rows, ", ", cols, "] matrix"));
  }
  return absl::OkStatus();
}

std::atomic<int> g_sms_used{0};

int MaxActiveClusters(void (*kernel)(KernelParams), const cudaLaunchConfig_t& config) {
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

// Clusters of two CTAs (one per SM), as many as fit at once: the kernels are persistent, so a
// cluster that had to wait for a free pair of SMs would run its units after everyone else.
template <Kind kKind>
absl::Status Launch(const KernelParams& p, int64_t max_tiles, cudaStream_t stream) {
  static const cudaError_t configured = cudaFuncSetAttribute(
      MoeGemmKernel<kKind>, cudaFuncAttributeMaxDynamicSharedMemorySize, SmemBytes(kKind));
  CUDA_RETURN_IF_ERROR(configured);
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 2;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(2 * MultiprocessorCount());
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = SmemBytes(kKind);
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  static const int max_clusters = MaxActiveClusters(MoeGemmKernel<kKind>, config);
  if (max_clusters < 1) {
    return absl::InternalError("moe_gemm: no cluster of two CTAs fits on this GPU");
  }
  g_sms_used.store(2 * max_clusters, std::memory_order_relaxed);
  const int64_t units = max_tiles * ((p.n_tiles + 1) / 2);
  config.gridDim = dim3(static_cast<unsigned>(2 * std::min<int64_t>(max_clusters, units)));
  CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&config, MoeGemmKernel<kKind>, p));
  return absl::OkStatus();
}

size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }
int64_t MaxTiles(int64_t num_assignments, int64_t num_experts) {
  return num_assignments / kBM + num_experts + 1;
}
// A tile list and its count.
size_t TileListBytes(int64_t num_assignments, int64_t num_experts) {
  return AlignUp(MaxTiles(num_assignments, num_experts) * sizeof(MoeTile) + sizeof(int32_t));
}

}  // namespace

bool MoeGemmAvailable() {
  // A probe kernel says whether the device runs code built with the sm_90a features (a plain
  // sm_90 or PTX build of this file has none).
  static const bool available = [] {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        major != 9) {
      cudaGetLastError();
      return false;
    }
    int32_t* flag = nullptr;
    int32_t host = 0;
    bool ok = cudaMalloc(&flag, sizeof(int32_t)) == cudaSuccess;
    if (ok) {
      ProbeKernel<<<1, 1>>>(flag);
      ok = cudaMemcpy(&host, flag, sizeof(int32_t), cudaMemcpyDeviceToHost) == cudaSuccess;
      cudaFree(flag);
    }
    cudaGetLastError();
    return ok && host == 1;
  }();
  return available;
}

int MoeGemmSmsUsed() { return g_sms_used.load(std::memory_order_relaxed); }

bool MoeGemmFits(int64_t num_experts, int64_t hidden, int64_t expert_width) {
  // Weight rows are addressed with 32-bit tensor-copy coordinates.
  return num_experts >= 1 && num_experts <= kMaxExperts && hidden > 0 && hidden % kBN == 0 &&
         expert_width > 0 && expert_width % (kBN / 2) == 0 &&
         num_experts * std::max(hidden, 2 * expert_width) <= INT32_MAX;
}

size_t MoeGemmWorkspaceBytes(int64_t num_assignments, int64_t num_experts, int64_t expert_width) {
  return 2 * TileListBytes(num_assignments, num_experts) +
         AlignUp(num_assignments * expert_width * sizeof(__nv_bfloat16));
}

absl::Status MoeGemm(const MoeGemmArgs& a, cudaStream_t stream) {
  const int64_t experts = a.plan.num_experts, n = a.plan.num_assignments;
  if (!MoeGemmFits(experts, a.hidden, a.expert_width)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "moe_gemm: ", experts, " experts, hidden ", a.hidden, ", expert width ", a.expert_width,
        " do not fit the tiles (hidden % 256, width % 128, <= 1024 experts, < 2^31 weight rows)"));
  }
  if (a.workspace_bytes < MoeGemmWorkspaceBytes(n, experts, a.expert_width)) {
    return absl::InvalidArgumentError("moe_gemm: workspace too small");
  }
  if (n == 0) return absl::OkStatus();
  if (!MoeGemmAvailable()) {
    return absl::FailedPreconditionError("moe_gemm: needs an sm_90 GPU and sm_90a code");
  }
  const int64_t max_tiles = MaxTiles(n, experts);
  char* base = static_cast<char*>(a.workspace);
  auto list_at = [&](int i) {
    auto* tiles = reinterpret_cast<MoeTile*>(base + i * TileListBytes(n, experts));
    return TileList{tiles, reinterpret_cast<int32_t*>(tiles + max_tiles)};
  };
  auto* act = reinterpret_cast<__nv_bfloat16*>(base + 2 * TileListBytes(n, experts));

  // See Kind: the deeper ring pays once an expert's weights serve two row tiles on average. It
  // leaves no room for tall tiles, so the down kernel then walks a second list without them,
  // and the up kernel's list has tall pairs too. Below that, tall pairs measured slower
  // (token-choice skew N = 1024: 197 -> 219 us); from it they gain (expert-choice capacity factor
  // 1.25 at N = 8192, 320 rows an expert: 1264-1344 -> 1151-1229 us in four runs).
  const bool down4 = n >= 2 * kBM * experts;
  const TileList up_list = list_at(0);
  const TileList down_list = down4 ? list_at(1) : TileList{nullptr, nullptr};
  TileListKernel<<<1, static_cast<int>(CeilDiv(experts, kWarpSize) * kWarpSize), 0, stream>>>(
      a.plan.expert_offsets, static_cast<int>(experts),
      down4 ? TallTiles::kSinglesAndPairs : TallTiles::kSingles, up_list, down_list);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());

  KernelParams up{};
  up.x = static_cast<const __nv_bfloat16*>(a.x);
  RETURN_IF_ERROR(EncodeRows(&up.b_map, a.w13, experts * 2 * a.expert_width, a.hidden, kBN / 2));
  up.token_idx = a.plan.token_idx;
  up.b_rows_per_expert = static_cast<int32_t>(2 * a.expert_width);
  up.b_box1_offset = static_cast<int32_t>(a.expert_width);
  up.b_tile_step = kBN / 2;
  up.k = static_cast<int32_t>(a.hidden);
  up.n_tiles = static_cast<int32_t>(a.expert_width / (kBN / 2));
  up.out_cols = static_cast<int32_t>(a.expert_width);
  up.tiles = up_list.tiles;
  up.num_tiles = up_list.num_tiles;
  up.out = act;
  KernelParams down{};
  RETURN_IF_ERROR(EncodeRows(&down.a_map, act, n, a.expert_width, kBM / 2));
  RETURN_IF_ERROR(EncodeRows(&down.a_tall_map, act, n, a.expert_width, kTallRows));
  RETURN_IF_ERROR(EncodeRows(&down.b_map, a.w2, experts * a.hidden, a.expert_width, kBN / 2));
  down.x = nullptr;
  down.token_idx = nullptr;
  down.b_rows_per_expert = static_cast<int32_t>(a.hidden);
  down.b_box1_offset = kBN / 2;
  down.b_tile_step = kBN;
  down.k = static_cast<int32_t>(a.expert_width);
  down.n_tiles = static_cast<int32_t>(a.hidden / kBN);
  down.out_cols = static_cast<int32_t>(a.hidden);
  const TileList& dl = down4 ? down_list : up_list;
  down.tiles = dl.tiles;
  down.num_tiles = dl.num_tiles;
  down.out = static_cast<__nv_bfloat16*>(a.expert_out);
  RETURN_IF_ERROR(Launch<Kind::kUp>(up, max_tiles, stream));
  if (down4) return Launch<Kind::kDown4>(down, max_tiles, stream);
  return Launch<Kind::kDown3>(down, max_tiles, stream);
}

}  // namespace moeserve::cuda
