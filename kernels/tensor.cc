#include "kernels/tensor.h"

#include <cstdlib>
#include <new>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moeserve {

void HostBuffer::Free::operator()(void* p) const { std::free(p); }

HostBuffer::HostBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  constexpr size_t kAlign = 64;
  void* p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  if (p == nullptr) throw std::bad_alloc();
  data_.reset(p);
}

HostTensor::HostTensor(DType dtype, std::vector<int64_t> shape)
    : dtype_(dtype), shape_(std::move(shape)) {
  numel_ = 1;
  for (int64_t d : shape_) numel_ *= d;
  buffer_ = HostBuffer(static_cast<size_t>(numel_) * DTypeSize(dtype_));
}

std::string HostTensor::DebugString() const {
  return absl::StrCat(DTypeName(dtype_), "[", absl::StrJoin(shape_, ", "), "]");
}

MatrixView AsMatrix(const HostTensor& tensor) {
  return {tensor.dtype(), tensor.raw(), tensor.dim(0),
          tensor.shape().size() > 1 ? tensor.dim(1) : 1};
}

MatrixView AsMatrix(const HostTensor& tensor, int64_t index) {
  const int64_t rows = tensor.dim(1), cols = tensor.dim(2);
  return {
      tensor.dtype(),
      static_cast<const std::byte*>(tensor.raw()) + index * rows * cols * DTypeSize(tensor.dtype()),
      rows, cols};
}

}  // namespace moeserve
