// Host tensors and the element types the kernels understand.
//
// Weight matrices are BF16 or F32 (the model keeps a checkpoint's F32 matrices in F32 and turns
// F16 into F32 exactly, so loading never loses precision); activations are always float32.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moeserve {

// Element types of weights. Activations are always float32.
enum class DType : uint8_t { kF32, kBF16 };

inline constexpr size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
  }
  return 0;
}

inline constexpr const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

// bfloat16 <-> float32. BF16 is the upper half of a float32; conversion to BF16 rounds to
// nearest even and keeps NaN a (quiet) NaN.
inline float Bf16ToFloat(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}
inline uint16_t FloatToBf16(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
// IEEE binary16 -> float32 (exact; handles subnormals, infinities and NaN).
inline float F16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3ffu;
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13);
  }
  return std::bit_cast<float>(bits);
}

// An owning, 64-byte aligned, uninitialized block of host memory.
class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(size_t bytes);
  void* data() { return data_.get(); }
  const void* data() const { return data_.get(); }
  size_t bytes() const { return bytes_; }

 private:
  struct Free {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> data_;
  size_t bytes_ = 0;
};

// An owning host tensor: dtype, shape (row-major) and storage.
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, std::vector<int64_t> shape);

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_[i]; }
  int64_t numel() const { return numel_; }
  size_t bytes() const { return buffer_.bytes(); }
  bool empty() const { return numel_ == 0; }
  void* raw() { return buffer_.data(); }
  const void* raw() const { return buffer_.data(); }
  template <typename T>
  T* data() {
    return static_cast<T*>(buffer_.data());
  }
  template <typename T>
  const T* data() const {
    return static_cast<const T*>(buffer_.data());
  }
  // "BF16[256, 1024, 2048]"
  std::string DebugString() const;

 private:
  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
  int64_t numel_ = 0;
  HostBuffer buffer_;
};

// A read-only view of a row-major weight matrix [rows, cols] (one expert's slice of a fused
// tensor, say). The kernels take views so that they never care who owns the memory.
struct MatrixView {
  DType dtype = DType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;

  // Rows [first, first + count) of this matrix.
  MatrixView Rows(int64_t first, int64_t count) const {
    return {dtype, static_cast<const std::byte*>(data) + first * cols * DTypeSize(dtype), count,
            cols};
  }
};

// The whole of a 2-D tensor, or slice `index` of a 3-D tensor [n, rows, cols].
MatrixView AsMatrix(const HostTensor& tensor);
MatrixView AsMatrix(const HostTensor& tensor, int64_t index);

}  // namespace moeserve
