#include "asteria/scheduler.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <optional>
#include <random>
#include <stdexcept>

#include "asteria/errors.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace asteria {

// ----- HostTensor ----------------------------------------------------------------------------
std::size_t dtype_size(DType d) noexcept {
  switch (d) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kInt64: return 8;
  }
  return 0;
}
const char* dtype_name(DType d) noexcept {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kInt64: return "int64";
  }
  return "?";
}
const char* job_status_name(JobStatus s) noexcept {
  switch (s) {
    case JobStatus::kOk: return "ok";
    case JobStatus::kFailed: return "failed";
    case JobStatus::kCancelled: return "cancelled";
  }
  return "?";
}

std::size_t HostTensor::numel() const noexcept {
  std::size_t n = 1;
  for (auto d : shape) n *= static_cast<std::size_t>(d);
  return n;
}

HostTensor HostTensor::empty(DType dtype, std::vector<std::int64_t> shape) {
  HostTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  for (auto d : t.shape)
    ASTERIA_CHECK(d >= 0, kInvalidArgument, "[scheduler::HostTensor] negative dimension " << d);
  const std::size_t bytes = std::max<std::size_t>(t.nbytes(), 1);
  constexpr std::align_val_t kAlign{64};
  auto* raw = static_cast<unsigned char*>(::operator new[](bytes, kAlign));
  t.storage = std::shared_ptr<unsigned char[]>(raw, [](unsigned char* p) { ::operator delete[](p, std::align_val_t{64}); });
  return t;
}

