#pragma once
// LockedScheduler — BENCHMARK BASELINE ONLY, not part of the library: the job intake that
// asteria::RefreshScheduler had before its intake became lock-free, kept so that
// scheduler_bench can run the two side by side in one binary.
//
// What it keeps of the previous design, unchanged: submit() takes a mutex to enter the job in a
// std::map of issued jobs, pushes it on the MPMC ring and posts a semaphore; a worker takes the
// semaphore, then a second mutex under which it drains the ring into a std::priority_queue and pops
// the earliest deadline (ties: smaller id); completion enters the result in a std::map under the first
// mutex and notifies a condition variable; wait() and poll() collect under that mutex. The job body is
// the library's: asteria::run_job (validation, prerequisite, the task or the solver, the finiteness
// check), with the same timing and per-worker accounting as RefreshScheduler's workers. Left out: the
// test hooks (delay, fault injection), CPU pinning, denormal flushing and stats().
//
// Thread safety: every method may be called from any thread.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <queue>
#include <semaphore>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "asteria/errors.h"
#include "asteria/mpmc_queue.h"
#include "asteria/scheduler.h"

namespace asteria_bench {

class LockedScheduler {
 public:
  explicit LockedScheduler(int workers, std::size_t queue_capacity = 4096)
      : ingress_(queue_capacity), busy_ns_(static_cast<std::size_t>(workers)) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { worker_main(i); });
  }
  ~LockedScheduler() { shutdown(); }
  LockedScheduler(const LockedScheduler&) = delete;
  LockedScheduler& operator=(const LockedScheduler&) = delete;

  asteria::JobId submit(asteria::JobSpec spec) {
    ASTERIA_CHECK(!stopping_.load(), kCancelled, "[LockedScheduler::submit] the scheduler is shut down");
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
      ASTERIA_CHECK(false, kBudgetExhausted, "[LockedScheduler::submit] the job queue is full");
    }
    work_available_.release();
    return job->id;
  }

  asteria::JobResult wait(asteria::JobId id) {
    std::unique_lock<std::mutex> lk(mu_);
    ASTERIA_CHECK(jobs_.count(id) != 0, kInvalidArgument, "[LockedScheduler::wait] unknown job id " << id);
    done_cv_.wait(lk, [&] { return done_.count(id) != 0; });
    asteria::JobResult r = std::move(done_.at(id));
    done_.erase(id);
    jobs_.erase(id);
    return r;
  }

  std::vector<asteria::JobResult> poll() {
    std::vector<asteria::JobResult> out;
    std::lock_guard<std::mutex> g(mu_);
    out.reserve(done_.size());
    for (auto& [id, r] : done_) {
      jobs_.erase(id);
      out.push_back(std::move(r));
    }
    done_.clear();
    return out;
  }

  void shutdown() {
    if (stopping_.exchange(true)) {
      for (auto& t : threads_)
        if (t.joinable()) t.join();
      return;
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& [id, job] : jobs_) {
        int expected = kQueued;
        job->state.compare_exchange_strong(expected, kCancelled);
      }
    }
    work_available_.release(static_cast<std::ptrdiff_t>(threads_.size()));
    for (auto& t : threads_)
      if (t.joinable()) t.join();
  }

 private:
  enum : int { kQueued = 0, kRunning = 1, kDone = 2, kCancelled = 3 };
  struct Job {
    asteria::JobId id = 0;
    asteria::JobSpec spec;
    std::atomic<int> state{kQueued};
    std::int64_t submitted_ns = 0;
  };
  struct Later {
    bool operator()(const std::shared_ptr<Job>& a, const std::shared_ptr<Job>& b) const {
      if (a->spec.deadline != b->spec.deadline) return a->spec.deadline > b->spec.deadline;
      return a->id > b->id;
    }
  };

  static std::int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  static void atomic_max(std::atomic<std::int64_t>& a, std::int64_t v) {
    std::int64_t cur = a.load(std::memory_order_relaxed);
    while (cur < v && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
    }
  }

  std::shared_ptr<Job> next_job() {
    std::lock_guard<std::mutex> g(ready_mu_);
    std::shared_ptr<Job> j;
    while (ingress_.try_pop(j)) ready_.push(std::move(j));
    if (ready_.empty()) return nullptr;
    j = ready_.top();
    ready_.pop();
    return j;
  }

  void finish(const std::shared_ptr<Job>& job, asteria::JobResult&& r) {
    r.id = job->id;
    r.block_id = job->spec.block_id;
    r.version = job->spec.version;
    r.deadline = job->spec.deadline;
    if (r.status == asteria::JobStatus::kFailed) failed_.fetch_add(1);
    if (r.status == asteria::JobStatus::kCancelled) cancelled_.fetch_add(1);
    {
      std::lock_guard<std::mutex> g(mu_);
      done_.emplace(job->id, std::move(r));
      completed_.fetch_add(1);
    }
    done_cv_.notify_all();
  }

  void worker_main(int index) {
    for (;;) {
      work_available_.acquire();
      std::shared_ptr<Job> job = next_job();
      if (!job) {
        if (stopping_.load()) return;
        work_available_.release();
        std::this_thread::yield();
        continue;
      }
      int expected = kQueued;
      asteria::JobResult r;
      if (!job->state.compare_exchange_strong(expected, kRunning)) {
        r.status = asteria::JobStatus::kCancelled;
        r.message = "cancelled before it started";
        finish(job, std::move(r));
        continue;
      }
      running_.fetch_add(1);
      const std::int64_t t0 = now_ns();
      try {
        r.outputs = asteria::run_job(job->spec);
      } catch (const std::exception& e) {
        r.status = asteria::JobStatus::kFailed;
        r.message = e.what();
      }
      const std::int64_t t1 = now_ns();
      r.queued_seconds = static_cast<double>(t0 - job->submitted_ns) * 1e-9;
      r.run_seconds = static_cast<double>(t1 - t0) * 1e-9;
      busy_ns_[static_cast<std::size_t>(index)].fetch_add(t1 - t0);
      total_run_ns_.fetch_add(t1 - t0);
      atomic_max(max_run_ns_, t1 - t0);
      atomic_max(max_queued_ns_, t0 - job->submitted_ns);
      job->state.store(kDone);
      running_.fetch_sub(1);
      finish(job, std::move(r));
    }
  }

  asteria::MpmcQueue<std::shared_ptr<Job>> ingress_;
  std::counting_semaphore<> work_available_{0};
  std::mutex ready_mu_;  // guards ready_ (workers only)
  std::priority_queue<std::shared_ptr<Job>, std::vector<std::shared_ptr<Job>>, Later> ready_;
  std::mutex mu_;  // guards jobs_, done_
  std::condition_variable done_cv_;
  std::map<asteria::JobId, std::shared_ptr<Job>> jobs_;
  std::map<asteria::JobId, asteria::JobResult> done_;
  std::atomic<asteria::JobId> next_id_{1};
  std::atomic<bool> stopping_{false};
  std::atomic<std::size_t> completed_{0}, failed_{0}, cancelled_{0}, running_{0};
  std::vector<std::atomic<std::int64_t>> busy_ns_;
  std::atomic<std::int64_t> max_run_ns_{0}, total_run_ns_{0}, max_queued_ns_{0};
  std::vector<std::thread> threads_;
};

}  // namespace asteria_bench
