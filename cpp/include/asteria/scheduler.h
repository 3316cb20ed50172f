#pragma once
// asteria::RefreshScheduler — runs preconditioner refresh jobs (eigendecomposition, inverse
// roots, eigenbasis refresh) on N worker threads, earliest deadline first.
//
// Thread safety: every method may be called from any thread. submit() copies nothing but the
// job description (inputs are owned by the job), pushes it on a lock-free MPMC ring and wakes a
// worker; it never waits for a worker. poll() never blocks; wait() blocks until the job is done.
// A job that fails (non-finite input, solver failure, a result holding NaN or Inf, any exception,
// std::bad_alloc included) completes with status kFailed and a message naming the job, its block and
// its version; it never takes the process down, and the worker goes on with the next job. Worker threads run with
// flush-to-zero / denormals-are-zero set. Destruction cancels queued jobs and joins the workers
// after the running ones finish; it never hangs on queued work.

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include "asteria/linalg.h"
#include "asteria/mpmc_queue.h"

namespace asteria {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kInt64 = 2 };
std::size_t dtype_size(DType d) noexcept;
const char* dtype_name(DType d) noexcept;

// An owned, contiguous, 64-byte-aligned host array (row-major).
struct HostTensor {
  DType dtype = DType::kFloat32;
  std::vector<std::int64_t> shape;
  std::shared_ptr<unsigned char[]> storage;

  static HostTensor empty(DType dtype, std::vector<std::int64_t> shape);
  std::size_t numel() const noexcept;
  std::size_t nbytes() const noexcept { return numel() * dtype_size(dtype); }
  void* data() const noexcept { return storage.get(); }
  template <typename T>
  T* ptr() const noexcept {
    return reinterpret_cast<T*>(storage.get());
  }
};

enum class JobKind : int {
  kEigh = 0,               // inputs {A}; outputs {eigenvalues, eigenvectors}
  kInverseRoot = 1,        // inputs {A}; outputs {root}
  kEigenbasisRefresh = 2,  // inputs {L, Q}; outputs {basis, permutation, rotation = Qᵀ·basis (unless !rotation)}
  kTask = 3,               // run `task` (tests, benchmarks, custom work); no outputs
};
enum class JobStatus : int { kOk = 0, kFailed = 1, kCancelled = 2 };
const char* job_status_name(JobStatus s) noexcept;

using JobId = std::uint64_t;

struct JobSpec {
  JobKind kind = JobKind::kTask;
  std::uint64_t block_id = 0;  // which preconditioner block the result belongs to
  std::int64_t version = 0;    // the step whose statistics the job was built from (snapshot step)
  std::int64_t deadline = 0;   // the step the result must be installed at (EDF key)
  std::vector<HostTensor> inputs;
  // kEigh
  linalg::EighOptions eigh;
  // kInverseRoot
  double root = 2.0;
  double epsilon = 0.0;
  bool use_newton = false;
  linalg::NewtonOptions newton;
  // kEigenbasisRefresh
  bool sort = true;
  bool rotation = true;  // also return R = Qᵀ·basis (what SOAP rotates its first moment with); KL-Shampoo needs none
  // kTask
  std::function<void()> task;
  // Optional: run by the worker right before the job (any kind), e.g. to wait for the asynchronous
  // device-to-host copy that fills the inputs (a CUDA event). An exception fails the job with its message.
  std::function<void()> prerequisite;
};

struct JobResult {
  JobId id = 0;
  std::uint64_t block_id = 0;
  std::int64_t version = 0;
  std::int64_t deadline = 0;
  JobStatus status = JobStatus::kOk;
  std::string message;  // empty on success
  std::vector<std::pair<std::string, HostTensor>> outputs;
  double queued_seconds = 0;  // submit -> start
  double run_seconds = 0;     // start -> done
};

// TEST HOOK, off by default: makes chosen jobs fail on purpose so that the callers' failure policy
// (keep the previous preconditioner, warn, count, raise past the tolerance) can be tested without a
// failing solver or an exhausted allocator. Never set it in production code.
enum class SchedulerFaultKind : int {
  kNone = 0,
  kSolverFailure = 1,    // the job fails as a LAPACK failure does (a kNumerical error naming the routine)
  kRuntimeError = 2,     // the job body throws std::runtime_error
  kBadAlloc = 3,         // the job body throws std::bad_alloc (an allocation failure on the worker)
  kNonFiniteResult = 4,  // the job runs, then a NaN is written into its first output (jobs with outputs only);
                         // the worker's check of the outputs must reject it
};
struct SchedulerFault {
  SchedulerFaultKind kind = SchedulerFaultKind::kNone;
  std::optional<JobKind> job;  // which jobs count (empty: every kind; kNonFiniteResult skips kTask jobs)
  std::uint64_t skip = 0;      // matching jobs that run normally first (0: the next one fails)
  std::uint64_t count = 1;     // matching jobs that fail after those (>= 1)
};

