#pragma once
// Internal helpers of the CUDA backend (not installed, not part of the API): converting CUDA,
// cuBLAS and cuSOLVER status codes to asteria::Error exactly once, and a scoped device switch.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstddef>
#include <sstream>
#include <string>

#include "asteria/errors.h"

namespace asteria::cuda::detail {

inline ErrorCategory category_of(cudaError_t e) noexcept {
  switch (e) {
    case cudaErrorMemoryAllocation: return ErrorCategory::kBudgetExhausted;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidResourceHandle:
    case cudaErrorHostMemoryAlreadyRegistered:
    case cudaErrorHostMemoryNotRegistered: return ErrorCategory::kInvalidArgument;
    default: return ErrorCategory::kUnavailable;
  }
}

inline std::string describe(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// Throws asteria::Error for a failed CUDA runtime call and clears the thread's last-error slot so
// that a later launch check does not report it again.
[[noreturn]] inline void throw_cuda(cudaError_t e, const std::string& where, const char* expr) {
  (void)cudaGetLastError();
  throw Error(category_of(e), "[cuda::" + where + "] " + expr + " failed (" + describe(e) + ")");
}

inline const char* cublas_status_name(cublasStatus_t s) noexcept {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_(other)";
  }
}

inline const char* cusolver_status_name(cusolverStatus_t s) noexcept {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "CUSOLVER_STATUS_(other)";
  }
}

[[noreturn]] inline void throw_library(const char* status, bool alloc_failed, const std::string& where,
                                       const char* expr) {
  (void)cudaGetLastError();
  throw Error(alloc_failed ? ErrorCategory::kBudgetExhausted : ErrorCategory::kInternal,
              "[cuda::" + where + "] " + expr + " failed (" + status + ")");
}

// Sets the calling thread's current device for the scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      (void)cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device_) {
      const cudaError_t e = cudaSetDevice(device_);
      if (e != cudaSuccess) throw_cuda(e, "device", "cudaSetDevice");
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && previous_ != device_) (void)cudaSetDevice(previous_);
  }
  // Not copyable or movable: it restores the device exactly once.
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = -1;
};

}  // namespace asteria::cuda::detail

#define ASTERIA_CUDA_CHECK(expr, where)                                          \
  do {                                                                           \
    const cudaError_t asteria_cuda_e_ = (expr);                                  \
    if (asteria_cuda_e_ != cudaSuccess) ::asteria::cuda::detail::throw_cuda(asteria_cuda_e_, where, #expr); \
  } while (0)

#define ASTERIA_CUBLAS_CHECK(expr, where)                                                                  \
  do {                                                                                                     \
    const cublasStatus_t asteria_cublas_s_ = (expr);                                                       \
    if (asteria_cublas_s_ != CUBLAS_STATUS_SUCCESS)                                                        \
      ::asteria::cuda::detail::throw_library(::asteria::cuda::detail::cublas_status_name(asteria_cublas_s_), \
                                             asteria_cublas_s_ == CUBLAS_STATUS_ALLOC_FAILED, where, #expr);  \
  } while (0)

#define ASTERIA_CUSOLVER_CHECK(expr, where)                                                                    \
  do {                                                                                                         \
    const cusolverStatus_t asteria_cusolver_s_ = (expr);                                                       \
    if (asteria_cusolver_s_ != CUSOLVER_STATUS_SUCCESS)                                                        \
      ::asteria::cuda::detail::throw_library(::asteria::cuda::detail::cusolver_status_name(asteria_cusolver_s_), \
                                             asteria_cusolver_s_ == CUSOLVER_STATUS_ALLOC_FAILED, where, #expr);  \
  } while (0)
