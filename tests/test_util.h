// Helpers shared by the test suites: random inputs and named tolerances.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/tensor.h"

namespace moeserve::testing {

// The source tree and its tests/data, as compiled in; the environment variable of the same name
// overrides them, so that test binaries can run from a copy of the tree elsewhere (the GPU
// machine).
inline std::string SourceDir() {
  const char* env = std::getenv("MOESERVE_SOURCE_DIR");
  return env != nullptr ? env : MOESERVE_SOURCE_DIR;
}
inline std::string TestDataDir() { return SourceDir() + "/tests/data"; }

// Tolerances, with the reason for each.
// float32 kernels vs a float64 reference of the same math: rounding of sums over <= a few
// thousand terms stays far below 1e-5 relative.
inline constexpr double kF32Rtol = 1e-5;
inline constexpr double kF32Atol = 1e-6;

inline std::vector<float> RandomFloats(int64_t n, uint32_t seed, float lo = -1.0f,
                                       float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// A random matrix in `dtype` with BF16-representable values, so that F32 and BF16 copies hold
// identical numbers.
inline HostTensor RandomMatrix(DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  HostTensor t(dtype, std::move(shape));
  const std::vector<float> v = RandomFloats(t.numel(), seed);
  for (int64_t i = 0; i < t.numel(); ++i) {
    const uint16_t b = FloatToBf16(v[i]);
    if (dtype == DType::kBF16) {
      t.data<uint16_t>()[i] = b;
    } else {
      t.data<float>()[i] = Bf16ToFloat(b);
    }
  }
  return t;
}

inline float At(const HostTensor& t, int64_t i) {
  return t.dtype() == DType::kBF16 ? Bf16ToFloat(t.data<uint16_t>()[i]) : t.data<float>()[i];
}

// Checks |a - b| <= atol + rtol * |ref| elementwise; reports the first few mismatches.
inline ::testing::AssertionResult AllClose(const std::vector<float>& actual,
                                           const std::vector<double>& ref, double rtol,
                                           double atol) {
  if (actual.size() != ref.size()) {
    return ::testing::AssertionFailure()
           << "size " << actual.size() << " vs reference " << ref.size();
  }
  int bad = 0;
  std::string detail;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::abs(actual[i] - ref[i]);
    if (!(err <= atol + rtol * std::abs(ref[i]))) {
      if (bad < 5) {
        detail += "\n  [" + std::to_string(i) + "] expected " + std::to_string(ref[i]) + " got " +
                  std::to_string(actual[i]);
      }
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << ref.size() << " elements out of tolerance" << detail;
}

}  // namespace moeserve::testing
