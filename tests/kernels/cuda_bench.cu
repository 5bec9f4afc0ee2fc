// Micro-benchmark of the CUDA ops at LLaDA2.0-mini shapes (a program, not a test: it needs a GPU).
//
// Times expert-choice selection (N = 512, 4096, 16384 tokens x 256 experts, one scope and many
// 32-token scopes) against a full segmented sort (cub::DeviceSegmentedRadixSort) in the same
// process, token-choice routing, the device routing plan, attention, and the GEMMs; prints the
// achieved bandwidth or FLOP/s as a fraction of this GPU's ceilings, which it measures first
// (a large device-to-device copy; a bf16 8192^3 cuBLAS GEMM; the float32 CUDA-core peak is
// computed from the SM count and clock). Each number is the median over many timed samples of
// back-to-back launches after warm-up; inputs of memory-bound ops rotate over several buffers
// larger than L2 together, so repeated runs do not measure the cache.
//
// Usage: cuda_bench [--quick | --profile]  (--profile: one launch of each routing and attention
// kernel, for ncu)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/expert_choice.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/moe_dispatch.h"
#include "kernels/cuda/routing_plan.h"
#include "kernels/cuda/token_choice.h"
#include "model/routing.h"
#include "tests/kernels/bench_util.cuh"

namespace moeserve::cuda {
namespace {

constexpr int kExperts = 256, kTopk = 8, kHidden = 2048, kHeads = 16, kKvHeads = 4, kHeadDim = 128;
constexpr int kRotate = 4;  // input sets per memory-bound benchmark

// ---------------------------------------------------------------------------------------------

// Scopes on the device: `num_scopes` consecutive scopes of `rows_per_scope` rows.
struct ScopeTable {
  DeviceBuffer row_offsets, capacity, selected_offsets;
  ExpertChoiceScopes view;
};
ScopeTable MakeScopes(int64_t num_scopes, int64_t rows_per_scope) {
  const int64_t capacity = ExpertChoiceCapacity(1.25, rows_per_scope, kTopk, kExperts);
  std::vector<int32_t> offsets(num_scopes + 1), caps(num_scopes, capacity), sel(num_scopes + 1);
  for (int64_t s = 0; s <= num_scopes; ++s) {
    offsets[s] = static_cast<int32_t>(s * rows_per_scope);
    sel[s] = static_cast<int32_t>(s * capacity);
  }
  ScopeTable t;
  t.row_offsets = Upload(offsets);
  t.capacity = Upload(caps);
  t.selected_offsets = Upload(sel);
  t.view = {num_scopes,
            t.row_offsets.as<int32_t>(),
            nullptr,
            t.capacity.as<int32_t>(),
            t.selected_offsets.as<int32_t>(),
            rows_per_scope,
            num_scopes * capacity};
  return t;
}

__global__ void SigmoidKernel(const float* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = RouterSigmoid(in[i]);
  }
}
__global__ void IotaKernel(int32_t* out, int64_t n, int64_t period) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<int32_t>(i % period);
  }
}

