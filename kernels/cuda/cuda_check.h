// CUDA and cuBLAS errors as absl::Status, and whether this process can use a GPU at all.
//
// CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(...)) returns from the enclosing function (which returns
// absl::Status or absl::StatusOr) with a status that names the failed statement, the error, the
// current device and file:line, e.g.
//   "cudaMalloc(&data, bytes) failed: cudaErrorMemoryAllocation (out of memory) on device 0 at
//    kernels/cuda/device_buffer.cc:21".
// Out of memory maps to RESOURCE_EXHAUSTED, a missing device or driver to UNAVAILABLE, everything
// else to INTERNAL. A kernel launch is followed by CUDA_RETURN_IF_ERROR(cudaGetLastError()).
// Sticky errors (an illegal address, say) leave the context unusable: IsStickyCudaError tells the
// server to stop serving.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"

namespace moeserve::cuda {

absl::Status CudaErrorStatus(cudaError_t error, const char* statement, const char* file, int line);
absl::Status CublasErrorStatus(cublasStatus_t status, const char* statement, const char* file,
                               int line);

// True for errors after which every later CUDA call of this process fails too.
bool IsStickyCudaError(cudaError_t error);

// Whether a CUDA device can be used: cudaGetDeviceCount succeeds and finds at least one.
bool CudaDeviceAvailable();

// The current device's SM count (read once; 1 if it cannot be read).
int MultiprocessorCount();

}  // namespace moeserve::cuda

#define CUDA_RETURN_IF_ERROR(expr)                                                               \
  do {                                                                                           \
    const cudaError_t _moeserve_cuda_error = (expr);                                             \
    if (_moeserve_cuda_error != cudaSuccess) {                                                   \
      return ::moeserve::cuda::CudaErrorStatus(_moeserve_cuda_error, #expr, __FILE__, __LINE__); \
    }                                                                                            \
  } while (0)

#define CUBLAS_RETURN_IF_ERROR(expr)                                                       \
  do {                                                                                     \
    const cublasStatus_t _moeserve_cublas_status = (expr);                                 \
    if (_moeserve_cublas_status != CUBLAS_STATUS_SUCCESS) {                                \
      return ::moeserve::cuda::CublasErrorStatus(_moeserve_cublas_status, #expr, __FILE__, \
                                                 __LINE__);                                \
    }                                                                                      \
  } while (0)
