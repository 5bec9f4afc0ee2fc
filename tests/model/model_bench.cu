// Benchmark of the LLaDA2.0-mini MoE layer and of whole forwards on the GPU (a program, not a
// test: it needs a GPU and about 40 GB of device and 40 GB of host memory).
//
// 1. The routed experts of one MoE layer (hidden 2048, expert width 512, 256 experts, top-8,
//    BF16 random weights) at N = 32 ... 16384 tokens, from routing given to layer output: device
//    plan build, the routed experts (MoeExperts), weighted combine (no shared expert, no router).
//    The layer runs as the model runs it: the plan's row pass goes beside the experts on a side
//    stream, after the CSR part (token-choice), and for expert-choice the experts start on the
//    selection with all of the plan build beside them (routing_plan.h's SelectionPlan); "plan
//    1st" is the same layer with the whole plan built first, its samples alternating with the
//    other's.
//    Routings: token-choice with uniform and Zipf-skewed (skew 1.0) router logits, expert-choice
//    with capacity factor 1.0 and 1.25 over one scope of N tokens. The fused path (moe_gemm.h,
//    no host round trip) is timed as a CUDA graph of 10 layers, median of 20 replays. Beside it,
//    in the same process and event-timed (median of many runs after warm-up, host launches
//    included, a token-choice plan's per-expert counts copied back every run): the unfused cuBLAS
//    path (MoeExpertsPath::kCublas) and a plain baseline with one cuBLAS GEMM per expert around
//    the same gather, SwiGLU and combine. Ratio = floor / time, floor = max(bytes that must be
//    read / copy bandwidth, useful FLOPs / bf16 GEMM rate), both ceilings measured first in the
//    same process; bytes = the touched experts' weights + x + the output. sust% is the same ratio
//    with the GEMM rate sustained at the power limit (MeasureCeilings), which the large-N rows,
//    timed over many replays, run under.
// 2. The routing kernels alone are in tests/kernels/cuda_bench.cu.
// 3. Whole forwards of the random-weight full LLaDA2.0-mini (Model on Device::kCuda, BF16) at 1,
//    8, 32 and 64 concurrent 32-token blocks over a 512-token cached prefix each, token-choice and
//    expert-choice (request scope, capacity factor 1.0 and 1.25): wall time of Model::Forward (all
//    host work and synchronization included) with CUDA graphs, the ratio of the time to read what
//    the forward must read (non-expert weights, lm_head, the touched experts, the K/V caches) at
//    copy bandwidth, and as baseline the same forwards with every kernel launched eagerly.
//
// Usage: model_bench [--config model/configs/LLaDA2.0-mini-preview.json] [--layer-only]
//                    [--forward-only] [--sizes 32,256,1024,4096,16384] [--blocks 1,8,32,64]
//                    [--no-baselines] [--profile] [--plan-variants]
// --sizes picks the layer's token counts; --no-baselines times the fused layer alone and, by CUDA
// graphs of its first parts, the plan build, the experts and the combine (quick comparisons);
// --profile runs each layer once, untimed, and nothing else (for ncu: one launch per kernel);
// --plan-variants times, alternating, the layer as the model runs it, with the whole plan first,
// with the CSR part alone (token-choice; no row pass, no side stream) and with no plan build (the
// plan built before the graph; the combine then reads that plan): what the plan costs the layer;
// --forward-only runs part 3 alone, --blocks picks its batch sizes; part 3 brackets its timed
// forwards with graphs by cudaProfilerStart / Stop (for nsys or ncu capture ranges).
#include <cuda_bf16.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/cuda/expert_choice.h"
#include "kernels/cuda/moe_dispatch.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/moe_gemm.h"
#include "kernels/cuda/routing_plan.h"
#include "kernels/cuda/side_stream.h"
#include "kernels/cuda/swiglu.h"
#include "kernels/cuda/token_choice.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/model.h"
#include "tests/kernels/bench_util.cuh"

