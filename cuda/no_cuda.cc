// Built when ASTERIA_ENABLE_CUDA is OFF: the same functions and class as the CUDA backend, each
// failing with a clear message.
#include <string>

#include "asteria/cuda.h"
#include "asteria/errors.h"

namespace asteria::cuda {
namespace {

[[noreturn]] void unavailable(const char* what) {
  throw Error(ErrorCategory::kUnavailable,
              std::string("[cuda::") + what +
                  "] asteria was built without CUDA; rebuild with -DASTERIA_ENABLE_CUDA=ON "
                  "(pip install . -Ccmake.define.ASTERIA_ENABLE_CUDA=ON) on a machine with the CUDA toolkit, "
                  "cuSOLVER and cuBLAS");
}

}  // namespace

bool built_with_cuda() noexcept { return false; }
int device_count() { unavailable("device_count"); }
DeviceInfo device_info(int) { unavailable("device_info"); }
void host_register(void*, std::size_t) { unavailable("host_register"); }
void host_unregister(void*) { unavailable("host_unregister"); }
void event_synchronize(std::uintptr_t) { unavailable("event_synchronize"); }
bool event_query(std::uintptr_t) { unavailable("event_query"); }

const char* precision_name(Precision p) noexcept { return p == Precision::kFloat32 ? "float32" : "float64"; }

struct RefreshEngine::Impl {};

RefreshEngine::RefreshEngine(const EngineOptions&) { unavailable("RefreshEngine"); }
RefreshEngine::~RefreshEngine() = default;
JobId RefreshEngine::submit_eigh(const JobTag&, Precision, int, int, const void*, void*, void*, double, bool,
                                 std::uintptr_t) {
  unavailable("RefreshEngine::submit_eigh");
}
JobId RefreshEngine::submit_inverse_root(const JobTag&, Precision, int, int, const void*, void*, double, double,
                                         std::uintptr_t) {
  unavailable("RefreshEngine::submit_inverse_root");
}
JobId RefreshEngine::submit_eigenbasis_refresh(const JobTag&, Precision, int, int, const void*, const void*, void*,
                                               std::int64_t*, bool, std::uintptr_t) {
  unavailable("RefreshEngine::submit_eigenbasis_refresh");
}
std::vector<JobResult> RefreshEngine::poll() { unavailable("RefreshEngine::poll"); }
JobResult RefreshEngine::wait(JobId) { unavailable("RefreshEngine::wait"); }
bool RefreshEngine::is_done(JobId) { unavailable("RefreshEngine::is_done"); }
EngineStats RefreshEngine::stats() { unavailable("RefreshEngine::stats"); }
void RefreshEngine::close() {}
std::uintptr_t RefreshEngine::stream() const noexcept { return 0; }
int RefreshEngine::device() const noexcept { return -1; }
int RefreshEngine::priority() const noexcept { return 0; }
void RefreshEngine::set_test_fp32_failures(int) { unavailable("RefreshEngine::set_test_fp32_failures"); }
long long RefreshEngine::test_fp32_failures_injected() const {
  unavailable("RefreshEngine::test_fp32_failures_injected");
}

}  // namespace asteria::cuda