void BenchExpertChoice(const Ceilings& ceil) {
  std::printf("== expert-choice selection, %d experts, capacity factor 1.25 (top-%d equivalent)\n",
              kExperts, kTopk);
  struct Shape {
    int64_t tokens, scope_rows;
  };
  for (Shape shape : {Shape{512, 512}, Shape{4096, 4096}, Shape{16384, 16384}, Shape{16384, 32}}) {
    const int64_t n = shape.tokens, num_scopes = n / shape.scope_rows;
    ScopeTable scopes = MakeScopes(num_scopes, shape.scope_rows);
    std::vector<DeviceBuffer> logits;
    for (int r = 0; r < kRotate; ++r)
      logits.push_back(RandomDevice(n * kExperts, DType::kF32, 10 + r, 4.0f));
    DeviceBuffer workspace =
        Alloc(ExpertChoiceWorkspaceBytes(LogitsLayout::kTokenMajor, n, kExperts));
    DeviceBuffer selected = Alloc(kExperts * scopes.view.total_capacity * 4);
    DeviceBuffer scores = Alloc(kExperts * scopes.view.total_capacity * 4);
    const double bytes_in = 4.0 * n * kExperts,
                 bytes_out = 8.0 * kExperts * scopes.view.total_capacity;
    char name[128];
    for (LogitsLayout layout : {LogitsLayout::kTokenMajor, LogitsLayout::kExpertMajor}) {
      ExpertChoiceSelectArgs a;
      a.layout = layout;
      a.num_tokens = n;
      a.num_experts = kExperts;
      a.scopes = scopes.view;
      a.selected = selected.as<int32_t>();
      a.selected_scores = scores.as<float>();
      a.workspace = workspace.data();
      a.workspace_bytes = workspace.bytes();
      const double us = TimeUs([&](int i) {
        a.logits = logits[i % kRotate].as<float>();
        Check(ExpertChoiceSelect(a, nullptr), "expert choice");
      });
      std::snprintf(name, sizeof(name), "ec select N=%lld scopes=%lld C=%lld %s", (long long)n,
                    (long long)num_scopes, (long long)(scopes.view.total_capacity / num_scopes),
                    layout == LogitsLayout::kTokenMajor ? "token-major" : "expert-major");
      Row(name, us, Tbps(bytes_in + bytes_out, us),
          (bytes_in + bytes_out) / us * 1e6 / ceil.copy_bytes_per_s,
          "copy bandwidth (1 read of the logits)");
      a.logits = logits[0].as<float>();
      const double graph_us =
          TimeGraphUs([&](cudaStream_t stream) { Check(ExpertChoiceSelect(a, stream), "ec"); });
      Row("  same, replayed from a CUDA graph", graph_us, Tbps(bytes_in + bytes_out, graph_us),
          (bytes_in + bytes_out) / graph_us * 1e6 / ceil.copy_bytes_per_s, "copy bandwidth");
      if (layout == LogitsLayout::kExpertMajor) {
        // Baseline: a full segmented sort of every (expert, scope) column by score, keys and
        // token ids, on the same expert-major scores (sigmoid applied once, not timed).
        DeviceBuffer keys_in = Alloc(n * kExperts * 4), keys_out = Alloc(n * kExperts * 4),
                     vals_in = Alloc(n * kExperts * 4), vals_out = Alloc(n * kExperts * 4);
        SigmoidKernel<<<1024, 256>>>(logits[0].as<float>(), keys_in.as<float>(), n * kExperts);
        IotaKernel<<<1024, 256>>>(vals_in.as<int32_t>(), n * kExperts, n);
        const int64_t segments = kExperts * num_scopes;
        std::vector<int32_t> seg_offsets(segments + 1);
        for (int64_t s = 0; s <= segments; ++s)
          seg_offsets[s] = static_cast<int32_t>(s * shape.scope_rows);
        DeviceBuffer d_offsets = Upload(seg_offsets);
        size_t temp_bytes = 0;
        Check(cub::DeviceSegmentedRadixSort::SortPairsDescending(
                  nullptr, temp_bytes, keys_in.as<float>(), keys_out.as<float>(),
                  vals_in.as<int32_t>(), vals_out.as<int32_t>(), static_cast<int>(n * kExperts),
                  static_cast<int>(segments), d_offsets.as<int32_t>(), d_offsets.as<int32_t>() + 1),
              "cub temp size");
        DeviceBuffer temp = Alloc(temp_bytes);
        const double sort_us = TimeUs([&](int) {
          Check(
              cub::DeviceSegmentedRadixSort::SortPairsDescending(
                  temp.data(), temp_bytes, keys_in.as<float>(), keys_out.as<float>(),
                  vals_in.as<int32_t>(), vals_out.as<int32_t>(), static_cast<int>(n * kExperts),
                  static_cast<int>(segments), d_offsets.as<int32_t>(), d_offsets.as<int32_t>() + 1),
              "cub sort");
        });
        std::snprintf(name, sizeof(name), "  baseline cub segmented radix sort N=%lld",
                      (long long)n);
        Row(name, sort_us, "select speed-up", sort_us / us, "x (shown as %: 100 = 1x)");
      }
    }
  }
  std::printf("\n");
}

