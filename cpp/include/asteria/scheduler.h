#pragma once
// asteria::RefreshScheduler — runs preconditioner refresh jobs (eigendecomposition, inverse
// roots, eigenbasis refresh) on N worker threads, earliest deadline first.
//
// Thread safety: every method may be called from any thread.
// Lock-free (atomic operations only, no mutex): the job intake, from submit() to a worker starting the
// job, and cancel(). submit() copies nothing but the job description (inputs are owned by the job),
// claims the job's slot in a fixed table (slot = id mod queue_capacity) with a compare-and-swap, pushes
// the slot on a lock-free MPMC ring and posts a semaphore (an atomic counter; a futex wakes a worker
// only when one sleeps). A worker moves what the ring holds into sorted runs, which every worker pops
// by compare-and-swap, and starts the job at the head with the earliest deadline (ties: the smaller
// id). cancel() is one compare-and-swap on the job's slot. submit() never waits for a worker to pick or
// finish a job; like the ring's own push it can spin only while a worker is inside its pop of the very
// ring slot the push needs (a few instructions).
// Order: a worker starts the earliest of the jobs it can see, those in the runs and those it has just
// moved there from the ring. With one worker that is every job submitted before it picks (but for the
// jobs pushed behind a submit() still inside its push: the ring is FIFO); with several, the jobs another
// worker is moving from the ring into the runs at that moment (a bounded sort and merge) are seen once
// it has published them.
// Locks: a job's completion takes a mutex (its result enters the table of uncollected results), as
// do poll(), wait() (which sleeps on a condition variable), stats() (to count uncollected results),
// shutdown() (joining the workers) and the test hooks when they are set (test_delay_seconds and
// test_jitter_seconds, an armed test_fault), once per job.
// poll() never blocks; wait() blocks until the job is done.
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
  // The outputs may overwrite the inputs (the inputs are this job's private copies, e.g. shadow
  // snapshots): the n×n result is written over inputs[0] ('eigenvectors', 'root', 'basis') and the
  // rotation over inputs[1], and those outputs share the inputs' storage, so a refresh round needs no
  // memory beyond its snapshots. The caller must not read the inputs after submit().
  bool reuse_inputs = false;
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
  std::size_t reused_bytes = 0;  // bytes of `outputs` that share an input's storage (JobSpec::reuse_inputs)
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
  // Jobs submitted and not yet collected by poll()/wait() (rounded up to a power of two, 1..2^20): the
  // size of the job table and of the ingress ring. Job id n takes table slot n mod queue_capacity, so
  // submit() throws kBudgetExhausted while job n - queue_capacity is still uncollected.
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
  // Throws kBudgetExhausted when the job table is full (see queue_capacity), kCancelled after shutdown().
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
  struct Job;     // a submitted spec and its submit time (scheduler.cc)
  struct Slot;    // one entry of the job table: the job's state, EDF key and run link (scheduler.cc)
  struct RunKey;  // (deadline, id) of a queued job and its slot
  static constexpr int kRunLevels = 12;  // sorted runs, merged as the digits of a binary counter

  void worker_main(int index);
  void intake(std::vector<RunKey>& chunk);  // moves what the ring holds into the runs
  std::int64_t pop_earliest();             // takes the head with the earliest key; its slot, or -1 when none
  void publish(std::uint32_t chain);        // enters a sorted chain in the runs (merging with full levels)
  std::uint32_t merge(std::uint32_t a, std::uint32_t b);
  RunKey key_of(std::uint32_t slot) const;
  bool issued(JobId id) const;  // id was issued and is not yet collected
  void finish(Slot& slot, JobId id, JobResult&& r);
  SchedulerFaultKind take_fault(const JobSpec& spec);  // the test hook's decision for a job starting now

  SchedulerOptions opts_;
  std::size_t capacity_;  // job table slots = ring slots (a power of two)
  std::unique_ptr<Slot[]> slots_;
  MpmcQueue<std::uint32_t> ingress_;  // slots of submitted jobs, submit -> workers
  std::counting_semaphore<> work_available_{0};  // one permit per submitted job not yet taken by a worker
  // Heads of the sorted runs: (modification tag << 21) | (slot + 1); 0 in the low bits: empty.
  alignas(kCacheLine) std::atomic<std::uint64_t> runs_[kRunLevels] = {};
  alignas(kCacheLine) std::atomic<JobId> next_id_{1};
  // Bit 0: shutdown has begun (no submit starts); above it, submits past that check, counted in twos.
  alignas(kCacheLine) std::atomic<std::uint64_t> gate_{0};

  mutable std::mutex mu_;  // guards done_; taken by completion and collection only
  std::condition_variable done_cv_;
  std::map<JobId, JobResult> done_;  // completed, not yet collected

  std::atomic<bool> stopping_{false};  // set by shutdown() once no submit is in flight
  std::mutex stop_mu_;  // with stop_cv_: wakes workers sleeping in the test delay at shutdown
  std::condition_variable stop_cv_;
  std::mutex fault_mu_;  // guards fault_, fault_seen_
  std::atomic<bool> fault_armed_{false};  // fault_.kind != kNone: only then does a starting job take fault_mu_
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
