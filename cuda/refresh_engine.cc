// asteria::cuda::RefreshEngine — preconditioner refreshes with cuSOLVER and cuBLAS on one
// low-priority stream (see asteria/cuda.h for the contract).
//
// Layout conventions. Callers hand over row-major (batch, n, n) matrices, exactly like the CPU
// path (asteria::linalg). cuSOLVER and cuBLAS are column-major: the row-major buffer of a matrix M
// is the column-major buffer of Mᵀ. Every step below mirrors what linalg.cc does with LAPACK on
// the same buffers, so the two paths agree up to rounding:
//   eigh        copy A (+ ridge·I) into z and run syevd with uplo = UPPER on the column-major view
//               (the lower triangle of the row-major matrix), eigenvectors come back in the
//               columns of the column-major z, and v_out = zᵀ read row-major (columns reversed for
//               descending order).
//   inverse     X = B·Zᵀ with B = Z·diag(f(λ)), computed column-major into `out` (linalg.cc writes
//               the column-major product into the row-major output the same way).
//   eigenbasis  qc = transpose(q) is Q column-major; lq = Lᵀ·Q with L's row-major buffer read as
//               column-major (Lᵀ, = L for the symmetric statistics callers pass; linalg.cc reads it
//               the same way); e_j = <Q[:, j], lq[:, j]>; π = stable descending rank of e;
//               m = lq[:, π]; geqrf + orgqr turn m into Q_new (column-major), and basis_out =
//               transpose(m) read row-major.
//
// Failure detection never synchronizes: small kernels OR bits into a per-matrix int32 status
// array (input not finite, solver info != 0, output not finite) that is copied with
// cudaMemcpyAsync into pinned host memory owned by the engine and read only after the job's end
// event has been observed complete. A matrix whose input is not finite is replaced by the identity
// before the solver runs, so the solvers only ever see finite data.
//
// The fp64 retry of fp32 eigh/inverse-root jobs is the one exception, and only on the queueing
// thread: after queueing the fp32 pass it waits for an event on the engine stream, reads the
// status, and queues the fp64 redo of each failed matrix (fp32_failures, solve_fp64) before the
// job's end event. cuSOLVER calls cannot be made conditional on device data, so a device-side
// retry would mean solving every matrix in fp64.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "asteria/cuda.h"
#include "asteria/errors.h"
#include "cuda_util.h"
#include "kernels.cuh"

namespace asteria::cuda {
namespace {

using kernels::kBadEigen;
using kernels::kBadInput;
using kernels::kBadOutput;
using kernels::kRetried;
using kernels::kSolverInfo;

// Largest batch of small matrices handled by one batched solver call and one set of scratch.
constexpr int kSmallN = 32;
constexpr std::size_t kAlign = 256;
// cuBLAS workspace (NVIDIA recommends 32 MiB on Hopper, 4 MiB is enough elsewhere).
constexpr std::size_t kBlasWorkspace = std::size_t{32} << 20;

#define ASTERIA_LAUNCHED(expr, where) ASTERIA_CUDA_CHECK(expr, where)

template <typename T>
constexpr cudaDataType cuda_type() {
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_64F;
}

// Byte offsets of the pieces of one job's device scratch (one allocation per job).
struct Layout {
  std::size_t total = 0;
  std::size_t add(std::size_t bytes) {
    const std::size_t off = total;
    total += (std::max<std::size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
    return off;
  }
};

// ----- pinned host memory for the status arrays ------------------------------------------------
// Buffers are recycled by power-of-two size class and only returned to CUDA when the last owner
// (the engine or a job still referenced by a waiter) goes away: cudaFreeHost synchronizes the
// device, so it never runs on the submit/poll path.
class PinnedCache {
 public:
  PinnedCache() = default;
  ~PinnedCache() {
    for (auto& [bytes, list] : free_)
      for (void* p : list) (void)cudaFreeHost(p);
  }
  // Not copyable or movable: it owns the buffers.
  PinnedCache(const PinnedCache&) = delete;
  PinnedCache& operator=(const PinnedCache&) = delete;

  static std::size_t size_class(std::size_t bytes) {
    std::size_t c = 256;
    while (c < bytes) c <<= 1;
    return c;
  }
  void* take(std::size_t bytes) {
    const std::size_t c = size_class(bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& list = free_[c];
      if (!list.empty()) {
        void* p = list.back();
        list.pop_back();
        return p;
      }
    }
    void* p = nullptr;
    ASTERIA_CUDA_CHECK(cudaHostAlloc(&p, c, cudaHostAllocDefault), "RefreshEngine");
    return p;
  }
  void give(void* p, std::size_t bytes) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    free_[size_class(bytes)].push_back(p);
  }

 private:
  std::mutex mu_;
  std::map<std::size_t, std::vector<void*>> free_;
};

// One submitted job: its events and status buffer. Shared between the engine and a thread blocked
// in wait(), so the events outlive that wait whatever poll() does meanwhile.
struct Job {
  JobId id = 0;
  JobTag tag;
  std::string what;  // "eigh float32 n=64 batch=4"
  int batch = 0;
  cudaEvent_t submit_ev = nullptr, start_ev = nullptr, end_ev = nullptr;
  cudaEvent_t wait_ev = nullptr;  // recorded on the caller's wait_stream at submission
  std::shared_ptr<PinnedCache> cache;
  int* host_flags = nullptr;
  std::size_t host_bytes = 0;
  std::vector<unsigned char> host_workspace;       // cuSOLVER host workspace (usually empty)
  std::vector<unsigned char> host_workspace_fp64;  // the same for the fp64 redo of failed fp32 matrices
  // Filled in on the submitting thread, run (once) by the engine's queueing thread.
  std::function<void(Job&)> enqueue;
  bool enqueued = false;      // the queueing thread is done with it (under the engine mutex)
  std::string enqueue_error;  // why queueing the work failed, if it did

  Job() = default;
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;
  ~Job() {
    // Destroying an event whose work is pending is allowed: the resources go when it completes.
    if (submit_ev) (void)cudaEventDestroy(submit_ev);
    if (start_ev) (void)cudaEventDestroy(start_ev);
    if (end_ev) (void)cudaEventDestroy(end_ev);
    if (wait_ev) (void)cudaEventDestroy(wait_ev);
    if (host_flags) cache->give(host_flags, host_bytes);
  }
};

std::string status_reasons(int bits) {
  std::string s;
  auto add = [&](const char* r) {
    if (!s.empty()) s += ", ";
    s += r;
  };
  if (bits & kBadInput) add("input contains NaN or Inf");
  if (bits & kSolverInfo) add("the solver reported info != 0");
  if (bits & kBadEigen) add("the eigendecomposition is not finite");
  if (bits & kBadOutput) add("the result is not finite");
  return s;
}

}  // namespace

// ----- the engine ----------------------------------------------------------------------------
struct RefreshEngine::Impl {
  EngineOptions opts;
  int device = 0;
  int priority = 0;
  cudaStream_t stream = nullptr;  // the engine stream: every job runs here, in submission order
  cudaStream_t clock = nullptr;   // always empty: an event recorded here timestamps a submission
  cudaMemPool_t pool = nullptr;   // the engine's own pool: cached scratch, no release on sync
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  cusolverDnParams_t params = nullptr;
  void* blas_workspace = nullptr;
  // Queueing thread only: recorded after the fp32 pass of an fp32 eigh/inverse-root job and waited
  // for (blocking sync: the thread sleeps) before the status flags are read for the fp64 retry.
  cudaEvent_t pass_ev = nullptr;
  std::shared_ptr<PinnedCache> pinned = std::make_shared<PinnedCache>();
  // The test hook (set_test_fp32_failures): fp32 matrices still to fail, and failed so far.
  std::atomic<int> test_fp32_faults{0};
  std::atomic<long long> test_fp32_injected{0};