namespace moeserve::cuda {
namespace {

constexpr int64_t kExperts = 256, kTopk = 8, kHidden = 2048, kWidth = 512;
constexpr double kExpertBytes = 3.0 * kWidth * kHidden * 2;          // W13 + W2, BF16
constexpr double kFlopPerAssignment = 2.0 * 3.0 * kWidth * kHidden;  // gate, up, down

// Router logits [n, experts]: uniform noise plus, when skewed, -skew * ln(rank) for a random
// popularity rank per expert (what route-stats --skew does).
std::vector<float> RouterLogits(int64_t n, double skew, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<int> rank(kExperts);
  std::iota(rank.begin(), rank.end(), 1);
  std::shuffle(rank.begin(), rank.end(), rng);
  std::vector<float> logits(n * kExperts);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t e = 0; e < kExperts; ++e) {
      logits[t * kExperts + e] = u(rng) - static_cast<float>(skew * std::log(rank[e]));
    }
  }
  return logits;
}

struct LayerWeights {
  DeviceBuffer w13, w2;
  ExpertWeightsView w13_view, w2_view;
};

// One routing of n tokens as a device plan, with its host offsets.
// Held by pointer: plan.args points at tc / ec.
struct Routed {
  std::vector<int32_t> offsets;
  int64_t touched_experts = 0;
  bool token_choice = false;
  // What BuildRoutingPlan needs again in the timed region.
  DeviceBuffer logits, rows, topk_idx, topk_weight, selected, renormalize;
  DeviceBuffer row_offsets, capacity, selected_offsets;
  TokenChoiceSelections tc;
  ExpertChoiceSelections ec;
  PlanBuild plan;
};

std::unique_ptr<Routed> Route(int64_t n, bool token_choice, double skew, double capacity_factor) {
  auto routed = std::make_unique<Routed>();
  Routed& r = *routed;
  r.token_choice = token_choice;
  r.logits = Upload(RouterLogits(n, skew, 7));
  int64_t assignments = 0;
  if (token_choice) {
    r.topk_idx = Alloc(n * kTopk * 4);
    r.topk_weight = Alloc(n * kTopk * 4);
    const cpu::TokenChoiceParams p{kExperts, kTopk, 8, 4, true, 2.5f};
    Check(TokenChoiceRoute(p,
                           {r.logits.as<float>(), nullptr, nullptr, n, r.topk_idx.as<int32_t>(),
                            r.topk_weight.as<float>()},
                           nullptr),
          "token choice");
    r.tc = {nullptr, n, kTopk, r.topk_idx.as<int32_t>(), r.topk_weight.as<float>()};
    assignments = n * kTopk;
  } else {
    const int32_t cap =
        static_cast<int32_t>(ExpertChoiceCapacity(capacity_factor, n, kTopk, kExperts));
    r.row_offsets = Upload(std::vector<int32_t>{0, static_cast<int32_t>(n)});
    r.capacity = Upload(std::vector<int32_t>{cap});
    r.selected_offsets = Upload(std::vector<int32_t>{0, cap});
    r.renormalize = Upload(std::vector<uint8_t>{1});
    ExpertChoiceScopes scopes{1,
                              r.row_offsets.as<int32_t>(),
                              nullptr,
                              r.capacity.as<int32_t>(),
                              r.selected_offsets.as<int32_t>(),
                              n,
                              cap};
    r.selected = Alloc(kExperts * cap * 4);
    DeviceBuffer ws = Alloc(ExpertChoiceWorkspaceBytes(LogitsLayout::kTokenMajor, n, kExperts));
    ExpertChoiceSelectArgs a;
    a.logits = r.logits.as<float>();
    a.num_tokens = n;
    a.num_experts = kExperts;
    a.scopes = scopes;
    a.selected = r.selected.as<int32_t>();
    a.workspace = ws.data();
    a.workspace_bytes = ws.bytes();
    Check(ExpertChoiceSelect(a, nullptr), "expert choice");
    r.ec = {scopes, r.selected.as<int32_t>(), r.renormalize.as<uint8_t>(), r.logits.as<float>(),
            2.5f};
    assignments = kExperts * cap;
  }
  r.plan = MakePlanBuild(n, kExperts, assignments, token_choice ? &r.tc : nullptr,
                         token_choice ? nullptr : &r.ec);
  Check(BuildRoutingPlan(r.plan.args, nullptr), "plan");
  absl::StatusOr<std::vector<int32_t>> offsets =
      Download(r.plan.storage.plan().expert_offsets, kExperts + 1);
  Check(offsets.status(), "offsets");
  r.offsets = *offsets;
  for (int64_t e = 0; e < kExperts; ++e) r.touched_experts += r.offsets[e + 1] > r.offsets[e];
  return routed;
}

