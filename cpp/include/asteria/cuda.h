#pragma once
// asteria::cuda — the CUDA backend: device queries, host registration, event helpers and the
// RefreshEngine that runs preconditioner refreshes with cuSOLVER/cuBLAS on a low-priority stream.
//
// Built from cuda/ when ASTERIA_ENABLE_CUDA is ON; otherwise cuda/no_cuda.cc provides the same
// functions and class, which throw kUnavailable with the fix. This header includes no CUDA or
// torch header: streams and events cross it as integers (cudaStream_t / cudaEvent_t values, as
// torch's `Stream.cuda_stream` and `Event.cuda_event` hand them out) and device memory as raw
// pointers.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace asteria::cuda {

// True when this build contains the CUDA backend.
bool built_with_cuda() noexcept;
// Number of visible CUDA devices (0 when there is no device or no driver). Throws kUnavailable in
// a build without CUDA.
int device_count();

// What the platform detection needs to know about a device (cudaGetDeviceProperties and
// cudaDeviceGetAttribute). Discrete GPUs over PCIe have integrated = false and
// pageable_memory_access = false; unified/coherent memory systems (GH200, GB10, ...) report
// pageable_memory_access (and on hardware-coherent ones ..._uses_host_page_tables) true.
struct DeviceInfo {
  int device = 0;
  std::string name;
  int major = 0, minor = 0;  // compute capability
  std::size_t total_memory = 0;  // bytes
  int multiprocessors = 0;
  bool integrated = false;
  bool pageable_memory_access = false;
  bool pageable_memory_access_uses_host_page_tables = false;
  bool concurrent_managed_access = false;
  bool can_use_host_pointer_for_registered_mem = false;
  bool host_native_atomic_supported = false;
  int stream_priority_least = 0;     // numerically largest priority (the lowest)
  int stream_priority_greatest = 0;  // numerically smallest priority (the highest)
};
// Throws kInvalidArgument for a device index out of range.
DeviceInfo device_info(int device);

// Page-locks `bytes` of existing host memory at `p` for fast, asynchronous DMA
// (cudaHostRegister with cudaHostRegisterDefault). Throws kInvalidArgument for a null pointer or
// zero size, kBudgetExhausted when the driver cannot lock that much, kUnavailable otherwise; the
// message names the size and the CUDA error.
void host_register(void* p, std::size_t bytes);
// Undoes host_register (cudaHostUnregister). Throws kInvalidArgument when `p` was not registered.
void host_unregister(void* p);

// Blocks the calling thread until the cudaEvent_t `event` (an integer, e.g. torch.cuda.Event's
// `cuda_event`) has completed. Never synchronizes the device or any stream.
void event_synchronize(std::uintptr_t event);
// True when the event has completed (cudaEventQuery); never blocks.
bool event_query(std::uintptr_t event);

// Element type of the matrices of a refresh job.
enum class Precision : int { kFloat32 = 0, kFloat64 = 1 };
const char* precision_name(Precision p) noexcept;

using JobId = std::uint64_t;

// What a job belongs to; carried through to its result unchanged.
struct JobTag {
  std::uint64_t block_id = 0;  // which preconditioner block
  std::int64_t version = 0;    // the snapshot step the input was taken at
  std::int64_t deadline = 0;   // the step the result must be installed at
};

// `wait_stream` value meaning "do not wait on any stream". 0 is a real stream (the legacy default
// stream, which is torch's default stream), so it cannot be the sentinel.
inline constexpr std::uintptr_t kNoStream = ~std::uintptr_t{0};

struct JobResult {
  JobId id = 0;
  std::uint64_t block_id = 0;
  std::int64_t version = 0;
  std::int64_t deadline = 0;
  bool ok = true;
  std::vector<std::int64_t> failed;  // batch indices of the failed matrices (all of them after a CUDA error)
  // Batch indices of the fp32 matrices that failed in fp32 and were redone in fp64
  // (EngineOptions::fp64_retry); those that are not also in `failed` succeeded in fp64.
  std::vector<std::int64_t> retried;
  std::string message;               // empty when ok
  double queued_seconds = 0;         // submission -> the job starts on the engine stream (device clock)
  double run_seconds = 0;            // start -> end of the job on the engine stream (device clock)
};

