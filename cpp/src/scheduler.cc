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
      auto v = s.reuse_inputs ? a : HostTensor::empty(dt, {n, n});
      linalg::eigh<T>(n, a.ptr<T>(), w.ptr<T>(), v.ptr<T>(), s.eigh);
      out.emplace_back("eigenvalues", std::move(w));
      out.emplace_back("eigenvectors", std::move(v));
      break;
    }
    case JobKind::kInverseRoot: {
      auto x = s.reuse_inputs ? a : HostTensor::empty(dt, {n, n});
      if (s.use_newton) {
        linalg::newton_inverse_root<T>(n, a.ptr<T>(), x.ptr<T>(), static_cast<int>(s.root), s.epsilon, s.newton);
      } else {
        linalg::inverse_root<T>(n, a.ptr<T>(), x.ptr<T>(), s.root, s.epsilon, s.eigh.fp64_retry);
      }
      out.emplace_back("root", std::move(x));
      break;
    }
    case JobKind::kEigenbasisRefresh: {
      auto q = s.reuse_inputs ? a : HostTensor::empty(dt, {n, n});
      auto p = HostTensor::empty(DType::kInt64, {n});
      linalg::eigenbasis_refresh<T>(n, a.ptr<T>(), s.inputs[1].ptr<T>(), q.ptr<T>(), p.ptr<std::int64_t>(), s.sort);
      std::optional<HostTensor> r;
      if (s.rotation) {
        // R = Q_oldᵀ·Q_new: what the install rotates the first moment with, computed here, off the training thread
        if (s.reuse_inputs) {
          r = s.inputs[1];
          linalg::matmul_tn_into_a<T>(n, r->ptr<T>(), q.ptr<T>());
        } else {
          r = HostTensor::empty(dt, {n, n});
          linalg::matmul_tn<T>(n, s.inputs[1].ptr<T>(), q.ptr<T>(), r->ptr<T>());
        }
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

// Bytes of the outputs that share an input's storage (JobSpec::reuse_inputs).
std::size_t reused_bytes(const JobSpec& spec, const std::vector<std::pair<std::string, HostTensor>>& outputs) {
  std::size_t n = 0;
  for (const auto& [name, t] : outputs)
    for (const auto& in : spec.inputs)
      if (t.storage && t.data() == in.data()) {
        n += t.nbytes();
        break;
      }
  return n;
}

}  // namespace

std::vector<std::pair<std::string, HostTensor>> run_job(const JobSpec& spec) {
  return run_with_fault(spec, SchedulerFaultKind::kNone);
}

// ----- the scheduler -------------------------------------------------------------------------
//
// The intake takes no lock. Its three structures:
//
// * The job table, slots_: capacity_ slots; job id n lives in slot n & (capacity_ - 1) from submit until
//   poll()/wait() collects its result. A slot's word is (ticket << 3) | state. A free slot's ticket is the
//   id it is free for (the previous occupant's id + capacity_), so submit() claims an id and its slot
//   together, as a push does in the MPMC ring: it reads next_id_ = n, checks that slot n is free for n and
//   advances next_id_ from n to n + 1 with a compare-and-swap. Ids are never skipped, and a slot whose
//   ticket is below n still holds job n - k·capacity_: the table is full for n, and submit() fails
//   without taking the id. An occupied slot's ticket is its job's id: cancel(n) and wait(n) find the job
//   by its slot and check the ticket.
// * The ingress ring, ingress_ (asteria::MpmcQueue): slot numbers, from submit() to the workers. It has
//   capacity_ slots and holds only uncollected jobs, other than the one being pushed, so it is never
//   full; a push spins only while a worker is between the two steps of a pop of the slot it needs.
// * The runs, runs_: up to kRunLevels sorted chains of queued jobs, linked through Slot::next, in
//   (deadline, id) order. A head word is (tag << 21) | (slot + 1); every change of a head increments its
//   tag, so a compare-and-swap on a head fails whenever the head changed since it was read (no ABA).
//   Chains reachable from a head are never modified: a worker pops a head (CAS to the next node) or
//   claims a whole run (CAS to empty) and then owns its nodes.
//
// A worker picks a job in two steps. intake(): it pops what the ring holds (in chunks of kChunk, at most
// capacity_ slots), sorts each chunk and publishes it: into level 0 if empty, else it claims level 0's
// run, merges, and carries on to level 1, and so on (the increment of a binary counter; the top level
// absorbs carries), so a job is merged at most kRunLevels - 1 times before the top level, which a carry
// reaches once per 2^(kRunLevels-1) chunks. pop_earliest(): it reads the heads of all levels and pops
// the one with the smallest key. Every job submitted before the pick is then either in the runs, or
// in a chunk another worker is merging (it becomes visible when that worker publishes it, before
// that worker picks), or behind a ring slot whose push has not finished. A worker that finds nothing
// returns its permit and retries; it exits only at shutdown, when no push is in flight, and only
// when it finds nothing: the last worker to exit has found the runs and the ring empty, so no job is
// left without a result.
//
// A job's state moves kQueued -> kRunning (the worker that popped it) or kQueued -> kCancelled (cancel(),
// shutdown()); a popped cancelled job completes as cancelled. Then kDone (the result is in done_) and,
// at collection, kFree with the ticket of the slot's next id.
namespace {

constexpr int kStateBits = 3;
constexpr std::uint64_t kStateMask = (1u << kStateBits) - 1;
constexpr std::uint64_t kFree = 0, kQueued = 1, kCancelled = 2, kRunning = 3, kDone = 4;
constexpr std::uint64_t pack(JobId ticket, std::uint64_t state) { return ticket << kStateBits | state; }
constexpr JobId ticket_of(std::uint64_t word) { return word >> kStateBits; }
constexpr std::uint64_t state_of(std::uint64_t word) { return word & kStateMask; }

constexpr int kHeadBits = 21;  // slot + 1 (at most 2^20)
constexpr std::uint64_t kHeadMask = (std::uint64_t{1} << kHeadBits) - 1;
// The head word after a change to `node` (slot + 1, 0: empty).
constexpr std::uint64_t next_head(std::uint64_t head, std::uint32_t node) {
  return ((head >> kHeadBits) + 1) << kHeadBits | node;
}

constexpr std::size_t kChunk = 64;           // ring slots sorted at once by intake()
constexpr std::uint64_t kSubmitter = 2;      // gate_: one submit in flight
constexpr std::uint64_t kGateStopping = 1;   // gate_: shutdown has begun

std::size_t checked_capacity(const SchedulerOptions& o) {
  ASTERIA_CHECK(o.queue_capacity >= 1 && o.queue_capacity <= (std::size_t{1} << 20), kInvalidArgument,
                "[scheduler] queue_capacity must be in 1..1048576, got " << o.queue_capacity);
  return mpmc_detail::ring_capacity(o.queue_capacity);
}

}  // namespace

struct RefreshScheduler::Job {
  JobSpec spec;
  std::int64_t submitted_ns = 0;
};

struct RefreshScheduler::Slot {
  std::atomic<std::uint64_t> word{0};       // (ticket << 3) | state
  std::atomic<std::int64_t> deadline{0};    // the EDF key with the ticket; read by workers scanning the runs
  std::atomic<std::uint32_t> next{0};       // the next node of the slot's run (slot + 1; 0: the end)
  std::unique_ptr<Job> job;                 // set by submit(), released at collection
};

struct RefreshScheduler::RunKey {
  std::int64_t deadline;
  JobId id;
  std::uint32_t slot;
  bool operator<(const RunKey& o) const { return deadline != o.deadline ? deadline < o.deadline : id < o.id; }
};

RefreshScheduler::RefreshScheduler(const SchedulerOptions& opts)
    : opts_(opts), capacity_(checked_capacity(opts)), slots_(new Slot[capacity_]), ingress_(capacity_) {
  ASTERIA_CHECK(opts.workers >= 1 && opts.workers <= 256, kInvalidArgument,
                "[scheduler] workers must be in 1..256, got " << opts.workers);
  ASTERIA_CHECK(opts.test_delay_seconds >= 0 && opts.test_delay_seconds <= 3600 && opts.test_jitter_seconds >= 0 &&
                    opts.test_jitter_seconds <= 3600,
                kInvalidArgument,
                "[scheduler] test_delay_seconds and test_jitter_seconds must be in [0, 3600], got "
                    << opts.test_delay_seconds << " and " << opts.test_jitter_seconds);
  check_fault(opts.test_fault);
  fault_ = opts.test_fault;
  fault_armed_.store(fault_.kind != SchedulerFaultKind::kNone);
  // Ids start at 1: slot s is first free for id s (slot 0 for id capacity_).
  for (std::size_t s = 0; s < capacity_; ++s) slots_[s].word.store(pack(s == 0 ? capacity_ : s, kFree));
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
  ASTERIA_CHECK(!(gate_.load(std::memory_order_acquire) & kGateStopping), kCancelled,
                "[scheduler::submit] the scheduler is shut down");
  validate(spec);
  auto job = std::make_unique<Job>();
  job->spec = std::move(spec);
  const std::int64_t deadline = job->spec.deadline;
  // Counted in gate_ until the push is done, so that shutdown() waits for it before the workers may exit.
  struct InFlight {
    std::atomic<std::uint64_t>& gate;
    ~InFlight() { gate.fetch_sub(kSubmitter, std::memory_order_release); }
  };
  const bool stopping = gate_.fetch_add(kSubmitter, std::memory_order_acq_rel) & kGateStopping;
  InFlight in_flight{gate_};
  ASTERIA_CHECK(!stopping, kCancelled, "[scheduler::submit] the scheduler is shut down");

  JobId id = next_id_.load(std::memory_order_acquire);
  Slot* slot = nullptr;
  for (;;) {
    slot = &slots_[id & (capacity_ - 1)];
    const std::uint64_t w = slot->word.load(std::memory_order_acquire);
    const JobId t = ticket_of(w);
    if (t == id && state_of(w) == kFree) {
      if (next_id_.compare_exchange_weak(id, id + 1, std::memory_order_acq_rel, std::memory_order_acquire)) break;
    } else if (t < id) {
      ASTERIA_CHECK(false, kBudgetExhausted,
                    "[scheduler::submit] the job table is full: job "
                        << t << " still holds the slot of the next job, and at most queue_capacity = " << capacity_
                        << " jobs may be submitted and not yet collected; collect results with poll()/wait() or "
                           "raise queue_capacity");
    } else {
      id = next_id_.load(std::memory_order_acquire);  // another submit took id
    }
  }
  // Slot `id` is this submit's: no other id maps to it before job id is collected.
  job->submitted_ns = now_ns();
  slot->job = std::move(job);
  slot->deadline.store(deadline, std::memory_order_relaxed);
  slot->next.store(0, std::memory_order_relaxed);
  slot->word.store(pack(id, kQueued), std::memory_order_release);
  ingress_.push(static_cast<std::uint32_t>(id & (capacity_ - 1)));
  submitted_.fetch_add(1, std::memory_order_relaxed);
  work_available_.release();
  return id;
}

RefreshScheduler::RunKey RefreshScheduler::key_of(std::uint32_t slot) const {
  const Slot& s = slots_[slot];
  return RunKey{s.deadline.load(std::memory_order_relaxed), ticket_of(s.word.load(std::memory_order_relaxed)), slot};
}

// Merges two sorted chains (slot + 1 of their first nodes) that this worker owns; returns the merged chain.
std::uint32_t RefreshScheduler::merge(std::uint32_t a, std::uint32_t b) {
  if (a == 0) return b;
  if (b == 0) return a;
  std::uint32_t head = 0, tail = 0;
  auto append = [&](std::uint32_t node) {
    if (tail != 0) slots_[tail - 1].next.store(node, std::memory_order_relaxed);
    else head = node;
    tail = node;
  };
  RunKey ka = key_of(a - 1), kb = key_of(b - 1);
  while (a != 0 && b != 0) {
    if (ka < kb) {
      const std::uint32_t n = slots_[a - 1].next.load(std::memory_order_relaxed);
      append(a);
      if ((a = n) != 0) ka = key_of(a - 1);
    } else {
      const std::uint32_t n = slots_[b - 1].next.load(std::memory_order_relaxed);
      append(b);
      if ((b = n) != 0) kb = key_of(b - 1);
    }
  }
  append(a != 0 ? a : b);
  return head;
}

void RefreshScheduler::publish(std::uint32_t chain) {
  int k = 0;
  std::uint64_t h = runs_[0].load(std::memory_order_acquire);
  for (;;) {
    std::atomic<std::uint64_t>& level = runs_[k];
    if ((h & kHeadMask) == 0) {
      // Empty: the chain goes here (release: its links and keys are visible to whoever reads the head).
      if (level.compare_exchange_weak(h, next_head(h, chain), std::memory_order_acq_rel, std::memory_order_acquire))
        return;
    } else if (level.compare_exchange_weak(h, next_head(h, 0), std::memory_order_acq_rel, std::memory_order_acquire)) {
      // Claimed the level's run: merge it in and carry to the next level (the top level absorbs carries).
      chain = merge(chain, static_cast<std::uint32_t>(h & kHeadMask));
      if (k + 1 < kRunLevels) ++k;
      h = runs_[k].load(std::memory_order_acquire);
    }
  }
}

void RefreshScheduler::intake(std::vector<RunKey>& chunk) {
  std::size_t budget = capacity_;  // what the ring held when the pick began, at most
  for (;;) {
    chunk.clear();
    std::uint32_t s;
    while (chunk.size() < kChunk && budget > 0 && ingress_.try_pop(s)) {
      chunk.push_back(key_of(s));
      --budget;
    }
    if (chunk.empty()) return;
    std::sort(chunk.begin(), chunk.end());
    for (std::size_t i = 0; i < chunk.size(); ++i)
      slots_[chunk[i].slot].next.store(i + 1 < chunk.size() ? chunk[i + 1].slot + 1 : 0, std::memory_order_relaxed);
    publish(chunk.front().slot + 1);
    if (chunk.size() < kChunk || budget == 0) return;
  }
}

std::int64_t RefreshScheduler::pop_earliest() {
  for (;;) {
    int best = -1;
    std::uint64_t best_head = 0;
    RunKey best_key{};
    for (int k = 0; k < kRunLevels; ++k) {
      const std::uint64_t h = runs_[k].load(std::memory_order_acquire);
      const auto node = static_cast<std::uint32_t>(h & kHeadMask);
      if (node == 0) continue;
      const RunKey key = key_of(node - 1);  // may be stale: then the CAS below fails
      if (best < 0 || key < best_key) {
        best = k;
        best_head = h;
        best_key = key;
      }
    }
    if (best < 0) return -1;
    const auto node = static_cast<std::uint32_t>(best_head & kHeadMask);
    const std::uint32_t next = slots_[node - 1].next.load(std::memory_order_relaxed);
    if (runs_[best].compare_exchange_strong(best_head, next_head(best_head, next), std::memory_order_acq_rel,
                                            std::memory_order_relaxed))
      return node - 1;
  }
}

bool RefreshScheduler::issued(JobId id) const {
  const std::uint64_t w = slots_[id & (capacity_ - 1)].word.load(std::memory_order_acquire);
  return ticket_of(w) == id && state_of(w) != kFree;
}

void RefreshScheduler::finish(Slot& slot, JobId id, JobResult&& r) {
  const JobSpec& spec = slot.job->spec;
  r.id = id;
  r.block_id = spec.block_id;
  r.version = spec.version;
  r.deadline = spec.deadline;
  if (r.status == JobStatus::kFailed) failed_.fetch_add(1);
  if (r.status == JobStatus::kCancelled) cancelled_.fetch_add(1);
  slot.word.store(pack(id, kDone), std::memory_order_release);
  {
    std::lock_guard<std::mutex> g(mu_);
    done_.emplace(id, std::move(r));
    completed_.fetch_add(1);
  }
  done_cv_.notify_all();
  // The slot is the collector's from here on.
}

void RefreshScheduler::worker_main(int index) {
  if (opts_.flush_denormals) set_flush_denormals();
  std::mt19937_64 delay_rng(opts_.test_seed + static_cast<std::uint64_t>(index));
  std::uniform_real_distribution<double> jitter(0.0, 1.0);
  const bool delayed = opts_.test_delay_seconds > 0 || opts_.test_jitter_seconds > 0;
  std::vector<RunKey> chunk;
  chunk.reserve(kChunk);
  for (;;) {
    work_available_.acquire();
    intake(chunk);
    const std::int64_t taken = pop_earliest();
    if (taken < 0) {
      if (stopping_.load(std::memory_order_acquire)) return;
      // The permit belongs to a job that is not visible yet: behind a ring slot whose push has not finished
      // (the ring is FIFO), or in a chunk another worker is merging. Keep the permit for it and retry.
      work_available_.release();
      std::this_thread::yield();
      continue;
    }
    Slot& slot = slots_[taken];
    std::uint64_t w = slot.word.load(std::memory_order_acquire);
    const JobId id = ticket_of(w);
    ASTERIA_ASSERT(state_of(w) == kQueued || state_of(w) == kCancelled);
    const JobSpec& spec = slot.job->spec;
    JobResult r;
    if (state_of(w) != kQueued ||
        !slot.word.compare_exchange_strong(w, pack(id, kRunning), std::memory_order_acq_rel,
                                           std::memory_order_acquire)) {
      ASTERIA_ASSERT(state_of(w) == kCancelled);
      r.status = JobStatus::kCancelled;
      r.message = "cancelled before it started";
      finish(slot, id, std::move(r));
      continue;
    }
    running_.fetch_add(1);
    const std::int64_t t0 = now_ns();
    const std::int64_t submitted_ns = slot.job->submitted_ns;
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
        r.outputs = run_with_fault(spec, take_fault(spec));
        r.reused_bytes = reused_bytes(spec, r.outputs);
      }
    } catch (const std::bad_alloc&) {
      r.status = JobStatus::kFailed;
      r.message = failure_message(id, spec,
                                  "out of memory on the worker (std::bad_alloc); free host memory or use fewer workers");
    } catch (const std::exception& e) {
      r.status = JobStatus::kFailed;
      r.message = failure_message(id, spec, e.what());
    } catch (...) {
      r.status = JobStatus::kFailed;
      r.message = failure_message(id, spec, "an exception of unknown type");
    }
    const std::int64_t t1 = now_ns();
    r.queued_seconds = static_cast<double>(t0 - submitted_ns) * 1e-9;
    r.run_seconds = static_cast<double>(t1 - t0) * 1e-9;
    busy_ns_[index].fetch_add(t1 - t0);
    total_run_ns_.fetch_add(t1 - t0);
    atomic_max(max_run_ns_, t1 - t0);
    atomic_max(max_queued_ns_, t0 - submitted_ns);
    running_.fetch_sub(1);
    finish(slot, id, std::move(r));
  }
}

