#include "kernels/cuda/cuda_check.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace moeserve::cuda {
namespace {

// "kernels/cuda/x.cu" rather than the build machine's absolute path.
const char* ShortPath(const char* file) {
  for (const char* root : {"/kernels/", "/model/", "/server/", "/tests/"}) {
    if (const char* p = std::strstr(file, root); p != nullptr) return p + 1;
  }
  return file;
}

std::string Where(const char* file, int line) {
  int device = -1;
  // Reading the current device does not disturb a sticky error's state.
  if (cudaGetDevice(&device) != cudaSuccess) device = -1;
  return absl::StrCat(" on device ", device, " at ", ShortPath(file), ":", line);
}

}  // namespace

bool IsStickyCudaError(cudaError_t error) {
  switch (error) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
      return true;
    default:
      return false;
  }
}

absl::Status CudaErrorStatus(cudaError_t error, const char* statement, const char* file, int line) {
  std::string message = absl::StrCat(statement, " failed: ", cudaGetErrorName(error), " (",
                                     cudaGetErrorString(error), ")", Where(file, line));
  if (IsStickyCudaError(error)) absl::StrAppend(&message, " [sticky: the CUDA context is lost]");
  switch (error) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return absl::UnavailableError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CublasErrorStatus(cublasStatus_t status, const char* statement, const char* file,
                               int line) {
  std::string message = absl::StrCat(statement, " failed: ", cublasGetStatusName(status), " (",
                                     cublasGetStatusString(status), ")", Where(file, line));
  switch (status) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::ResourceExhaustedError(message);
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_INVALID_VALUE:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

bool CudaDeviceAvailable() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

int MultiprocessorCount() {
  static const int count = [] {
    int device = 0, n = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
    }
    return n > 0 ? n : 1;
  }();
  return count;
}

}  // namespace moeserve::cuda
