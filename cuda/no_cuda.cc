// Built when ASTERIA_ENABLE_CUDA is OFF: the same functions as the CUDA backend, each failing
// with a clear message.
#include "asteria/cuda.h"

#include "asteria/errors.h"

namespace asteria::cuda {

bool built_with_cuda() noexcept { return false; }

int device_count() {
  throw Error(ErrorCategory::kUnavailable,
              "[cuda] asteria was built without CUDA; rebuild with -DASTERIA_ENABLE_CUDA=ON "
              "(pip install . -Ccmake.define.ASTERIA_ENABLE_CUDA=ON) on a machine with the CUDA toolkit");
}

}  // namespace asteria::cuda