  std::mutex mu;  // guards everything below (the handles above belong to the queueing thread)
  std::condition_variable cv;  // pending work for the queueing thread, or a job it finished queueing
  std::deque<std::shared_ptr<Job>> pending;    // submitted, not yet taken by the queueing thread
  std::deque<std::shared_ptr<Job>> in_flight;  // submission order == queueing order == completion order
  std::thread queuer;
  bool stopping = false;
  std::map<JobId, JobResult> done;
  std::set<JobId> waiting;  // ids a thread is blocked on in wait(): poll() leaves them alone
  JobId next_id = 1;
  bool closed = false;
  std::string broken;  // the sticky CUDA error that broke the context, if any
  std::size_t submitted = 0, completed = 0, failed = 0, fp64_retries = 0;
  double total_run = 0, max_run = 0, max_queued = 0;

  void release_resources() noexcept;
  void check_usable(const char* where) const;
  void check_pointer(const void* p, std::size_t align, const char* where, const char* what) const;
  void harvest_locked();
  JobResult make_result(Job& job, cudaError_t status);

  // Submitting thread, under `mu`: the job record, its timestamps and its wait_stream event.
  std::shared_ptr<Job> create_job(const JobTag& tag, std::string what, int batch, std::uintptr_t wait_stream,
                                  const char* where);
  JobId queue(std::shared_ptr<Job> job, std::function<void(Job&)> enqueue);
  // The queueing thread: it runs each job's enqueue function in submission order. cuSOLVER's
  // syevd waits on the host for its own stream while it is being queued, so this happens here and
  // never on the submitting (training) thread.
  void queuer_main();

  // Queueing thread: wait_stream ordering, start event, status array and scratch for one job.
  // The scratch base follows the device status array.
  struct Started {
    Job* job = nullptr;
    unsigned char* scratch = nullptr;
    int* flags = nullptr;
  };
  Started begin(Job& job, std::size_t scratch_bytes, const char* where);
  void finish(Started& s, const char* where);
  void abort(Started& s) noexcept;
  // Queueing thread: `bytes` of device memory from the engine pool, stream-ordered on the engine
  // stream (kBudgetExhausted when the pool cannot grow). The caller frees it with cudaFreeAsync on
  // the engine stream.
  void* alloc_scratch(std::size_t bytes, const char* where);
  // Queueing thread, between begin() and finish() of an fp32 eigh/inverse-root job whose fp32 pass
  // is queued: waits for the engine stream (never another stream), reads the status flags, applies
  // the test hook, and returns the matrices to redo in fp64 (those with finite input and a bit of
  // `retry_mask`; none when opts.fp64_retry is off). Their device flags are reset to kRetried by a
  // copy queued on the engine stream before this returns, so the redo's checks OR fresh bits into
  // them. Without the retry and with the hook disarmed it queues nothing and does not wait.
  std::vector<int> fp32_failures(Started& s, int retry_mask, const char* where);
  bool take_test_fault() noexcept;
};

void RefreshEngine::Impl::release_resources() noexcept {
  if (pass_ev) (void)cudaEventDestroy(pass_ev);
  pass_ev = nullptr;
  if (params) (void)cusolverDnDestroyParams(params);
  if (solver) (void)cusolverDnDestroy(solver);
  if (blas) (void)cublasDestroy(blas);
  if (blas_workspace) (void)cudaFree(blas_workspace);
  if (pool) (void)cudaMemPoolDestroy(pool);
  if (clock) (void)cudaStreamDestroy(clock);
  if (stream) (void)cudaStreamDestroy(stream);
  params = nullptr;
  solver = nullptr;
  blas = nullptr;
  blas_workspace = nullptr;
  pool = nullptr;
  clock = nullptr;
  stream = nullptr;
  (void)cudaGetLastError();
}

void RefreshEngine::Impl::check_usable(const char* where) const {
  ASTERIA_CHECK(!closed, kCancelled, "[cuda::RefreshEngine::" << where << "] the engine is closed");
  ASTERIA_CHECK(broken.empty(), kUnavailable,
                "[cuda::RefreshEngine::" << where << "] the CUDA context of device " << device
                                         << " hit a sticky error (" << broken
                                         << "); no further job can run in this process");
}

void RefreshEngine::Impl::check_pointer(const void* p, std::size_t align, const char* where, const char* what) const {
  ASTERIA_CHECK(p != nullptr, kInvalidArgument, "[cuda::RefreshEngine::" << where << "] " << what << " is null");
  ASTERIA_CHECK(reinterpret_cast<std::uintptr_t>(p) % align == 0, kInvalidArgument,
                "[cuda::RefreshEngine::" << where << "] " << what << " (" << p << ") is not aligned to " << align
                                         << " bytes");
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess) (void)cudaGetLastError();
  const bool device_memory =
      e == cudaSuccess && (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged);
  ASTERIA_CHECK(device_memory, kInvalidArgument,
                "[cuda::RefreshEngine::" << where << "] " << what << " (" << p
                                         << ") is not CUDA device memory; pass a CUDA tensor on device " << device);
  ASTERIA_CHECK(attr.type == cudaMemoryTypeManaged || attr.device == device, kInvalidArgument,
                "[cuda::RefreshEngine::" << where << "] " << what << " lives on device " << attr.device
                                         << " but the engine works on device " << device);
}

std::shared_ptr<Job> RefreshEngine::Impl::create_job(const JobTag& tag, std::string what, int batch,
                                                     std::uintptr_t wait_stream, const char* where) {
  auto job = std::make_shared<Job>();
  job->id = next_id;
  job->tag = tag;
  job->what = std::move(what);
  job->batch = batch;
  job->cache = pinned;
  ASTERIA_CUDA_CHECK(cudaEventCreateWithFlags(&job->submit_ev, cudaEventDefault), where);
  ASTERIA_CUDA_CHECK(cudaEventCreateWithFlags(&job->start_ev, cudaEventDefault), where);
  // Blocking sync: a thread in wait() sleeps instead of spinning a core.
  ASTERIA_CUDA_CHECK(cudaEventCreateWithFlags(&job->end_ev, cudaEventBlockingSync), where);
  ASTERIA_CUDA_CHECK(cudaEventRecord(job->submit_ev, clock), where);
  if (wait_stream != kNoStream) {
    // Recorded now, on the caller's thread: the job waits for exactly the work queued so far.
    ASTERIA_CUDA_CHECK(cudaEventCreateWithFlags(&job->wait_ev, cudaEventDisableTiming), where);
    const cudaError_t e = cudaEventRecord(job->wait_ev, reinterpret_cast<cudaStream_t>(wait_stream));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      ASTERIA_CHECK(false, kInvalidArgument,
                    "[cuda::RefreshEngine::" << where << "] cannot record an event on wait_stream 0x" << std::hex
                                             << wait_stream << std::dec << " (" << detail::describe(e)
                                             << "); it must be a live stream of device " << device);
    }
  }
  return job;
}

