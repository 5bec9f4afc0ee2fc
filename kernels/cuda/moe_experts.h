// The routed experts of one MoE layer over a device routing plan: gather the plan's tokens into
// expert order, y = W2_e · swiglu(W13_e · x) for every expert with tokens (two grouped GEMMs
// through cuBLAS, SwiGLU between), leaving one output row per assignment for Combine
// (moe_dispatch.h) to weight and add. What cpu::MoeExperts computes before its combine.
//
// Activations follow the weights' dtype: BF16 weights take BF16 activations (float32 accumulation
// in the GEMMs, BF16 intermediates), F32 weights run in float32 throughout.
//
// Two paths:
// - fused (BF16 on an sm_90 GPU, shapes that fit the tiles: MoeExpertsFused): the two kernels of
//   moe_gemm.h, which read the plan on the device; expert_offsets (host) is not read, so the
//   caller need not copy the counts back, and the call can be captured in a CUDA graph.
// - cuBLAS (F32, other GPUs, or asked for): gather, grouped W13 GEMM, SwiGLU, grouped W2 GEMM,
//   four launches with intermediates in device memory; the grouped GEMM needs the per-expert
//   counts on the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/routing_plan.h"
#include "kernels/tensor.h"

namespace moeserve::cuda {

enum class MoeExpertsPath {
  kAuto,    // fused when MoeExpertsFused, else cuBLAS
  kCublas,  // always the cuBLAS path (the benchmark's unfused pipeline)
};

struct MoeExpertsArgs {
  const void* x = nullptr;  // [plan.num_tokens, hidden_size] in w13.dtype
  DeviceRoutingPlan plan;
  std::span<const int32_t> expert_offsets;  // host copy of plan.expert_offsets (cuBLAS path)
  ExpertWeightsView w13;       // [num_experts, 2 * expert_width, hidden_size] (gate; up)
  ExpertWeightsView w2;        // [num_experts, hidden_size, expert_width]
  void* expert_out = nullptr;  // [plan.num_assignments, hidden_size] in w13.dtype
  void* workspace = nullptr;   // MoeExpertsWorkspaceBytes
  size_t workspace_bytes = 0;
  MoeExpertsPath path = MoeExpertsPath::kAuto;
};

// Whether kAuto takes the fused path for these shapes on this process's GPU.
bool MoeExpertsFused(DType dtype, int64_t num_experts, int64_t hidden_size, int64_t expert_width);
size_t MoeExpertsWorkspaceBytes(DType dtype, int64_t num_assignments, int64_t num_experts,
                                int64_t hidden_size, int64_t expert_width,
                                MoeExpertsPath path = MoeExpertsPath::kAuto);
// Runs on gemm.stream().
absl::Status MoeExperts(Gemm& gemm, const MoeExpertsArgs& args);

}  // namespace moeserve::cuda