void BenchTokenChoice(const Ceilings& ceil) {
  std::printf("== token-choice routing, %d experts, top-%d, 8 groups / top-4\n", kExperts, kTopk);
  const cpu::TokenChoiceParams params{kExperts, kTopk, 8, 4, true, 2.5f};
  for (int64_t n : {512, 4096, 16384}) {
    std::vector<DeviceBuffer> logits;
    for (int r = 0; r < kRotate; ++r)
      logits.push_back(RandomDevice(n * kExperts, DType::kF32, 20 + r, 4.0f));
    DeviceBuffer bias = RandomDevice(kExperts, DType::kF32, 30, 0.1f);
    DeviceBuffer idx = Alloc(n * kTopk * 4), weight = Alloc(n * kTopk * 4);
    const double us = TimeUs([&](int i) {
      Check(TokenChoiceRoute(params,
                             {logits[i % kRotate].as<float>(), bias.as<float>(), nullptr, n,
                              idx.as<int32_t>(), weight.as<float>()},
                             nullptr),
            "token choice");
    });
    const double bytes = 4.0 * n * kExperts + 8.0 * n * kTopk;
    char name[128];
    std::snprintf(name, sizeof(name), "tc route N=%lld", (long long)n);
    Row(name, us, Tbps(bytes, us), bytes / us * 1e6 / ceil.copy_bytes_per_s, "copy bandwidth");

    // The device plan from these selections, then a combine of hidden 2048.
    TokenChoiceSelections tc{nullptr, n, kTopk, idx.as<int32_t>(), weight.as<float>()};
    const PlanBuild plan = MakePlanBuild(n, kExperts, n * kTopk, &tc, nullptr);
    const BuildRoutingPlanArgs& build = plan.args;
    const double plan_us = TimeUs([&](int) { Check(BuildRoutingPlan(build, nullptr), "plan"); });
    std::snprintf(name, sizeof(name), "routing plan build N=%lld (tc)", (long long)n);
    const double plan_bytes = 8.0 * n * kTopk * 3;  // selections in, plan out (two indices)
    Row(name, plan_us, Tbps(plan_bytes, plan_us),
        plan_bytes / plan_us * 1e6 / ceil.copy_bytes_per_s, "copy bandwidth");
    const double plan_graph_us =
        TimeGraphUs([&](cudaStream_t stream) { Check(BuildRoutingPlan(build, stream), "plan"); });
    Row("  same, replayed from a CUDA graph", plan_graph_us, Tbps(plan_bytes, plan_graph_us),
        plan_bytes / plan_graph_us * 1e6 / ceil.copy_bytes_per_s, "copy bandwidth");
    // What the experts wait for (the row pass runs beside them).
    const double csr_graph_us = TimeGraphUs(
        [&](cudaStream_t stream) { Check(BuildRoutingPlanCsr(build, stream), "plan"); });
    const double csr_bytes = 8.0 * n * kTopk * 2;  // selections in, token_idx out
    Row("  its CSR part alone, CUDA graph", csr_graph_us, Tbps(csr_bytes, csr_graph_us),
        csr_bytes / csr_graph_us * 1e6 / ceil.copy_bytes_per_s, "copy bandwidth");
    DeviceBuffer y = RandomDevice(n * kTopk * kHidden, DType::kBF16, 31);
    DeviceBuffer x = RandomDevice(n * kHidden, DType::kF32, 32);
    DeviceBuffer shared = RandomDevice(n * kHidden, DType::kF32, 33);
    const double combine_us = TimeUs([&](int) {
      Check(Combine({plan.storage.plan(), DType::kBF16, y.data(), shared.as<float>(), x.as<float>(),
                     x.as<float>(), kHidden},
                    nullptr),
            "combine");
    });
    const double combine_bytes = 2.0 * n * kTopk * kHidden + 12.0 * n * kHidden;
    std::snprintf(name, sizeof(name), "combine N=%lld (bf16 expert rows)", (long long)n);
    Row(name, combine_us, Tbps(combine_bytes, combine_us),
        combine_bytes / combine_us * 1e6 / ceil.copy_bytes_per_s, "copy bandwidth");
  }
  std::printf("\n");
}

