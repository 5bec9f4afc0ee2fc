// A floor under thread stack sizes, for the metrics endpoint of a CUDA build.
//
// civetweb (the HTTP server inside prometheus-cpp's Exposer) starts its threads with a fixed
// 100 KiB stack (Debian builds it with USE_STACK_SIZE=102400). glibc takes a thread's static TLS
// out of its stack, and the CUDA libraries this binary links bring about 110 KiB of it (cuBLASLt
// 92 KiB, cuBLAS 12 KiB, cudart 4 KiB), so pthread_create fails with EINVAL and the exposer
// cannot start ("null context when constructing CivetServer"). civetweb has no option for its
// stack size, so this binary interposes pthread_attr_setstacksize (the executable's definition
// wins over libc's for every library's calls) and raises each request to at least kMinStack.
#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <cstddef>

namespace {

constexpr size_t kMinStack = size_t{1} << 20;

using SetStackSize = int (*)(pthread_attr_t*, size_t);

SetStackSize LibcSetStackSize() {
  static const SetStackSize real =
      reinterpret_cast<SetStackSize>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  return real;
}

}  // namespace

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) noexcept {
  const SetStackSize real = LibcSetStackSize();
  return real != nullptr ? real(attr, std::max(size, kMinStack)) : 22;  // EINVAL
}