JobId RefreshEngine::Impl::queue(std::shared_ptr<Job> job, std::function<void(Job&)> enqueue) {
  job->enqueue = std::move(enqueue);
  pending.push_back(job);
  in_flight.push_back(job);
  ++next_id;
  ++submitted;
  cv.notify_all();
  return job->id;
}

void RefreshEngine::Impl::queuer_main() {
  bool device_set = cudaSetDevice(device) == cudaSuccess;
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return stopping || !pending.empty(); });
      if (pending.empty()) return;  // stopping, and everything submitted has been queued
      job = pending.front();
      pending.pop_front();
    }
    std::string error;
    try {
      if (!device_set) device_set = cudaSetDevice(device) == cudaSuccess;
      ASTERIA_CHECK(device_set, kUnavailable, "[cuda::RefreshEngine] cannot make device " << device << " current");
      job->enqueue(*job);
    } catch (const std::exception& e) {
      error = e.what();
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      job->enqueue = nullptr;
      job->enqueue_error = std::move(error);
      job->enqueued = true;
    }
    cv.notify_all();
  }
}

RefreshEngine::Impl::Started RefreshEngine::Impl::begin(Job& job, std::size_t scratch_bytes, const char* where) {
  Started s;
  s.job = &job;
  try {
    if (job.wait_ev) ASTERIA_CUDA_CHECK(cudaStreamWaitEvent(stream, job.wait_ev, 0), where);
    ASTERIA_CUDA_CHECK(cudaEventRecord(job.start_ev, stream), where);
    job.host_bytes = static_cast<std::size_t>(job.batch) * sizeof(int);
    job.host_flags = static_cast<int*>(pinned->take(job.host_bytes));
    Layout layout;
    layout.add(job.host_bytes);  // the device status array comes first
    const std::size_t total = layout.total + scratch_bytes;
    s.scratch = static_cast<unsigned char*>(alloc_scratch(total, where));
    s.flags = reinterpret_cast<int*>(s.scratch);
    ASTERIA_CUDA_CHECK(cudaMemsetAsync(s.flags, 0, job.host_bytes, stream), where);
    s.scratch += layout.total;
  } catch (...) {
    abort(s);
    throw;
  }
  return s;
}

void* RefreshEngine::Impl::alloc_scratch(std::size_t bytes, const char* /*where*/) {
  void* p = nullptr;
  const cudaError_t e = cudaMallocFromPoolAsync(&p, bytes, pool, stream);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    ASTERIA_CHECK(false, kBudgetExhausted,
                  "cannot allocate " << bytes << " bytes of scratch on device " << device << " ("
                                     << detail::describe(e) << "); free device memory or refresh smaller blocks");
  }
  return p;
}

bool RefreshEngine::Impl::take_test_fault() noexcept {
  int left = test_fp32_faults.load(std::memory_order_relaxed);
  while (left > 0 && !test_fp32_faults.compare_exchange_weak(left, left - 1, std::memory_order_relaxed)) {
  }
  if (left <= 0) return false;
  test_fp32_injected.fetch_add(1, std::memory_order_relaxed);
  return true;
}

std::vector<int> RefreshEngine::Impl::fp32_failures(Started& s, int retry_mask, const char* where) {
  std::vector<int> redo;
  const bool retry = opts.fp64_retry;
  if (!retry && test_fp32_faults.load(std::memory_order_relaxed) <= 0) return redo;
  Job& job = *s.job;
  int* bits = job.host_flags;  // pinned; finish() copies the final flags over it later, in stream order
  ASTERIA_CUDA_CHECK(cudaMemcpyAsync(bits, s.flags, job.host_bytes, cudaMemcpyDeviceToHost, stream), where);
  ASTERIA_CUDA_CHECK(cudaEventRecord(pass_ev, stream), where);
  // Blocks this (queueing) thread until the engine stream has run the fp32 pass; other streams,
  // the caller's included, go on.
  ASTERIA_CUDA_CHECK(cudaEventSynchronize(pass_ev), where);
  bool changed = false;
  for (int b = 0; b < job.batch; ++b) {
    // The hook fails a matrix whose fp32 solve ran on finite input and reported info == 0, as
    // linalg's hook fails a syevd that succeeded.
    if (!(bits[b] & (kBadInput | kSolverInfo)) && take_test_fault()) {
      bits[b] |= kSolverInfo;
      changed = true;
    }
    if (retry && !(bits[b] & kBadInput) && (bits[b] & retry_mask)) {
      bits[b] = kRetried;
      redo.push_back(b);
      changed = true;
    }
  }
  // Stream-ordered before every kernel of the redo (and before finish()'s copy back into `bits`).
  if (changed)
    ASTERIA_CUDA_CHECK(cudaMemcpyAsync(s.flags, bits, job.host_bytes, cudaMemcpyHostToDevice, stream), where);
  return redo;
}

void RefreshEngine::Impl::finish(Started& s, const char* where) {
  Job& job = *s.job;
  ASTERIA_CUDA_CHECK(cudaMemcpyAsync(job.host_flags, s.flags, job.host_bytes, cudaMemcpyDeviceToHost, stream), where);
  void* base = s.flags;
  s.flags = nullptr;
  s.scratch = nullptr;
  ASTERIA_CUDA_CHECK(cudaFreeAsync(base, stream), where);
  ASTERIA_CUDA_CHECK(cudaEventRecord(job.end_ev, stream), where);
}

void RefreshEngine::Impl::abort(Started& s) noexcept {
  // Work already queued stays queued and finishes harmlessly; only the scratch must go back
  // (stream-ordered, after that work). The job's events and status buffer go with the Job. A
  // sticky error, if that is what failed, shows up at the next completion check.
  if (s.flags) (void)cudaFreeAsync(s.flags, stream);
  s.flags = nullptr;
  s.scratch = nullptr;
  (void)cudaGetLastError();
}