void BenchAttention(const Ceilings& ceil) {
  std::printf("== attention, %d q heads / %d kv heads, head_dim %d, block 32\n", kHeads, kKvHeads,
              kHeadDim);
  struct Shape {
    const char* name;
    int64_t sequences, queries, cached;
  };
  const int64_t kv_size = kKvHeads * kHeadDim;
  for (DType kv_dtype : {DType::kF32, DType::kBF16}) {
    for (Shape s : {Shape{"decode 64 seqs x 32 over 1024", 64, 32, 1024},
                    Shape{"decode 64 seqs x 32 over 4096", 64, 32, 4096},
                    Shape{"decode 1 seq x 32 over 4096", 1, 32, 4096},
                    Shape{"prefill 1 seq x 2048", 1, 2048, 0}}) {
      const int64_t tokens = s.sequences * s.queries, keys = s.cached + s.queries;
      DeviceBuffer q = RandomDevice(tokens * kHeads * kHeadDim, DType::kF32, 40);
      DeviceBuffer out = Alloc(tokens * kHeads * kHeadDim * 4);
      std::vector<DeviceBuffer> caches;
      std::vector<AttentionSequence> seqs;
      for (int64_t i = 0; i < s.sequences; ++i) {
        caches.push_back(RandomDevice(keys * kv_size, kv_dtype, 50 + 2 * i));
        caches.push_back(RandomDevice(keys * kv_size, kv_dtype, 51 + 2 * i));
        AttentionSequence seq;
        seq.k_cache = caches[caches.size() - 2].data();
        seq.v_cache = caches.back().data();
        seq.first_row = static_cast<int32_t>(i * s.queries);
        seq.num_queries = static_cast<int32_t>(s.queries);
        seq.query_start = static_cast<int32_t>(s.cached);
        seq.block_length = 32;
        seqs.push_back(seq);
      }
      DeviceBuffer d_seqs = Upload(seqs);
      AttentionArgs a;
      a.q = q.as<float>();
      a.sequences = d_seqs.as<AttentionSequence>();
      a.num_sequences = s.sequences;
      a.max_queries = s.queries;
      a.num_heads = kHeads;
      a.num_kv_heads = kKvHeads;
      a.head_dim = kHeadDim;
      a.kv_dtype = kv_dtype;
      a.out = out.as<float>();
      const double us = TimeUs([&](int) { Check(Attention(a, nullptr), "attention"); });
      // Visible keys per query: its block and everything before.
      double visible = 0;
      for (int64_t i = 0; i < s.queries; ++i) {
        const int64_t pos = s.cached + i;
        visible += std::min<int64_t>(keys, (pos / 32 + 1) * 32);
      }
      const double flop = 4.0 * s.sequences * visible * kHeads * kHeadDim;
      const double bytes = s.sequences * (2.0 * keys * kv_size * DTypeSize(kv_dtype)) +
                           8.0 * tokens * kHeads * kHeadDim;
      char name[128];
      std::snprintf(name, sizeof(name), "attn %s, %s KV", s.name, DTypeName(kv_dtype));
      Row(name, us, Tflops(flop, us), flop / us * 1e6 / ceil.fp32_simt_flop_per_s,
          "fp32 CUDA cores");
      Row("", us, Tbps(bytes, us), bytes / us * 1e6 / ceil.copy_bytes_per_s, "copy bandwidth");
    }
  }
  std::printf("\n");
}

