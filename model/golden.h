// Checks a model against reference outputs in the golden format of tests/data/llada2-tiny
// (golden.json + golden.safetensors, written by the upstream PyTorch modeling code): every forward
// case's logits, every layer's input hidden state, every MoE layer's router logits and top-k
// expert sets and weights.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/model.h"

namespace moeserve {

// The README's float32 tolerance: a float32 forward over the same BF16 weights lands within 1e-4
// of the reference, measured as max|a - b| / max|ref| over a tensor.
inline constexpr double kGoldenF32Tolerance = 1e-4;

struct GoldenCheck {
  std::string name;        // e.g. "fwd0.router.1.topk"
  double max_rel_err = 0;  // max|a - b| / max|ref|
  bool ok = false;
  std::string detail;  // first mismatches when not ok
};

struct GoldenCaseReport {
  std::string name;  // "fwd0"
  std::vector<GoldenCheck> checks;
  bool ok = true;
  double worst_rel_err = 0;
};

struct GoldenReport {
  std::vector<GoldenCaseReport> cases;
  bool ok = true;
};

// One generate case: the reference generate() (scheduled policy, temperature 0, no cache) against
// this engine's KV-cached decoder.
struct GoldenGenerateReport {
  std::string name;  // "gen0"
  std::vector<int32_t> expected;
  std::vector<int32_t> actual;
  bool ok = false;
};

// Runs every forward case of `golden_dir` through `model` and compares.
absl::StatusOr<GoldenReport> VerifyGoldenForward(const Model& model, const std::string& golden_dir,
                                                 double tolerance = kGoldenF32Tolerance);

// Runs every generate case of `golden_dir` (golden.json's generate_cases, with its mask_id,
// eos_id and block_length) through the block-diffusion decoder with the scheduled policy.
absl::StatusOr<std::vector<GoldenGenerateReport>> VerifyGoldenGenerate(
    const Model& model, const std::string& golden_dir);

}  // namespace moeserve