JobResult RefreshEngine::Impl::make_result(Job& job, cudaError_t status) {
  JobResult r;
  r.id = job.id;
  r.block_id = job.tag.block_id;
  r.version = job.tag.version;
  r.deadline = job.tag.deadline;
  std::ostringstream head;
  head << "[cuda::RefreshEngine] block " << job.tag.block_id << " version " << job.tag.version << " (deadline "
       << job.tag.deadline << "): " << job.what;
  if (!job.enqueue_error.empty()) {
    r.ok = false;
    for (int b = 0; b < job.batch; ++b) r.failed.push_back(b);
    r.message = head.str() + " could not be queued: " + job.enqueue_error;
    return r;
  }
  if (status != cudaSuccess) {
    if (broken.empty()) broken = detail::describe(status);
    r.ok = false;
    for (int b = 0; b < job.batch; ++b) r.failed.push_back(b);
    r.message = head.str() + " failed: the CUDA context reported " + detail::describe(status) +
                "; the engine cannot run further jobs in this process";
    return r;
  }
  float ms = 0;
  if (cudaEventElapsedTime(&ms, job.submit_ev, job.start_ev) == cudaSuccess) r.queued_seconds = ms / 1e3;
  if (cudaEventElapsedTime(&ms, job.start_ev, job.end_ev) == cudaSuccess) r.run_seconds = ms / 1e3;
  (void)cudaGetLastError();
  std::ostringstream details;
  int shown = 0;
  for (int b = 0; b < job.batch; ++b) {
    const int bits = job.host_flags[b];
    if (bits & kRetried) r.retried.push_back(b);
    const int bad = bits & ~kRetried;
    if (bad == 0) continue;
    r.failed.push_back(b);
    if (shown < 8)
      details << (shown ? "; " : "") << "matrix " << b << ": " << status_reasons(bad)
              << ((bits & kRetried) ? " (fp32 failed, fp64 retry included)" : "");
    ++shown;
  }
  if (!r.failed.empty()) {
    r.ok = false;
    if (shown > 8) details << "; ... (" << shown - 8 << " more)";
    r.message = head.str() + " failed for " + std::to_string(r.failed.size()) + " of " + std::to_string(job.batch) +
                " matrices (" + details.str() + "); the previous result is kept";
  }
  return r;
}

void RefreshEngine::Impl::harvest_locked() {
  while (!in_flight.empty()) {
    const std::shared_ptr<Job> job = in_flight.front();
    if (!job->enqueued) break;  // the queueing thread has not reached it yet
    const cudaError_t e = job->enqueue_error.empty() ? cudaEventQuery(job->end_ev) : cudaSuccess;
    if (e == cudaErrorNotReady) break;
    if (e != cudaSuccess) (void)cudaGetLastError();
    JobResult r = make_result(*job, e);
    in_flight.pop_front();
    ++completed;
    if (!r.ok) ++failed;
    fp64_retries += r.retried.size();
    total_run += r.run_seconds;
    max_run = std::max(max_run, r.run_seconds);
    max_queued = std::max(max_queued, r.queued_seconds);
    done.emplace(r.id, std::move(r));
  }
}

RefreshEngine::RefreshEngine(const EngineOptions& opts) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.opts = opts;
  m.device = opts.device;
  const int count = device_count();
  ASTERIA_CHECK(count > 0, kUnavailable, "[cuda::RefreshEngine] no CUDA device is visible");
  ASTERIA_CHECK(opts.device >= 0 && opts.device < count, kInvalidArgument,
                "[cuda::RefreshEngine] device must be in 0.." << count - 1 << ", got " << opts.device);
  detail::DeviceGuard guard(m.device);
  try {
    int pools = 0;
    ASTERIA_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, m.device), "RefreshEngine");
    ASTERIA_CHECK(pools != 0, kUnavailable,
                  "[cuda::RefreshEngine] device " << m.device << " does not support stream-ordered memory pools");
    int least = 0, greatest = 0;
    ASTERIA_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest), "RefreshEngine");
    m.priority = opts.priority_low ? least : greatest;
    ASTERIA_CUDA_CHECK(cudaStreamCreateWithPriority(&m.stream, cudaStreamNonBlocking, m.priority), "RefreshEngine");
    ASTERIA_CUDA_CHECK(cudaStreamCreateWithPriority(&m.clock, cudaStreamNonBlocking, greatest), "RefreshEngine");
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = m.device;
    ASTERIA_CUDA_CHECK(cudaMemPoolCreate(&m.pool, &props), "RefreshEngine");
    std::uint64_t keep = std::numeric_limits<std::uint64_t>::max();
    ASTERIA_CUDA_CHECK(cudaMemPoolSetAttribute(m.pool, cudaMemPoolAttrReleaseThreshold, &keep), "RefreshEngine");
    ASTERIA_CUBLAS_CHECK(cublasCreate(&m.blas), "RefreshEngine");
    ASTERIA_CUBLAS_CHECK(cublasSetStream(m.blas, m.stream), "RefreshEngine");
    ASTERIA_CUDA_CHECK(cudaMalloc(&m.blas_workspace, kBlasWorkspace), "RefreshEngine");
    ASTERIA_CUBLAS_CHECK(cublasSetWorkspace(m.blas, m.blas_workspace, kBlasWorkspace), "RefreshEngine");
    // Full fp32/fp64 arithmetic (no TF32), like the CPU path.
    ASTERIA_CUBLAS_CHECK(cublasSetMathMode(m.blas, CUBLAS_DEFAULT_MATH), "RefreshEngine");
    ASTERIA_CUSOLVER_CHECK(cusolverDnCreate(&m.solver), "RefreshEngine");
    ASTERIA_CUSOLVER_CHECK(cusolverDnSetStream(m.solver, m.stream), "RefreshEngine");
    ASTERIA_CUSOLVER_CHECK(cusolverDnCreateParams(&m.params), "RefreshEngine");
    ASTERIA_CUDA_CHECK(cudaEventCreateWithFlags(&m.pass_ev, cudaEventBlockingSync | cudaEventDisableTiming),
                       "RefreshEngine");
    m.queuer = std::thread([&m] { m.queuer_main(); });
  } catch (...) {
    m.release_resources();
    throw;
  }
}

RefreshEngine::~RefreshEngine() {
  try {
    close();
  } catch (...) {
  }
}

std::uintptr_t RefreshEngine::stream() const noexcept { return reinterpret_cast<std::uintptr_t>(impl_->stream); }
int RefreshEngine::device() const noexcept { return impl_->device; }
int RefreshEngine::priority() const noexcept { return impl_->priority; }

void RefreshEngine::set_test_fp32_failures(int count) {
  ASTERIA_CHECK(count >= 0, kInvalidArgument,
                "[cuda::RefreshEngine::set_test_fp32_failures] count must be >= 0, got " << count);
  impl_->test_fp32_faults.store(count);
}

long long RefreshEngine::test_fp32_failures_injected() const { return impl_->test_fp32_injected.load(); }

void RefreshEngine::close() {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (m.closed) return;
    m.closed = true;  // no new submissions from here on
    m.stopping = true;
  }
  m.cv.notify_all();
  if (m.queuer.joinable()) m.queuer.join();  // it queues what was already submitted, then exits
  std::lock_guard<std::mutex> lock(m.mu);
  detail::DeviceGuard guard(m.device);
  // A healthy stream drains; on a context with a sticky error this returns that error at once.
  const cudaError_t e = cudaStreamSynchronize(m.stream);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    if (m.broken.empty()) m.broken = detail::describe(e);
  }
  m.harvest_locked();  // every job is complete (or failed with the context error) now
  m.release_resources();
}