// ----- running one job -----------------------------------------------------------------------
namespace {

int square_size(const HostTensor& t, const char* what) {
  ASTERIA_CHECK(t.shape.size() == 2 && t.shape[0] == t.shape[1] && t.shape[0] >= 1, kInvalidArgument,
                "[scheduler::submit] " << what << " must be a non-empty square matrix");
  ASTERIA_CHECK(t.dtype == DType::kFloat32 || t.dtype == DType::kFloat64, kInvalidArgument,
                "[scheduler::submit] " << what << " must be float32 or float64, got " << dtype_name(t.dtype));
  return static_cast<int>(t.shape[0]);
}

void validate(const JobSpec& s) {
  switch (s.kind) {
    case JobKind::kEigh:
    case JobKind::kInverseRoot:
      ASTERIA_CHECK(s.inputs.size() == 1, kInvalidArgument, "[scheduler::submit] this job takes one matrix");
      square_size(s.inputs[0], "the matrix");
      if (s.kind == JobKind::kInverseRoot) {
        ASTERIA_CHECK(s.root > 0, kInvalidArgument, "[scheduler::submit] root must be positive, got " << s.root);
        ASTERIA_CHECK(s.epsilon >= 0, kInvalidArgument,
                      "[scheduler::submit] epsilon must be >= 0, got " << s.epsilon);
        if (s.use_newton) {
          const double p = s.root;
          ASTERIA_CHECK(p == static_cast<int>(p), kInvalidArgument,
                        "[scheduler::submit] the Newton method needs an integer root, got " << p);
        }
      }
      break;
    case JobKind::kEigenbasisRefresh: {
      ASTERIA_CHECK(s.inputs.size() == 2, kInvalidArgument,
                    "[scheduler::submit] an eigenbasis refresh takes the statistic and the basis");
      const int n = square_size(s.inputs[0], "the statistic");
      const int m = square_size(s.inputs[1], "the basis");
      ASTERIA_CHECK(n == m && s.inputs[0].dtype == s.inputs[1].dtype, kInvalidArgument,
                    "[scheduler::submit] statistic and basis must have the same size and dtype");
      break;
    }
    case JobKind::kTask:
      ASTERIA_CHECK(static_cast<bool>(s.task), kInvalidArgument, "[scheduler::submit] a task job needs a task");
      break;
  }
}

template <typename T>
std::vector<std::pair<std::string, HostTensor>> run_typed(const JobSpec& s) {
  const DType dt = std::is_same_v<T, float> ? DType::kFloat32 : DType::kFloat64;
  const HostTensor& a = s.inputs[0];
  const int n = static_cast<int>(a.shape[0]);
  std::vector<std::pair<std::string, HostTensor>> out;
  switch (s.kind) {
    case JobKind::kEigh: {
      auto w = HostTensor::empty(dt, {n});
      auto v = HostTensor::empty(dt, {n, n});
      linalg::eigh<T>(n, a.ptr<T>(), w.ptr<T>(), v.ptr<T>(), s.eigh);
      out.emplace_back("eigenvalues", std::move(w));
      out.emplace_back("eigenvectors", std::move(v));
      break;
    }
    case JobKind::kInverseRoot: {
      auto x = HostTensor::empty(dt, {n, n});
      if (s.use_newton) {
        linalg::newton_inverse_root<T>(n, a.ptr<T>(), x.ptr<T>(), static_cast<int>(s.root), s.epsilon, s.newton);
      } else {
        linalg::inverse_root<T>(n, a.ptr<T>(), x.ptr<T>(), s.root, s.epsilon, s.eigh.fp64_retry);
      }
      out.emplace_back("root", std::move(x));
      break;
    }
    case JobKind::kEigenbasisRefresh: {
      auto q = HostTensor::empty(dt, {n, n});
      auto p = HostTensor::empty(DType::kInt64, {n});
      linalg::eigenbasis_refresh<T>(n, a.ptr<T>(), s.inputs[1].ptr<T>(), q.ptr<T>(), p.ptr<std::int64_t>(), s.sort);
      std::optional<HostTensor> r;
      if (s.rotation) {
        // R = Q_oldᵀ·Q_new: what the install rotates the first moment with, computed here, off the training thread
        r = HostTensor::empty(dt, {n, n});
        linalg::matmul_tn<T>(n, s.inputs[1].ptr<T>(), q.ptr<T>(), r->ptr<T>());
      }
      out.emplace_back("basis", std::move(q));
      out.emplace_back("permutation", std::move(p));
      if (r) out.emplace_back("rotation", std::move(*r));
      break;
    }
    case JobKind::kTask: break;
  }
  return out;
}

void set_flush_denormals() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_setcsr(_mm_getcsr() | 0x8040);  // FTZ (bit 15) | DAZ (bit 6)
#elif defined(__aarch64__)
  std::uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  fpcr |= (1ull << 24);  // FZ
  asm volatile("msr fpcr, %0" : : "r"(fpcr));
#endif
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void atomic_max(std::atomic<std::int64_t>& a, std::int64_t v) {
  std::int64_t cur = a.load(std::memory_order_relaxed);
  while (cur < v && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

// A job's results never carry NaN or Inf to the caller: the check runs here, on the worker, off the
// training thread (O(n²) against the job's O(n³)).
void check_outputs_finite(const std::vector<std::pair<std::string, HostTensor>>& outputs) {
  for (const auto& [name, t] : outputs) {
    bool ok = true;
    if (t.dtype == DType::kFloat32) ok = linalg::all_finite(t.numel(), t.ptr<float>());
    if (t.dtype == DType::kFloat64) ok = linalg::all_finite(t.numel(), t.ptr<double>());
    ASTERIA_CHECK(ok, kNumerical, "[scheduler] the output '" << name << "' holds NaN or Inf; the result is discarded");
  }
}

void check_fault(const SchedulerFault& f) {
  const int k = static_cast<int>(f.kind);
  ASTERIA_CHECK(k >= 0 && k <= 4, kInvalidArgument, "[scheduler] unknown test fault kind " << k);
  ASTERIA_CHECK(f.kind == SchedulerFaultKind::kNone || f.count >= 1, kInvalidArgument,
                "[scheduler] a test fault needs count >= 1");
  if (f.job) {
    const int j = static_cast<int>(*f.job);
    ASTERIA_CHECK(j >= 0 && j <= 3, kInvalidArgument, "[scheduler] unknown job kind " << j << " in the test fault");
  }
}

// The test hook's failure, raised where the job body would fail (after the prerequisite, before the solver).
[[noreturn]] void raise_fault(const JobSpec& s, SchedulerFaultKind fault) {
  const long long n = s.inputs.empty() || s.inputs[0].shape.empty() ? 0 : static_cast<long long>(s.inputs[0].shape[0]);
  switch (fault) {
    case SchedulerFaultKind::kSolverFailure: {
      const std::string tail = ", n=" + std::to_string(n) + ", injected by SchedulerOptions::test_fault)";
      if (s.kind == JobKind::kEigenbasisRefresh)
        throw Error(ErrorCategory::kNumerical, "[linalg::eigenbasis_refresh] QR factorisation failed (geqrf info=-4" + tail);
      throw Error(ErrorCategory::kNumerical,
                  std::string("[linalg::") + (s.kind == JobKind::kInverseRoot ? "inverse_root" : "eigh") +
                      "] symmetric eigendecomposition failed (LAPACK syevd info=" + std::to_string(n > 0 ? n : 1) +
                      tail + "; the previous result is kept. A larger ridge/epsilon usually fixes this.");
    }
    case SchedulerFaultKind::kRuntimeError:
      throw std::runtime_error("a runtime_error thrown by the job body (injected by SchedulerOptions::test_fault)");
    case SchedulerFaultKind::kBadAlloc:
      throw std::bad_alloc();
    default:
      break;
  }
  ASTERIA_ASSERT(false);
  std::abort();
}

std::vector<std::pair<std::string, HostTensor>> run_with_fault(const JobSpec& spec, SchedulerFaultKind fault) {
  validate(spec);
  if (spec.prerequisite) spec.prerequisite();
  if (fault != SchedulerFaultKind::kNone && fault != SchedulerFaultKind::kNonFiniteResult) raise_fault(spec, fault);
  if (spec.kind == JobKind::kTask) {
    spec.task();
    return {};
  }
  auto out = spec.inputs[0].dtype == DType::kFloat32 ? run_typed<float>(spec) : run_typed<double>(spec);
  if (fault == SchedulerFaultKind::kNonFiniteResult && !out.empty()) {
    HostTensor& t = out.front().second;
    if (t.dtype == DType::kFloat32) t.ptr<float>()[0] = std::numeric_limits<float>::quiet_NaN();
    if (t.dtype == DType::kFloat64) t.ptr<double>()[0] = std::numeric_limits<double>::quiet_NaN();
  }
  check_outputs_finite(out);
  return out;
}

// "job 7 (block 3, version 12) failed: <why>". Under memory exhaustion building the text can itself throw;
// the fallback fits the small-string buffer, so it never allocates.
std::string failure_message(JobId id, const JobSpec& spec, const char* why) noexcept {
  try {
    return "job " + std::to_string(id) + " (block " + std::to_string(spec.block_id) + ", version " +
           std::to_string(spec.version) + ") failed: " + why;
  } catch (...) {
    return "out of memory";
  }
}

}  // namespace

std::vector<std::pair<std::string, HostTensor>> run_job(const JobSpec& spec) {
  return run_with_fault(spec, SchedulerFaultKind::kNone);
}

// ----- the scheduler -------------------------------------------------------------------------
enum class JobState : int { kQueued = 0, kRunning = 1, kDone = 2, kCancelled = 3 };

struct RefreshScheduler::Job {
  JobId id = 0;
  JobSpec spec;
  std::atomic<int> state{static_cast<int>(JobState::kQueued)};
  std::int64_t submitted_ns = 0;
};

bool RefreshScheduler::Later::operator()(const std::shared_ptr<Job>& a, const std::shared_ptr<Job>& b) const {
  if (a->spec.deadline != b->spec.deadline) return a->spec.deadline > b->spec.deadline;
  return a->id > b->id;
}

RefreshScheduler::RefreshScheduler(const SchedulerOptions& opts)
    : opts_(opts), ingress_([&] {
        ASTERIA_CHECK(opts.queue_capacity >= 1 && opts.queue_capacity <= (std::size_t{1} << 20), kInvalidArgument,
                      "[scheduler] queue_capacity must be in 1..1048576, got " << opts.queue_capacity);
        return opts.queue_capacity;
      }()) {
  ASTERIA_CHECK(opts.workers >= 1 && opts.workers <= 256, kInvalidArgument,
                "[scheduler] workers must be in 1..256, got " << opts.workers);
  ASTERIA_CHECK(opts.test_delay_seconds >= 0 && opts.test_delay_seconds <= 3600 && opts.test_jitter_seconds >= 0 &&
                    opts.test_jitter_seconds <= 3600,
                kInvalidArgument,
                "[scheduler] test_delay_seconds and test_jitter_seconds must be in [0, 3600], got "
                    << opts.test_delay_seconds << " and " << opts.test_jitter_seconds);
  check_fault(opts.test_fault);
  fault_ = opts.test_fault;
  linalg::set_num_threads(opts.blas_threads);
  busy_ns_ = std::make_unique<std::atomic<std::int64_t>[]>(static_cast<std::size_t>(opts.workers));
  for (int i = 0; i < opts.workers; ++i) busy_ns_[i].store(0);
  cpu_set_t set;
  CPU_ZERO(&set);
  std::string listed;
  for (int cpu : opts.cpus) {
    ASTERIA_CHECK(cpu >= 0 && cpu < CPU_SETSIZE, kInvalidArgument,
                  "[scheduler] cpus must be CPU numbers in 0.." << CPU_SETSIZE - 1 << ", got " << cpu);
    CPU_SET(cpu, &set);
    listed += (listed.empty() ? "" : ",") + std::to_string(cpu);
  }
  threads_.reserve(static_cast<std::size_t>(opts.workers));
  for (int i = 0; i < opts.workers; ++i) {
    threads_.emplace_back([this, i] { worker_main(i); });
    if (opts.cpus.empty()) continue;
    const int e = pthread_setaffinity_np(threads_.back().native_handle(), sizeof(set), &set);
    if (e != 0) {
      shutdown();
      throw Error(ErrorCategory::kInvalidArgument,
                  "[scheduler] cannot pin the workers to CPUs " + listed + ": " + std::strerror(e) +
                      " (each must be a CPU this process may use; see os.sched_getaffinity(0) and the cgroup's cpuset)");
    }
  }
}

RefreshScheduler::~RefreshScheduler() { shutdown(); }

JobId RefreshScheduler::submit(JobSpec spec) {
  ASTERIA_CHECK(!stopping_.load(), kCancelled, "[scheduler::submit] the scheduler is shut down");
  validate(spec);
  auto job = std::make_shared<Job>();
  job->id = next_id_.fetch_add(1);
  job->spec = std::move(spec);
  job->submitted_ns = now_ns();
  {
    std::lock_guard<std::mutex> g(mu_);
    jobs_.emplace(job->id, job);
  }
  if (!ingress_.try_push(job)) {
    std::lock_guard<std::mutex> g(mu_);
    jobs_.erase(job->id);
    ASTERIA_CHECK(false, kBudgetExhausted,
                  "[scheduler::submit] the job queue is full (" << ingress_.capacity()
                                                                << " jobs); raise queue_capacity or collect results");
  }
  submitted_.fetch_add(1);
  work_available_.release();
  return job->id;
}

std::shared_ptr<RefreshScheduler::Job> RefreshScheduler::next_job() {
  std::lock_guard<std::mutex> g(ready_mu_);
  std::shared_ptr<Job> j;
  while (ingress_.try_pop(j)) ready_.push(std::move(j));
  if (ready_.empty()) return nullptr;
  j = ready_.top();
  ready_.pop();
  return j;
}

void RefreshScheduler::finish(const std::shared_ptr<Job>& job, JobResult&& r) {
  r.id = job->id;
  r.block_id = job->spec.block_id;
  r.version = job->spec.version;
  r.deadline = job->spec.deadline;
  if (r.status == JobStatus::kFailed) failed_.fetch_add(1);
  if (r.status == JobStatus::kCancelled) cancelled_.fetch_add(1);
  {
    std::lock_guard<std::mutex> g(mu_);
    done_.emplace(job->id, std::move(r));
    completed_.fetch_add(1);
  }
  done_cv_.notify_all();
}

void RefreshScheduler::worker_main(int index) {
  if (opts_.flush_denormals) set_flush_denormals();
  std::mt19937_64 delay_rng(opts_.test_seed + static_cast<std::uint64_t>(index));
  std::uniform_real_distribution<double> jitter(0.0, 1.0);
  const bool delayed = opts_.test_delay_seconds > 0 || opts_.test_jitter_seconds > 0;
  for (;;) {
    work_available_.acquire();
    std::shared_ptr<Job> job = next_job();
    if (!job) {
      if (stopping_.load()) return;
      // The permit belongs to a job a producer has claimed a ring slot for but not yet published (the ring
      // is FIFO: a later, published slot waits behind it). Keep the permit for that job, or it is lost and
      // its job is never run.
      work_available_.release();
      std::this_thread::yield();
      continue;
    }
    int expected = static_cast<int>(JobState::kQueued);
    JobResult r;
    if (!job->state.compare_exchange_strong(expected, static_cast<int>(JobState::kRunning))) {
      r.status = JobStatus::kCancelled;
      r.message = "cancelled before it started";
      finish(job, std::move(r));
      continue;
    }
    running_.fetch_add(1);
    const std::int64_t t0 = now_ns();
    bool interrupted = false;
    if (delayed) {  // test hook (SchedulerOptions::test_delay_seconds); shutdown() cuts it short
      const double secs = opts_.test_delay_seconds + opts_.test_jitter_seconds * jitter(delay_rng);
      std::unique_lock<std::mutex> lk(stop_mu_);
      interrupted = stop_cv_.wait_for(lk, std::chrono::duration<double>(secs), [&] { return stopping_.load(); });
    }
    // Nothing a job throws leaves this block: the job completes as failed and the worker serves the next one.
    try {
      if (interrupted) {
        r.status = JobStatus::kCancelled;
        r.message = "cancelled during the test delay by shutdown";
      } else {
        r.outputs = run_with_fault(job->spec, take_fault(job->spec));
      }
    } catch (const std::bad_alloc&) {
      r.status = JobStatus::kFailed;
      r.message = failure_message(job->id, job->spec,
                                  "out of memory on the worker (std::bad_alloc); free host memory or use fewer workers");
    } catch (const std::exception& e) {
      r.status = JobStatus::kFailed;
      r.message = failure_message(job->id, job->spec, e.what());
    } catch (...) {
      r.status = JobStatus::kFailed;
      r.message = failure_message(job->id, job->spec, "an exception of unknown type");
    }
    const std::int64_t t1 = now_ns();
    r.queued_seconds = static_cast<double>(t0 - job->submitted_ns) * 1e-9;
    r.run_seconds = static_cast<double>(t1 - t0) * 1e-9;
    busy_ns_[index].fetch_add(t1 - t0);
    total_run_ns_.fetch_add(t1 - t0);
    atomic_max(max_run_ns_, t1 - t0);
    atomic_max(max_queued_ns_, t0 - job->submitted_ns);
    job->state.store(static_cast<int>(JobState::kDone));
    running_.fetch_sub(1);
    finish(job, std::move(r));
  }
}

std::vector<JobResult> RefreshScheduler::poll() {
  std::vector<JobResult> out;
  std::lock_guard<std::mutex> g(mu_);
  out.reserve(done_.size());
  for (auto& [id, r] : done_) {
    jobs_.erase(id);
    out.push_back(std::move(r));
  }
  done_.clear();
  return out;
}

JobResult RefreshScheduler::wait(JobId id) {
  std::unique_lock<std::mutex> lk(mu_);
  ASTERIA_CHECK(jobs_.count(id) != 0, kInvalidArgument,
                "[scheduler::wait] unknown job id " << id << " (never submitted, or already returned by poll/wait)");
  done_cv_.wait(lk, [&] { return done_.count(id) != 0; });
  JobResult r = std::move(done_.at(id));
  done_.erase(id);
  jobs_.erase(id);
  return r;
}

bool RefreshScheduler::cancel(JobId id) {
  std::shared_ptr<Job> job;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return false;
    job = it->second;
  }
  int expected = static_cast<int>(JobState::kQueued);
  return job->state.compare_exchange_strong(expected, static_cast<int>(JobState::kCancelled));
}

SchedulerStats RefreshScheduler::stats() const {
  SchedulerStats s;
  s.submitted = submitted_.load();
  s.completed = completed_.load();
  s.failed = failed_.load();
  s.cancelled = cancelled_.load();
  s.faults_injected = faults_injected_.load();
  s.running = running_.load();
  s.queued = s.submitted > s.completed + s.running ? s.submitted - s.completed - s.running : 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    s.uncollected = done_.size();
  }
  for (std::size_t i = 0; i < threads_.size(); ++i) s.worker_busy_seconds.push_back(busy_ns_[i].load() * 1e-9);
  s.max_run_seconds = max_run_ns_.load() * 1e-9;
  s.total_run_seconds = total_run_ns_.load() * 1e-9;
  s.max_queued_seconds = max_queued_ns_.load() * 1e-9;
  return s;
}

