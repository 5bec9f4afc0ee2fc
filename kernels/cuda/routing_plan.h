// The routing plan on the device, built from either router's output (or both, for a batch of
// mixed modes), in the layout of kernels/routing_plan.h: per expert its (token_idx, weight) list,
// grouped by expert (CSR) and sorted by token inside an expert, plus the token-major index the
// combine needs (per token its assignments in ascending expert order).
//
// Building needs no sort and no ordering between atomics, so the plan is deterministic: every
// selection sets bit `token` in its expert's bitmap (num_experts x num_tokens bits); per-expert
// popcount prefix sums give each (token, expert) its place, rank by token inside the expert. A
// block per expert (the expert pass) scans its bitmap row, finds its offset from the experts
// before it by decoupled look-back, and writes its CSR entries, so the CSR part (what the expert
// GEMMs read) is complete after a memset, the marks and that one pass. A warp per token (32
// tokens share a block and their bitmap words; the row pass) then walks its experts in ascending
// order, which is also the order in which expert-choice renormalization sums a token's scores, as
// model/routing.cc does on the CPU, and writes the weights and the token-major index; it scans
// the tokens' counts the same way. A build is one memset and four kernels (three for one
// router); BuildRoutingPlanCsr and FinishRoutingPlan split it after the expert pass, so that the
// experts can start while the row pass runs beside them (side_stream.h).
// Weights: token-choice ones are taken as the router wrote them; expert-choice ones are
// s / (sum of the token's selected s) * routed_scaling_factor (renormalized scopes) or
// s * routed_scaling_factor (raw), s = RouterSigmoid(logit), with the CPU's operation order.
//
// Limits: num_experts <= 4096. Preconditions (not checked on the device): a row is routed by at
// most one router, and in at most one expert-choice scope; a token-choice row names distinct
// experts.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/expert_choice.h"
#include "kernels/routing_plan.h"

namespace moeserve::cuda {

// Device arrays of a plan; see kernels/routing_plan.h for the first three.
struct DeviceRoutingPlan {
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  int64_t num_assignments = 0;
  int32_t* expert_offsets = nullptr;     // [num_experts + 1]
  int32_t* token_idx = nullptr;          // [num_assignments], ascending inside an expert
  float* weight = nullptr;               // [num_assignments]
  int32_t* token_offsets = nullptr;      // [num_tokens + 1]
  int32_t* token_assignments = nullptr;  // [num_assignments]: per token, ascending expert
};

// Owns the arrays of one DeviceRoutingPlan.
class DeviceRoutingPlanStorage {
 public:
  static absl::StatusOr<DeviceRoutingPlanStorage> Allocate(int64_t num_tokens, int64_t num_experts,
                                                           int64_t num_assignments);
  const DeviceRoutingPlan& plan() const { return plan_; }

 private:
  DeviceBuffer buffer_;
  DeviceRoutingPlan plan_;
};

// A host plan on the device, token-major index included (synchronous).
absl::StatusOr<DeviceRoutingPlanStorage> UploadRoutingPlan(const RoutingPlan& plan);
// The device plan's CSR part as a host RoutingPlan (synchronous).
absl::StatusOr<RoutingPlan> DownloadRoutingPlan(const DeviceRoutingPlan& plan);

// What TokenChoiceRoute wrote.
struct TokenChoiceSelections {
  const int32_t* rows = nullptr;  // [num_rows], or null: rows [0, num_rows)
  int64_t num_rows = 0;
  int64_t topk = 0;
  const int32_t* topk_idx = nullptr;   // [num_rows, topk]
  const float* topk_weight = nullptr;  // [num_rows, topk]
};

// What ExpertChoiceSelect wrote, and how to weight it.
struct ExpertChoiceSelections {
  ExpertChoiceScopes scopes;
  const int32_t* selected = nullptr;  // [num_experts, scopes.total_capacity]
  // [num_scopes]: 1: renormalized weights, 0: raw (model/routing.h's ExpertChoiceWeighting).
  const uint8_t* renormalize = nullptr;
  const float* logits = nullptr;  // [num_tokens, num_experts], token-major router logits
  float routed_scaling_factor = 1.0f;
};

struct BuildRoutingPlanArgs {
  const TokenChoiceSelections* token_choice = nullptr;    // or null
  const ExpertChoiceSelections* expert_choice = nullptr;  // or null
  // Output arrays; plan.num_assignments must be PlanAssignments(token_choice, expert_choice).
  DeviceRoutingPlan plan;
  void* workspace = nullptr;  // BuildRoutingPlanWorkspaceBytes
  size_t workspace_bytes = 0;
};

// The CSR part (expert_offsets, token_idx) of the plan BuildRoutingPlan makes from expert-choice
// selections alone, when their scopes come in ascending row order (every row of a scope above
// every row of the scope before it; ScopesInRowOrder): expert e's rows are then its selection in
// scope order, selected[e * total_capacity, (e + 1) * total_capacity), already ascending, and
// expert_offsets[e] = e * total_capacity. The expert GEMMs read only that part (moe_gemm.h), so
// they can start on the selection while BuildRoutingPlan writes the weights and the token-major
// index beside them (side_stream.h). weight, token_offsets and token_assignments are null.
// `expert_offsets`: a device copy of UniformExpertOffsets(num_experts, total_capacity).
DeviceRoutingPlan SelectionPlan(const ExpertChoiceSelections& expert_choice, int64_t num_tokens,
                                int64_t num_experts, const int32_t* expert_offsets);
// [num_experts + 1]: e * per_expert.
std::vector<int32_t> UniformExpertOffsets(int64_t num_experts, int64_t per_expert);
// Whether the scopes' rows, concatenated in scope order (ExpertChoiceScopes::rows on the host),
// strictly ascend.
bool ScopesInRowOrder(const std::vector<int32_t>& scope_rows);

// token_choice rows * topk + num_experts * expert_choice total capacity.
int64_t PlanAssignments(const TokenChoiceSelections* token_choice,
                        const ExpertChoiceSelections* expert_choice, int64_t num_experts);
size_t BuildRoutingPlanWorkspaceBytes(int64_t num_tokens, int64_t num_experts);
// The whole plan: BuildRoutingPlanCsr, then FinishRoutingPlan, on one stream.
absl::Status BuildRoutingPlan(const BuildRoutingPlanArgs& args, cudaStream_t stream);
// The plan's CSR part (expert_offsets, token_idx): the memset, the marks and the expert pass.
absl::Status BuildRoutingPlanCsr(const BuildRoutingPlanArgs& args, cudaStream_t stream);
// The rest (weight, token_offsets, token_assignments) by the row pass, from what
// BuildRoutingPlanCsr of the same args left in the workspace: `stream` must be ordered after it.
absl::Status FinishRoutingPlan(const BuildRoutingPlanArgs& args, cudaStream_t stream);

}  // namespace moeserve::cuda
