// Helpers of the CUDA benchmark programs (tests/kernels/cuda_bench.cu, tests/model/model_bench.cu):
// checks that exit with a message, device buffers, random device data, event and CUDA-graph
// timers (medians after warm-up), routing-plan builds, and this GPU's ceilings measured in the
// same process.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/routing_plan.h"
#include "kernels/cuda/side_stream.h"

namespace moeserve::cuda {
namespace {

void Check(const absl::Status& status, const char* what) {
  if (!status.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, status.ToString().c_str());
    std::exit(1);
  }
}
void Check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(error));
    std::exit(1);
  }
}

DeviceBuffer Alloc(size_t bytes) {
  absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(std::max<size_t>(bytes, 16));
  Check(b.status(), "allocate");
  return std::move(*b);
}

template <typename T>
DeviceBuffer Upload(const std::vector<T>& host) {
  DeviceBuffer b = Alloc(host.size() * sizeof(T));
  Check(CopyToDevice(host.data(), host.size() * sizeof(T), b.data()), "upload");
  return b;
}

// Uniform values in [-scale, scale) from a hash of the index, converted to T.
template <typename T>
__global__ void FillKernel(T* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9e3779b1u ^ seed;
    h ^= h >> 15;
    h *= 0x2c1b3c6du;
    h ^= h >> 12;
    p[i] = static_cast<T>((static_cast<float>(h >> 8) / 16777216.0f * 2.0f - 1.0f) * scale);
  }
}
// Random device data without host traffic (never zeros: they can run faster than real data).
DeviceBuffer RandomDevice(int64_t n, DType dtype, uint32_t seed, float scale = 1.0f) {
  DeviceBuffer b = Alloc(n * DTypeSize(dtype));
  switch (dtype) {
    case DType::kF32:
      FillKernel<<<1024, 256>>>(b.as<float>(), n, seed, scale);
      break;
    case DType::kBF16:
      FillKernel<<<1024, 256>>>(b.as<__nv_bfloat16>(), n, seed, scale);
      break;
  }
  Check(cudaGetLastError(), "fill");
  return b;
}