void BenchGemms(Gemm& gemm, const Ceilings& ceil) {
  std::printf("== GEMMs (cuBLAS), y = x @ w^T, bf16 in, fp32 accumulation\n");
  struct Shape {
    const char* name;
    int64_t n, k;
    DType in, out;
  };
  for (int64_t rows : {32, 512, 4096}) {
    for (Shape s : {Shape{"q/o proj 2048x2048", 2048, 2048, DType::kBF16, DType::kBF16},
                    Shape{"k+v proj 1024x2048", 1024, 2048, DType::kBF16, DType::kF32},
                    Shape{"dense mlp w13 10240x2048", 10240, 2048, DType::kBF16, DType::kBF16},
                    Shape{"router 256x2048 fp32", 256, 2048, DType::kF32, DType::kF32},
                    Shape{"lm_head 157184x2048", 157184, 2048, DType::kBF16, DType::kF32}}) {
      if (s.n == 157184 && rows > 512) continue;
      DeviceBuffer x = RandomDevice(rows * s.k, s.in, 60), w = RandomDevice(s.n * s.k, s.in, 61);
      DeviceBuffer y = Alloc(rows * s.n * DTypeSize(s.out));
      GemmArgs g;
      g.x_dtype = s.in;
      g.x = x.data();
      g.x_stride = s.k;
      g.num_rows = rows;
      g.w = {s.in, w.data(), s.n, s.k};
      g.y_dtype = s.out;
      g.y = y.data();
      g.y_stride = s.n;
      const double us = TimeUs([&](int) { Check(gemm.Run(g), "gemm"); });
      const double flop = 2.0 * rows * s.n * s.k;
      const double bytes =
          (rows * s.k + s.n * s.k) * DTypeSize(s.in) + rows * s.n * DTypeSize(s.out);
      char name[128];
      std::snprintf(name, sizeof(name), "gemm %s rows=%lld", s.name, (long long)rows);
      GemmRow(name, us, flop, bytes, ceil);
    }
  }
  // Routed experts: grouped gate/up GEMMs over one layer's 256 experts (1.07 GB of bf16 weights).
  for (int64_t tokens : {32, 512, 4096}) {
    for (bool uniform : {false, true}) {
      const int64_t assignments = tokens * kTopk;
      std::vector<int32_t> offsets(kExperts + 1, 0);
      std::mt19937 rng(70);
      std::vector<int32_t> counts(kExperts, 0);
      if (uniform) {
        for (int32_t& c : counts) c = static_cast<int32_t>(assignments / kExperts);
      } else {
        for (int64_t a = 0; a < assignments; ++a) ++counts[rng() % kExperts];
      }
      for (int e = 0; e < kExperts; ++e) offsets[e + 1] = offsets[e] + counts[e];
      const int64_t rows = offsets.back();
      if (rows == 0) continue;
      DeviceBuffer x = RandomDevice(rows * kHidden, DType::kBF16, 71);
      DeviceBuffer w = RandomDevice(int64_t{kExperts} * 1024 * kHidden, DType::kBF16, 72);
      DeviceBuffer y = Alloc(rows * 1024 * 2);
      GroupedGemmArgs g{DType::kBF16,
                        x.data(),
                        {DType::kBF16, w.data(), kExperts, 1024, kHidden},
                        offsets,
                        y.data()};
      const double us = TimeUs([&](int) { Check(gemm.RunGrouped(g), "grouped gemm"); }, 15);
      int touched = 0;
      for (int32_t c : counts) touched += c > 0;
      const double flop = 2.0 * rows * 1024 * kHidden;
      const double bytes = touched * 1024.0 * kHidden * 2 + rows * (kHidden + 1024) * 2.0;
      char name[128];
      std::snprintf(name, sizeof(name), "experts w13 %s tokens=%lld (%d experts touched)",
                    uniform ? "uniform" : "ragged", (long long)tokens, touched);
      GemmRow(name, us, flop, bytes, ceil);
    }
  }
  std::printf("\n");
}