// profile: run each layer once, untimed, for a profiler (ncu) to see its kernels.
void BenchMoeLayer(Gemm& gemm, const Ceilings& ceil, const std::vector<int64_t>& sizes,
                   bool baselines, bool profile, bool plan_variants) {
  LayerWeights w;
  w.w13 = RandomDevice(kExperts * 2 * kWidth * kHidden, DType::kBF16, 11, 0.03f);
  w.w2 = RandomDevice(kExperts * kHidden * kWidth, DType::kBF16, 12, 0.03f);
  w.w13_view = {DType::kBF16, w.w13.data(), kExperts, 2 * kWidth, kHidden};
  w.w2_view = {DType::kBF16, w.w2.data(), kExperts, kHidden, kWidth};
  std::printf(
      "MoE layer, routed experts (256 x [1024 x 2048 | 2048 x 512] BF16), routing given to layer "
      "output; floor = max(bytes / %.2f TB/s, FLOPs / %.0f TFLOP/s); sust%% takes the GEMM rate "
      "sustained at the power limit, %.0f TFLOP/s, instead\n",
      ceil.copy_bytes_per_s / 1e12, ceil.bf16_flop_per_s / 1e12,
      ceil.bf16_sustained_flop_per_s / 1e12);
  std::printf("%-24s %6s %8s %10s %9s %9s %7s %7s %11s %10s %7s %8s %9s\n", "routing", "N",
              "experts", "time us", "TB/s", "TFLOP/s", "floor%", "sust%", "unfused us", "base us",
              "base%", "speedup", "plan 1st");
  struct Mode {
    const char* name;
    bool token_choice;
    double skew, cf;
  };
  const Mode modes[] = {{"token_choice uniform", true, 0.0, 0},
                        {"token_choice skew 1.0", true, 1.0, 0},
                        {"expert_choice cf 1.0", false, 0.0, 1.0},
                        {"expert_choice cf 1.25", false, 0.0, 1.25}};
  const bool fused = MoeExpertsFused(DType::kBF16, kExperts, kHidden, kWidth);
  // The model's stream priority (side_stream.h): the plan build beside the experts runs on a
  // lower one.
  cudaStream_t graph_stream;
  Check(cudaStreamCreateWithPriority(&graph_stream, cudaStreamNonBlocking, HighestStreamPriority()),
        "stream");
  absl::StatusOr<SideStream> side = SideStream::Create();
  Check(side.status(), "side stream");
  absl::StatusOr<std::unique_ptr<Gemm>> graph_gemm = Gemm::Create(graph_stream);
  Check(graph_gemm.status(), "gemm");
  std::printf("routed experts: %s\n", fused ? "fused plan-reading kernels (moe_gemm.h), timed "
                                              "as a CUDA graph"
                                            : "cuBLAS path (no sm_90 GPU / sm_90a code), events");
  for (int64_t n : sizes) {
    DeviceBuffer x = RandomDevice(n * kHidden, DType::kBF16, 13);
    DeviceBuffer residual = RandomDevice(n * kHidden, DType::kF32, 14);
    DeviceBuffer out = Alloc(n * kHidden * 4);
    for (const Mode& m : modes) {
      const std::unique_ptr<Routed> routed = Route(n, m.token_choice, m.skew, m.cf);
      const Routed& r = *routed;
      const DeviceRoutingPlan plan = r.plan.storage.plan();
      const int64_t a = plan.num_assignments;
      DeviceBuffer ws =
          Alloc(std::max(MoeExpertsWorkspaceBytes(DType::kBF16, a, kExperts, kHidden, kWidth),
                         MoeExpertsWorkspaceBytes(DType::kBF16, a, kExperts, kHidden, kWidth,
                                                  MoeExpertsPath::kCublas)));
      DeviceBuffer expert_out = Alloc(a * kHidden * 2);
      std::vector<int32_t> offsets(kExperts + 1);
      auto get_offsets = [&](cudaStream_t stream) {
        if (!r.token_choice) return;  // even plans: known on the host
        Check(cudaMemcpyAsync(offsets.data(), plan.expert_offsets, offsets.size() * 4,
                              cudaMemcpyDeviceToHost, stream),
              "offsets");
        Check(cudaStreamSynchronize(stream), "offsets");
      };
      offsets = r.offsets;
      auto combine = [&](cudaStream_t stream) {
        Check(Combine({plan, DType::kBF16, expert_out.data(), nullptr, residual.as<float>(),
                       out.as<float>(), kHidden},
                      stream),
              "combine");
      };
      // Expert-choice over one scope: the experts can start on the selection, with the plan
      // build beside them (routing_plan.h's SelectionPlan), as the model runs it.
      DeviceBuffer uniform_offsets;
      DeviceRoutingPlan selection_plan;
      if (!r.token_choice) {
        uniform_offsets = Upload(UniformExpertOffsets(kExperts, r.ec.scopes.total_capacity));
        selection_plan = SelectionPlan(r.ec, n, kExperts, uniform_offsets.as<int32_t>());
      }
      // parts: 1 the plan build, 2 also the experts, 3 the whole layer. Where the whole layer
      // builds its plan: kBeside as the model runs it (token-choice builds the plan's CSR part
      // first and its row pass beside the experts, on the side stream; expert-choice starts the
      // experts on the selection, all of the build beside them); kFirst all of it before the
      // experts; kCsrOnly the CSR part alone (token-choice), no row pass and no side work; kNone
      // no build (the plan Route built).
      enum class PlanAt { kBeside, kFirst, kCsrOnly, kNone };
      auto layer = [&](Gemm& g, cudaStream_t stream, MoeExpertsPath path, int parts = 3,
                       PlanAt at = PlanAt::kFirst) {
        if (parts < 3) at = PlanAt::kFirst;
        const bool beside = at == PlanAt::kBeside;
        if (beside) {
          if (r.token_choice) Check(BuildRoutingPlanCsr(r.plan.args, stream), "plan");
          Check(side->Fork(stream), "fork");
          if (!r.token_choice) Check(BuildRoutingPlanCsr(r.plan.args, side->stream()), "plan");
          Check(FinishRoutingPlan(r.plan.args, side->stream()), "plan");
        } else if (at == PlanAt::kFirst) {
          Check(BuildRoutingPlan(r.plan.args, stream), "plan");
        } else if (at == PlanAt::kCsrOnly && r.token_choice) {
          Check(BuildRoutingPlanCsr(r.plan.args, stream), "plan");
        }
        if (parts == 1) return;
        if (path == MoeExpertsPath::kCublas) get_offsets(stream);
        MoeExpertsArgs args;
        args.x = x.data();
        args.plan = at != PlanAt::kFirst && !r.token_choice ? selection_plan : plan;
        if (path == MoeExpertsPath::kCublas) args.expert_offsets = offsets;
        args.w13 = w.w13_view;
        args.w2 = w.w2_view;
        args.expert_out = expert_out.data();
        args.workspace = ws.data();
        args.workspace_bytes = ws.bytes();
        args.path = path;
        Check(MoeExperts(g, args), "experts");
        if (beside) Check(side->Join(stream), "join");
        if (parts == 3) combine(stream);
      };
      if (profile) {
        layer(gemm, nullptr, MoeExpertsPath::kAuto);
        Check(cudaDeviceSynchronize(), "profile");
        std::printf("%-24s %6lld: ran once\n", m.name, static_cast<long long>(n));
        continue;
      }
      // The fused path has no host round trip: it is timed as a CUDA graph, like the issue's
      // reference numbers. The cuBLAS path copies counts back, so it is event-timed.
      // Also the layer with the whole plan built before the experts, its samples alternating with
      // the other's (plan_first_us).
      double us = 0, plan_first_us = 0;
      if (fused) {
        auto graph_layer = [&](PlanAt at) {
          return [&, at](cudaStream_t s) { layer(**graph_gemm, s, MoeExpertsPath::kAuto, 3, at); };
        };
        if (plan_variants) {
          const std::vector<double> t =
              TimeGraphsUs({graph_layer(PlanAt::kBeside), graph_layer(PlanAt::kFirst),
                            graph_layer(PlanAt::kCsrOnly), graph_layer(PlanAt::kNone)},
                           20, graph_stream);
          std::printf(
              "%-24s %6lld  as the model %.1f, plan first %.1f, CSR part only %.1f, "
              "no plan build %.1f\n",
              m.name, static_cast<long long>(n), t[0], t[1], t[2], t[3]);
          continue;
        }
        const std::vector<double> t = TimeGraphsUs(
            {graph_layer(PlanAt::kBeside), graph_layer(PlanAt::kFirst)}, 20, graph_stream);
        us = t[0];
        plan_first_us = t[1];
      } else {
        us = plan_first_us = TimeUs([&](int) { layer(gemm, nullptr, MoeExpertsPath::kAuto); });
      }
      if (!baselines) {
        std::printf("%-24s %6lld %8lld %10.1f", m.name, static_cast<long long>(n),
                    static_cast<long long>(r.touched_experts), us);
        if (fused) {
          // Where the time goes: graphs of the plan build alone and of the plan and the experts
          // (each difference includes the launch gap before that part). The event-timed cuBLAS
          // path has a host round trip in the middle, so it gets no breakdown.
          auto graph_of = [&](int parts) {
            return TimeGraphUs(
                [&](cudaStream_t s) { layer(**graph_gemm, s, MoeExpertsPath::kAuto, parts); }, 20,
                graph_stream);
          };
          const double plan_us = graph_of(1), experts_us = graph_of(2) - plan_us;
          std::printf("   plan %.1f, experts %.1f, combine %.1f", plan_us, experts_us,
                      plan_first_us - plan_us - experts_us);
          std::printf(" (plan first: %.1f)", plan_first_us);
        }
        std::printf("\n");
        continue;
      }
      const double unfused_us = TimeUs([&](int) { layer(gemm, nullptr, MoeExpertsPath::kCublas); });
      // Baseline: one cuBLAS GEMM per expert, same gather / SwiGLU / combine kernels.
      DeviceBuffer xs = Alloc(a * kHidden * 2), gate_up = Alloc(a * 2 * kWidth * 2),
                   act = Alloc(a * kWidth * 2);
      const double base_us = TimeUs([&](int) {
        Check(BuildRoutingPlan(r.plan.args, nullptr), "plan");
        get_offsets(nullptr);
        Check(GatherRows({DType::kBF16, x.data(), kHidden, plan.token_idx, a, xs.data()}, nullptr),
              "gather");
        for (int64_t e = 0; e < kExperts; ++e) {
          const int32_t b = offsets[e], c = offsets[e + 1] - offsets[e];
          if (c == 0) continue;
          Check(gemm.Run({DType::kBF16,
                          xs.as<__nv_bfloat16>() + int64_t{b} * kHidden,
                          kHidden,
                          c,
                          {DType::kBF16, w.w13.as<__nv_bfloat16>() + e * 2 * kWidth * kHidden,
                           2 * kWidth, kHidden},
                          DType::kBF16,
                          gate_up.as<__nv_bfloat16>() + int64_t{b} * 2 * kWidth,
                          2 * kWidth,
                          0.0f}),
                "w13");
        }
        SwiGluArgs s{DType::kBF16, gate_up.data(), a, kWidth};
        s.out_bf16 = act.as<__nv_bfloat16>();
        Check(SwiGlu(s, nullptr), "swiglu");
        for (int64_t e = 0; e < kExperts; ++e) {
          const int32_t b = offsets[e], c = offsets[e + 1] - offsets[e];
          if (c == 0) continue;
          Check(gemm.Run({DType::kBF16,
                          act.as<__nv_bfloat16>() + int64_t{b} * kWidth,
                          kWidth,
                          c,
                          {DType::kBF16, w.w2.as<__nv_bfloat16>() + e * kHidden * kWidth, kHidden,
                           kWidth},
                          DType::kBF16,
                          expert_out.as<__nv_bfloat16>() + int64_t{b} * kHidden,
                          kHidden,
                          0.0f}),
                "w2");
        }
        combine(nullptr);
      });
      const double bytes = r.touched_experts * kExpertBytes + n * kHidden * 2.0 + n * kHidden * 4.0;
      const double flop = a * kFlopPerAssignment;
      auto floor_at = [&](double flop_per_s) {
        return std::max(bytes / ceil.copy_bytes_per_s, flop / flop_per_s) * 1e6;
      };
      const double floor_us = floor_at(ceil.bf16_flop_per_s);
      const double sustained_floor_us = floor_at(ceil.bf16_sustained_flop_per_s);
      std::printf(
          "%-24s %6lld %8lld %10.1f %9.3f %9.1f %6.1f%% %6.1f%% %11.1f %10.1f %6.1f%% %7.2fx",
          m.name, static_cast<long long>(n), static_cast<long long>(r.touched_experts), us,
          bytes / us / 1e6, flop / us / 1e6, 100.0 * floor_us / us, 100.0 * sustained_floor_us / us,
          unfused_us, base_us, 100.0 * floor_us / base_us, base_us / us);
      std::printf(" %9.1f\n", plan_first_us);
    }
  }
  graph_gemm->reset();
  Check(cudaStreamDestroy(graph_stream), "stream");
  if (fused) std::printf("fused kernels ran on %d SMs (clusters of 2)\n", MoeGemmSmsUsed());
  std::printf("\n");
}