// Median microseconds per call of `fn(i)` (i counts calls, for rotating inputs), after
// `warm_up` untimed calls.
double TimeUs(const std::function<void(int)>& fn, int samples = 30, int warm_up = 5) {
  cudaEvent_t start, stop;
  Check(cudaEventCreate(&start), "event");
  Check(cudaEventCreate(&stop), "event");
  int call = 0;
  for (int i = 0; i < warm_up; ++i) fn(call++);
  Check(cudaDeviceSynchronize(), "warm-up");
  // Calls per sample: enough for ~200 us of work, so launch gaps and event resolution vanish.
  Check(cudaEventRecord(start), "record");
  fn(call++);
  Check(cudaEventRecord(stop), "record");
  Check(cudaEventSynchronize(stop), "sync");
  float one_ms = 0;
  Check(cudaEventElapsedTime(&one_ms, start, stop), "elapsed");
  const int inner = std::clamp(static_cast<int>(0.2f / std::max(one_ms, 1e-4f)), 1, 200);
  std::vector<double> us;
  for (int s = 0; s < samples; ++s) {
    Check(cudaEventRecord(start), "record");
    for (int i = 0; i < inner; ++i) fn(call++);
    Check(cudaEventRecord(stop), "record");
    Check(cudaEventSynchronize(stop), "sync");
    float ms = 0;
    Check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    us.push_back(1000.0 * ms / inner);
  }
  Check(cudaGetLastError(), "timed work");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

// Median microseconds per call of each `fns[i](stream)` replayed from a CUDA graph of 10 calls:
// what the op costs inside a captured forward, without the host's launch overhead. With several
// functions the samples alternate between their graphs (A B A B ...), so a comparison does not
// depend on which ran first while the GPU warmed up or reached its power limit. Captures on
// `capture_stream` when given (it must not be the legacy default stream), else on its own.
std::vector<double> TimeGraphsUs(const std::vector<std::function<void(cudaStream_t)>>& fns,
                                 int samples = 20, cudaStream_t capture_stream = nullptr) {
  constexpr int kCallsPerGraph = 10;
  cudaStream_t stream = capture_stream;
  if (capture_stream == nullptr) {
    Check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  }
  std::vector<cudaGraphExec_t> execs;
  for (const auto& fn : fns) {
    for (int i = 0; i < 3; ++i) fn(stream);  // warm-up, one-time attribute calls
    Check(cudaStreamSynchronize(stream), "warm-up");
    cudaGraph_t graph;
    Check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
    for (int i = 0; i < kCallsPerGraph; ++i) fn(stream);
    Check(cudaStreamEndCapture(stream, &graph), "capture");
    cudaGraphExec_t exec;
    Check(cudaGraphInstantiate(&exec, graph, kGraphInstantiateFlags), "instantiate");
    cudaGraphDestroy(graph);
    Check(cudaGraphLaunch(exec, stream), "graph");
    execs.push_back(exec);
  }
  cudaEvent_t start, stop;
  Check(cudaEventCreate(&start), "event");
  Check(cudaEventCreate(&stop), "event");
  std::vector<std::vector<double>> us(fns.size());
  for (int s = 0; s < samples; ++s) {
    for (size_t f = 0; f < execs.size(); ++f) {
      Check(cudaEventRecord(start, stream), "record");
      Check(cudaGraphLaunch(execs[f], stream), "graph");
      Check(cudaEventRecord(stop, stream), "record");
      Check(cudaEventSynchronize(stop), "sync");
      float ms = 0;
      Check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
      us[f].push_back(1000.0 * ms / kCallsPerGraph);
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  for (cudaGraphExec_t exec : execs) cudaGraphExecDestroy(exec);
  if (capture_stream == nullptr) cudaStreamDestroy(stream);
  std::vector<double> medians;
  for (std::vector<double>& u : us) {
    std::sort(u.begin(), u.end());
    medians.push_back(u[u.size() / 2]);
  }
  return medians;
}

double TimeGraphUs(const std::function<void(cudaStream_t)>& fn, int samples = 20,
                   cudaStream_t capture_stream = nullptr) {
  return TimeGraphsUs({fn}, samples, capture_stream)[0];
}

// What BuildRoutingPlan needs for n tokens and `assignments` plan entries: the plan's storage, its
// workspace, and the arguments, pointed at the caller's selections (which must outlive them).
struct PlanBuild {
  DeviceRoutingPlanStorage storage;
  DeviceBuffer workspace;
  BuildRoutingPlanArgs args;
};
PlanBuild MakePlanBuild(int64_t n, int64_t experts, int64_t assignments,
                        const TokenChoiceSelections* token_choice,
                        const ExpertChoiceSelections* expert_choice) {
  absl::StatusOr<DeviceRoutingPlanStorage> storage =
      DeviceRoutingPlanStorage::Allocate(n, experts, assignments);
  Check(storage.status(), "plan storage");
  PlanBuild b{std::move(*storage), Alloc(BuildRoutingPlanWorkspaceBytes(n, experts)), {}};
  b.args.token_choice = token_choice;
  b.args.expert_choice = expert_choice;
  b.args.plan = b.storage.plan();
  b.args.workspace = b.workspace.data();
  b.args.workspace_bytes = b.workspace.bytes();
  return b;
}

struct Ceilings {
  double copy_bytes_per_s;           // bytes read + written per second, device-to-device copy
  double bf16_flop_per_s;            // cuBLAS bf16 8192^3 (median of short runs)
  double bf16_sustained_flop_per_s;  // the same GEMM, timed after 0.25 s of it (power limit)
  double fp32_simt_flop_per_s;       // SMs x 128 lanes x 2 x clock
};

void Row(const std::string& name, double us, const std::string& achieved, double ratio,
         const std::string& limit) {
  std::printf("%-52s %10.2f us  %-22s %6.1f%% of %s\n", name.c_str(), us, achieved.c_str(),
              100.0 * ratio, limit.c_str());
}
std::string Tbps(double bytes, double us) {
  char s[64];
  std::snprintf(s, sizeof(s), "%.3f TB/s", bytes / us / 1e6);
  return s;
}
std::string Tflops(double flop, double us) {
  char s[64];
  std::snprintf(s, sizeof(s), "%.1f TFLOP/s", flop / us / 1e6);
  return s;
}
// A GEMM's row against whichever ceiling binds it: copy bandwidth or the BF16 GEMM rate.
void GemmRow(const std::string& name, double us, double flop, double bytes, const Ceilings& ceil) {
  const double compute = flop / us * 1e6 / ceil.bf16_flop_per_s;
  const double memory = bytes / us * 1e6 / ceil.copy_bytes_per_s;
  if (memory > compute) {
    Row(name, us, Tbps(bytes, us), memory, "copy bandwidth");
  } else {
    Row(name, us, Tflops(flop, us), compute, "bf16 GEMM peak");
  }
}

Ceilings MeasureCeilings(Gemm& gemm) {
  Ceilings c{};
  const size_t bytes = size_t{1} << 30;
  DeviceBuffer a = RandomDevice(bytes / 4, DType::kF32, 1), b = Alloc(bytes);
  const double copy_us = TimeUs(
      [&](int) {
        Check(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice), "copy");
      },
      10);
  c.copy_bytes_per_s = 2.0 * bytes / (copy_us * 1e-6);
  const int64_t n = 8192;
  DeviceBuffer x = RandomDevice(n * n, DType::kBF16, 2), w = RandomDevice(n * n, DType::kBF16, 3),
               y = Alloc(n * n * 2);
  GemmArgs g;
  g.x_dtype = DType::kBF16;
  g.x = x.data();
  g.x_stride = n;
  g.num_rows = n;
  g.w = {DType::kBF16, w.data(), n, n};
  g.y_dtype = DType::kBF16;
  g.y = y.data();
  g.y_stride = n;
  const double gemm_us = TimeUs([&](int) { Check(gemm.Run(g), "gemm"); }, 10);
  c.bf16_flop_per_s = 2.0 * n * n * n / (gemm_us * 1e-6);
  // The short runs above end before the GPU settles at its power limit; a layer timed over many
  // graph replays runs there. So the same GEMM once more, timed after ~0.25 s of it.
  const int warm = std::max(1, static_cast<int>(250e3 / gemm_us));
  const double sustained_us = TimeUs([&](int) { Check(gemm.Run(g), "gemm"); }, warm / 2 + 1, warm);
  c.bf16_sustained_flop_per_s = 2.0 * n * n * n / (sustained_us * 1e-6);
  int sms = 0, clock_khz = 0;
  Check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "attr");
  Check(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0), "attr");
  c.fp32_simt_flop_per_s = sms * 128.0 * 2.0 * clock_khz * 1e3;
  std::printf(
      "ceilings: copy %.2f TB/s (read + write), bf16 GEMM %.0f TFLOP/s (%.0f sustained, after "
      "0.25 s of it), fp32 CUDA cores %.1f TFLOP/s (%d SMs x 128 x 2 x %.2f GHz)\n\n",
      c.copy_bytes_per_s / 1e12, c.bf16_flop_per_s / 1e12, c.bf16_sustained_flop_per_s / 1e12,
      c.fp32_simt_flop_per_s / 1e12, sms, clock_khz / 1e6);
  return c;
}

}  // namespace
}  // namespace moeserve::cuda
