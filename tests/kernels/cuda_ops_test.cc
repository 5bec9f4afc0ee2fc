// CUDA ops against their CPU references (kernels/cpu, model/routing.cc, model/sampling.cc) on
// random inputs over grids of shapes, LLaDA2.0-mini sizes and edge cases included (1 token, sizes
// that are not multiples of a block, many scopes, ties). Routing decisions must equal the CPU's
// exactly; floats are compared with the named tolerances below. Every test skips when this
// machine has no CUDA device, so CI without a GPU passes.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <numeric>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/expert_choice.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/swiglu.h"
#include "kernels/cpu/token_choice.h"
#include "kernels/cuda/argmax.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/expert_choice.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/moe_dispatch.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/qk_norm_rope.h"
#include "kernels/cuda/rms_norm.h"
#include "kernels/cuda/routing_plan.h"
#include "kernels/cuda/swiglu.h"
#include "kernels/cuda/token_choice.h"
#include "kernels/routing_plan.h"
#include "model/routing.h"
#include "model/sampling.h"
#include "tests/test_util.h"

namespace moeserve {
namespace {

using cuda::DeviceBuffer;
using testing::RandomFloats;

// Tolerances, |gpu - ref| <= atol + rtol * |ref|, with the reason for each.
// Elementwise float32 ops that differ from the CPU only in a reduction order over <= a few
// thousand terms (RMSNorm, QK-norm) or in expf's last ulps (SwiGLU).
constexpr double kF32Rtol = 1e-5;
constexpr double kF32Atol = 1e-6;
// Attention: online softmax rescales partial sums and divides once at the end; a different
// order over up to ~1000 keys.
constexpr double kAttentionRtol = 1e-4;
constexpr double kAttentionAtol = 1e-5;
// GEMMs: float32 accumulation in another order (and tensor-core adders). Rounding errors scale
// with the sum of |x_i * w_i|, not with |y|: tolerance = kGemmAbsSumRtol * sum |x_i * w_i|.
constexpr double kGemmAbsSumRtol = 3e-5;
// One rounding to BF16 (half an ulp is 2^-9 relative), on top of the float32 result.
constexpr double kBf16Rtol = 1.0 / 128;
// Router weights: exact arithmetic order, but RouterSigmoid may differ from glibc's expf by one
// ulp on ~2.5e-4 of inputs; that moves a weight by a few ulps.
constexpr double kRouterWeightRtol = 4e-6;
// Greedy probability against a float64 softmax: the GPU's tree-ordered float32 sum over up to
// 157184 terms stays within a few ulps.
constexpr double kProbRtol = 1e-5;
// Against the CPU's Propose, whose sequential float32 sum over 157184 terms drifts further
// (measured 2.5e-4 relative on rows of many equal logits; the bound is n * 2^-24 ~ 1e-2).
constexpr double kProbVsCpuRtol = 1e-3;
// The routed experts chain, norm-wise ||gpu - ref|| / ||ref||: float32 throughout, or BF16
// activations between the GEMMs (2^-9 per rounding, several roundings deep).
constexpr double kMoeF32NormRtol = 1e-5;
constexpr double kMoeBf16NormRtol = 2e-2;

bool HaveGpu() { return cuda::CudaDeviceAvailable(); }

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine"

#define ASSERT_OK(expr)                   \
  do {                                    \
    const absl::Status _status = (expr);  \
    ASSERT_TRUE(_status.ok()) << _status; \
  } while (0)

// Test-side device arrays: allocation failures fail the test.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t count) : count_(count) {
    absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(count * sizeof(T));
    EXPECT_TRUE(b.ok()) << b.status();
    if (b.ok()) buffer_ = std::move(*b);
    Poison();
  }
  explicit DeviceArray(std::span<const T> host) : DeviceArray(host.size()) {
    EXPECT_TRUE(cuda::CopyToDevice(host.data(), host.size_bytes(), buffer_.data()).ok());
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(std::span<const T>(host)) {}
  // All bits set: NaN for floats, -1 for integers, so unwritten outputs show.
  void Poison() {
    if (count_ > 0) {
      EXPECT_EQ(cudaMemset(buffer_.data(), 0xff, count_ * sizeof(T)), cudaSuccess);
    }
  }
  T* get() const { return buffer_.as<T>(); }
  size_t size() const { return count_; }
  std::vector<T> ToHost() const {
    std::vector<T> host(count_);
    EXPECT_TRUE(cuda::CopyToHost(buffer_.data(), count_ * sizeof(T), host.data()).ok());
    return host;
  }

 private:
  DeviceBuffer buffer_;
  size_t count_ = 0;
};

std::vector<uint16_t> ToBf16Bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16(v[i]);
  return out;
}
std::vector<float> RoundToBf16(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToFloat(FloatToBf16(v[i]));
  return out;
}
std::vector<float> Bf16BitsToFloat(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToFloat(v[i]);
  return out;
}
// Bits of a __nv_bfloat16 array downloaded as uint16_t.
std::vector<float> DownloadBf16(const DeviceArray<uint16_t>& d) {
  return Bf16BitsToFloat(d.ToHost());
}

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Largest errors seen per test suite, printed when the run ends (docs/CUDA.md quotes them).
struct ErrorStats {
  double max_abs = 0;   // max |gpu - ref|
  double max_rel = 0;   // max |gpu - ref| / |ref| over |ref| >= 1e-3
  double max_norm = 0;  // max ||gpu - ref|| / ||ref||
};
std::map<std::string, ErrorStats>& SuiteErrors() {
  static auto* stats = new std::map<std::string, ErrorStats>;
  return *stats;
}
ErrorStats& CurrentSuiteErrors(const std::string& label) {
  return SuiteErrors()
      [std::string(::testing::UnitTest::GetInstance()->current_test_info()->test_suite_name()) +
       " " + label];
}
class ErrorReport : public ::testing::Environment {
 public:
  void TearDown() override {
    for (const auto& [suite, e] : SuiteErrors()) {
      std::printf("max error %-36s abs %.3g  rel %.3g  norm-rel %.3g\n", suite.c_str(), e.max_abs,
                  e.max_rel, e.max_norm);
    }
  }
};
[[maybe_unused]] ::testing::Environment* const kErrorReport =
    ::testing::AddGlobalTestEnvironment(new ErrorReport);

void RecordErrors(const std::vector<float>& actual, const std::vector<float>& ref,
                  const std::string& label = "f32") {
  ErrorStats& e = CurrentSuiteErrors(label);
  for (size_t i = 0; i < std::min(actual.size(), ref.size()); ++i) {
    const double d = std::abs(double(actual[i]) - ref[i]);
    e.max_abs = std::max(e.max_abs, d);
    if (std::abs(ref[i]) >= 1e-3) e.max_rel = std::max(e.max_rel, d / std::abs(ref[i]));
  }
}

// |a - b| <= atol + rtol * |ref| with max-error reporting.
::testing::AssertionResult Close(const std::vector<float>& actual, const std::vector<float>& ref,
                                 double rtol, double atol, const std::string& label = "f32") {
  RecordErrors(actual, ref, label);
  return testing::AllClose(actual, ToDouble(ref), rtol, atol);
}