// ----- submission ------------------------------------------------------------------------------
namespace {

void check_sizes(int batch, int n, const char* where) {
  ASTERIA_CHECK(n >= 1 && n <= 65536, kInvalidArgument,
                "[cuda::RefreshEngine::" << where << "] matrix size must be in 1..65536, got " << n);
  ASTERIA_CHECK(batch >= 1 && batch <= (1 << 24), kInvalidArgument,
                "[cuda::RefreshEngine::" << where << "] batch must be in 1..16777216, got " << batch);
}

std::string describe_job(const char* kind, Precision p, int batch, int n) {
  std::ostringstream os;
  os << kind << " " << precision_name(p) << " n=" << n << " batch=" << batch;
  return os.str();
}

// ----- the fp64 redo of failed fp32 matrices ----------------------------------------------------
// Device scratch of the redo: one fp64 matrix at a time (zd, wd, info, workspace), reused for each
// redone matrix in stream order. It comes from the engine pool and goes back with cudaFreeAsync on
// the engine stream, after the work queued on it: by release() normally, by the destructor when
// an exception unwinds before (the job's own scratch then goes in abort()).
struct RedoScratch {
  cudaStream_t stream = nullptr;
  unsigned char* base = nullptr;
  double* z = nullptr;
  double* w = nullptr;
  int* info = nullptr;
  void* ws = nullptr;
  std::size_t dws = 0;
  void* hw = nullptr;
  std::size_t hws = 0;

  RedoScratch() = default;
  RedoScratch(const RedoScratch&) = delete;
  RedoScratch& operator=(const RedoScratch&) = delete;
  ~RedoScratch() {
    if (base) (void)cudaFreeAsync(base, stream);
  }
  void release(const char* where) {
    void* p = base;
    base = nullptr;
    ASTERIA_CUDA_CHECK(cudaFreeAsync(p, stream), where);
  }
};

// Sizes and allocates the redo scratch for n×n matrices. `any_a`/`any_w` are device pointers of
// the job, only there because the size query wants non-null pointers (it reads neither).
template <typename Engine>
void open_redo(Engine& m, Job& job, int n, const void* any_a, const void* any_w, RedoScratch& r, const char* where) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR,
                                                     CUBLAS_FILL_MODE_UPPER, n, CUDA_R_64F, any_a, n, CUDA_R_64F,
                                                     any_w, CUDA_R_64F, &r.dws, &r.hws),
                         where);
  Layout L;
  const std::size_t z_off = L.add(nn * sizeof(double));
  const std::size_t w_off = L.add(static_cast<std::size_t>(n) * sizeof(double));
  const std::size_t info_off = L.add(sizeof(int));
  const std::size_t ws_off = L.add(r.dws);
  r.stream = m.stream;
  r.base = static_cast<unsigned char*>(m.alloc_scratch(L.total, where));
  r.z = reinterpret_cast<double*>(r.base + z_off);
  r.w = reinterpret_cast<double*>(r.base + w_off);
  r.info = reinterpret_cast<int*>(r.base + info_off);
  r.ws = r.base + ws_off;
  job.host_workspace_fp64.resize(r.hws);
  r.hw = r.hws ? job.host_workspace_fp64.data() : nullptr;
}

// The fp64 redo of one matrix `a` (row-major fp32, finite) of an fp32 job, as linalg's retry does
// it: zd = double(A) + ridge·I (the ridge in double), fp64 syevd (per matrix, whatever the job's
// solver), its info folded into *flag (kSolverInfo), then the results rounded to fp32 into z
// (column-major eigenvectors) and w (ascending eigenvalues), the fp32 pass's scratch, for the same
// post-processing as the fp32 pass.
template <typename Engine>
void solve_fp64(Engine& m, RedoScratch& r, int n, const float* a, double ridge, float* z, float* w, int* flag,
                const char* where) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  ASTERIA_LAUNCHED(kernels::widen(a, r.z, n, ridge, ridge != 0.0, m.stream), where);
  ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevd(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                          CUDA_R_64F, r.z, n, CUDA_R_64F, r.w, CUDA_R_64F, r.ws, r.dws, r.hw, r.hws,
                                          r.info),
                         where);
  ASTERIA_LAUNCHED(kernels::fold_info(flag, r.info, 1, 1, m.stream), where);
  ASTERIA_LAUNCHED(kernels::narrow(r.z, z, nn, m.stream), where);
  ASTERIA_LAUNCHED(kernels::narrow(r.w, w, static_cast<std::size_t>(n), m.stream), where);
}

template <typename T, typename Engine>
void eigh_job(Engine& m, Job& job, int batch, int n, const T* a, T* w_out, T* v_out,
               double ridge, bool descending) {
  const char* where = "submit_eigh";
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  const bool batched = n <= kSmallN && batch > 1;
  const int g = batched ? batch : 1;
  const cudaDataType dt = cuda_type<T>();
  std::size_t dws = 0, hws = 0;
  if (batched) {
    ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR,
                                                             CUBLAS_FILL_MODE_UPPER, n, dt, a, n, dt, w_out, dt, &dws,
                                                             &hws, g),
                           where);
  } else {
    ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR,
                                                       CUBLAS_FILL_MODE_UPPER, n, dt, a, n, dt, w_out, dt, &dws, &hws),
                           where);
  }
  Layout L;
  const std::size_t z_off = L.add(g * nn * sizeof(T));
  const std::size_t w_off = L.add(static_cast<std::size_t>(g) * n * sizeof(T));
  const std::size_t info_off = L.add(static_cast<std::size_t>(g) * sizeof(int));
  const std::size_t ws_off = L.add(dws);
  auto s = m.begin(job, L.total, where);
  try {
    T* z = reinterpret_cast<T*>(s.scratch + z_off);
    T* w = reinterpret_cast<T*>(s.scratch + w_off);
    int* info = reinterpret_cast<int*>(s.scratch + info_off);
    void* ws = s.scratch + ws_off;
    s.job->host_workspace.resize(hws);
    void* hw = hws ? s.job->host_workspace.data() : nullptr;
    ASTERIA_LAUNCHED(kernels::check_finite(a, nn, batch, s.flags, kBadInput, m.stream), where);
    for (int g0 = 0; g0 < batch; g0 += g) {
      const int cnt = std::min(g, batch - g0);
      ASTERIA_LAUNCHED(kernels::prepare<T>(a + g0 * nn, z, n, cnt, s.flags + g0, static_cast<T>(ridge), ridge != 0.0,
                                           m.stream),
                       where);
      if (batched) {
        ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevBatched(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR,
                                                      CUBLAS_FILL_MODE_UPPER, n, dt, z, n, dt, w, dt, ws, dws, hw, hws,
                                                      info, cnt),
                               where);
      } else {
        ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevd(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                                dt, z, n, dt, w, dt, ws, dws, hw, hws, info),
                               where);
      }
      ASTERIA_LAUNCHED(kernels::fold_info(s.flags + g0, info, 1, cnt, m.stream), where);
      ASTERIA_LAUNCHED(kernels::transpose<T>(z, v_out + g0 * nn, n, cnt, descending, m.stream), where);
      ASTERIA_LAUNCHED(
          kernels::eigvals<T>(w, w_out + static_cast<std::size_t>(g0) * n, n, cnt, descending, m.stream), where);
    }
    ASTERIA_LAUNCHED(
        kernels::check_finite<T>(w_out, static_cast<std::size_t>(n), batch, s.flags, kBadOutput, m.stream), where);
    ASTERIA_LAUNCHED(kernels::check_finite<T>(v_out, nn, batch, s.flags, kBadOutput, m.stream), where);
    if constexpr (std::is_same_v<T, float>) {
      // The fp64 retry: a matrix whose decomposition failed (info != 0) or is not finite, from
      // finite input, is redone in fp64 and rounded back; the same ordering as the fp32 pass.
      const std::vector<int> redo = m.fp32_failures(s, kSolverInfo | kBadOutput, where);
      if (!redo.empty()) {
        RedoScratch r;
        open_redo(m, *s.job, n, a, w_out, r, where);
        for (const int b : redo) {
          int* flag = s.flags + b;
          float* wb = w_out + static_cast<std::size_t>(b) * n;
          float* vb = v_out + static_cast<std::size_t>(b) * nn;
          solve_fp64(m, r, n, a + static_cast<std::size_t>(b) * nn, ridge, z, w, flag, where);
          ASTERIA_LAUNCHED(kernels::transpose<float>(z, vb, n, 1, descending, m.stream), where);
          ASTERIA_LAUNCHED(kernels::eigvals<float>(w, wb, n, 1, descending, m.stream), where);
          ASTERIA_LAUNCHED(
              kernels::check_finite<float>(wb, static_cast<std::size_t>(n), 1, flag, kBadOutput, m.stream), where);
          ASTERIA_LAUNCHED(kernels::check_finite<float>(vb, nn, 1, flag, kBadOutput, m.stream), where);
        }
        r.release(where);
      }
    }
    m.finish(s, where);
  } catch (...) {
    m.abort(s);
    throw;
  }
}

