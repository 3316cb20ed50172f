// The CUDA backend (built when ASTERIA_ENABLE_CUDA is ON): device queries, host registration and
// event helpers. The refresh engine lives in refresh_engine.cu.
#include <cuda_runtime.h>

#include <iomanip>
#include <sstream>
#include <string>

#include "asteria/cuda.h"
#include "asteria/errors.h"
#include "cuda_util.h"

namespace asteria::cuda {
namespace {

std::string human_bytes(std::size_t bytes) {
  std::ostringstream os;
  const double b = static_cast<double>(bytes);
  if (b >= 1024.0 * 1024 * 1024) {
    os << std::fixed << std::setprecision(2) << b / (1024.0 * 1024 * 1024) << " GiB";
  } else if (b >= 1024.0 * 1024) {
    os << std::fixed << std::setprecision(2) << b / (1024.0 * 1024) << " MiB";
  } else {
    os << bytes << " B";
  }
  os << " (" << bytes << " bytes)";
  return os.str();
}

int attribute(cudaDeviceAttr attr, int device) {
  int v = 0;
  ASTERIA_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device), "device_info");
  return v;
}

}  // namespace

bool built_with_cuda() noexcept { return true; }

const char* precision_name(Precision p) noexcept { return p == Precision::kFloat32 ? "float32" : "float64"; }

int device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
    (void)cudaGetLastError();
    return 0;
  }
  if (e != cudaSuccess) detail::throw_cuda(e, "device_count", "cudaGetDeviceCount");
  return n;
}

DeviceInfo device_info(int device) {
  const int count = device_count();
  ASTERIA_CHECK(device >= 0 && device < count, kInvalidArgument,
                "[cuda::device_info] device must be in 0.." << count - 1 << ", got " << device
                                                            << (count == 0 ? " (no CUDA device is visible)" : ""));
  cudaDeviceProp prop{};
  ASTERIA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device), "device_info");
  DeviceInfo info;
  info.device = device;
  info.name = prop.name;
  info.total_memory = prop.totalGlobalMem;
  info.major = attribute(cudaDevAttrComputeCapabilityMajor, device);
  info.minor = attribute(cudaDevAttrComputeCapabilityMinor, device);
  info.multiprocessors = attribute(cudaDevAttrMultiProcessorCount, device);
  info.integrated = attribute(cudaDevAttrIntegrated, device) != 0;
  info.pageable_memory_access = attribute(cudaDevAttrPageableMemoryAccess, device) != 0;
  info.pageable_memory_access_uses_host_page_tables =
      attribute(cudaDevAttrPageableMemoryAccessUsesHostPageTables, device) != 0;
  info.concurrent_managed_access = attribute(cudaDevAttrConcurrentManagedAccess, device) != 0;
  info.can_use_host_pointer_for_registered_mem = attribute(cudaDevAttrCanUseHostPointerForRegisteredMem, device) != 0;
  info.host_native_atomic_supported = attribute(cudaDevAttrHostNativeAtomicSupported, device) != 0;
  detail::DeviceGuard guard(device);
  ASTERIA_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&info.stream_priority_least, &info.stream_priority_greatest),
                     "device_info");
  return info;
}

void host_register(void* p, std::size_t bytes) {
  ASTERIA_CHECK(p != nullptr && bytes > 0, kInvalidArgument,
                "[cuda::host_register] needs a non-null pointer and a positive size, got " << p << " and " << bytes
                                                                                           << " bytes");
  const cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterDefault);
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();
  std::ostringstream os;
  os << "[cuda::host_register] cannot page-lock " << human_bytes(bytes) << " at " << p << " ("
     << detail::describe(e) << ")";
  if (e == cudaErrorMemoryAllocation)
    os << "; the driver could not lock that much memory: lower the host budget or raise the memlock limit";
  throw Error(detail::category_of(e), os.str());
}

void host_unregister(void* p) {
  ASTERIA_CHECK(p != nullptr, kInvalidArgument, "[cuda::host_unregister] needs a non-null pointer");
  const cudaError_t e = cudaHostUnregister(p);
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();
  std::ostringstream os;
  os << "[cuda::host_unregister] cannot unregister " << p << " (" << detail::describe(e) << ")";
  throw Error(detail::category_of(e), os.str());
}

void event_synchronize(std::uintptr_t event) {
  ASTERIA_CHECK(event != 0, kInvalidArgument, "[cuda::event_synchronize] the event handle is null");
  ASTERIA_CUDA_CHECK(cudaEventSynchronize(reinterpret_cast<cudaEvent_t>(event)), "event_synchronize");
}

bool event_query(std::uintptr_t event) {
  ASTERIA_CHECK(event != 0, kInvalidArgument, "[cuda::event_query] the event handle is null");
  const cudaError_t e = cudaEventQuery(reinterpret_cast<cudaEvent_t>(event));
  if (e == cudaSuccess) return true;
  if (e == cudaErrorNotReady) return false;
  detail::throw_cuda(e, "event_query", "cudaEventQuery");
}

}  // namespace asteria::cuda