double NormRelError(const std::vector<float>& actual, const std::vector<float>& ref,
                    const std::string& label) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (double(actual[i]) - ref[i]) * (double(actual[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  const double err = std::sqrt(num / std::max(den, 1e-300));
  ErrorStats& e = CurrentSuiteErrors(label);
  e.max_norm = std::max(e.max_norm, err);
  return err;
}

// A fast generator for large random inputs: BF16-representable values in [-scale, scale).
class FastRandom {
 public:
  explicit FastRandom(uint64_t seed) : state_(seed * 0x9e3779b97f4a7c15ull + 1) {}
  float Next(float scale) {
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    const float u = static_cast<float>(static_cast<int64_t>(state_ >> 40) - (1 << 23)) /
                    static_cast<float>(1 << 23);
    return Bf16ToFloat(FloatToBf16(u * scale));
  }

 private:
  uint64_t state_;
};

std::vector<float> FastRandomFloats(int64_t n, uint64_t seed) {
  FastRandom rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = rng.Next(1.0f);
  return v;
}

void FillRandom(HostTensor* t, uint64_t seed, float scale) {
  FastRandom rng(seed);
  for (int64_t i = 0; i < t->numel(); ++i) {
    const float v = rng.Next(scale);
    if (t->dtype() == DType::kBF16) {
      t->data<uint16_t>()[i] = FloatToBf16(v);
    } else {
      t->data<float>()[i] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Embedding

struct EmbeddingCase {
  DType dtype;
  int64_t num_tokens, hidden;
};
void PrintTo(const EmbeddingCase& c, std::ostream* os) {
  *os << DTypeName(c.dtype) << " tokens=" << c.num_tokens << " hidden=" << c.hidden;
}
class EmbeddingTest : public ::testing::TestWithParam<EmbeddingCase> {};

TEST_P(EmbeddingTest, MatchesCpuExactly) {
  SKIP_WITHOUT_GPU();
  const EmbeddingCase c = GetParam();
  const int64_t vocab = 1000;
  const HostTensor table = testing::RandomMatrix(c.dtype, {vocab, c.hidden}, 11);
  std::vector<int32_t> ids(c.num_tokens);
  std::mt19937 rng(12);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % vocab);
  ids.back() = vocab - 1;
  std::vector<float> ref(c.num_tokens * c.hidden);
  cpu::Embedding(AsMatrix(table), ids.data(), c.num_tokens, ref.data());

  DeviceArray<uint8_t> d_table(
      std::span<const uint8_t>(static_cast<const uint8_t*>(table.raw()), table.bytes()));
  DeviceArray<int32_t> d_ids(ids);
  DeviceArray<float> d_out(ref.size());
  MatrixView view = AsMatrix(table);
  view.data = d_table.get();
  ASSERT_OK(cuda::Embedding(view, d_ids.get(), c.num_tokens, d_out.get(), nullptr));
  EXPECT_EQ(d_out.ToHost(), ref);
}

INSTANTIATE_TEST_SUITE_P(Grid, EmbeddingTest, ::testing::ValuesIn([] {
                           std::vector<EmbeddingCase> cases;
                           for (DType d : {DType::kF32, DType::kBF16})
                             for (int64_t n : {1, 5, 100})
                               for (int64_t h : {2048, 24, 7}) cases.push_back({d, n, h});
                           return cases;
                         }()));

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNormCase {
  int64_t rows, dim;
  DType weight_dtype;
};
void PrintTo(const RmsNormCase& c, std::ostream* os) {
  *os << "rows=" << c.rows << " dim=" << c.dim << " weight " << DTypeName(c.weight_dtype);
}
class RmsNormTest : public ::testing::TestWithParam<RmsNormCase> {};

TEST_P(RmsNormTest, MatchesCpu) {
  SKIP_WITHOUT_GPU();
  const RmsNormCase c = GetParam();
  const std::vector<float> x = RandomFloats(c.rows * c.dim, 21, -3.0f, 3.0f);
  const std::vector<float> w = RoundToBf16(RandomFloats(c.dim, 22, 0.5f, 1.5f));
  std::vector<float> ref(x.size());
  cpu::RmsNorm(x.data(), c.rows, c.dim, w.data(), 1e-6f, ref.data());

  DeviceArray<float> d_x(x), d_out(x.size());
  DeviceArray<uint16_t> d_bf16(x.size());
  DeviceArray<float> d_w32(w);
  DeviceArray<uint16_t> d_w16(ToBf16Bits(w));
  cuda::RmsNormArgs args;
  args.x = d_x.get();
  args.num_rows = c.rows;
  args.dim = c.dim;
  args.weight_dtype = c.weight_dtype;
  args.weight = c.weight_dtype == DType::kF32 ? static_cast<const void*>(d_w32.get())
                                              : static_cast<const void*>(d_w16.get());
  args.eps = 1e-6f;
  args.out_f32 = d_out.get();
  args.out_bf16 = reinterpret_cast<__nv_bfloat16*>(d_bf16.get());
  ASSERT_OK(cuda::RmsNorm(args, nullptr));
  EXPECT_TRUE(Close(d_out.ToHost(), ref, kF32Rtol, kF32Atol));
  EXPECT_TRUE(Close(DownloadBf16(d_bf16), ref, kBf16Rtol, kF32Atol, "bf16-out"));

  // In place.
  args.out_f32 = d_x.get();
  args.out_bf16 = nullptr;
  ASSERT_OK(cuda::RmsNorm(args, nullptr));
  EXPECT_TRUE(Close(d_x.ToHost(), ref, kF32Rtol, kF32Atol));
}

INSTANTIATE_TEST_SUITE_P(Grid, RmsNormTest, ::testing::ValuesIn([] {
                           std::vector<RmsNormCase> cases;
                           for (int64_t rows : {1, 3, 257})
                             for (int64_t dim : {128, 2048, 100, 1, 4096, 4100})
                               for (DType d : {DType::kF32, DType::kBF16})
                                 cases.push_back({rows, dim, d});
                           return cases;
                         }()));

// ---------------------------------------------------------------------------------------------
// QK-norm + RoPE

struct RopeCase {
  int64_t tokens, heads, head_dim, rotary_dim;
  bool norm;
  int32_t max_position;
};
void PrintTo(const RopeCase& c, std::ostream* os) {
  *os << "tokens=" << c.tokens << " heads=" << c.heads << " head_dim=" << c.head_dim
      << " rotary=" << c.rotary_dim << (c.norm ? " norm" : " rope-only")
      << " max_pos=" << c.max_position;
}
class QkNormRopeTest : public ::testing::TestWithParam<RopeCase> {};

TEST_P(QkNormRopeTest, MatchesCpuNormThenRope) {
  SKIP_WITHOUT_GPU();
  const RopeCase c = GetParam();
  const float theta = 600000.0f, eps = 1e-6f;
  const std::vector<float> x = RandomFloats(c.tokens * c.heads * c.head_dim, 31, -2.0f, 2.0f);
  const std::vector<float> w = RandomFloats(c.head_dim, 32, 0.5f, 1.5f);
  std::vector<int32_t> positions(c.tokens);
  std::mt19937 rng(33);
  for (int32_t& p : positions) p = static_cast<int32_t>(rng() % c.max_position);
  positions[0] = c.max_position - 1;

  std::vector<float> ref = x;
  if (c.norm) {
    cpu::RmsNorm(ref.data(), c.tokens * c.heads, c.head_dim, w.data(), eps, ref.data());
  }
  cpu::ApplyRope(
      {ref.data(), positions.data(), c.tokens, c.heads, c.head_dim, c.rotary_dim, theta});

  DeviceArray<float> d_x(x), d_w(w);
  DeviceArray<int32_t> d_pos(positions);
  cuda::QkNormRopeArgs args;
  args.x = d_x.get();
  args.positions = d_pos.get();
  args.num_tokens = c.tokens;
  args.num_heads = c.heads;
  args.head_dim = c.head_dim;
  args.rotary_dim = c.rotary_dim;
  args.theta = theta;
  args.norm_weight = c.norm ? d_w.get() : nullptr;
  args.eps = eps;
  ASSERT_OK(cuda::QkNormRope(args, nullptr));
  const std::vector<float> got = d_x.ToHost();
  if (c.norm) {
    EXPECT_TRUE(Close(got, ref, kF32Rtol, kF32Atol));
  } else {
    // The rotation alone mirrors the CPU's float32 operations: bit-identical.
    RecordErrors(got, ref, "rope-only");
    EXPECT_EQ(got, ref);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, QkNormRopeTest,
    ::testing::Values(RopeCase{1, 16, 128, 64, true, 8192}, RopeCase{37, 16, 128, 64, true, 8192},
                      RopeCase{37, 4, 128, 64, false, 8192}, RopeCase{64, 4, 128, 64, true, 32768},
                      RopeCase{9, 3, 64, 64, true, 100}, RopeCase{9, 3, 64, 16, false, 100},
                      RopeCase{5, 2, 96, 0, true, 10}, RopeCase{5, 20, 128, 128, false, 4096},
                      // A token's last block of 4 heads holds 2.
                      RopeCase{7, 6, 64, 32, true, 500}));

// ---------------------------------------------------------------------------------------------
// SwiGLU

struct SwiGluCase {
  int64_t rows, width;
  DType in_dtype;
};
void PrintTo(const SwiGluCase& c, std::ostream* os) {
  *os << "rows=" << c.rows << " width=" << c.width << " in " << DTypeName(c.in_dtype);
}
class SwiGluTest : public ::testing::TestWithParam<SwiGluCase> {};

TEST_P(SwiGluTest, MatchesCpu) {
  SKIP_WITHOUT_GPU();
  const SwiGluCase c = GetParam();
  const std::vector<float> gate_up = RoundToBf16(RandomFloats(c.rows * 2 * c.width, 41, -6, 6));
  std::vector<float> ref(c.rows * c.width);
  cpu::SwiGlu(gate_up.data(), c.rows, c.width, ref.data());
  DeviceArray<float> d_in32(gate_up), d_out(ref.size());
  DeviceArray<uint16_t> d_in16(ToBf16Bits(gate_up)), d_out16(ref.size());
  cuda::SwiGluArgs args;
  args.in_dtype = c.in_dtype;
  args.gate_up = c.in_dtype == DType::kF32 ? static_cast<const void*>(d_in32.get())
                                           : static_cast<const void*>(d_in16.get());
  args.num_rows = c.rows;
  args.width = c.width;
  args.out_f32 = d_out.get();
  args.out_bf16 = reinterpret_cast<__nv_bfloat16*>(d_out16.get());
  ASSERT_OK(cuda::SwiGlu(args, nullptr));
  EXPECT_TRUE(Close(d_out.ToHost(), ref, kF32Rtol, kF32Atol));
  EXPECT_TRUE(Close(DownloadBf16(d_out16), ref, kBf16Rtol, kF32Atol, "bf16-out"));
}

INSTANTIATE_TEST_SUITE_P(Grid, SwiGluTest, ::testing::ValuesIn([] {
                           std::vector<SwiGluCase> cases;
                           for (int64_t rows : {1, 33, 512})
                             for (int64_t width : {512, 5120, 7})
                               for (DType d : {DType::kF32, DType::kBF16})
                                 cases.push_back({rows, width, d});
                           return cases;
                         }()));

// ---------------------------------------------------------------------------------------------
// Greedy argmax + probability

struct ArgmaxCase {
  int64_t rows, vocab;
  int32_t excluded;
  bool ties;
  // Elements between rows; 0: vocab. Past vocab a row holds 100.0, which must be ignored. Rows
  // of a stride that is not a multiple of 4 are not 16-byte aligned (the kernel's scalar path).
  int64_t stride = 0;
};
void PrintTo(const ArgmaxCase& c, std::ostream* os) {
  *os << "rows=" << c.rows << " vocab=" << c.vocab << " excluded=" << c.excluded
      << (c.ties ? " ties" : "") << " stride=" << c.stride;
}
class ArgmaxTest : public ::testing::TestWithParam<ArgmaxCase> {};

TEST_P(ArgmaxTest, MatchesPropose) {
  SKIP_WITHOUT_GPU();
  const ArgmaxCase c = GetParam();
  const int64_t stride = c.stride > 0 ? c.stride : c.vocab;
  std::vector<float> logits = RandomFloats(c.rows * stride, 51, -10.0f, 10.0f);
  for (int64_t r = 0; r < c.rows; ++r) {
    float* row = logits.data() + r * stride;
    for (int64_t i = c.vocab; i < stride; ++i) row[i] = 100.0f;
    if (c.ties) {
      for (int64_t i = 0; i < c.vocab; ++i) row[i] = std::round(row[i]);
      row[c.vocab - 1] = row[c.vocab / 2] = 12.0f;  // two maxima: the lower id wins
    }
    // The excluded token is the row maximum in every other row.
    if (c.excluded >= 0 && r % 2 == 0) row[c.excluded] = 20.0f;
  }
  DeviceArray<float> d_logits(logits), d_prob(c.rows);
  DeviceArray<int32_t> d_token(c.rows);
  ASSERT_OK(cuda::ArgmaxWithProb(
      {d_logits.get(), c.rows, c.vocab, c.excluded, d_token.get(), d_prob.get(), c.stride},
      nullptr));
  const std::vector<int32_t> token = d_token.ToHost();
  const std::vector<float> prob = d_prob.ToHost();
  for (int64_t r = 0; r < c.rows; ++r) {
    const std::span<const float> row(logits.data() + r * stride, c.vocab);
    const Proposal want = Propose(row, SamplingOptions{}, c.excluded, nullptr);
    EXPECT_EQ(token[r], want.token) << "row " << r;
    EXPECT_NEAR(prob[r], want.p, kProbVsCpuRtol * want.p) << "row " << r;
    double max = -INFINITY, sum = 0;
    for (float l : row) max = std::max<double>(max, l);
    for (float l : row) sum += std::exp(l - max);
    EXPECT_NEAR(prob[r], std::exp(row[want.token] - max) / sum, kProbRtol * want.p);
    RecordErrors({prob[r]}, {static_cast<float>(std::exp(row[want.token] - max) / sum)},
                 "prob-vs-f64");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, ArgmaxTest,
    ::testing::Values(ArgmaxCase{1, 157184, 156895, false}, ArgmaxCase{7, 157184, 156895, true},
                      ArgmaxCase{3, 1000, -1, false}, ArgmaxCase{4, 1000, 0, true},
                      ArgmaxCase{2, 2, 1, false}, ArgmaxCase{2, 1, -1, false},
                      // 16 logits a thread: a partial last round, a tail
                      ArgmaxCase{32, 157184, 156895, false}, ArgmaxCase{3, 8195, 8194, true},
                      ArgmaxCase{3, 8195, 8194, false, 8200}, ArgmaxCase{3, 1000, 5, true, 1001}));

// ---------------------------------------------------------------------------------------------
// GEMM

struct GemmCase {
  int64_t rows, n, k;
  DType in_dtype, out_dtype;
  float beta;
};
void PrintTo(const GemmCase& c, std::ostream* os) {
  *os << "rows=" << c.rows << " n=" << c.n << " k=" << c.k << " " << DTypeName(c.in_dtype) << "->"
      << DTypeName(c.out_dtype) << " beta=" << c.beta;
}
class GemmTest : public ::testing::TestWithParam<GemmCase> {};

TEST_P(GemmTest, MatchesFloat64Reference) {
  SKIP_WITHOUT_GPU();
  const GemmCase c = GetParam();
  const int64_t x_stride = c.k + (c.rows % 2), y_stride = c.n + (c.rows % 3);  // some padding
  const std::vector<float> x = RoundToBf16(RandomFloats(c.rows * x_stride, 61));
  const std::vector<float> w = FastRandomFloats(c.n * c.k, 62);
  const std::vector<float> y0 = RoundToBf16(RandomFloats(c.rows * y_stride, 63));
  std::vector<float> ref(c.rows * c.n), abs_sum(c.rows * c.n);
  for (int64_t i = 0; i < c.rows; ++i) {
    for (int64_t j = 0; j < c.n; ++j) {
      double acc = 0, mag = 0;
      for (int64_t p = 0; p < c.k; ++p) {
        const double t = double(x[i * x_stride + p]) * w[j * c.k + p];
        acc += t;
        mag += std::abs(t);
      }
      ref[i * c.n + j] = static_cast<float>(acc + c.beta * y0[i * y_stride + j]);
      abs_sum[i * c.n + j] = static_cast<float>(mag + std::abs(c.beta * y0[i * y_stride + j]));
    }
  }
  const bool bf16_in = c.in_dtype == DType::kBF16;
  DeviceArray<float> d_x32(x), d_w32(w), d_y32(y0);
  DeviceArray<uint16_t> d_x16(ToBf16Bits(x)), d_w16(ToBf16Bits(w)), d_y16(ToBf16Bits(y0));
  absl::StatusOr<std::unique_ptr<cuda::Gemm>> gemm = cuda::Gemm::Create(nullptr);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  cuda::GemmArgs args;
  args.x_dtype = c.in_dtype;
  args.x = bf16_in ? static_cast<const void*>(d_x16.get()) : d_x32.get();
  args.x_stride = x_stride;
  args.num_rows = c.rows;
  args.w = {c.in_dtype, bf16_in ? static_cast<const void*>(d_w16.get()) : d_w32.get(), c.n, c.k};
  args.y_dtype = c.out_dtype;
  args.y = c.out_dtype == DType::kBF16 ? static_cast<void*>(d_y16.get()) : d_y32.get();
  args.y_stride = y_stride;
  args.beta = c.beta;
  ASSERT_OK((*gemm)->Run(args));
  std::vector<float> got_strided =
      c.out_dtype == DType::kBF16 ? DownloadBf16(d_y16) : d_y32.ToHost();
  std::vector<float> got(c.rows * c.n);
  for (int64_t i = 0; i < c.rows; ++i) {
    std::copy_n(got_strided.begin() + i * y_stride, c.n, got.begin() + i * c.n);
    // Padding columns keep their value.
    for (int64_t j = c.n; j < y_stride; ++j) {
      const float before = c.out_dtype == DType::kBF16
                               ? Bf16ToFloat(FloatToBf16(y0[i * y_stride + j]))
                               : y0[i * y_stride + j];
      ASSERT_EQ(got_strided[i * y_stride + j], before) << "padding overwritten";
    }
  }
  RecordErrors(got, ref, c.out_dtype == DType::kBF16 ? "bf16-out" : DTypeName(c.in_dtype));
  const double out_rtol = c.out_dtype == DType::kBF16 ? kBf16Rtol : 0.0;
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double tol = kGemmAbsSumRtol * abs_sum[i] + out_rtol * std::abs(ref[i]) + 1e-30;
    if (!(std::abs(got[i] - double(ref[i])) <= tol) && bad++ < 5) {
      ADD_FAILURE() << "[" << i << "] expected " << ref[i] << " got " << got[i] << " tol " << tol;
    }
  }
  EXPECT_EQ(bad, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Grid, GemmTest, ::testing::ValuesIn([] {
      std::vector<GemmCase> cases;
      // LLaDA2.0-mini projections: q/o (2048 x 2048), k/v (512 x 2048), router (256 x 2048, F32),
      // an expert's gate/up (1024 x 2048); odd sizes.
      for (int64_t rows : {1, 64}) {
        for (auto [n, k] :
             {std::pair<int64_t, int64_t>{2048, 2048}, {512, 2048}, {1024, 2048}, {7, 130}}) {
          cases.push_back({rows, n, k, DType::kBF16, DType::kF32, 0.0f});
          cases.push_back({rows, n, k, DType::kBF16, DType::kBF16, 0.0f});
        }
        cases.push_back({rows, 256, 2048, DType::kF32, DType::kF32, 0.0f});
        cases.push_back({rows, 2048, 2048, DType::kBF16, DType::kF32, 1.0f});  // residual add
      }
      // More rows than one tile, not a multiple of any.
      cases.push_back({333, 512, 2048, DType::kBF16, DType::kF32, 0.0f});
      cases.push_back({333, 256, 2048, DType::kF32, DType::kF32, 0.0f});
      cases.push_back({333, 7, 130, DType::kBF16, DType::kBF16, 0.0f});
      return cases;
    }()));

TEST(GemmTest, RejectsUnsupportedTypes) {
  SKIP_WITHOUT_GPU();
  absl::StatusOr<std::unique_ptr<cuda::Gemm>> gemm = cuda::Gemm::Create(nullptr);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  cuda::GemmArgs args;
  args.x_dtype = DType::kF32;
  args.w = {DType::kBF16, nullptr, 4, 4};
  args.num_rows = 1;
  args.x_stride = args.y_stride = 4;
  EXPECT_EQ((*gemm)->Run(args).code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Token-choice routing

struct TokenChoiceCase {
  int64_t tokens;
  cpu::TokenChoiceParams params;
  bool bias, ties, row_list;
  bool negative_bias = false;  // bias in [-1.5, -0.5]: kept experts score below masked ones (0)
};
void PrintTo(const TokenChoiceCase& c, std::ostream* os) {
  const cpu::TokenChoiceParams& p = c.params;
  *os << "tokens=" << c.tokens << " experts=" << p.num_experts << " topk=" << p.topk
      << " groups=" << p.n_group << "/" << p.topk_group << (p.norm_topk_prob ? " norm" : "")
      << (c.bias ? " bias" : "") << (c.ties ? " ties" : "") << (c.row_list ? " rows" : "")
      << (c.negative_bias ? " negative" : "");
}
class TokenChoiceTest : public ::testing::TestWithParam<TokenChoiceCase> {};

// Router logits: random, or on a coarse grid so that many scores tie exactly.
std::vector<float> RouterLogits(int64_t n, uint32_t seed, bool ties, float lo = -4.0f,
                                float hi = 4.0f) {
  std::vector<float> v = RandomFloats(n, seed, lo, hi);
  if (ties) {
    for (float& x : v) x = std::round(x * 2.0f) / 2.0f;
  }
  return v;
}

TEST_P(TokenChoiceTest, DecisionsEqualCpu) {
  SKIP_WITHOUT_GPU();
  const TokenChoiceCase c = GetParam();
  const cpu::TokenChoiceParams& p = c.params;
  const int64_t total_rows = c.row_list ? 2 * c.tokens + 1 : c.tokens;
  const std::vector<float> logits = RouterLogits(total_rows * p.num_experts, 71, c.ties);
  std::vector<float> bias = c.negative_bias ? RandomFloats(p.num_experts, 72, -1.5f, -0.5f)
                                            : RandomFloats(p.num_experts, 72, -0.3f, 0.1f);
  if (c.ties) {
    for (float& b : bias) b = std::round(b * 10.0f) / 10.0f;
  }
  std::vector<int32_t> rows(c.tokens);
  for (int64_t i = 0; i < c.tokens; ++i) rows[i] = static_cast<int32_t>(c.row_list ? 2 * i + 1 : i);
  // CPU on each routed row.
  std::vector<int32_t> ref_idx(c.tokens * p.topk);
  std::vector<float> ref_weight(c.tokens * p.topk);
  for (int64_t i = 0; i < c.tokens; ++i) {
    cpu::TokenChoiceRoute(
        p, {logits.data() + rows[i] * p.num_experts, c.bias ? bias.data() : nullptr, 1,
            ref_idx.data() + i * p.topk, ref_weight.data() + i * p.topk});
  }
  DeviceArray<float> d_logits(logits), d_bias(bias), d_weight(ref_weight.size());
  DeviceArray<int32_t> d_rows(rows), d_idx(ref_idx.size());
  const cuda::TokenChoiceArgs args{d_logits.get(),
                                   c.bias ? d_bias.get() : nullptr,
                                   c.row_list ? d_rows.get() : nullptr,
                                   c.tokens,
                                   d_idx.get(),
                                   d_weight.get()};
  // Both kernels, where the group-per-lane one fits (it must for the LLaDA2 shape).
  std::vector<cuda::TokenChoiceKernel> kernels{cuda::TokenChoiceKernel::kWarpPerToken};
  if (cuda::GroupPerLaneFits(p, args)) kernels.push_back(cuda::TokenChoiceKernel::kGroupPerLane);
  if (p.num_experts == 256 && p.topk <= 8 && (p.n_group == 8 || p.n_group == 1)) {
    EXPECT_EQ(kernels.size(), 2u);
  }
  for (const cuda::TokenChoiceKernel kernel : kernels) {
    SCOPED_TRACE(kernel == cuda::TokenChoiceKernel::kGroupPerLane ? "group per lane"
                                                                  : "warp per token");
    ASSERT_OK(cuda::TokenChoiceRoute(p, args, kernel, nullptr));
    EXPECT_EQ(d_idx.ToHost(), ref_idx);
    EXPECT_TRUE(Close(d_weight.ToHost(), ref_weight, kRouterWeightRtol, 0.0, "weights"));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, TokenChoiceTest, ::testing::ValuesIn([] {
      const cpu::TokenChoiceParams mini{256, 8, 8, 4, true, 2.5f};
      std::vector<TokenChoiceCase> cases;
      for (int64_t tokens : {1, 37, 1024}) {
        for (bool ties : {false, true}) {
          cases.push_back({tokens, mini, true, ties, false});
          cases.push_back({tokens, {64, 6, 1, 1, true, 1.0f}, false, ties, tokens > 1});
          // topk larger than the kept groups hold: masked (0.0) experts are chosen too.
          cases.push_back({tokens, {8, 8, 2, 1, true, 1.0f}, true, ties, false});
          cases.push_back({tokens, {1024, 8, 32, 4, true, 2.5f}, true, ties, false});
          cases.push_back({tokens, {100, 3, 4, 2, false, 1.5f}, true, ties, true});
          cases.push_back({tokens, {256, 1, 8, 4, true, 2.5f}, true, ties, false});
          // The group-per-lane kernel: 16 experts a lane, no groups, a row list, negative bias.
          cases.push_back({tokens, {128, 8, 8, 4, true, 2.5f}, true, ties, false});
          cases.push_back({tokens, {256, 6, 1, 1, false, 1.0f}, false, ties, tokens > 1});
          cases.push_back({tokens, mini, true, ties, tokens > 1, true});
        }
      }
      return cases;
    }()));

// ---------------------------------------------------------------------------------------------
// Expert-choice selection

struct EcScope {
  std::vector<int32_t> rows;  // ascending
  int64_t capacity;
};

// Device copies of a scope table.
struct DeviceScopes {
  DeviceArray<int32_t> row_offsets, rows, capacity, selected_offsets;
  cuda::ExpertChoiceScopes view;
};

void UploadScopes(const std::vector<EcScope>& scopes, bool identity_rows, DeviceScopes* out) {
  std::vector<int32_t> offsets{0}, rows, capacity, selected{0};
  int64_t max_rows = 0;
  for (const EcScope& s : scopes) {
    rows.insert(rows.end(), s.rows.begin(), s.rows.end());
    offsets.push_back(static_cast<int32_t>(rows.size()));
    capacity.push_back(static_cast<int32_t>(s.capacity));
    selected.push_back(selected.back() + static_cast<int32_t>(s.capacity));
    max_rows = std::max<int64_t>(max_rows, s.rows.size());
  }
  out->row_offsets = DeviceArray<int32_t>(offsets);
  out->rows = DeviceArray<int32_t>(rows);
  out->capacity = DeviceArray<int32_t>(capacity);
  out->selected_offsets = DeviceArray<int32_t>(selected);
  out->view = {static_cast<int64_t>(scopes.size()),
               out->row_offsets.get(),
               identity_rows ? nullptr : out->rows.get(),
               out->capacity.get(),
               out->selected_offsets.get(),
               max_rows,
               selected.back()};
}

std::vector<float> CpuSigmoid(const std::vector<float>& logits) {
  std::vector<float> s(logits.size());
  for (size_t i = 0; i < s.size(); ++i) s[i] = 1.0f / (1.0f + std::exp(-logits[i]));
  return s;
}

struct EcCase {
  std::string name;
  int64_t tokens, experts;
  std::vector<int64_t> scope_sizes;  // consecutive row ranges, or interleaved when `interleave`
  bool interleave, ties;
  int capacity_rule;                        // 0: factor 1.25 with topk 8; 1: all rows; 2: one row
  float logit_lo = -4.0f, logit_hi = 4.0f;  // [5, 30]: scores saturate at 1.0, wide ties
};
void PrintTo(const EcCase& c, std::ostream* os) { *os << c.name; }
class ExpertChoiceTest : public ::testing::TestWithParam<EcCase> {};

std::vector<EcScope> MakeScopes(const EcCase& c) {
  std::vector<EcScope> scopes(c.scope_sizes.size());
  if (c.interleave) {  // row r goes to scope r % S while that scope still wants rows
    std::vector<int64_t> left = c.scope_sizes;
    int64_t row = 0;
    for (bool any = true; any;) {
      any = false;
      for (size_t s = 0; s < scopes.size(); ++s) {
        if (left[s] > 0) {
          scopes[s].rows.push_back(static_cast<int32_t>(row++));
          --left[s];
          any = true;
        }
      }
    }
  } else {
    int64_t row = 0;
    for (size_t s = 0; s < scopes.size(); ++s) {
      for (int64_t i = 0; i < c.scope_sizes[s]; ++i) scopes[s].rows.push_back(row++);
    }
  }
  for (EcScope& s : scopes) {
    const int64_t t = static_cast<int64_t>(s.rows.size());
    s.capacity = c.capacity_rule == 0   ? ExpertChoiceCapacity(1.25, t, 8, c.experts)
                 : c.capacity_rule == 1 ? t
                                        : 1;
  }
  return scopes;
}

TEST_P(ExpertChoiceTest, EveryPathEqualsCpu) {
  SKIP_WITHOUT_GPU();
  const EcCase c = GetParam();
  const std::vector<EcScope> scopes = MakeScopes(c);
  const std::vector<float> logits =
      RouterLogits(c.tokens * c.experts, 81, c.ties, c.logit_lo, c.logit_hi);
  const std::vector<float> scores = CpuSigmoid(logits);
  // CPU: per scope, per expert, the selected rows sorted ascending (the GPU's order).
  int64_t total_capacity = 0;
  for (const EcScope& s : scopes) total_capacity += s.capacity;
  std::vector<int32_t> ref(c.experts * total_capacity);
  std::vector<float> ref_scores(ref.size());
  int64_t offset = 0;
  for (const EcScope& s : scopes) {
    std::vector<int32_t> selected(c.experts * s.capacity);
    cpu::ExpertChoiceSelect({scores.data(), c.experts, s.rows.data(),
                             static_cast<int64_t>(s.rows.size()), s.capacity, selected.data()});
    for (int64_t e = 0; e < c.experts; ++e) {
      std::sort(selected.begin() + e * s.capacity, selected.begin() + (e + 1) * s.capacity);
      for (int64_t i = 0; i < s.capacity; ++i) {
        const int32_t row = selected[e * s.capacity + i];
        ref[e * total_capacity + offset + i] = row;
        ref_scores[e * total_capacity + offset + i] = scores[row * c.experts + e];
      }
    }
    offset += s.capacity;
  }

  bool contiguous = !c.interleave;
  DeviceScopes d_scopes;
  UploadScopes(scopes, contiguous, &d_scopes);
  std::vector<float> logits_t(logits.size());
  for (int64_t t = 0; t < c.tokens; ++t)
    for (int64_t e = 0; e < c.experts; ++e) logits_t[e * c.tokens + t] = logits[t * c.experts + e];
  DeviceArray<float> d_logits(logits), d_logits_t(logits_t);
  DeviceArray<float> d_workspace(c.tokens * c.experts), d_scores(ref.size());
  DeviceArray<int32_t> d_selected(ref.size());
  std::vector<cuda::ExpertChoicePath> paths{cuda::ExpertChoicePath::kBlockRadixGlobal};
  if (d_scopes.view.max_scope_rows <= cuda::kSharedRadixMaxRows)
    paths.push_back(cuda::ExpertChoicePath::kBlockRadixShared);
  if (d_scopes.view.max_scope_rows <= cuda::kWarpRankMaxRows)
    paths.push_back(cuda::ExpertChoicePath::kWarpRank);
  for (cuda::ExpertChoicePath path : paths) {
    for (cuda::LogitsLayout layout :
         {cuda::LogitsLayout::kTokenMajor, cuda::LogitsLayout::kExpertMajor}) {
      SCOPED_TRACE(::testing::Message()
                   << "path " << static_cast<int>(path) << " layout " << static_cast<int>(layout));
      d_selected.Poison();
      d_scores.Poison();
      cuda::ExpertChoiceSelectArgs args;
      args.logits = layout == cuda::LogitsLayout::kTokenMajor ? d_logits.get() : d_logits_t.get();
      args.layout = layout;
      args.num_tokens = c.tokens;
      args.num_experts = c.experts;
      args.scopes = d_scopes.view;
      args.selected = d_selected.get();
      args.selected_scores = d_scores.get();
      args.workspace = d_workspace.get();
      args.workspace_bytes = d_workspace.size() * sizeof(float);
      ASSERT_OK(cuda::ExpertChoiceSelect(args, path, nullptr));
      const std::vector<int32_t> got = d_selected.ToHost();
      int mismatches = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        if (got[i] != ref[i] && mismatches++ < 5) {
          ADD_FAILURE() << "expert " << i / total_capacity << " slot " << i % total_capacity
                        << ": want row " << ref[i] << " got " << got[i];
        }
      }
      EXPECT_EQ(mismatches, 0);
      EXPECT_TRUE(Close(d_scores.ToHost(), ref_scores, kRouterWeightRtol, 0.0, "scores"));
    }
  }
  // The default path too.
  EXPECT_EQ(cuda::ChooseExpertChoicePath(d_scopes.view.max_scope_rows), paths.back());
}

INSTANTIATE_TEST_SUITE_P(
    Grid, ExpertChoiceTest, ::testing::ValuesIn([] {
      std::vector<EcCase> cases;
      for (int64_t n : {1, 32, 100, 256, 257, 4096}) {
        cases.push_back({"one_scope_" + std::to_string(n), n, 256, {n}, false, false, 0});
      }
      cases.push_back({"one_scope_16384", 16384, 256, {16384}, false, false, 0});
      cases.push_back({"ties_4096", 4096, 256, {4096}, false, true, 0});
      cases.push_back({"ties_200", 200, 64, {200}, false, true, 0});
      cases.push_back({"capacity_all_300", 300, 16, {300}, false, false, 1});
      cases.push_back({"capacity_one_1000", 1000, 16, {1000}, false, true, 2});
      cases.push_back({"decode_512_scopes_of_32", 512 * 32, 256, std::vector<int64_t>(512, 32),
                       false, false, 0});
      cases.push_back({"mixed_scopes_interleaved", 1305, 64, {5, 300, 1000}, true, false, 0});
      cases.push_back({"many_small_interleaved_ties", 33 * 40, 100, std::vector<int64_t>(40, 33),
                       true, true, 0});
      cases.push_back({"big_scope_40000", 40000, 8, {40000}, false, false, 0});
      cases.push_back({"capacity_all_200", 200, 16, {200}, false, false, 1});
      cases.push_back({"capacity_all_ties_64", 64, 16, {64}, false, true, 1});
      cases.push_back({"saturated_3000", 3000, 16, {3000}, false, false, 0, 5.0f, 30.0f});
      cases.push_back({"saturated_100", 100, 16, {100}, false, false, 0, 5.0f, 30.0f});
      cases.push_back(
          {"negative_capacity_one_3000", 3000, 16, {3000}, false, false, 2, -30.0f, -5.0f});
      // The large-block bitmaps (> 4096 rows): ties inside the boundary bin, runs that leave it
      // (saturated scores), every row, one row.
      cases.push_back({"ties_8192", 8192, 64, {8192}, false, true, 0});
      cases.push_back({"saturated_8000", 8000, 16, {8000}, false, false, 0, 5.0f, 30.0f});
      cases.push_back({"capacity_all_5000", 5000, 8, {5000}, false, false, 1});
      cases.push_back({"capacity_one_ties_6000", 6000, 8, {6000}, false, true, 2});
      // Every logit in [1, 1.01): all keys share the first digit, so the first gathering
      // overflows and the next digit's pass gathers and marks again.
      cases.push_back({"narrow_range_16384", 16384, 8, {16384}, false, false, 0, 1.0f, 1.01f});
      return cases;
    }()));

// ---------------------------------------------------------------------------------------------
// The device routing plan vs model/routing.cc's RouteMoeLayer on mixed batches

ModelConfig MiniRoutingConfig(int64_t num_experts = 256) {
  ModelConfig c;
  c.num_experts = num_experts;
  c.num_experts_per_tok = 8;
  c.n_group = 8;
  c.topk_group = 4;
  c.routed_scaling_factor = 2.5;
  c.norm_topk_prob = true;
  return c;
}

// Builds the device plan the way a GPU forward will: token-choice over the token-choice rows,
// expert-choice over the scopes RouteMoeLayer forms (request: blocks; batch: one scope per
// (capacity factor, weighting)), then BuildRoutingPlan.
struct GpuRouting {
  cuda::DeviceRoutingPlanStorage storage;
  RoutingPlan plan;
  // The CSR part as BuildRoutingPlanCsr left it, before the row pass (split builds only).
  RoutingPlan csr;
  // Expert-choice rows alone, scopes in row order (cuda::ScopesInRowOrder): then the selection and
  // the uniform offsets of cuda::SelectionPlan.
  bool selection_is_plan = false;
  std::vector<int32_t> selected, uniform_offsets;
};

// implicit_rows: when every row is token-choice, no row list (rows [0, num_tokens)); otherwise
// the list.
void RouteOnGpu(const ModelConfig& config, const std::vector<float>& logits,
                const std::vector<float>& bias, int64_t num_tokens,
                const std::vector<SequenceRouting>& sequences, GpuRouting* out, bool split,
                bool implicit_rows) {
  const int64_t experts = config.num_experts, topk = config.num_experts_per_tok;
  const ForwardScopes formed = FormRoutingScopes(config, num_tokens, sequences);
  const std::vector<int32_t>& tc_rows = formed.token_choice_rows;
  std::vector<EcScope> scopes;
  std::vector<uint8_t> renormalize;
  for (const ExpertChoiceScope& scope : formed.expert_choice) {
    scopes.push_back({scope.rows, scope.capacity});
    renormalize.push_back(scope.weighting == ExpertChoiceWeighting::kRenormalized);
  }

  DeviceArray<float> d_logits(logits), d_bias(bias);
  DeviceArray<int32_t> d_tc_rows(tc_rows);
  const int64_t num_tc = static_cast<int64_t>(tc_rows.size());
  const int32_t* rows = implicit_rows && num_tc == num_tokens ? nullptr : d_tc_rows.get();
  DeviceArray<int32_t> d_topk_idx(std::max<int64_t>(1, num_tc * topk));
  DeviceArray<float> d_topk_weight(std::max<int64_t>(1, num_tc * topk));
  const cpu::TokenChoiceParams tp{experts,
                                  topk,
                                  config.n_group,
                                  config.topk_group,
                                  config.norm_topk_prob,
                                  static_cast<float>(config.routed_scaling_factor)};
  ASSERT_OK(cuda::TokenChoiceRoute(
      tp, {d_logits.get(), d_bias.get(), rows, num_tc, d_topk_idx.get(), d_topk_weight.get()},
      nullptr));
  cuda::TokenChoiceSelections tc{rows, num_tc, topk, d_topk_idx.get(), d_topk_weight.get()};

  DeviceScopes d_scopes;
  UploadScopes(scopes, /*identity_rows=*/false, &d_scopes);
  DeviceArray<uint8_t> d_renormalize(renormalize);
  DeviceArray<int32_t> d_selected(std::max<int64_t>(1, experts * d_scopes.view.total_capacity));
  DeviceArray<float> d_workspace(num_tokens * experts);
  cuda::ExpertChoiceSelectArgs ec_args;
  ec_args.logits = d_logits.get();
  ec_args.num_tokens = num_tokens;
  ec_args.num_experts = experts;
  ec_args.scopes = d_scopes.view;
  ec_args.selected = d_selected.get();
  ec_args.workspace = d_workspace.get();
  ec_args.workspace_bytes = d_workspace.size() * sizeof(float);
  ASSERT_OK(cuda::ExpertChoiceSelect(ec_args, nullptr));
  cuda::ExpertChoiceSelections ec{d_scopes.view, d_selected.get(), d_renormalize.get(),
                                  d_logits.get(), static_cast<float>(config.routed_scaling_factor)};
  std::vector<int32_t> scope_rows;
  for (const ExpertChoiceScope& scope : formed.expert_choice)
    scope_rows.insert(scope_rows.end(), scope.rows.begin(), scope.rows.end());
  out->selection_is_plan = num_tc == 0 && !scopes.empty() && cuda::ScopesInRowOrder(scope_rows);
  if (out->selection_is_plan) {
    const cuda::DeviceRoutingPlan csr = cuda::SelectionPlan(ec, num_tokens, experts, nullptr);
    absl::StatusOr<std::vector<int32_t>> selected =
        cuda::Download(csr.token_idx, csr.num_assignments);
    ASSERT_TRUE(selected.ok()) << selected.status();
    out->selected = std::move(*selected);
    out->uniform_offsets = cuda::UniformExpertOffsets(experts, d_scopes.view.total_capacity);
  }

  const int64_t assignments = cuda::PlanAssignments(&tc, &ec, experts);
  absl::StatusOr<cuda::DeviceRoutingPlanStorage> storage =
      cuda::DeviceRoutingPlanStorage::Allocate(num_tokens, experts, assignments);
  ASSERT_TRUE(storage.ok()) << storage.status();
  DeviceArray<uint8_t> d_plan_ws(cuda::BuildRoutingPlanWorkspaceBytes(num_tokens, experts));
  cuda::BuildRoutingPlanArgs build;
  build.token_choice = &tc;
  build.expert_choice = &ec;
  build.plan = storage->plan();
  build.workspace = d_plan_ws.get();
  build.workspace_bytes = d_plan_ws.size();
  if (split) {
    ASSERT_OK(cuda::BuildRoutingPlanCsr(build, nullptr));
    absl::StatusOr<RoutingPlan> csr = cuda::DownloadRoutingPlan(storage->plan());
    ASSERT_TRUE(csr.ok()) << csr.status();
    out->csr = std::move(*csr);
    ASSERT_OK(cuda::FinishRoutingPlan(build, nullptr));
  } else {
    ASSERT_OK(cuda::BuildRoutingPlan(build, nullptr));
  }
  absl::StatusOr<RoutingPlan> plan = cuda::DownloadRoutingPlan(storage->plan());
  ASSERT_TRUE(plan.ok()) << plan.status();
  out->plan = std::move(*plan);
  out->storage = std::move(*storage);
}

struct PlanCase {
  std::string name;
  std::vector<int64_t> lengths;         // tokens per sequence
  std::vector<RoutingOptions> options;  // per sequence
  bool ties;
  // Other than the mini's 256: the plan's row pass loads logits 256 experts at a time.
  int64_t experts = 256;
  // Expert-choice rows alone with their scopes in row order: the plan's CSR part is then the
  // selection itself (cuda::SelectionPlan, what the model's experts start on).
  bool selection_is_plan = false;
};
void PrintTo(const PlanCase& c, std::ostream* os) { *os << c.name; }
class RoutingPlanTest : public ::testing::TestWithParam<PlanCase> {};

TEST_P(RoutingPlanTest, EqualsRouteMoeLayer) {
  SKIP_WITHOUT_GPU();
  const PlanCase c = GetParam();
  const ModelConfig config = MiniRoutingConfig(c.experts);
  std::vector<SequenceRouting> sequences;
  int64_t num_tokens = 0;
  for (size_t s = 0; s < c.lengths.size(); ++s) {
    // Start positions that are not block-aligned split request scopes unevenly.
    sequences.push_back({num_tokens, c.lengths[s], c.options[s], static_cast<int64_t>(7 * s), 32});
    num_tokens += c.lengths[s];
  }
  const std::vector<float> logits = RouterLogits(num_tokens * config.num_experts, 91, c.ties);
  const std::vector<float> bias = RandomFloats(config.num_experts, 92, -0.2f, 0.2f);
  const LayerRouting want =
      RouteMoeLayer(config, logits.data(), bias.data(), num_tokens, sequences);
  GpuRouting got;
  RouteOnGpu(config, logits, bias, num_tokens, sequences, &got, /*split=*/true,
             /*implicit_rows=*/true);
  if (HasFatalFailure()) return;
  EXPECT_EQ(got.plan.expert_offsets, want.plan.expert_offsets);
  EXPECT_EQ(got.plan.token_idx, want.plan.token_idx);
  // What the experts start on, before the row pass has run.
  EXPECT_EQ(got.csr.expert_offsets, want.plan.expert_offsets);
  EXPECT_EQ(got.csr.token_idx, want.plan.token_idx);
  EXPECT_TRUE(Close(got.plan.weight, want.plan.weight, kRouterWeightRtol, 0.0, "weights"));
  ASSERT_EQ(got.selection_is_plan, c.selection_is_plan);
  if (got.selection_is_plan) {
    EXPECT_EQ(got.selected, want.plan.token_idx);
    EXPECT_EQ(got.uniform_offsets, want.plan.expert_offsets);
  }
  // The token-major index the combine walks: per token its assignments, in ascending expert
  // order (assignments are expert-major, so ascending assignment order).
  {
    const cuda::DeviceRoutingPlan& d = got.storage.plan();
    absl::StatusOr<std::vector<int32_t>> offsets = cuda::Download(d.token_offsets, num_tokens + 1);
    absl::StatusOr<std::vector<int32_t>> assignments =
        cuda::Download(d.token_assignments, d.num_assignments);
    ASSERT_TRUE(offsets.ok() && assignments.ok());
    std::vector<int32_t> want_offsets(num_tokens + 1, 0);
    for (int32_t t : want.plan.token_idx) ++want_offsets[t + 1];
    for (int64_t t = 0; t < num_tokens; ++t) want_offsets[t + 1] += want_offsets[t];
    std::vector<int32_t> want_assignments(want.plan.token_idx.size());
    std::vector<int32_t> fill(want_offsets.begin(), want_offsets.end() - 1);
    for (size_t a = 0; a < want.plan.token_idx.size(); ++a) {
      want_assignments[fill[want.plan.token_idx[a]]++] = static_cast<int32_t>(a);
    }
    EXPECT_EQ(*offsets, want_offsets);
    EXPECT_EQ(*assignments, want_assignments);
  }

  // Deterministic: a second build, in one call, gives the same bits (for token-choice rows alone,
  // from the row list).
  GpuRouting again;
  RouteOnGpu(config, logits, bias, num_tokens, sequences, &again, /*split=*/false,
             /*implicit_rows=*/false);
  if (HasFatalFailure()) return;
  EXPECT_EQ(again.plan.expert_offsets, got.plan.expert_offsets);
  EXPECT_EQ(again.plan.token_idx, got.plan.token_idx);
  EXPECT_EQ(again.plan.weight, got.plan.weight);
}

// Host-side: what lets a forward start its experts on the selection.
TEST(SelectionPlanTest, ScopesInRowOrderMeansStrictlyAscendingRows) {
  EXPECT_TRUE(cuda::ScopesInRowOrder({}));
  EXPECT_TRUE(cuda::ScopesInRowOrder({4}));
  EXPECT_TRUE(cuda::ScopesInRowOrder({0, 1, 2, 7, 9}));
  EXPECT_FALSE(cuda::ScopesInRowOrder({0, 1, 1}));
  EXPECT_FALSE(cuda::ScopesInRowOrder({0, 5, 6, 2, 3}));
  EXPECT_EQ(cuda::UniformExpertOffsets(3, 5), (std::vector<int32_t>{0, 5, 10, 15}));
}

RoutingOptions Tc() { return {}; }
RoutingOptions Ec(double cf, RoutingScope scope, ExpertChoiceWeighting w) {
  return {RoutingMode::kExpertChoice, cf, scope, w};
}

INSTANTIATE_TEST_SUITE_P(
    Grid, RoutingPlanTest, ::testing::ValuesIn([] {
      const RoutingOptions ec_req =
          Ec(1.25, RoutingScope::kRequest, ExpertChoiceWeighting::kRenormalized);
      const RoutingOptions ec_raw = Ec(2.0, RoutingScope::kRequest, ExpertChoiceWeighting::kRaw);
      const RoutingOptions ec_batch =
          Ec(1.25, RoutingScope::kBatch, ExpertChoiceWeighting::kRenormalized);
      const RoutingOptions ec_batch_raw =
          Ec(0.5, RoutingScope::kBatch, ExpertChoiceWeighting::kRaw);
      std::vector<PlanCase> cases;
      cases.push_back({"one_token_tc", {1}, {Tc()}, false});
      // Every expert selects the one token: 256 selected experts in its row, past the 32 that
      // the row pass gathers into lanes (its per-chunk path; a 5-token scope below, about 51 a row,
      // too); scopes of 32 rows at cf 1.25 select 16 a row (the gathered path).
      cases.push_back({"one_token_ec", {1}, {ec_req}, false, 256, true});
      cases.push_back({"all_tc", {37, 32, 100}, {Tc(), Tc(), Tc()}, false});
      // Token-choice rows alone, built with no row list (rows [0, N), as model_bench routes)
      // and, in the test's second build, with the list.
      cases.push_back({"all_tc_ties", {37, 32, 100}, {Tc(), Tc(), Tc()}, true});
      cases.push_back({"all_tc_4096", {4096}, {Tc()}, false});
      cases.push_back({"all_ec_request", {32, 70, 5}, {ec_req, ec_raw, ec_req}, false, 256, true});
      cases.push_back({"all_ec_request_then_batch",
                       {32, 70, 50, 20},
                       {ec_req, ec_raw, ec_batch, ec_batch},
                       true,
                       256,
                       true});
      // A batch scope of rows on both sides of a request's: the scopes are not in row order, and
      // the plan is built before the experts.
      cases.push_back({"all_ec_interleaved_scopes",
                       {20, 32, 50},
                       {ec_batch, ec_req, ec_batch},
                       false,
                       256,
                       false});
      cases.push_back({"mixed",
                       {37, 70, 50, 20, 1, 33},
                       {Tc(), ec_req, ec_batch, ec_batch_raw, Tc(), ec_batch},
                       false});
      cases.push_back({"mixed_ties",
                       {37, 70, 50, 20, 1, 33},
                       {Tc(), ec_req, ec_batch, ec_batch_raw, Tc(), ec_batch},
                       true});
      std::vector<int64_t> lengths(64, 32);
      std::vector<RoutingOptions> options(64);
      for (int i = 0; i < 64; ++i) options[i] = i % 3 == 0 ? Tc() : ec_req;
      cases.push_back({"decode_64_blocks", lengths, options, false});
      cases.push_back({"mixed_40_experts", {37, 20, 50}, {Tc(), ec_raw, ec_batch}, false, 40});
      cases.push_back({"mixed_328_experts", {37, 70, 50}, {Tc(), ec_req, ec_batch}, false, 328});
      // Grids of 256 and 512 words: the row pass runs 16 warps a block where 32-warp blocks would
      // not all be resident at once (both here on an H100/H200; the grids above run 32).
      cases.push_back({"rows_8192", {4096, 4096}, {Tc(), ec_batch}, false});
      cases.push_back({"rows_16384", {8192, 4096, 4096}, {Tc(), ec_batch, ec_req}, false});
      return cases;
    }()));

// ---------------------------------------------------------------------------------------------
// Gather and combine

TEST(MoeDispatchTest, GatherRowsCopiesExactly) {
  SKIP_WITHOUT_GPU();
  for (int64_t row_size : {2048, 5}) {
    const std::vector<float> x = RandomFloats(10 * row_size, 101);
    const std::vector<int32_t> rows{9, 0, 3, 3, 7};
    DeviceArray<float> d_x(x), d_out(rows.size() * row_size);
    DeviceArray<int32_t> d_rows(rows);
    ASSERT_OK(cuda::GatherRows({DType::kF32, d_x.get(), row_size, d_rows.get(),
                                static_cast<int64_t>(rows.size()), d_out.get()},
                               nullptr));
    const std::vector<float> got = d_out.ToHost();
    for (size_t i = 0; i < rows.size(); ++i) {
      ASSERT_TRUE(std::equal(got.begin() + i * row_size, got.begin() + (i + 1) * row_size,
                             x.begin() + rows[i] * row_size));
    }
  }
}

// A random plan: every token takes between 0 and max_experts distinct experts.
RoutingPlan RandomPlan(int64_t tokens, int64_t experts, int64_t max_experts, uint32_t seed) {
  std::mt19937 rng(seed);
  RoutingPlanBuilder builder(tokens, experts);
  std::vector<int32_t> order(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    const int64_t k = rng() % (max_experts + 1);
    for (int64_t j = 0; j < k; ++j) {
      builder.Add(static_cast<int32_t>(t), order[j],
                  std::uniform_real_distribution<float>(0.0f, 2.0f)(rng));
    }
  }
  return std::move(builder).Finish();
}

// hidden 257: one dimension per thread; 2048: eight per thread (vector loads); 24: fewer threads
// than the block has.
class CombineTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(CombineTest, BitIdenticalToCpuOrder) {
  SKIP_WITHOUT_GPU();
  const int64_t tokens = 50, experts = 16, hidden = GetParam();
  const RoutingPlan plan = RandomPlan(tokens, experts, 5, 111);
  const int64_t n = plan.num_assignments();
  const std::vector<float> y = RandomFloats(n * hidden, 112);
  const std::vector<float> shared = RandomFloats(tokens * hidden, 113);
  const std::vector<float> residual = RandomFloats(tokens * hidden, 114, -10.0f, 10.0f);
  // The CPU order of model/model.cc: mlp = 0 + shared; mlp += w * y by ascending expert
  // (kernels/cpu/moe.cc); x += mlp.
  std::vector<float> mix(tokens * hidden, 0.0f);
  for (int64_t i = 0; i < tokens * hidden; ++i) mix[i] += shared[i];
  for (int64_t e = 0; e < experts; ++e) {
    for (int32_t a = plan.expert_offsets[e]; a < plan.expert_offsets[e + 1]; ++a) {
      for (int64_t d = 0; d < hidden; ++d) {
        const float p = plan.weight[a] * y[a * hidden + d];
        mix[plan.token_idx[a] * hidden + d] += p;
      }
    }
  }
  std::vector<float> want = residual;
  for (int64_t i = 0; i < tokens * hidden; ++i) want[i] += mix[i];

  absl::StatusOr<cuda::DeviceRoutingPlanStorage> d_plan = cuda::UploadRoutingPlan(plan);
  ASSERT_TRUE(d_plan.ok()) << d_plan.status();
  DeviceArray<float> d_y(y), d_shared(shared), d_x(residual);
  cuda::CombineArgs args{d_plan->plan(), DType::kF32, d_y.get(), d_shared.get(),
                         d_x.get(),      d_x.get(),   hidden};
  ASSERT_OK(cuda::Combine(args, nullptr));
  EXPECT_EQ(d_x.ToHost(), want);

  // BF16 expert outputs, no shared expert, no residual.
  const std::vector<float> y16 = RoundToBf16(y);
  std::vector<float> want16(tokens * hidden, 0.0f);
  for (int64_t e = 0; e < experts; ++e) {
    for (int32_t a = plan.expert_offsets[e]; a < plan.expert_offsets[e + 1]; ++a) {
      for (int64_t d = 0; d < hidden; ++d) {
        const float p = plan.weight[a] * y16[a * hidden + d];
        want16[plan.token_idx[a] * hidden + d] += p;
      }
    }
  }
  DeviceArray<uint16_t> d_y16(ToBf16Bits(y));
  DeviceArray<float> d_out(tokens * hidden);
  args = {d_plan->plan(), DType::kBF16, d_y16.get(), nullptr, nullptr, d_out.get(), hidden};
  ASSERT_OK(cuda::Combine(args, nullptr));
  EXPECT_EQ(d_out.ToHost(), want16);
}

INSTANTIATE_TEST_SUITE_P(Hidden, CombineTest, ::testing::Values(257, 2048, 24));

// ---------------------------------------------------------------------------------------------
// Routed experts (grouped GEMMs + SwiGLU) + combine vs cpu::MoeExperts

struct MoeCase {
  int64_t tokens, experts, hidden, width, max_experts;
  DType dtype;
  bool uniform;  // every expert the same count (expert-choice): the strided-batched path
  cuda::MoeExpertsPath path = cuda::MoeExpertsPath::kAuto;  // kAuto: fused where it fits
  // When set, expert e takes counts[e] distinct random tokens (tokens, uniform unused).
  std::vector<int32_t> counts = {};
};
void PrintTo(const MoeCase& c, std::ostream* os) {
  *os << "tokens=" << c.tokens << " experts=" << c.experts << " hidden=" << c.hidden
      << " width=" << c.width << " " << DTypeName(c.dtype)
      << (!c.counts.empty() ? " counts"
          : c.uniform       ? " uniform"
                            : " ragged")
      << (c.path == cuda::MoeExpertsPath::kCublas ? " cublas" : " auto");
}
// Each expert takes counts[e] distinct random tokens.
RoutingPlan PlanWithCounts(int64_t tokens, const std::vector<int32_t>& counts, uint32_t seed) {
  std::mt19937 rng(seed);
  RoutingPlanBuilder builder(tokens, static_cast<int64_t>(counts.size()));
  std::vector<int32_t> order(tokens);
  for (size_t e = 0; e < counts.size(); ++e) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int32_t j = 0; j < counts[e]; ++j) {
      builder.Add(order[j], static_cast<int32_t>(e), 0.5f + 0.01f * j);
    }
  }
  return std::move(builder).Finish();
}
RoutingPlan MakeMoePlan(const MoeCase& c, uint32_t seed) {
  if (!c.counts.empty()) return PlanWithCounts(c.tokens, c.counts, seed);
  if (c.uniform) {
    return PlanWithCounts(c.tokens, std::vector<int32_t>(c.experts, c.max_experts), seed);
  }
  return RandomPlan(c.tokens, c.experts, c.max_experts, seed);
}
// Tall tiles (moe_gemm.cu: a remainder of 1-32 rows on a single last full tile): experts of 129,
// 160 and 400 rows; beside them remainders in tiles of their own (161: 33 rows; 270: the full
// tiles pair up), one full tile, a short one, none.
MoeCase TallTileCase() {
  MoeCase c{450, 8, 512, 256, 0, DType::kBF16, false};
  c.counts = {129, 160, 161, 270, 400, 40, 0, 128};
  return c;
}
// The widths of a tall tile's swapped product (moe_gemm.cu TallWidth): remainders of 8 and 9, 16
// and 17 rows (experts of 136, 137, 144, 145), beside 1 and 32 (129, 160) and plain tiles.
MoeCase TallWidthCase() {
  MoeCase c{400, 8, 512, 256, 0, DType::kBF16, false};
  c.counts = {136, 137, 144, 145, 129, 160, 128, 50};
  return c;
}
// Tall pairs (moe_gemm.cu SplitExpert: a remainder of 1-64 rows split over a pair of full tiles):
// 257, 300 and 320 rows (two full tiles and 1, 44, 64 more), 420 (three full tiles and 36: the
// first two take them), 545 (four and 33); beside them 321 (a remainder of 65 in a tile of its
// own), 416 (a tall single tile). The average expert has two row tiles, so the up kernel walks a
// list with tall pairs and the 4-stage down kernel one without tall tiles.
MoeCase TallPairCase() {
  MoeCase c{700, 7, 512, 256, 0, DType::kBF16, false};
  c.counts = {257, 300, 320, 420, 545, 321, 416};
  return c;
}
// The tile list's order (moe_gemm.cu): no expert has more than two row tiles, so the experts of
// one tall tile (129, 131, 150, 160 rows) go first; beside them pairs (200, 256 rows), plain
// single tiles (60, 100, 128 rows) and an expert without rows.
MoeCase TallFirstCase() {
  MoeCase c{300, 10, 512, 256, 0, DType::kBF16, false};
  c.counts = {100, 150, 0, 129, 256, 60, 160, 200, 128, 131};
  return c;
}
// A host tensor's bytes on the device.
DeviceArray<uint8_t> BytesOnDevice(const HostTensor& t) {
  return DeviceArray<uint8_t>(
      std::span<const uint8_t>(static_cast<const uint8_t*>(t.raw()), t.bytes()));
}
class MoeExpertsTest : public ::testing::TestWithParam<MoeCase> {};

TEST_P(MoeExpertsTest, MatchesCpu) {
  SKIP_WITHOUT_GPU();
  const MoeCase c = GetParam();
  const RoutingPlan plan = MakeMoePlan(c, c.uniform ? 121 : 122);
  HostTensor w13(c.dtype, {c.experts, 2 * c.width, c.hidden});
  HostTensor w2(c.dtype, {c.experts, c.hidden, c.width});
  FillRandom(&w13, 123, 0.05f);
  FillRandom(&w2, 124, 0.05f);
  const std::vector<float> x = RoundToBf16(RandomFloats(c.tokens * c.hidden, 125));
  // The accumulator starts at zero: measuring the routed part as (out - out0) of a random out0
  // would cancel digits and blur the comparison.
  const std::vector<float> out0(c.tokens * c.hidden, 0.0f);
  std::vector<float> want = out0;
  cpu::MoeExperts({x.data(), &plan, &w13, &w2, want.data()});

  absl::StatusOr<cuda::DeviceRoutingPlanStorage> d_plan = cuda::UploadRoutingPlan(plan);
  ASSERT_TRUE(d_plan.ok()) << d_plan.status();
  DeviceArray<uint8_t> d_w13 = BytesOnDevice(w13), d_w2 = BytesOnDevice(w2);
  DeviceArray<float> d_x32(x), d_out(out0);
  DeviceArray<uint16_t> d_x16(ToBf16Bits(x));
  const int64_t n = plan.num_assignments();
  DeviceArray<uint8_t> d_expert_out(std::max<int64_t>(1, n * c.hidden * DTypeSize(c.dtype)));
  const bool fused = c.path == cuda::MoeExpertsPath::kAuto &&
                     cuda::MoeExpertsFused(c.dtype, c.experts, c.hidden, c.width);
  RecordProperty("path", fused ? "fused" : "cublas");
  const size_t ws_bytes =
      cuda::MoeExpertsWorkspaceBytes(c.dtype, n, c.experts, c.hidden, c.width, c.path);
  DeviceArray<uint8_t> d_ws(std::max<size_t>(1, ws_bytes));
  absl::StatusOr<std::unique_ptr<cuda::Gemm>> gemm = cuda::Gemm::Create(nullptr);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  cuda::MoeExpertsArgs args;
  args.x = c.dtype == DType::kBF16 ? static_cast<const void*>(d_x16.get()) : d_x32.get();
  args.plan = d_plan->plan();
  args.expert_offsets = plan.expert_offsets;
  args.w13 = {c.dtype, d_w13.get(), c.experts, 2 * c.width, c.hidden};
  args.w2 = {c.dtype, d_w2.get(), c.experts, c.hidden, c.width};
  args.expert_out = d_expert_out.get();
  args.workspace = d_ws.get();
  args.workspace_bytes = d_ws.size();
  args.path = c.path;
  if (fused) args.expert_offsets = {};  // the fused path reads the plan on the device only
  ASSERT_OK(cuda::MoeExperts(**gemm, args));
  ASSERT_OK(cuda::Combine({d_plan->plan(), c.dtype, d_expert_out.get(), /*shared_out=*/nullptr,
                           /*residual=*/d_out.get(), d_out.get(), c.hidden},
                          nullptr));
  const std::vector<float> got = d_out.ToHost();
  // Compare the routed contribution (out - out0), where the errors are.
  std::vector<float> got_delta(got.size()), want_delta(want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << i;
    got_delta[i] = got[i] - out0[i];
    want_delta[i] = want[i] - out0[i];
  }
  const double err = NormRelError(got_delta, want_delta, DTypeName(c.dtype));
  RecordProperty("norm_rel_error", std::to_string(err));
  EXPECT_LE(err, c.dtype == DType::kBF16 ? kMoeBf16NormRtol : kMoeF32NormRtol);
}

INSTANTIATE_TEST_SUITE_P(Grid, MoeExpertsTest,
                         ::testing::Values(MoeCase{20, 8, 64, 32, 3, DType::kF32, false},
                                           MoeCase{20, 8, 64, 32, 3, DType::kBF16, false},
                                           MoeCase{20, 8, 64, 32, 5, DType::kF32, true},
                                           MoeCase{1, 4, 16, 8, 4, DType::kBF16, false},
                                           MoeCase{64, 256, 2048, 512, 8, DType::kBF16, false},
                                           MoeCase{64, 256, 2048, 512, 3, DType::kBF16, true},
                                           MoeCase{64, 256, 2048, 512, 8, DType::kBF16, false,
                                                   cuda::MoeExpertsPath::kCublas},
                                           // Fused-kernel tiles: experts over one 128-row tile,
                                           // partial tiles, empty experts, an expert count that
                                           // is no multiple of 32, several column tiles. From
                                           // two row tiles per expert on average (700 tokens
                                           // uniform, the last two cases) the down kernel runs
                                           // its 4-stage variant, below that the 3-stage one.
                                           MoeCase{600, 8, 256, 128, 6, DType::kBF16, false},
                                           MoeCase{700, 8, 512, 256, 300, DType::kBF16, true},
                                           MoeCase{40, 300, 256, 128, 2, DType::kBF16, false},
                                           MoeCase{1, 8, 256, 128, 8, DType::kBF16, false},
                                           MoeCase{520, 4, 768, 384, 4, DType::kBF16, false},
                                           // Even column-tile counts (as in the mini) and experts
                                           // of 5-7 row tiles: tile pairs sharing B across the
                                           // cluster, and a single last tile split by columns.
                                           MoeCase{1000, 4, 512, 256, 3, DType::kBF16, false},
                                           MoeCase{1200, 16, 1024, 512, 8, DType::kBF16, false},
                                           TallTileCase(), TallWidthCase(), TallPairCase(),
                                           TallFirstCase(),
                                           // Every expert 160 rows, like expert-choice with
                                           // capacity factor 1.25 at 4096 tokens.
                                           MoeCase{1280, 8, 1024, 512, 160, DType::kBF16, true}));

// On a Hopper GPU the mini shape takes the fused kernels: the grid above then tests them.
TEST(MoeExpertsTest, FusedPathOnHopper) {
  SKIP_WITHOUT_GPU();
  int device = 0, major = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
  if (major != 9) GTEST_SKIP() << "not an sm_90 GPU";
  EXPECT_TRUE(cuda::MoeExpertsFused(DType::kBF16, 256, 2048, 512));
  EXPECT_FALSE(cuda::MoeExpertsFused(DType::kF32, 256, 2048, 512));
  EXPECT_FALSE(cuda::MoeExpertsFused(DType::kBF16, 8, 64, 32));
}

// The fused kernels again and again on a workspace and an output set to NaN before every call:
// reading anything before it is written (a tile list entry, an activation row, a stage of the
// ring) would show as NaN or as a change between runs. Shapes: pairs and single tiles with the
// 4-stage down kernel; an odd number of up column tiles (width 384: a CTA with no column) with
// the 3-stage one; tall tiles; tall pairs.
class FusedMoeRepeatTest : public ::testing::TestWithParam<MoeCase> {};

TEST_P(FusedMoeRepeatTest, BitIdenticalOnPoisonedWorkspace) {
  SKIP_WITHOUT_GPU();
  const MoeCase c = GetParam();
  if (!cuda::MoeExpertsFused(c.dtype, c.experts, c.hidden, c.width)) {
    GTEST_SKIP() << "no fused kernels on this GPU";
  }
  const RoutingPlan plan = MakeMoePlan(c, 131);
  HostTensor w13(c.dtype, {c.experts, 2 * c.width, c.hidden});
  HostTensor w2(c.dtype, {c.experts, c.hidden, c.width});
  FillRandom(&w13, 132, 0.05f);
  FillRandom(&w2, 133, 0.05f);
  absl::StatusOr<cuda::DeviceRoutingPlanStorage> d_plan = cuda::UploadRoutingPlan(plan);
  ASSERT_TRUE(d_plan.ok()) << d_plan.status();
  DeviceArray<uint8_t> d_w13 = BytesOnDevice(w13), d_w2 = BytesOnDevice(w2);
  DeviceArray<uint16_t> d_x(ToBf16Bits(RandomFloats(c.tokens * c.hidden, 134)));
  const int64_t n = plan.num_assignments();
  DeviceArray<uint16_t> d_expert_out(n * c.hidden);
  DeviceArray<uint8_t> d_ws(
      cuda::MoeExpertsWorkspaceBytes(c.dtype, n, c.experts, c.hidden, c.width));
  absl::StatusOr<std::unique_ptr<cuda::Gemm>> gemm = cuda::Gemm::Create(nullptr);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  cuda::MoeExpertsArgs args;
  args.x = d_x.get();
  args.plan = d_plan->plan();
  args.w13 = {c.dtype, d_w13.get(), c.experts, 2 * c.width, c.hidden};
  args.w2 = {c.dtype, d_w2.get(), c.experts, c.hidden, c.width};
  args.expert_out = d_expert_out.get();
  args.workspace = d_ws.get();
  args.workspace_bytes = d_ws.size();
  std::vector<uint16_t> first;
  for (int run = 0; run < 20; ++run) {
    d_ws.Poison();
    d_expert_out.Poison();
    ASSERT_OK(cuda::MoeExperts(**gemm, args));
    const std::vector<uint16_t> got = d_expert_out.ToHost();
    if (run == 0) {
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_FALSE(std::isnan(Bf16ToFloat(got[i]))) << "element " << i;
      }
      first = got;
    } else {
      ASSERT_EQ(got, first) << "run " << run;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Grid, FusedMoeRepeatTest,
                         ::testing::Values(MoeCase{3000, 32, 1024, 256, 8, DType::kBF16, false},
                                           MoeCase{600, 8, 768, 384, 4, DType::kBF16, false},
                                           TallTileCase(), TallWidthCase(), TallPairCase(),
                                           TallFirstCase()));

// ---------------------------------------------------------------------------------------------
// Attention over the KV cache, packed batches of chunks

struct ChunkSpec {
  int32_t num_queries, query_start, block_length;
};
struct AttentionCase {
  std::string name;
  int64_t heads, kv_heads, head_dim;
  DType kv_dtype;
  std::vector<ChunkSpec> chunks;
};
void PrintTo(const AttentionCase& c, std::ostream* os) {
  *os << c.name << " heads=" << c.heads << "/" << c.kv_heads << " d=" << c.head_dim << " "
      << DTypeName(c.kv_dtype);
}
class AttentionTest : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionTest, MatchesCpuPerSequence) {
  SKIP_WITHOUT_GPU();
  const AttentionCase c = GetParam();
  const int64_t kv_size = c.kv_heads * c.head_dim, q_size = c.heads * c.head_dim;
  const bool bf16 = c.kv_dtype == DType::kBF16;
  int64_t num_tokens = 0, max_queries = 0;
  for (const ChunkSpec& s : c.chunks) {
    num_tokens += s.num_queries;
    max_queries = std::max<int64_t>(max_queries, s.num_queries);
  }
  const std::vector<float> q = RandomFloats(num_tokens * q_size, 131, -2.0f, 2.0f);
  const std::vector<float> k_new = RandomFloats(num_tokens * kv_size, 132, -2.0f, 2.0f);
  const std::vector<float> v_new = RandomFloats(num_tokens * kv_size, 133);
  std::vector<float> want(num_tokens * q_size);
  std::vector<DeviceArray<float>> k32, v32;
  std::vector<DeviceArray<uint16_t>> k16, v16;
  std::vector<cuda::AttentionSequence> seqs;
  std::vector<std::vector<float>> k_caches, v_caches;  // what the caches must hold afterwards
  int64_t row = 0;
  for (size_t s = 0; s < c.chunks.size(); ++s) {
    const ChunkSpec& spec = c.chunks[s];
    const int64_t num_keys = spec.query_start + spec.num_queries;
    // Cached keys before the chunk, then the chunk's own (which AppendKv writes).
    std::vector<float> kc = RandomFloats(num_keys * kv_size, 140 + s, -2.0f, 2.0f);
    std::vector<float> vc = RandomFloats(num_keys * kv_size, 160 + s);
    std::copy_n(k_new.begin() + row * kv_size, spec.num_queries * kv_size,
                kc.begin() + spec.query_start * kv_size);
    std::copy_n(v_new.begin() + row * kv_size, spec.num_queries * kv_size,
                vc.begin() + spec.query_start * kv_size);
    if (bf16) {
      kc = RoundToBf16(kc);
      vc = RoundToBf16(vc);
    }
    cpu::AttentionArgs a;
    a.q = q.data() + row * q_size;
    a.k = kc.data();
    a.v = vc.data();
    a.out = want.data() + row * q_size;
    a.num_queries = spec.num_queries;
    a.num_keys = num_keys;
    a.query_start = spec.query_start;
    a.num_heads = c.heads;
    a.num_kv_heads = c.kv_heads;
    a.head_dim = c.head_dim;
    a.block_length = spec.block_length;
    cpu::Attention(a);
    // Device caches: the cached part filled, the chunk's part poisoned (AppendKv fills it).
    std::vector<float> k_init = kc, v_init = vc;
    std::fill(k_init.begin() + spec.query_start * kv_size, k_init.end(), NAN);
    std::fill(v_init.begin() + spec.query_start * kv_size, v_init.end(), NAN);
    cuda::AttentionSequence seq;
    if (bf16) {
      k16.emplace_back(ToBf16Bits(k_init));
      v16.emplace_back(ToBf16Bits(v_init));
      seq.k_cache = k16.back().get();
      seq.v_cache = v16.back().get();
    } else {
      k32.emplace_back(k_init);
      v32.emplace_back(v_init);
      seq.k_cache = k32.back().get();
      seq.v_cache = v32.back().get();
    }
    seq.first_row = static_cast<int32_t>(row);
    seq.num_queries = spec.num_queries;
    seq.query_start = spec.query_start;
    seq.block_length = spec.block_length;
    seqs.push_back(seq);
    k_caches.push_back(std::move(kc));
    v_caches.push_back(std::move(vc));
    row += spec.num_queries;
  }
  DeviceArray<cuda::AttentionSequence> d_seqs(seqs);
  DeviceArray<float> d_q(q), d_k(k_new), d_v(v_new), d_out(want.size());
  DeviceArray<uint16_t> d_out16(want.size());
  const int64_t num_seqs = static_cast<int64_t>(seqs.size());
  ASSERT_OK(cuda::AppendKv(
      {d_k.get(), d_v.get(), d_seqs.get(), num_seqs, max_queries, kv_size, c.kv_dtype}, nullptr));
  cuda::AttentionArgs args;
  args.q = d_q.get();
  args.sequences = d_seqs.get();
  args.num_sequences = num_seqs;
  args.max_queries = max_queries;
  args.num_heads = c.heads;
  args.num_kv_heads = c.kv_heads;
  args.head_dim = c.head_dim;
  args.kv_dtype = c.kv_dtype;
  args.out = d_out.get();
  args.out_bf16 = reinterpret_cast<__nv_bfloat16*>(d_out16.get());
  args.num_tokens = num_tokens;
  // One key range per block (no workspace), then split keys where the shape asks for them.
  ASSERT_OK(cuda::Attention(args, nullptr));
  EXPECT_TRUE(Close(d_out.ToHost(), want, kAttentionRtol, kAttentionAtol));
  EXPECT_TRUE(Close(DownloadBf16(d_out16), want, kBf16Rtol, kAttentionAtol, "bf16-out"));
  const int64_t splits = cuda::AttentionSplits(args);
  if (c.chunks.size() == 1 && c.heads / c.kv_heads * max_queries <= 64) {
    EXPECT_GT(splits, 1);
  }
  if (splits > 1) {
    DeviceArray<uint8_t> workspace(cuda::AttentionWorkspaceBytes(args));
    args.workspace = workspace.get();
    args.workspace_bytes = cuda::AttentionWorkspaceBytes(args);
    args.workspace_bytes -= 4;
    EXPECT_EQ(cuda::Attention(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
    args.workspace_bytes += 4;
    d_out.Poison();
    d_out16.Poison();
    ASSERT_OK(cuda::Attention(args, nullptr));
    EXPECT_TRUE(Close(d_out.ToHost(), want, kAttentionRtol, kAttentionAtol, "split"));
    EXPECT_TRUE(Close(DownloadBf16(d_out16), want, kBf16Rtol, kAttentionAtol, "split bf16-out"));
  }
  for (size_t s = 0; s < seqs.size(); ++s) {
    const std::vector<float> kc = bf16 ? DownloadBf16(k16[s]) : k32[s].ToHost();
    const std::vector<float> vc = bf16 ? DownloadBf16(v16[s]) : v32[s].ToHost();
    EXPECT_EQ(kc, k_caches[s]) << "k cache of sequence " << s;
    EXPECT_EQ(vc, v_caches[s]) << "v cache of sequence " << s;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, AttentionTest, ::testing::ValuesIn([] {
      const std::vector<std::pair<std::string, std::vector<ChunkSpec>>> batches{
          {"prefill_block", {{32, 0, 32}}},
          {"denoise_over_cache", {{32, 96, 32}}},
          {"one_token", {{1, 0, 32}}},
          {"mixed_batch",
           {{1, 0, 32}, {32, 64, 32}, {100, 0, 32}, {5, 3, 4}, {70, 0, 1000}, {64, 512, 32}}},
          {"causal_and_odd", {{33, 10, 1}, {17, 40, 7}}},
          {"long_cache", {{32, 2000, 32}}},
          {"long_bidirectional", {{7, 3001, 4000}}},
      };
      struct Heads {
        int64_t heads, kv_heads, head_dim;
      };
      std::vector<AttentionCase> cases;
      for (const auto& [name, chunks] : batches) {
        for (Heads h : {Heads{16, 4, 128}, Heads{8, 8, 64}, Heads{4, 1, 64}, Heads{32, 1, 128},
                        Heads{4, 2, 16}, Heads{8, 2, 32}}) {
          for (DType d : {DType::kF32, DType::kBF16}) {
            cases.push_back({name, h.heads, h.kv_heads, h.head_dim, d, chunks});
          }
        }
      }
      return cases;
    }()));

TEST(AttentionTest, RejectsUnsupportedShapes) {
  SKIP_WITHOUT_GPU();
  cuda::AttentionArgs args;
  args.num_heads = 12;
  args.num_kv_heads = 4;
  args.head_dim = 128;
  args.num_sequences = 1;
  args.max_queries = 1;
  args.out = reinterpret_cast<float*>(16);
  EXPECT_EQ(cuda::Attention(args, nullptr).code(), absl::StatusCode::kInvalidArgument);  // group 3
  args.num_heads = 16;
  args.head_dim = 96;
  EXPECT_EQ(cuda::Attention(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moeserve