std::vector<JobResult> RefreshScheduler::poll() {
  std::vector<JobResult> out;
  std::vector<std::unique_ptr<Job>> collected;  // freed after the lock is released
  {
    std::lock_guard<std::mutex> g(mu_);
    out.reserve(done_.size());
    collected.reserve(done_.size());
    for (auto& [id, r] : done_) {
      Slot& slot = slots_[id & (capacity_ - 1)];
      collected.push_back(std::move(slot.job));
      slot.word.store(pack(id + capacity_, kFree), std::memory_order_release);
      out.push_back(std::move(r));
    }
    done_.clear();
  }
  if (!out.empty()) done_cv_.notify_all();  // a wait() for one of these ids now fails instead of sleeping on
  return out;
}

JobResult RefreshScheduler::wait(JobId id) {
  std::unique_ptr<Job> collected;  // freed after the lock is released
  std::unique_lock<std::mutex> lk(mu_);
  ASTERIA_CHECK(issued(id), kInvalidArgument,
                "[scheduler::wait] unknown job id " << id << " (never submitted, or already returned by poll/wait)");
  done_cv_.wait(lk, [&] { return done_.count(id) != 0 || !issued(id); });
  auto it = done_.find(id);
  ASTERIA_CHECK(it != done_.end(), kInvalidArgument,
                "[scheduler::wait] job " << id << " was returned by poll/wait on another thread while this one waited");
  JobResult r = std::move(it->second);
  done_.erase(it);
  Slot& slot = slots_[id & (capacity_ - 1)];
  collected = std::move(slot.job);
  slot.word.store(pack(id + capacity_, kFree), std::memory_order_release);
  lk.unlock();
  return r;
}

