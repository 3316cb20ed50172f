// The CUDA backend (built when ASTERIA_ENABLE_CUDA is ON).
#include <cuda_runtime.h>

#include <string>

#include "asteria/cuda.h"
#include "asteria/errors.h"

namespace asteria::cuda {

bool built_with_cuda() noexcept { return true; }

int device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) return 0;
  if (e != cudaSuccess)
    throw Error(ErrorCategory::kUnavailable, std::string("[cuda::device_count] ") + cudaGetErrorString(e));
  return n;
}

}  // namespace asteria::cuda