template <typename T>
void gemm_strided(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int n, const T* a, const T* b, T* c,
                  int count, const char* where) {
  const T one = 1, zero = 0;
  const long long stride = static_cast<long long>(n) * n;
  if constexpr (std::is_same_v<T, float>) {
    ASTERIA_CUBLAS_CHECK(
        cublasSgemmStridedBatched(h, ta, tb, n, n, n, &one, a, n, stride, b, n, stride, &zero, c, n, stride, count),
        where);
  } else {
    ASTERIA_CUBLAS_CHECK(
        cublasDgemmStridedBatched(h, ta, tb, n, n, n, &one, a, n, stride, b, n, stride, &zero, c, n, stride, count),
        where);
  }
}

template <typename T, typename Engine>
void inverse_root_job(Engine& m, Job& job, int batch, int n, const T* a, T* out, double root,
                       double epsilon) {
  const char* where = "submit_inverse_root";
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  const bool batched = n <= kSmallN && batch > 1;
  const int g = batched ? batch : 1;
  const cudaDataType dt = cuda_type<T>();
  std::size_t dws = 0, hws = 0;
  if (batched) {
    ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR,
                                                             CUBLAS_FILL_MODE_UPPER, n, dt, a, n, dt, out, dt, &dws,
                                                             &hws, g),
                           where);
  } else {
    ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR,
                                                       CUBLAS_FILL_MODE_UPPER, n, dt, a, n, dt, out, dt, &dws, &hws),
                           where);
  }
  Layout L;
  const std::size_t z_off = L.add(g * nn * sizeof(T));
  const std::size_t b_off = L.add(g * nn * sizeof(T));
  const std::size_t w_off = L.add(static_cast<std::size_t>(g) * n * sizeof(T));
  const std::size_t info_off = L.add(static_cast<std::size_t>(g) * sizeof(int));
  const std::size_t ws_off = L.add(dws);
  auto s = m.begin(job, L.total, where);
  try {
    T* z = reinterpret_cast<T*>(s.scratch + z_off);
    T* bm = reinterpret_cast<T*>(s.scratch + b_off);
    T* w = reinterpret_cast<T*>(s.scratch + w_off);
    int* info = reinterpret_cast<int*>(s.scratch + info_off);
    void* ws = s.scratch + ws_off;
    s.job->host_workspace.resize(hws);
    void* hw = hws ? s.job->host_workspace.data() : nullptr;
    ASTERIA_LAUNCHED(kernels::check_finite(a, nn, batch, s.flags, kBadInput, m.stream), where);
    for (int g0 = 0; g0 < batch; g0 += g) {
      const int cnt = std::min(g, batch - g0);
      ASTERIA_LAUNCHED(kernels::prepare<T>(a + g0 * nn, z, n, cnt, s.flags + g0, static_cast<T>(epsilon),
                                           epsilon != 0.0, m.stream),
                       where);
      if (batched) {
        ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevBatched(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR,
                                                      CUBLAS_FILL_MODE_UPPER, n, dt, z, n, dt, w, dt, ws, dws, hw, hws,
                                                      info, cnt),
                               where);
      } else {
        ASTERIA_CUSOLVER_CHECK(cusolverDnXsyevd(m.solver, m.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                                dt, z, n, dt, w, dt, ws, dws, hw, hws, info),
                               where);
      }
      ASTERIA_LAUNCHED(kernels::fold_info(s.flags + g0, info, 1, cnt, m.stream), where);
      // linalg's eigh_colmajor checks the decomposition before the root is formed from it (and
      // retries an fp32 one that is not finite); a root that overflows is a failure, no retry.
      ASTERIA_LAUNCHED(
          kernels::check_finite<T>(w, static_cast<std::size_t>(n), cnt, s.flags + g0, kBadEigen, m.stream), where);
      ASTERIA_LAUNCHED(kernels::check_finite<T>(z, nn, cnt, s.flags + g0, kBadEigen, m.stream), where);
      ASTERIA_LAUNCHED(kernels::root_factors<T>(w, n, cnt, epsilon, -1.0 / root, m.stream), where);
      ASTERIA_LAUNCHED(kernels::scale_columns<T>(z, w, bm, n, cnt, m.stream), where);
      // X = B·Zᵀ, column-major, written into the row-major output like linalg::inverse_root.
      gemm_strided<T>(m.blas, CUBLAS_OP_N, CUBLAS_OP_T, n, bm, z, out + g0 * nn, cnt, where);
    }
    ASTERIA_LAUNCHED(kernels::check_finite<T>(out, nn, batch, s.flags, kBadOutput, m.stream), where);
    if constexpr (std::is_same_v<T, float>) {
      // The fp64 retry of a failed fp32 decomposition (info != 0 or not finite, finite input):
      // redone in fp64 and rounded back, then the fp32 pass's stabilisation and X = B·Zᵀ on it.
      const std::vector<int> redo = m.fp32_failures(s, kSolverInfo | kBadEigen, where);
      if (!redo.empty()) {
        RedoScratch r;
        open_redo(m, *s.job, n, a, out, r, where);
        for (const int b : redo) {
          int* flag = s.flags + b;
          float* xb = out + static_cast<std::size_t>(b) * nn;
          solve_fp64(m, r, n, a + static_cast<std::size_t>(b) * nn, epsilon, z, w, flag, where);
          ASTERIA_LAUNCHED(
              kernels::check_finite<float>(w, static_cast<std::size_t>(n), 1, flag, kBadEigen, m.stream), where);
          ASTERIA_LAUNCHED(kernels::check_finite<float>(z, nn, 1, flag, kBadEigen, m.stream), where);
          ASTERIA_LAUNCHED(kernels::root_factors<float>(w, n, 1, epsilon, -1.0 / root, m.stream), where);
          ASTERIA_LAUNCHED(kernels::scale_columns<float>(z, w, bm, n, 1, m.stream), where);
          gemm_strided<float>(m.blas, CUBLAS_OP_N, CUBLAS_OP_T, n, bm, z, xb, 1, where);
          ASTERIA_LAUNCHED(kernels::check_finite<float>(xb, nn, 1, flag, kBadOutput, m.stream), where);
        }
        r.release(where);
      }
    }
    m.finish(s, where);
  } catch (...) {
    m.abort(s);
    throw;
  }
}