SchedulerFaultKind RefreshScheduler::take_fault(const JobSpec& spec) {
  std::lock_guard<std::mutex> g(fault_mu_);
  const SchedulerFault& f = fault_;
  if (f.kind == SchedulerFaultKind::kNone) return SchedulerFaultKind::kNone;
  if (f.job && *f.job != spec.kind) return SchedulerFaultKind::kNone;
  if (f.kind == SchedulerFaultKind::kNonFiniteResult && spec.kind == JobKind::kTask) return SchedulerFaultKind::kNone;
  const std::uint64_t n = fault_seen_++;
  if (n < f.skip || n - f.skip >= f.count) return SchedulerFaultKind::kNone;
  faults_injected_.fetch_add(1);
  return f.kind;
}

void RefreshScheduler::set_test_fault(const SchedulerFault& fault) {
  check_fault(fault);
  std::lock_guard<std::mutex> g(fault_mu_);
  fault_ = fault;
  fault_seen_ = 0;
}

void RefreshScheduler::shutdown() {
  if (stopping_.exchange(true)) {
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    return;
  }
  {
    std::lock_guard<std::mutex> g(stop_mu_);  // pairs with the test-delay wait in worker_main
  }
  stop_cv_.notify_all();
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& [id, job] : jobs_) {
      int expected = static_cast<int>(JobState::kQueued);
      job->state.compare_exchange_strong(expected, static_cast<int>(JobState::kCancelled));
    }
  }
  // One wake-up per worker beyond the queued jobs, so each sees an empty queue and exits.
  work_available_.release(static_cast<std::ptrdiff_t>(threads_.size()));
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

}  // namespace asteria
