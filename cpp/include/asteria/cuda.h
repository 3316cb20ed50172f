#pragma once
// asteria::cuda — the CUDA backend's entry points. Built from cuda/ when ASTERIA_ENABLE_CUDA is
// ON; otherwise cuda/no_cuda.cc provides the same functions, which throw kUnavailable with the fix.

namespace asteria::cuda {

// True when this build contains the CUDA backend.
bool built_with_cuda() noexcept;
// Number of visible CUDA devices. Throws kUnavailable in a build without CUDA.
int device_count();

}  // namespace asteria::cuda