// One launch of each kernel worth profiling, at the shapes above (for `ncu -k ...`).
void ProfileOnce() {
  const int64_t n = 16384;
  DeviceBuffer logits = RandomDevice(n * kExperts, DType::kF32, 80, 4.0f);
  DeviceBuffer bias = RandomDevice(kExperts, DType::kF32, 81, 0.1f);
  DeviceBuffer idx = Alloc(n * kTopk * 4), weight = Alloc(n * kTopk * 4);
  const cpu::TokenChoiceParams params{kExperts, kTopk, 8, 4, true, 2.5f};
  Check(TokenChoiceRoute(params,
                         {logits.as<float>(), bias.as<float>(), nullptr, n, idx.as<int32_t>(),
                          weight.as<float>()},
                         nullptr),
        "token choice");
  TokenChoiceSelections tc{nullptr, n, kTopk, idx.as<int32_t>(), weight.as<float>()};
  const PlanBuild plan = MakePlanBuild(n, kExperts, n * kTopk, &tc, nullptr);
  Check(BuildRoutingPlan(plan.args, nullptr), "plan");
  for (int64_t scope_rows : {n, int64_t{512}, int64_t{32}}) {
    ScopeTable scopes = MakeScopes(scope_rows == 512 ? 1 : n / scope_rows, scope_rows);
    DeviceBuffer workspace =
        Alloc(ExpertChoiceWorkspaceBytes(LogitsLayout::kTokenMajor, n, kExperts));
    DeviceBuffer selected = Alloc(kExperts * scopes.view.total_capacity * 4);
    ExpertChoiceSelectArgs a;
    a.logits = logits.as<float>();
    a.layout = scope_rows == n ? LogitsLayout::kExpertMajor : LogitsLayout::kTokenMajor;
    a.num_tokens = n;
    a.num_experts = kExperts;
    a.scopes = scopes.view;
    a.selected = selected.as<int32_t>();
    a.workspace = workspace.data();
    a.workspace_bytes = workspace.bytes();
    Check(ExpertChoiceSelect(a, nullptr), "expert choice");
  }
  const int64_t seqs = 64, queries = 32, cached = 1024, keys = cached + queries;
  DeviceBuffer q = RandomDevice(seqs * queries * kHeads * kHeadDim, DType::kF32, 82);
  DeviceBuffer out = Alloc(seqs * queries * kHeads * kHeadDim * 4);
  DeviceBuffer k = RandomDevice(keys * kKvHeads * kHeadDim, DType::kF32, 83);
  DeviceBuffer v = RandomDevice(keys * kKvHeads * kHeadDim, DType::kF32, 84);
  std::vector<AttentionSequence> host_seqs(seqs);
  for (int64_t i = 0; i < seqs; ++i) {
    host_seqs[i] = {k.data(),
                    v.data(),
                    static_cast<int32_t>(i * queries),
                    static_cast<int32_t>(queries),
                    static_cast<int32_t>(cached),
                    32};
  }
  DeviceBuffer d_seqs = Upload(host_seqs);
  AttentionArgs a;
  a.q = q.as<float>();
  a.sequences = d_seqs.as<AttentionSequence>();
  a.num_sequences = seqs;
  a.max_queries = queries;
  a.num_heads = kHeads;
  a.num_kv_heads = kKvHeads;
  a.head_dim = kHeadDim;
  a.kv_dtype = DType::kF32;
  a.out = out.as<float>();
  Check(Attention(a, nullptr), "attention");
  Check(cudaDeviceSynchronize(), "sync");
}

}  // namespace
}  // namespace moeserve::cuda

int main(int argc, char** argv) {
  using namespace moeserve::cuda;
  if (!CudaDeviceAvailable()) {
    std::fprintf(stderr, "cuda_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  Check(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("device: %s, %d SMs, %.0f MB L2\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1e6);
  if (argc > 1 && std::strcmp(argv[1], "--profile") == 0) {
    ProfileOnce();
    return 0;
  }
  absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create(nullptr);
  Check(gemm.status(), "gemm");
  const Ceilings ceil = MeasureCeilings(**gemm);
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  BenchExpertChoice(ceil);
  BenchTokenChoice(ceil);
  BenchAttention(ceil);
  if (!quick) BenchGemms(**gemm, ceil);
  return 0;
}