// ---------------------------------------------------------------------------------------------
// Whole forwards of the full model.

double MedianMs(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void BenchForward(const std::string& config_path, const std::vector<int64_t>& block_counts) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(config_path);
  Check(config.status(), "config");
  const ModelConfig& c = *config;
  auto t0 = std::chrono::steady_clock::now();
  ModelWeights host = RandomWeights(c, {.seed = 1});
  auto t1 = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<Model>> model =
      Model::Create(c, std::move(host), {Device::kCuda, DType::kBF16});
  Check(model.status(), "model");
  auto t2 = std::chrono::steady_clock::now();
  std::printf("full model %s: %.2f B parameters, random init %.1f s, upload %.1f s\n",
              config_path.c_str(), ParameterCount(c) / 1e9,
              std::chrono::duration<double>(t1 - t0).count(),
              std::chrono::duration<double>(t2 - t1).count());

  // What one forward must read besides the routed experts: every other weight (attention,
  // dense MLP, shared experts, routers, norms; the embedding rows are negligible) and lm_head.
  const int64_t all_params = ParameterCount(c);
  const int64_t expert_params =
      c.num_moe_layers() * c.num_experts * 3 * c.moe_intermediate_size * c.hidden_size;
  const int64_t embed_params = c.vocab_size * c.hidden_size;
  const double other_bytes = 2.0 * (all_params - expert_params - embed_params);
  const double expert_bytes = 2.0 * 3 * c.moe_intermediate_size * c.hidden_size;
  const double copy_bw = [] {
    absl::StatusOr<std::unique_ptr<Gemm>> g = Gemm::Create(nullptr);
    Check(g.status(), "gemm");
    return MeasureCeilings(**g).copy_bytes_per_s;
  }();

  constexpr int64_t kPrefix = 512, kBlock = 32;
  struct Mode {
    const char* name;
    RoutingOptions routing;
  };
  RoutingOptions ec1, ec125;
  ec1.mode = ec125.mode = RoutingMode::kExpertChoice;
  ec1.capacity_factor = 1.0;
  const Mode modes[] = {
      {"token_choice", {}}, {"expert_choice cf 1.0", ec1}, {"expert_choice cf 1.25", ec125}};
  std::printf(
      "whole forwards: wall time of Model::Forward with CUDA graphs (replayed from the third "
      "forward of a shape on), and the same forwards launched kernel by kernel (eager)\n");
  std::printf("%-22s %6s %7s %10s %11s %10s %7s %9s %8s %5s\n", "routing", "blocks", "tokens",
              "forward ms", "experts/l", "floor ms", "floor%", "eager ms", "speedup", "repl");
  for (int64_t blocks : block_counts) {
    for (const Mode& m : modes) {
      std::vector<KvCache> caches;
      std::vector<std::vector<int32_t>> prompt(blocks), block(blocks);
      for (int64_t b = 0; b < blocks; ++b) {
        caches.emplace_back(c);
        for (int64_t i = 0; i < kPrefix; ++i) prompt[b].push_back((b * 7919 + i * 104729) % 150000);
        block[b].assign(kBlock, static_cast<int32_t>(c.vocab_size - 1));
        std::vector<SequenceInput> pre(1);
        pre[0].token_ids = prompt[b];
        pre[0].cache = &caches[b];
        pre[0].block_length = kBlock;
        pre[0].commit_tokens = kPrefix;
        pre[0].routing = m.routing;
        Check((*model)->Forward(pre).status(), "prefill");
      }
      std::vector<SequenceInput> in(blocks);
      for (int64_t b = 0; b < blocks; ++b) {
        in[b].token_ids = block[b];
        in[b].cache = &caches[b];
        in[b].block_length = kBlock;
        in[b].commit_tokens = 0;  // a denoising step: the caches stay as they are
        for (int32_t r = 0; r < kBlock; ++r) in[b].logit_rows.push_back(r);
        in[b].routing = m.routing;
        in[b].greedy = true;
      }
      double touched = 0;
      int replayed = 0;
      // Median of 10 forwards after 3 of warm-up (with graphs: the first runs eagerly, the second
      // is captured, the rest replay).
      auto time_forwards = [&](bool graphs) {
        (*model)->SetCudaGraphs(graphs);
        std::vector<double> ms;
        for (int it = 0; it < 13; ++it) {
          const auto s = std::chrono::steady_clock::now();
          absl::StatusOr<ForwardOutput> out = (*model)->Forward(in, nullptr, {0, 0});
          const auto e = std::chrono::steady_clock::now();
          Check(out.status(), "forward");
          if (it < 3) continue;  // warm-up
          ms.push_back(std::chrono::duration<double, std::milli>(e - s).count());
          replayed += out->launch == ForwardLaunch::kReplayed;
          touched = 0;
          for (const LayerLoad& load : out->layer_load) {
            for (int64_t x = 0; x < c.num_experts; ++x) {
              const RoutingLoad& tc = load.by_mode[0];
              const RoutingLoad& ec = load.by_mode[1];
              if (tc.tokens_per_expert.empty()) break;
              touched += (tc.tokens_per_expert[x] + ec.tokens_per_expert[x]) > 0;
            }
          }
        }
        return MedianMs(ms);
      };
      Check(cudaProfilerStart(), "profiler");
      const double med = time_forwards(true);
      Check(cudaProfilerStop(), "profiler");
      const int replayed_with_graphs = replayed;
      const double eager_med = time_forwards(false);
      const double kv_bytes =
          2.0 * blocks * (kPrefix + kBlock) * c.num_hidden_layers * c.kv_size() * 2;
      const double bytes = other_bytes + touched * expert_bytes + kv_bytes;
      const double floor_ms = bytes / copy_bw * 1e3;
      std::printf("%-22s %6lld %7lld %10.2f %11.1f %10.2f %6.1f%% %9.2f %7.2fx %5lld\n", m.name,
                  static_cast<long long>(blocks), static_cast<long long>(blocks * kBlock), med,
                  touched / c.num_moe_layers(), floor_ms, 100.0 * floor_ms / med, eager_med,
                  eager_med / med, static_cast<long long>(replayed_with_graphs));
    }
  }
}

}  // namespace
}  // namespace moeserve::cuda