template <typename T>
void qr_buffer_sizes(cusolverDnHandle_t h, int n, T* a, T* tau, int* lwork, const char* where) {
  int lg = 0, lo = 0;
  if constexpr (std::is_same_v<T, float>) {
    ASTERIA_CUSOLVER_CHECK(cusolverDnSgeqrf_bufferSize(h, n, n, a, n, &lg), where);
    ASTERIA_CUSOLVER_CHECK(cusolverDnSorgqr_bufferSize(h, n, n, n, a, n, tau, &lo), where);
  } else {
    ASTERIA_CUSOLVER_CHECK(cusolverDnDgeqrf_bufferSize(h, n, n, a, n, &lg), where);
    ASTERIA_CUSOLVER_CHECK(cusolverDnDorgqr_bufferSize(h, n, n, n, a, n, tau, &lo), where);
  }
  *lwork = std::max({1, lg, lo});
}

template <typename T>
void qr_q(cusolverDnHandle_t h, int n, T* a, T* tau, T* work, int lwork, int* info, const char* where) {
  if constexpr (std::is_same_v<T, float>) {
    ASTERIA_CUSOLVER_CHECK(cusolverDnSgeqrf(h, n, n, a, n, tau, work, lwork, info), where);
    ASTERIA_CUSOLVER_CHECK(cusolverDnSorgqr(h, n, n, n, a, n, tau, work, lwork, info + 1), where);
  } else {
    ASTERIA_CUSOLVER_CHECK(cusolverDnDgeqrf(h, n, n, a, n, tau, work, lwork, info), where);
    ASTERIA_CUSOLVER_CHECK(cusolverDnDorgqr(h, n, n, n, a, n, tau, work, lwork, info + 1), where);
  }
}

template <typename T, typename Engine>
void eigenbasis_job(Engine& m, Job& job, int batch, int n, const T* l, const T* q, T* basis_out,
                     std::int64_t* perm_out, bool sort) {
  const char* where = "submit_eigenbasis_refresh";
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  const int g = n <= kSmallN ? batch : 1;
  int lwork = 1;
  qr_buffer_sizes<T>(m.solver, n, basis_out, basis_out, &lwork, where);
  Layout L;
  const std::size_t qc_off = L.add(g * nn * sizeof(T));
  const std::size_t lq_off = L.add(g * nn * sizeof(T));
  const std::size_t e_off = L.add(static_cast<std::size_t>(g) * n * sizeof(T));
  const std::size_t tau_off = L.add(static_cast<std::size_t>(g) * n * sizeof(T));
  const std::size_t info_off = L.add(static_cast<std::size_t>(g) * 2 * sizeof(int));
  const std::size_t ws_off = L.add(static_cast<std::size_t>(lwork) * sizeof(T));
  auto s = m.begin(job, L.total, where);
  try {
    T* qc = reinterpret_cast<T*>(s.scratch + qc_off);  // Q column-major, then M = (L·Q)[:, π]
    T* lq = reinterpret_cast<T*>(s.scratch + lq_off);
    T* e = reinterpret_cast<T*>(s.scratch + e_off);
    T* tau = reinterpret_cast<T*>(s.scratch + tau_off);
    int* info = reinterpret_cast<int*>(s.scratch + info_off);
    T* work = reinterpret_cast<T*>(s.scratch + ws_off);
    ASTERIA_LAUNCHED(kernels::check_finite(l, nn, batch, s.flags, kBadInput, m.stream), where);
    ASTERIA_LAUNCHED(kernels::check_finite(q, nn, batch, s.flags, kBadInput, m.stream), where);
    for (int g0 = 0; g0 < batch; g0 += g) {
      const int cnt = std::min(g, batch - g0);
      std::int64_t* perm = perm_out + static_cast<std::size_t>(g0) * n;
      ASTERIA_LAUNCHED(kernels::transpose<T>(q + g0 * nn, qc, n, cnt, false, m.stream), where);
      gemm_strided<T>(m.blas, CUBLAS_OP_N, CUBLAS_OP_N, n, l + g0 * nn, qc, lq, cnt, where);
      if (sort) {
        ASTERIA_LAUNCHED(kernels::rayleigh<T>(qc, lq, e, n, cnt, m.stream), where);
        ASTERIA_LAUNCHED(kernels::rank_descending<T>(e, perm, n, cnt, m.stream), where);
      } else {
        ASTERIA_LAUNCHED(kernels::iota(perm, n, cnt, m.stream), where);
      }
      ASTERIA_LAUNCHED(kernels::gather_columns<T>(lq, perm, qc, n, cnt, m.stream), where);
      for (int k = 0; k < cnt; ++k)
        qr_q<T>(m.solver, n, qc + k * nn, tau + static_cast<std::size_t>(k) * n, work, lwork, info + 2 * k, where);
      ASTERIA_LAUNCHED(kernels::fold_info(s.flags + g0, info, 2, cnt, m.stream), where);
      ASTERIA_LAUNCHED(kernels::transpose<T>(qc, basis_out + g0 * nn, n, cnt, false, m.stream), where);
    }
    ASTERIA_LAUNCHED(kernels::check_finite<T>(basis_out, nn, batch, s.flags, kBadOutput, m.stream), where);
    m.finish(s, where);
  } catch (...) {
    m.abort(s);
    throw;
  }
}

}  // namespace