struct SchedulerOptions {
  // Worker threads (1..256). One refresh runs per worker at a time.
  int workers = 1;
  // Jobs that may wait in the ingress ring at once (rounded up to a power of two, 1..2^20).
  std::size_t queue_capacity = 4096;
  // BLAS/LAPACK threads per call (1..256); keep 1 so workers do not oversubscribe cores.
  int blas_threads = 1;
  // Set flush-to-zero / denormals-are-zero on worker threads (denormals slow LAPACK badly).
  bool flush_denormals = true;
  // CPUs the workers may run on (Linux CPU numbers, each worker pinned to the whole set); empty: the
  // workers inherit the creating thread's affinity. The constructor throws kInvalidArgument (with the
  // errno text) when the kernel refuses the set, e.g. a CPU outside the process's cpuset.
  std::vector<int> cpus;
  // TEST HOOK, leave at 0 in production. Before running each job a worker waits
  // test_delay_seconds plus a uniform random extra in [0, test_jitter_seconds] (seconds, >= 0,
  // at most 3600 each), drawn from a per-worker generator seeded with test_seed + worker index.
  // It simulates slow or irregular workers so the Python runtime's staleness bound, stall
  // accounting and determinism can be tested. The wait counts as run time, and shutdown()
  // interrupts it (the job then completes as cancelled), so a delayed scheduler never hangs.
  double test_delay_seconds = 0.0;
  double test_jitter_seconds = 0.0;
  std::uint64_t test_seed = 0;
  // Test hook (see SchedulerFault); kNone in production. set_test_fault() re-arms it later.
  SchedulerFault test_fault;
};

struct SchedulerStats {
  std::size_t submitted = 0, completed = 0, failed = 0, cancelled = 0;
  std::size_t faults_injected = 0;  // jobs the test hook made fail
  std::size_t queued = 0;   // waiting to run (best effort)
  std::size_t running = 0;  // running now (best effort)
  std::size_t uncollected = 0;  // completed but not yet returned by poll/wait
  std::vector<double> worker_busy_seconds;
  double max_run_seconds = 0, total_run_seconds = 0, max_queued_seconds = 0;
};

class RefreshScheduler {
 public:
  explicit RefreshScheduler(const SchedulerOptions& opts = {});
  ~RefreshScheduler();
  // Not copyable or movable: worker threads hold `this`.
  RefreshScheduler(const RefreshScheduler&) = delete;
  RefreshScheduler& operator=(const RefreshScheduler&) = delete;

  // Validates the spec (throws kInvalidArgument on a malformed one) and queues it.
  // Throws kBudgetExhausted when the ring is full, kCancelled after shutdown().
  JobId submit(JobSpec spec);
  // Completed jobs not yet collected, in id order; each result is returned exactly once.
  std::vector<JobResult> poll();
  // Blocks until job `id` completes and returns it. Throws kInvalidArgument for an id that was
  // never issued or was already collected.
  JobResult wait(JobId id);
  // Cancels a job that has not started. Returns false when it already runs or finished.
  bool cancel(JobId id);
  SchedulerStats stats() const;
  // Cancels queued jobs, lets running ones finish, joins the workers. Idempotent.
  void shutdown();
  int workers() const noexcept { return static_cast<int>(threads_.size()); }
  // Re-arms the test hook (see SchedulerFault): counting starts from the next job a worker starts.
  // Throws kInvalidArgument for a malformed fault.
  void set_test_fault(const SchedulerFault& fault);

 private:
  struct Job;
  void worker_main(int index);
  std::shared_ptr<Job> next_job();
  void finish(const std::shared_ptr<Job>& job, JobResult&& r);
  SchedulerFaultKind take_fault(const JobSpec& spec);  // the test hook's decision for a job starting now

  SchedulerOptions opts_;
  MpmcQueue<std::shared_ptr<Job>> ingress_;
  std::counting_semaphore<> work_available_{0};

  std::mutex ready_mu_;  // guards ready_ (workers only)
  struct Later {
    bool operator()(const std::shared_ptr<Job>& a, const std::shared_ptr<Job>& b) const;
  };
  std::priority_queue<std::shared_ptr<Job>, std::vector<std::shared_ptr<Job>>, Later> ready_;

  mutable std::mutex mu_;  // guards jobs_, done_
  std::condition_variable done_cv_;
  std::map<JobId, std::shared_ptr<Job>> jobs_;  // issued, not yet collected
  std::map<JobId, JobResult> done_;

  std::atomic<JobId> next_id_{1};
  std::atomic<bool> stopping_{false};
  std::mutex stop_mu_;  // with stop_cv_: wakes workers sleeping in the test delay at shutdown
  std::condition_variable stop_cv_;
  std::mutex fault_mu_;  // guards fault_, fault_seen_
  SchedulerFault fault_;
  std::uint64_t fault_seen_ = 0;  // matching jobs started since the hook was armed
  std::atomic<std::size_t> faults_injected_{0};
  std::atomic<std::size_t> submitted_{0}, completed_{0}, failed_{0}, cancelled_{0}, running_{0};
  std::unique_ptr<std::atomic<std::int64_t>[]> busy_ns_;
  std::atomic<std::int64_t> max_run_ns_{0}, total_run_ns_{0}, max_queued_ns_{0};
  std::vector<std::thread> threads_;
};

// Runs one job synchronously on the calling thread (what a worker does, without the test hook).
// Throws on failure, including when an output holds NaN or Inf.
std::vector<std::pair<std::string, HostTensor>> run_job(const JobSpec& spec);

}  // namespace asteria