struct EngineStats {
  std::size_t submitted = 0;
  std::size_t completed = 0;    // completions observed by poll/wait/is_done/stats
  std::size_t failed = 0;       // completed jobs with at least one failed matrix
  std::size_t fp64_retries = 0;  // matrices of completed fp32 jobs redone in fp64 (JobResult::retried)
  std::size_t in_flight = 0;    // submitted, completion not yet observed
  std::size_t uncollected = 0;  // completed, not yet returned by poll/wait
  double total_run_seconds = 0, max_run_seconds = 0, max_queued_seconds = 0;
};

struct EngineOptions {
  // CUDA device ordinal the engine works on (0..device_count()-1). Default 0.
  int device = 0;
  // true (default): the engine stream gets the LOWEST priority the device offers, so refresh
  // kernels yield to kernels of higher-priority streams. Note that CUDA's default priority is
  // already the lowest one, so refresh work only yields to a training stream created with a higher
  // priority (torch.cuda.Stream(priority=-1)); with equal priorities the two streams share the
  // GPU. false: the HIGHEST priority (tests, or when the refresh is on the critical path).
  bool priority_low = true;
  // fp32 eigh and inverse-root jobs: redo in fp64 a matrix whose fp32 decomposition failed, like
  // linalg::EighOptions::fp64_retry (default on). Costs one host round trip per such job (see
  // "The fp64 retry" below); false queues those jobs without it, and a failed matrix is reported.
  bool fp64_retry = true;
};

// RefreshEngine — runs refresh jobs (eigh, inverse root, eigenbasis refresh) with cuSOLVER and
// cuBLAS on ONE dedicated non-blocking stream; job results match asteria::linalg (see each
// submit_* below for the exact semantics and the documented differences).
//
// Matrices are device pointers to row-major contiguous (batch, n, n) arrays on the engine's device;
// the caller keeps every input and output alive and untouched until the job completes.
// Submission never waits for the device: it validates the arguments, records the submission
// timestamp and (when `wait_stream` is given, a cudaStream_t as an integer, kNoStream for none) an
// event on that stream, and hands the job to the engine's queueing thread, which enqueues the
// kernels and solver calls on the engine stream in submission order. (cuSOLVER's syevd blocks
// the host thread that enqueues it until its own stream catches up, so that thread is never the
// caller's.) The engine stream waits for the wait_stream event with cudaStreamWaitEvent: no host
// synchronization. Scratch comes from the engine's own stream-ordered memory pool
// (cudaMallocFromPoolAsync / cudaFreeAsync), never cudaMalloc/cudaFree. Failures of individual
// matrices (non-finite input or output, solver info != 0) make the job complete with ok = false
// and their indices; they never poison the CUDA context. A job that could not be queued (out of
// device memory, a library error) completes failed with the reason, naming the job.
//
// Thread safety: every method may be called from any thread; one mutex guards the bookkeeping and
// only the queueing thread uses the cuSOLVER/cuBLAS handles. submit_*(), poll(), is_done() and
// stats() never block on the device; wait() blocks the calling thread only (cudaEventSynchronize
// outside the mutex). close() (and the destructor) lets the queueing thread queue what was
// submitted, waits for the engine stream, then frees everything; on a device with a sticky error
// the wait returns at once with that error and the engine is torn down without further waiting.
// A kernel that never terminates cannot be interrupted.
//
// The fp64 retry (EngineOptions::fp64_retry, fp32 submit_eigh and submit_inverse_root only), as
// linalg's: a matrix whose fp32 decomposition failed (solver info != 0, or eigenvalues or
// eigenvectors not finite) but whose input is finite is redone in fp64: its input is widened to
// fp64 on the device, ridge/epsilon added in fp64, decomposed with cusolverDnXsyevd (per matrix,
// also in a batched job), the results rounded to fp32 and post-processed exactly as the fp32 pass
// (eigenvalue order; the inverse root's stabilisation and X = B·Zᵀ in fp32), into the job's
// outputs. It is reported failed only when the fp64 decomposition fails too (or the root is not
// finite); JobResult::retried lists the redone matrices. How: after queueing the job's fp32 pass
// the queueing thread waits for the ENGINE stream (an event, blocking sync; never the caller's
// stream, nor the submitting thread), reads the per-matrix status and queues the fp64 redo of the
// failed ones on the engine stream, before the job's end event. So with the retry on, the next job
// is queued only once this job's fp32 pass has run (cusolverDnXsyevd already waited on the host
// for each matrix of a per-matrix job). fp64 jobs and eigenbasis refreshes are unaffected.
class RefreshEngine {
 public:
  // Creates the stream, the cuSOLVER/cuBLAS handles, the memory pool and the cuBLAS workspace.
  // It allocates device memory, which may synchronize the device: create engines at setup, not
  // between training steps. Throws kUnavailable without a device, kInvalidArgument for a bad one.
  explicit RefreshEngine(const EngineOptions& opts = {});
  ~RefreshEngine();
  // Not copyable or movable: the stream, handles and in-flight jobs belong to this object.
  RefreshEngine(const RefreshEngine&) = delete;
  RefreshEngine& operator=(const RefreshEngine&) = delete;