JobId RefreshEngine::submit_eigh(const JobTag& tag, Precision precision, int batch, int n, const void* a, void* w_out,
                                 void* v_out, double ridge, bool descending, std::uintptr_t wait_stream) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  m.check_usable("submit_eigh");
  check_sizes(batch, n, "submit_eigh");
  ASTERIA_CHECK(std::isfinite(ridge), kInvalidArgument, "[cuda::RefreshEngine::submit_eigh] ridge must be finite");
  detail::DeviceGuard guard(m.device);
  const std::size_t es = precision == Precision::kFloat32 ? 4 : 8;
  m.check_pointer(a, es, "submit_eigh", "a");
  m.check_pointer(w_out, es, "submit_eigh", "w_out");
  m.check_pointer(v_out, es, "submit_eigh", "v_out");
  auto job = m.create_job(tag, describe_job("eigh", precision, batch, n), batch, wait_stream, "submit_eigh");
  if (precision == Precision::kFloat32)
    return m.queue(std::move(job), [&m, batch, n, a, w_out, v_out, ridge, descending](Job& j) {
      eigh_job<float>(m, j, batch, n, static_cast<const float*>(a), static_cast<float*>(w_out),
                      static_cast<float*>(v_out), ridge, descending);
    });
  return m.queue(std::move(job), [&m, batch, n, a, w_out, v_out, ridge, descending](Job& j) {
    eigh_job<double>(m, j, batch, n, static_cast<const double*>(a), static_cast<double*>(w_out),
                     static_cast<double*>(v_out), ridge, descending);
  });
}

JobId RefreshEngine::submit_inverse_root(const JobTag& tag, Precision precision, int batch, int n, const void* a,
                                         void* out, double root, double epsilon, std::uintptr_t wait_stream) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  m.check_usable("submit_inverse_root");
  check_sizes(batch, n, "submit_inverse_root");
  ASTERIA_CHECK(root > 0 && std::isfinite(root), kInvalidArgument,
                "[cuda::RefreshEngine::submit_inverse_root] root must be positive and finite, got " << root);
  ASTERIA_CHECK(epsilon >= 0 && std::isfinite(epsilon), kInvalidArgument,
                "[cuda::RefreshEngine::submit_inverse_root] epsilon must be >= 0 and finite, got " << epsilon);
  detail::DeviceGuard guard(m.device);
  const std::size_t es = precision == Precision::kFloat32 ? 4 : 8;
  m.check_pointer(a, es, "submit_inverse_root", "a");
  m.check_pointer(out, es, "submit_inverse_root", "out");
  auto job = m.create_job(tag, describe_job("inverse_root", precision, batch, n), batch, wait_stream,
                          "submit_inverse_root");
  if (precision == Precision::kFloat32)
    return m.queue(std::move(job), [&m, batch, n, a, out, root, epsilon](Job& j) {
      inverse_root_job<float>(m, j, batch, n, static_cast<const float*>(a), static_cast<float*>(out), root, epsilon);
    });
  return m.queue(std::move(job), [&m, batch, n, a, out, root, epsilon](Job& j) {
    inverse_root_job<double>(m, j, batch, n, static_cast<const double*>(a), static_cast<double*>(out), root, epsilon);
  });
}

JobId RefreshEngine::submit_eigenbasis_refresh(const JobTag& tag, Precision precision, int batch, int n, const void* a,
                                               const void* q, void* basis_out, std::int64_t* perm_out, bool sort,
                                               std::uintptr_t wait_stream) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  m.check_usable("submit_eigenbasis_refresh");
  check_sizes(batch, n, "submit_eigenbasis_refresh");
  detail::DeviceGuard guard(m.device);
  const std::size_t es = precision == Precision::kFloat32 ? 4 : 8;
  m.check_pointer(a, es, "submit_eigenbasis_refresh", "a");
  m.check_pointer(q, es, "submit_eigenbasis_refresh", "q");
  m.check_pointer(basis_out, es, "submit_eigenbasis_refresh", "basis_out");
  m.check_pointer(perm_out, 8, "submit_eigenbasis_refresh", "perm_out");
  auto job = m.create_job(tag,
                          describe_job(sort ? "eigenbasis_refresh(sort)" : "eigenbasis_refresh(no sort)", precision,
                                       batch, n),
                          batch, wait_stream, "submit_eigenbasis_refresh");
  if (precision == Precision::kFloat32)
    return m.queue(std::move(job), [&m, batch, n, a, q, basis_out, perm_out, sort](Job& j) {
      eigenbasis_job<float>(m, j, batch, n, static_cast<const float*>(a), static_cast<const float*>(q),
                            static_cast<float*>(basis_out), perm_out, sort);
    });
  return m.queue(std::move(job), [&m, batch, n, a, q, basis_out, perm_out, sort](Job& j) {
    eigenbasis_job<double>(m, j, batch, n, static_cast<const double*>(a), static_cast<const double*>(q),
                           static_cast<double*>(basis_out), perm_out, sort);
  });
}

// ----- completion --------------------------------------------------------------------------------
std::vector<JobResult> RefreshEngine::poll() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  m.harvest_locked();
  std::vector<JobResult> out;
  for (auto it = m.done.begin(); it != m.done.end();) {
    if (m.waiting.count(it->first)) {
      ++it;
      continue;
    }
    out.push_back(std::move(it->second));
    it = m.done.erase(it);
  }
  return out;
}

JobResult RefreshEngine::wait(JobId id) {
  Impl& m = *impl_;
  std::shared_ptr<Job> job;
  {
    std::unique_lock<std::mutex> lock(m.mu);
    m.harvest_locked();
    if (auto it = m.done.find(id); it != m.done.end()) {
      JobResult r = std::move(it->second);
      m.done.erase(it);
      return r;
    }
    for (const auto& j : m.in_flight)
      if (j->id == id) job = j;
    ASTERIA_CHECK(job != nullptr, kInvalidArgument,
                  "[cuda::RefreshEngine::wait] job " << id
                                                     << (id == 0 || id >= m.next_id ? " was never submitted"
                                                                                    : " was already collected"));
    m.waiting.insert(id);
    // The end event exists on the stream only once the queueing thread has queued the job.
    m.cv.wait(lock, [&] { return job->enqueued; });
  }
  for (;;) {
    // Blocks this thread only; the event stays valid because `job` holds it.
    const cudaError_t e = job->enqueue_error.empty() ? cudaEventSynchronize(job->end_ev) : cudaSuccess;
    if (e != cudaSuccess) (void)cudaGetLastError();
    {
      std::lock_guard<std::mutex> lock(m.mu);
      m.harvest_locked();
      if (auto it = m.done.find(id); it != m.done.end()) {
        m.waiting.erase(id);
        JobResult r = std::move(it->second);
        m.done.erase(it);
        return r;
      }
    }
    // Only reachable when the synchronization itself failed without the event reporting it.
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

bool RefreshEngine::is_done(JobId id) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  ASTERIA_CHECK(id >= 1 && id < m.next_id, kInvalidArgument,
                "[cuda::RefreshEngine::is_done] job " << id << " was never submitted");
  m.harvest_locked();
  for (const auto& j : m.in_flight)
    if (j->id == id) return false;
  return true;
}

EngineStats RefreshEngine::stats() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  m.harvest_locked();
  EngineStats st;
  st.submitted = m.submitted;
  st.completed = m.completed;
  st.failed = m.failed;
  st.fp64_retries = m.fp64_retries;
  st.in_flight = m.in_flight.size();
  st.uncollected = m.done.size();
  st.total_run_seconds = m.total_run;
  st.max_run_seconds = m.max_run;
  st.max_queued_seconds = m.max_queued;
  return st;
}

}  // namespace asteria::cuda
