#include "kernels/cuda/gemm.h"

#include <cuda_bf16.h>

#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/util/status_macros.h"

namespace moeserve::cuda {
namespace {

cudaDataType_t CudaType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kBF16:
      return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

// The compute type of a supported (x, w, y) combination, or an error naming the combination.
absl::StatusOr<cublasComputeType_t> ComputeType(DType x, DType w, DType y) {
  if (x == DType::kBF16 && w == DType::kBF16) return CUBLAS_COMPUTE_32F;
  if (x == DType::kF32 && w == DType::kF32 && y == DType::kF32) {
    return CUBLAS_COMPUTE_32F_PEDANTIC;
  }
  return absl::InvalidArgumentError(absl::StrCat("gemm: x ", DTypeName(x), ", w ", DTypeName(w),
                                                 ", y ", DTypeName(y),
                                                 " is not supported (BF16 x BF16 -> F32|BF16, or "
                                                 "F32 x F32 -> F32)"));
}

bool FitsInt(int64_t v) { return v >= 0 && v <= INT32_MAX; }

}  // namespace

absl::StatusOr<std::unique_ptr<Gemm>> Gemm::Create(cudaStream_t stream, size_t workspace_bytes) {
  ASSIGN_OR_RETURN(DeviceBuffer workspace, DeviceBuffer::Allocate(workspace_bytes));
  cublasHandle_t handle = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasCreate(&handle));
  std::unique_ptr<Gemm> gemm(new Gemm(handle, stream, std::move(workspace)));
  CUBLAS_RETURN_IF_ERROR(cublasSetStream(handle, stream));
  CUBLAS_RETURN_IF_ERROR(
      cublasSetWorkspace(handle, gemm->workspace_.data(), gemm->workspace_.bytes()));
  return gemm;
}

Gemm::~Gemm() { cublasDestroy(handle_); }