  // Symmetric eigendecomposition of each matrix of `a` (+ ridge·I); only the lower triangle (row
  // major) is read, like linalg::eigh. Writes eigenvalues to w_out (batch, n) and eigenvectors to
  // the columns of the row-major v_out (batch, n, n); ascending or descending order. Solvers:
  // cusolverDnXsyevBatched when n <= 32 and batch > 1, cusolverDnXsyevd per matrix otherwise.
  // fp32: a failed matrix is retried in fp64 (EngineOptions::fp64_retry, see above).
  JobId submit_eigh(const JobTag& tag, Precision precision, int batch, int n, const void* a, void* w_out, void* v_out,
                    double ridge, bool descending, std::uintptr_t wait_stream = kNoStream);
  // out = (A + eps·I)^(-1/root) per matrix with linalg::inverse_root's stabilisation: if the
  // smallest eigenvalue λ_min of A + eps·I is below eps, every eigenvalue λ becomes (λ − λ_min) + eps
  // (in double, in that order, so eps survives in fp32 when |λ_min| ≫ eps).
  // root > 0, epsilon >= 0 (both finite). fp32: a failed decomposition is retried in fp64 (see above).
  JobId submit_inverse_root(const JobTag& tag, Precision precision, int batch, int n, const void* a, void* out,
                            double root, double epsilon, std::uintptr_t wait_stream = kNoStream);
  // SOAP (sort = true) / KL (sort = false) eigenbasis refresh as linalg::eigenbasis_refresh:
  // e = diag(QᵀLQ), π = stable descending argsort of e (identity without sort), basis_out =
  // qr(L·Q[:, π]).Q (geqrf + orgqr), perm_out[j] (int64) = the old column new column j came from.
  // The Rayleigh quotients are reduced in a different order than on the CPU, so near-ties may be
  // ordered differently.
  JobId submit_eigenbasis_refresh(const JobTag& tag, Precision precision, int batch, int n, const void* a,
                                  const void* q, void* basis_out, std::int64_t* perm_out, bool sort,
                                  std::uintptr_t wait_stream = kNoStream);

  // Completed jobs not yet collected, in id order; each result is returned exactly once. Never
  // blocks (cudaEventQuery).
  std::vector<JobResult> poll();
  // Blocks the calling thread until job `id` completes and returns its result. Throws
  // kInvalidArgument for an id never issued or already collected.
  JobResult wait(JobId id);
  // True when job `id` has completed (collected or not); never blocks.
  bool is_done(JobId id);
  EngineStats stats();
  // Waits for the engine stream, releases the stream, handles and memory. Idempotent; every later
  // submit throws kCancelled.
  void close();

  // The engine stream (a cudaStream_t as an integer; torch.cuda.ExternalStream accepts it).
  std::uintptr_t stream() const noexcept;
  int device() const noexcept;
  // The priority the engine stream was created with.
  int priority() const noexcept;

  // TEST HOOK, off by default (0), like linalg::set_test_fp32_eigh_failures but for this engine:
  // the next `count` fp32 matrices of eigh / inverse-root jobs whose fp32 solve ran on finite input
  // and reported info == 0 are reported as solver failures ("the solver reported info != 0") after
  // that solve, so the fp64 retry (or, with fp64_retry off, the failure report) can be tested
  // without an input that breaks the fp32 solver. They are taken in job submission order, then
  // batch index, by the jobs the queueing thread reaches after the call. fp64 jobs, eigenbasis
  // refreshes and the fp64 retry never consume it.
  // While it is armed, fp32 eigh/inverse-root jobs wait for their fp32 pass as with the retry on.
  // count >= 0 (kInvalidArgument otherwise); 0 disarms it. Never set it in production code.
  void set_test_fp32_failures(int count);
  // fp32 matrices the hook above has failed on this engine so far.
  long long test_fp32_failures_injected() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace asteria::cuda
