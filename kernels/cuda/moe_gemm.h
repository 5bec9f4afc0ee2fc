// The routed experts' two GEMMs as Hopper kernels that read the routing plan on the device: no
// host round trip for the per-expert counts, no permuted copy of the activations, no gate/up
// intermediate. What MoeExperts (moe_experts.h) runs for BF16 on an sm_90 GPU.
//
//   up:   act[a]  = swiglu(x[token_idx[a]] @ W13_e^T)   for every assignment a of expert e
//   down: y[a]    = act[a] @ W2_e^T
//
// Both kernels are persistent and warp-specialized: one producer warpgroup streams 128-row tiles
// of A (gathered through the plan's token_idx with cp.async in the up kernel, tensor copies in the
// down kernel) and 256-row tiles of the expert's weight (tensor copies, TMA) into a shared-memory
// ring (128-byte swizzle, mbarriers), two consumer warpgroups multiply them with wgmma
// (m64n256k16, BF16 in, float32 accumulation). The CTAs run in clusters of two: two row tiles of
// one expert share each weight tile, which one TMA multicast brings to both. The up kernel's
// 256 weight rows are 128 gate rows and the matching 128 up rows, so SwiGLU happens on the
// accumulators and only the BF16 activation is written. Tiles never cross experts; a small kernel
// turns the plan's expert_offsets into the list of (expert, first row, rows) tiles first (up to
// 32 of an expert's remainder rows may join a full tile, computed as a swapped product).
//
// Shapes: hidden % 256 == 0, expert_width % 128 == 0, num_experts <= 1024, fewer than 2^31 rows
// in either weight matrix (MoeGemmFits).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/routing_plan.h"

namespace moeserve::cuda {

struct MoeGemmArgs {
  const void* x = nullptr;    // [plan.num_tokens, hidden] BF16
  DeviceRoutingPlan plan;     // its expert_offsets and token_idx are read on the device
  const void* w13 = nullptr;  // [num_experts, 2 * expert_width, hidden] BF16 (gate rows; up rows)
  const void* w2 = nullptr;   // [num_experts, hidden, expert_width] BF16
  int64_t hidden = 0;
  int64_t expert_width = 0;
  void* expert_out = nullptr;  // [plan.num_assignments, hidden] BF16
  void* workspace = nullptr;   // MoeGemmWorkspaceBytes
  size_t workspace_bytes = 0;
};

// True when this process can run the kernels: the current device is sm_90 and the binary carries
// sm_90a code for them. Cached after the first call.
bool MoeGemmAvailable();
// The SMs the kernels run on: two per cluster, as many clusters as the GPU holds at once (a GPC
// with an odd number of SMs leaves one out). 0 before the first launch.
int MoeGemmSmsUsed();
// True when the shapes fit the tiles (see above).
bool MoeGemmFits(int64_t num_experts, int64_t hidden, int64_t expert_width);
// The tile list and the BF16 activations [num_assignments, expert_width].
size_t MoeGemmWorkspaceBytes(int64_t num_assignments, int64_t num_experts, int64_t expert_width);
absl::Status MoeGemm(const MoeGemmArgs& args, cudaStream_t stream);

}  // namespace moeserve::cuda
