#include "kernels/cuda/moe_experts.h"

#include "absl/strings/str_cat.h"
#include "kernels/cuda/moe_dispatch.h"
#include "kernels/cuda/moe_gemm.h"
#include "kernels/cuda/swiglu.h"
#include "kernels/util/status_macros.h"

namespace moeserve::cuda {
namespace {

constexpr size_t kAlign = 256;
size_t AlignUp(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

}  // namespace

bool MoeExpertsFused(DType dtype, int64_t num_experts, int64_t hidden_size, int64_t expert_width) {
  return dtype == DType::kBF16 && MoeGemmFits(num_experts, hidden_size, expert_width) &&
         MoeGemmAvailable();
}

size_t MoeExpertsWorkspaceBytes(DType dtype, int64_t num_assignments, int64_t num_experts,
                                int64_t hidden_size, int64_t expert_width, MoeExpertsPath path) {
  if (path == MoeExpertsPath::kAuto &&
      MoeExpertsFused(dtype, num_experts, hidden_size, expert_width)) {
    return MoeGemmWorkspaceBytes(num_assignments, num_experts, expert_width);
  }
  const size_t elem = DTypeSize(dtype);
  return AlignUp(num_assignments * hidden_size * elem) +       // permuted x
         AlignUp(num_assignments * 2 * expert_width * elem) +  // gate_up
         AlignUp(num_assignments * expert_width * elem);       // act
}

absl::Status MoeExperts(Gemm& gemm, const MoeExpertsArgs& a) {
  const DType dtype = a.w13.dtype;
  const int64_t num_experts = a.w13.num_experts, hidden = a.w13.cols, width = a.w13.rows / 2;
  if (a.w2.dtype != dtype || a.w2.num_experts != num_experts || a.w2.rows != hidden ||
      a.w2.cols != width || a.w13.rows != 2 * width) {
    return absl::InvalidArgumentError(absl::StrCat(
        "moe_experts: w13 [", num_experts, ", ", a.w13.rows, ", ", hidden, "] and w2 [",
        a.w2.num_experts, ", ", a.w2.rows, ", ", a.w2.cols, "] do not fit together"));
  }
  if (a.plan.num_experts != num_experts) {
    return absl::InvalidArgumentError("moe_experts: the plan does not match the weights");
  }
  const int64_t n = a.plan.num_assignments;
  if (a.path == MoeExpertsPath::kAuto && MoeExpertsFused(dtype, num_experts, hidden, width)) {
    MoeGemmArgs fused;
    fused.x = a.x;
    fused.plan = a.plan;
    fused.w13 = a.w13.data;
    fused.w2 = a.w2.data;
    fused.hidden = hidden;
    fused.expert_width = width;
    fused.expert_out = a.expert_out;
    fused.workspace = a.workspace;
    fused.workspace_bytes = a.workspace_bytes;
    return MoeGemm(fused, gemm.stream());
  }
  if (static_cast<int64_t>(a.expert_offsets.size()) != num_experts + 1 ||
      a.expert_offsets.back() != n) {
    return absl::InvalidArgumentError("moe_experts: the host expert_offsets do not match the plan");
  }
  if (a.workspace_bytes <
      MoeExpertsWorkspaceBytes(dtype, n, num_experts, hidden, width, MoeExpertsPath::kCublas)) {
    return absl::InvalidArgumentError("moe_experts: workspace too small");
  }
  if (n == 0) return absl::OkStatus();
  const size_t elem = DTypeSize(dtype);
  char* base = static_cast<char*>(a.workspace);
  void* xs = base;                                                          // [n, hidden]
  void* gate_up = base + AlignUp(n * hidden * elem);                        // [n, 2 * width]
  void* act = static_cast<char*>(gate_up) + AlignUp(n * 2 * width * elem);  // [n, width]

  RETURN_IF_ERROR(GatherRows({dtype, a.x, hidden, a.plan.token_idx, n, xs}, gemm.stream()));
  RETURN_IF_ERROR(gemm.RunGrouped({dtype, xs, a.w13, a.expert_offsets, gate_up}));
  SwiGluArgs swiglu;
  swiglu.in_dtype = dtype;
  swiglu.gate_up = gate_up;
  swiglu.num_rows = n;
  swiglu.width = width;
  switch (dtype) {
    case DType::kF32:
      swiglu.out_f32 = static_cast<float*>(act);
      break;
    case DType::kBF16:
      swiglu.out_bf16 = static_cast<__nv_bfloat16*>(act);
      break;
  }
  RETURN_IF_ERROR(SwiGlu(swiglu, gemm.stream()));
  RETURN_IF_ERROR(gemm.RunGrouped({dtype, act, a.w2, a.expert_offsets, a.expert_out}));
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