int main(int argc, char** argv) {
  using namespace moeserve::cuda;
  if (!CudaDeviceAvailable()) {
    std::fprintf(stderr, "model_bench: no CUDA device\n");
    return 1;
  }
  std::string config = "model/configs/LLaDA2.0-mini-preview.json";
  bool layer_only = false, forward_only = false, baselines = true, profile = false,
       plan_variants = false;
  std::vector<int64_t> sizes = {32, 256, 1024, 4096, 16384}, blocks = {1, 8, 32, 64};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--config") == 0 && i + 1 < argc) config = argv[++i];
    if (std::strcmp(argv[i], "--layer-only") == 0) layer_only = true;
    if (std::strcmp(argv[i], "--forward-only") == 0) forward_only = true;
    if (std::strcmp(argv[i], "--no-baselines") == 0) baselines = false;
    if (std::strcmp(argv[i], "--profile") == 0) profile = layer_only = true;
    if (std::strcmp(argv[i], "--plan-variants") == 0) plan_variants = layer_only = true;
    for (auto [flag, list] : {std::pair{"--sizes", &sizes}, std::pair{"--blocks", &blocks}}) {
      if (std::strcmp(argv[i], flag) != 0 || i + 1 >= argc) continue;
      list->clear();
      for (absl::string_view part : absl::StrSplit(argv[++i], ',')) {
        int64_t n = 0;
        if (!absl::SimpleAtoi(part, &n) || n <= 0) {
          std::fprintf(stderr, "model_bench: %s takes positive counts, got '%s'\n", flag,
                       std::string(part).c_str());
          return 2;
        }
        list->push_back(n);
      }
    }
  }
  cudaDeviceProp prop{};
  Check(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("device: %s, %d SMs, %.0f MB L2, %.0f GB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1e6, prop.totalGlobalMem / 1e9);
  if (!forward_only) {
    absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create(nullptr);
    Check(gemm.status(), "gemm");
    const Ceilings ceil = profile ? Ceilings{} : MeasureCeilings(**gemm);
    BenchMoeLayer(**gemm, ceil, sizes, baselines, profile, plan_variants);
  }
  if (!layer_only) BenchForward(config, blocks);
  return 0;
}