bool RefreshScheduler::cancel(JobId id) {
  std::uint64_t w = pack(id, kQueued);
  return slots_[id & (capacity_ - 1)].word.compare_exchange_strong(w, pack(id, kCancelled), std::memory_order_acq_rel,
                                                                   std::memory_order_relaxed);
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
  if (!fault_armed_.load(std::memory_order_acquire)) return SchedulerFaultKind::kNone;
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
  fault_armed_.store(fault.kind != SchedulerFaultKind::kNone, std::memory_order_release);
}

void RefreshScheduler::shutdown() {
  if (gate_.fetch_or(kGateStopping, std::memory_order_acq_rel) & kGateStopping) {
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    return;
  }
  // No submit starts from here on; wait for those past the check to finish their push. Only then may a
  // worker that finds nothing exit: every job is in the ring or the runs by now.
  unsigned spins = 0;
  while (gate_.load(std::memory_order_acquire) >= kSubmitter) mpmc_detail::backoff(spins);
  stopping_.store(true, std::memory_order_release);
  {
    std::lock_guard<std::mutex> g(stop_mu_);  // pairs with the test-delay wait in worker_main
  }
  stop_cv_.notify_all();
  for (std::size_t s = 0; s < capacity_; ++s) {
    std::uint64_t w = slots_[s].word.load(std::memory_order_acquire);
    while (state_of(w) == kQueued &&
           !slots_[s].word.compare_exchange_weak(w, pack(ticket_of(w), kCancelled), std::memory_order_acq_rel,
                                                 std::memory_order_acquire)) {
    }
  }
  // One wake-up per worker beyond the queued jobs, so each finds nothing left and exits.
  work_available_.release(static_cast<std::ptrdiff_t>(threads_.size()));
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  ASTERIA_ASSERT(ingress_.empty());
  for (const auto& level : runs_) ASTERIA_ASSERT((level.load() & kHeadMask) == 0);
}

}  // namespace asteria