absl::Status Gemm::Run(const GemmArgs& a) {
  ASSIGN_OR_RETURN(const cublasComputeType_t compute, ComputeType(a.x_dtype, a.w.dtype, a.y_dtype));
  const int64_t n = a.w.rows, k = a.w.cols;
  if (!FitsInt(a.num_rows) || !FitsInt(n) || !FitsInt(k) || !FitsInt(a.x_stride) ||
      !FitsInt(a.y_stride)) {
    return absl::InvalidArgumentError("gemm: sizes and strides must be in [0, 2^31)");
  }
  if (a.x_stride < k || a.y_stride < n) {
    return absl::InvalidArgumentError(absl::StrCat("gemm: x_stride ", a.x_stride, " < k ", k,
                                                   " or y_stride ", a.y_stride, " < n ", n));
  }
  if (a.num_rows == 0 || n == 0) return absl::OkStatus();
  const float alpha = 1.0f;
  // Row-major y[rows, n] is column-major y^T[n, rows] = w[n, k] (column-major w^T, transposed)
  // times x^T (column-major [k, rows]).
  CUBLAS_RETURN_IF_ERROR(cublasGemmEx(
      handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(a.num_rows),
      static_cast<int>(k), &alpha, a.w.data, CudaType(a.w.dtype), static_cast<int>(k), a.x,
      CudaType(a.x_dtype), static_cast<int>(a.x_stride), &a.beta, a.y, CudaType(a.y_dtype),
      static_cast<int>(a.y_stride), compute, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status Gemm::RunGrouped(const GroupedGemmArgs& a) {
  ASSIGN_OR_RETURN(const cublasComputeType_t compute, ComputeType(a.dtype, a.w.dtype, a.dtype));
  const int64_t num_experts = a.w.num_experts, n = a.w.rows, k = a.w.cols;
  if (static_cast<int64_t>(a.expert_offsets.size()) != num_experts + 1) {
    return absl::InvalidArgumentError(absl::StrCat("grouped gemm: expert_offsets has ",
                                                   a.expert_offsets.size(), " entries, want ",
                                                   num_experts + 1));
  }
  if (!FitsInt(n) || !FitsInt(k) || !FitsInt(num_experts)) {
    return absl::InvalidArgumentError("grouped gemm: sizes must be in [0, 2^31)");
  }
  if (n == 0 || a.expert_offsets.back() == 0) return absl::OkStatus();
  const size_t x_elem = DTypeSize(a.dtype), w_elem = DTypeSize(a.w.dtype);
  const cudaDataType_t type = CudaType(a.dtype);
  const float alpha = 1.0f, beta = 0.0f;
  const int32_t first_count = a.expert_offsets[1] - a.expert_offsets[0];
  bool uniform = true;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int32_t count = a.expert_offsets[e + 1] - a.expert_offsets[e];
    if (count < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("grouped gemm: expert_offsets decrease at expert ", e));
    }
    uniform = uniform && count == first_count;
  }
  if (uniform) {
    CUBLAS_RETURN_IF_ERROR(cublasGemmStridedBatchedEx(
        handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), first_count, static_cast<int>(k),
        &alpha, a.w.data, type, static_cast<int>(k), n * k, a.x, type, static_cast<int>(k),
        int64_t{first_count} * k, &beta, a.y, type, static_cast<int>(n), int64_t{first_count} * n,
        static_cast<int>(num_experts), compute, CUBLAS_GEMM_DEFAULT));
    return absl::OkStatus();
  }
  // One group of one problem per expert with rows; the problem sizes stay on the host, the
  // operand pointers go to the device.
  std::vector<const void*> pointers;  // [3, groups]: A (weights), B (x), C (y)
  std::vector<int> m_array, n_array, k_array, lda, ldb, ldc, group_size;
  std::vector<cublasOperation_t> trans_a, trans_b;
  std::vector<float> alphas, betas;
  std::vector<const void*> a_ptrs, b_ptrs, c_ptrs;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int32_t begin = a.expert_offsets[e], count = a.expert_offsets[e + 1] - begin;
    if (count == 0) continue;
    a_ptrs.push_back(static_cast<const char*>(a.w.data) + e * n * k * w_elem);
    b_ptrs.push_back(static_cast<const char*>(a.x) + int64_t{begin} * k * x_elem);
    c_ptrs.push_back(static_cast<char*>(a.y) + int64_t{begin} * n * x_elem);
    trans_a.push_back(CUBLAS_OP_T);
    trans_b.push_back(CUBLAS_OP_N);
    m_array.push_back(static_cast<int>(n));
    n_array.push_back(count);
    k_array.push_back(static_cast<int>(k));
    lda.push_back(static_cast<int>(k));
    ldb.push_back(static_cast<int>(k));
    ldc.push_back(static_cast<int>(n));
    alphas.push_back(alpha);
    betas.push_back(beta);
    group_size.push_back(1);
  }
  const size_t groups = a_ptrs.size();
  pointers.reserve(3 * groups);
  pointers.insert(pointers.end(), a_ptrs.begin(), a_ptrs.end());
  pointers.insert(pointers.end(), b_ptrs.begin(), b_ptrs.end());
  pointers.insert(pointers.end(), c_ptrs.begin(), c_ptrs.end());
  const size_t pointer_bytes = pointers.size() * sizeof(void*);
  if (pointers_.bytes() < pointer_bytes) {
    // Earlier grouped calls on the stream may still read the old array.
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    ASSIGN_OR_RETURN(pointers_, DeviceBuffer::Allocate(pointer_bytes));
  }
  // The copy is ordered after the stream's earlier work (a previous grouped call may still read
  // pointers_); from pageable memory it stages `pointers` before returning.
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(pointers_.data(), pointers.data(), pointer_bytes,
                                       cudaMemcpyHostToDevice, stream_));
  const void* const* device_ptrs = pointers_.as<const void*>();
  CUBLAS_RETURN_IF_ERROR(cublasGemmGroupedBatchedEx(
      handle_, trans_a.data(), trans_b.data(), m_array.data(), n_array.data(), k_array.data(),
      alphas.data(), device_ptrs, type, lda.data(), device_ptrs + groups, type, ldb.data(),
      betas.data(), const_cast<void* const*>(device_ptrs + 2 * groups), type, ldc.data(),
      static_cast<int>(groups), group_size.data(), compute));
  return absl::OkStatus();
}

}  // namespace moeserve::cuda
