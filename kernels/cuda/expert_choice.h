// Expert-choice selection on the GPU, for many routing scopes at once: for every (expert, scope)
// the `capacity` rows of the scope with the highest sigmoid score in the expert's column, ties to
// the lower row, as kernels/cpu/expert_choice.h selects them. Scores are RouterSigmoid of the
// logits (device_util.cuh: the CPU's float formula). Every path is a partial selection, never a
// sort.
//
// Output order differs from the CPU's on purpose: each (expert, scope) list is in ascending row
// order (the CPU's is by descending score), which is the order the routing plan wants.
//
// Paths (ChooseExpertChoicePath picks one from the largest scope; tests force each):
//   kWarpRank:          scopes of <= 256 rows (a request's 32-token block). A warp per (expert,
//                       scope) reads the logits in either layout (no transpose), computes the
//                       exact scores, and selects by `capacity` rounds of a two-instruction warp
//                       maximum (__reduce_max_sync on the scores' order-preserving keys, then
//                       __reduce_min_sync on the position), or by counting ranks when capacity is
//                       close to the scope size.
//   kBlockRadixShared:  scopes of <= 32768 rows; a block per (expert, scope) stages the column's
//                       logits as order-preserving keys in shared memory and radix-selects the
//                       capacity-th largest logit K with 12-bit digits (starting at the highest
//                       bit in which the column's keys differ; usually two passes). RouterSigmoid
//                       is monotone, so logit order is score order except that neighbouring
//                       logits can share a score: one warp finds the run of keys whose score
//                       equals K's, and that run is resolved by row as the CPU resolves ties. Only
//                       the selected rows' scores are ever computed.
//   kBlockRadixGlobal:  the same reading global memory each pass, for larger scopes.
// The radix paths read expert-major columns: token-major logits are first transposed into the
// workspace (num_tokens * num_experts floats); a forward can instead have the router GEMM write
// expert-major logits.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace moeserve::cuda {

// The routing scopes of one forward, in device memory, with the host-side sizes that shape the
// launch. Scope s covers rows rows[row_offsets[s] .. row_offsets[s + 1]) (ascending), or, when
// rows is null, the row range [row_offsets[s], row_offsets[s + 1]).
struct ExpertChoiceScopes {
  int64_t num_scopes = 0;
  const int32_t* row_offsets = nullptr;       // [num_scopes + 1]
  const int32_t* rows = nullptr;              // [row_offsets[num_scopes]], or null
  const int32_t* capacity = nullptr;          // [num_scopes], each in [1, the scope's rows]
  const int32_t* selected_offsets = nullptr;  // [num_scopes + 1]: prefix sums of capacity
  int64_t max_scope_rows = 0;                 // host copy: rows of the largest scope
  int64_t total_capacity = 0;                 // host copy: selected_offsets[num_scopes]
};

enum class LogitsLayout {
  kTokenMajor,   // [num_tokens, num_experts], as the router GEMM writes them
  kExpertMajor,  // [num_experts, num_tokens]
};

enum class ExpertChoicePath { kWarpRank, kBlockRadixShared, kBlockRadixGlobal };

inline constexpr int64_t kWarpRankMaxRows = 256;
inline constexpr int64_t kSharedRadixMaxRows = 32768;

// The path for scopes of at most max_scope_rows rows.
ExpertChoicePath ChooseExpertChoicePath(int64_t max_scope_rows);

struct ExpertChoiceSelectArgs {
  const float* logits = nullptr;  // router logits in `layout`
  LogitsLayout layout = LogitsLayout::kTokenMajor;
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  ExpertChoiceScopes scopes;
  // [num_experts, total_capacity]: expert e's rows of scope s at
  // e * total_capacity + selected_offsets[s], ascending.
  int32_t* selected = nullptr;
  float* selected_scores = nullptr;  // same layout: their sigmoid scores, or null
  void* workspace = nullptr;         // ExpertChoiceWorkspaceBytes
  size_t workspace_bytes = 0;
};

size_t ExpertChoiceWorkspaceBytes(LogitsLayout layout, int64_t num_tokens, int64_t num_experts);

// Runs the path ChooseExpertChoicePath picks.
absl::Status ExpertChoiceSelect(const ExpertChoiceSelectArgs& args, cudaStream_t stream);
// Runs `path` (tests run every path on the same inputs); INVALID_ARGUMENT if it cannot hold the
// largest scope.
absl::Status ExpertChoiceSelect(const ExpertChoiceSelectArgs& args, ExpertChoicePath path,
                                cudaStream_t stream);

}  // namespace moeserve::cuda
