#include "asteria/scheduler.h"

#include <sched.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "asteria/errors.h"

namespace {

using namespace std::chrono_literals;

asteria::HostTensor spd(int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::vector<double> g(static_cast<std::size_t>(n) * n);
  for (auto& x : g) x = nd(rng);
  auto t = asteria::HostTensor::empty(asteria::DType::kFloat64, {n, n});
  double* a = t.ptr<double>();
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += g[i * n + k] * g[j * n + k];
      a[i * n + j] = s + (i == j ? 0.1 : 0.0);
    }
  return t;
}

asteria::JobSpec task_job(std::int64_t deadline, std::function<void()> f) {
  asteria::JobSpec s;
  s.kind = asteria::JobKind::kTask;
  s.deadline = deadline;
  s.task = std::move(f);
  return s;
}

asteria::SchedulerOptions workers(int n) {
  asteria::SchedulerOptions o;
  o.workers = n;
  return o;
}

TEST(Scheduler, EighJobReturnsOutputsAndMetadata) {
  asteria::RefreshScheduler s(workers(1));
  asteria::JobSpec spec;
  spec.kind = asteria::JobKind::kEigh;
  spec.block_id = 42;
  spec.version = 7;
  spec.deadline = 8;
  spec.inputs.push_back(spd(8, 1));
  auto id = s.submit(std::move(spec));
  auto r = s.wait(id);
  EXPECT_EQ(r.status, asteria::JobStatus::kOk) << r.message;
  EXPECT_EQ(r.block_id, 42u);
  EXPECT_EQ(r.version, 7);
  EXPECT_EQ(r.deadline, 8);
  ASSERT_EQ(r.outputs.size(), 2u);
  EXPECT_EQ(r.outputs[0].first, "eigenvalues");
  EXPECT_EQ(r.outputs[1].second.shape, (std::vector<std::int64_t>{8, 8}));
  EXPECT_THROW(s.wait(id), asteria::Error);  // collected exactly once
}

// reuse_inputs: the results are written over the job's own inputs and share their storage, with the
// same values as results in fresh buffers.
TEST(Scheduler, ReusedInputsHoldTheResultsAndAreCounted) {
  asteria::RefreshScheduler s(workers(1));
  auto run = [&](asteria::JobKind kind, bool reuse) {
    asteria::JobSpec spec;
    spec.kind = kind;
    spec.inputs.push_back(spd(16, 3));
    if (kind == asteria::JobKind::kEigenbasisRefresh) spec.inputs.push_back(spd(16, 4));
    if (kind == asteria::JobKind::kInverseRoot) spec.root = 2.0;
    spec.reuse_inputs = reuse;
    std::vector<const void*> in;
    for (const auto& t : spec.inputs) in.push_back(t.data());
    auto r = s.wait(s.submit(std::move(spec)));
    EXPECT_EQ(r.status, asteria::JobStatus::kOk) << r.message;
    return std::make_pair(std::move(r), in);
  };
  for (auto kind : {asteria::JobKind::kEigh, asteria::JobKind::kInverseRoot, asteria::JobKind::kEigenbasisRefresh}) {
    auto [fresh, fresh_in] = run(kind, false);
    auto [reused, reused_in] = run(kind, true);
    EXPECT_EQ(fresh.reused_bytes, 0u);
    ASSERT_EQ(fresh.outputs.size(), reused.outputs.size());
    std::size_t shared = 0;
    for (std::size_t k = 0; k < fresh.outputs.size(); ++k) {
      const auto& a = fresh.outputs[k].second;
      const auto& b = reused.outputs[k].second;
      ASSERT_EQ(a.nbytes(), b.nbytes());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.nbytes()), 0) << fresh.outputs[k].first;
      for (const void* p : reused_in)
        if (b.data() == p) shared += b.nbytes();
    }
    // the n×n outputs (eigenvectors; root; basis and rotation) are the inputs' memory
    const std::size_t matrix = 16 * 16 * sizeof(double);
    EXPECT_EQ(shared, kind == asteria::JobKind::kEigenbasisRefresh ? 2 * matrix : matrix);
    EXPECT_EQ(reused.reused_bytes, shared);
  }
}

TEST(Scheduler, PrerequisiteRunsOnTheWorkerBeforeTheJob) {
  asteria::RefreshScheduler s(workers(1));
  std::atomic<bool> ready{false};
  std::atomic<bool> saw_ready{false};
  auto spec = task_job(1, [&] { saw_ready = ready.load(); });
  spec.prerequisite = [&] {
    std::this_thread::sleep_for(20ms);  // e.g. a device-to-host copy finishing
    ready = true;
  };
  auto r = s.wait(s.submit(std::move(spec)));
  EXPECT_EQ(r.status, asteria::JobStatus::kOk) << r.message;
  EXPECT_TRUE(saw_ready.load());
}

TEST(Scheduler, FailingPrerequisiteFailsOnlyThatJob) {
  asteria::RefreshScheduler s(workers(1));
  asteria::JobSpec spec;
  spec.kind = asteria::JobKind::kEigh;
  spec.block_id = 3;
  spec.version = 9;
  spec.inputs.push_back(spd(4, 2));
  spec.prerequisite = [] { throw std::runtime_error("copy event failed"); };
  auto r = s.wait(s.submit(std::move(spec)));
  EXPECT_EQ(r.status, asteria::JobStatus::kFailed);
  EXPECT_NE(r.message.find("copy event failed"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("block 3"), std::string::npos) << r.message;
  EXPECT_TRUE(r.outputs.empty());
  asteria::JobSpec next;
  next.kind = asteria::JobKind::kEigh;
  next.inputs.push_back(spd(4, 3));
  EXPECT_EQ(s.wait(s.submit(std::move(next))).status, asteria::JobStatus::kOk);
}

TEST(Scheduler, NonFiniteInputIsAFailedJobNotACrash) {
  asteria::RefreshScheduler s(workers(1));
  asteria::JobSpec spec;
  spec.kind = asteria::JobKind::kInverseRoot;
  spec.block_id = 3;
  spec.root = 4;
  spec.epsilon = 1e-12;
  spec.inputs.push_back(spd(4, 2));
  spec.inputs[0].ptr<double>()[5] = std::numeric_limits<double>::infinity();
  auto r = s.wait(s.submit(std::move(spec)));
  EXPECT_EQ(r.status, asteria::JobStatus::kFailed);
  EXPECT_NE(r.message.find("block 3"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("NaN or Inf"), std::string::npos) << r.message;
  EXPECT_EQ(s.stats().failed, 1u);
  // The scheduler keeps working.
  auto ok = s.wait(s.submit(task_job(0, [] {})));
  EXPECT_EQ(ok.status, asteria::JobStatus::kOk);
}

TEST(Scheduler, ExceptionsInTasksAreCaptured) {
  asteria::RefreshScheduler s(workers(2));
  auto r = s.wait(s.submit(task_job(0, [] { throw std::runtime_error("boom"); })));
  EXPECT_EQ(r.status, asteria::JobStatus::kFailed);
  EXPECT_NE(r.message.find("boom"), std::string::npos);
}

TEST(Scheduler, MalformedSpecIsRejectedAtSubmit) {
  asteria::RefreshScheduler s(workers(1));
  asteria::JobSpec spec;
  spec.kind = asteria::JobKind::kEigh;
  EXPECT_THROW(s.submit(spec), asteria::Error);
  spec.inputs.push_back(asteria::HostTensor::empty(asteria::DType::kFloat64, {2, 3}));
  EXPECT_THROW(s.submit(spec), asteria::Error);
  EXPECT_THROW(asteria::RefreshScheduler(workers(0)), asteria::Error);
}

TEST(Scheduler, EarliestDeadlineFirst) {
  asteria::RefreshScheduler s(workers(1));
  std::atomic<bool> release{false};
  std::mutex mu;
  std::vector<std::int64_t> order;
  // Block the only worker, queue jobs with shuffled deadlines, then release.
  auto gate = s.submit(task_job(-1, [&] {
    while (!release.load()) std::this_thread::sleep_for(1ms);
  }));
  std::this_thread::sleep_for(20ms);
  for (std::int64_t d : {50, 10, 40, 20, 30}) {
    s.submit(task_job(d, [&, d] {
      std::lock_guard<std::mutex> g(mu);
      order.push_back(d);
    }));
  }
  release = true;
  s.wait(gate);
  while (s.stats().completed < 6) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(order, (std::vector<std::int64_t>{10, 20, 30, 40, 50}));
}

TEST(Scheduler, CancelQueuedJob) {
  asteria::RefreshScheduler s(workers(1));
  std::atomic<bool> release{false}, ran{false};
  auto gate = s.submit(task_job(0, [&] {
    while (!release.load()) std::this_thread::sleep_for(1ms);
  }));
  auto victim = s.submit(task_job(1, [&] { ran = true; }));
  EXPECT_TRUE(s.cancel(victim));
  while (s.stats().running == 0) std::this_thread::sleep_for(1ms);
  EXPECT_FALSE(s.cancel(gate));  // running
  release = true;
  auto r = s.wait(victim);
  EXPECT_EQ(r.status, asteria::JobStatus::kCancelled);
  EXPECT_FALSE(ran.load());
  // The only worker ran the gate (the earlier deadline) before it reported the victim: finished, not collected.
  EXPECT_FALSE(s.cancel(gate));
  EXPECT_EQ(s.wait(gate).status, asteria::JobStatus::kOk);
  EXPECT_FALSE(s.cancel(gate));  // finished and collected
}

TEST(Scheduler, PollNeverBlocksAndReturnsEachResultOnce) {
  asteria::RefreshScheduler s(workers(2));
  std::set<asteria::JobId> ids;
  for (int i = 0; i < 20; ++i) ids.insert(s.submit(task_job(i, [] {})));
  std::set<asteria::JobId> seen;
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (seen.size() < ids.size() && std::chrono::steady_clock::now() < until) {
    for (auto& r : s.poll()) EXPECT_TRUE(seen.insert(r.id).second);
  }
  EXPECT_EQ(seen, ids);
  EXPECT_TRUE(s.poll().empty());
}

TEST(Scheduler, ShutdownWithQueuedJobsNeverHangs) {
  std::atomic<int> ran{0};
  {
    asteria::RefreshScheduler s(workers(2));
    for (int i = 0; i < 200; ++i)
      s.submit(task_job(i, [&] {
        std::this_thread::sleep_for(2ms);
        ++ran;
      }));
  }  // destructor: cancels what is queued, joins
  EXPECT_LT(ran.load(), 200);
}

TEST(Scheduler, SubmitAfterShutdownIsRefused) {
  asteria::RefreshScheduler s(workers(1));
  s.shutdown();
  s.shutdown();
  EXPECT_THROW(s.submit(task_job(0, [] {})), asteria::Error);
}

TEST(Scheduler, TwoWorkersRunConcurrently) {
  asteria::RefreshScheduler s(workers(2));
  std::atomic<int> inside{0}, max_inside{0};
  std::vector<asteria::JobId> ids;
  for (int i = 0; i < 4; ++i)
    ids.push_back(s.submit(task_job(i, [&] {
      int now = ++inside;
      int m = max_inside.load();
      while (now > m && !max_inside.compare_exchange_weak(m, now)) {
      }
      std::this_thread::sleep_for(50ms);
      --inside;
    })));
  for (auto id : ids) s.wait(id);
  EXPECT_EQ(max_inside.load(), 2);
  auto st = s.stats();
  ASSERT_EQ(st.worker_busy_seconds.size(), 2u);
  EXPECT_GT(st.worker_busy_seconds[0], 0.04);
  EXPECT_GT(st.worker_busy_seconds[1], 0.04);
}

TEST(Scheduler, FlushToZeroOnWorkers) {
  asteria::RefreshScheduler s(workers(1));
  volatile double tiny = std::numeric_limits<double>::denorm_min() * 1000;
  double seen = -1;
  s.wait(s.submit(task_job(0, [&] { seen = tiny * 0.5; })));
#if defined(__x86_64__)
  EXPECT_EQ(seen, 0.0);  // DAZ treats the denormal operand as zero
#else
  (void)seen;
#endif
}

// Many producers submit real linalg jobs and tasks while consumers wait/poll; every job is
// completed exactly once and the sum of task payloads is conserved.
TEST(Scheduler, StressConservesCompletedJobs) {
  asteria::SchedulerOptions o;
  o.workers = 3;
  o.queue_capacity = 1 << 14;
  asteria::RefreshScheduler s(o);
  constexpr int kProducers = 4, kPer = 300;
  std::atomic<long> payload{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> producers;
  std::mutex ids_mu;
  std::vector<asteria::JobId> ids;
  for (int p = 0; p < kProducers; ++p)
    producers.emplace_back([&, p] {
      while (!go.load()) std::this_thread::yield();
      for (int i = 0; i < kPer; ++i) {
        asteria::JobId id;
        if (i % 10 == 0) {
          asteria::JobSpec spec;
          spec.kind = asteria::JobKind::kEigh;
          spec.deadline = i;
          spec.inputs.push_back(spd(6, static_cast<unsigned>(p * kPer + i)));
          id = s.submit(std::move(spec));
        } else {
          id = s.submit(task_job(i, [&payload, i] { payload += i; }));
        }
        std::lock_guard<std::mutex> g(ids_mu);
        ids.push_back(id);
      }
    });
  go = true;
  for (auto& t : producers) t.join();
  std::set<asteria::JobId> seen;
  while (seen.size() < ids.size()) {
    for (auto& r : s.poll()) {
      EXPECT_EQ(r.status, asteria::JobStatus::kOk) << r.message;
      EXPECT_TRUE(seen.insert(r.id).second);
    }
    std::this_thread::yield();
  }
  long expected = 0;
  for (int i = 0; i < kPer; ++i)
    if (i % 10 != 0) expected += i;
  EXPECT_EQ(payload.load(), expected * kProducers);
  EXPECT_EQ(s.stats().completed, static_cast<std::size_t>(kProducers * kPer));
}

// Several producers submit while a collector polls. The job table (queue_capacity 64) is reused many
// times over and fills up: submit() then throws kBudgetExhausted and the producer retries. Every job runs
// exactly once (the payloads it adds sum to the payloads submitted, and it ran as many times as there are
// jobs), and every result is collected exactly once, for the id submit() returned, with that job's block.
TEST(Scheduler, StressEveryJobRunsOnceAndIsCollectedOnce) {
  for (int nworkers : {1, 2}) {
    SCOPED_TRACE("workers=" + std::to_string(nworkers));
    asteria::SchedulerOptions o = workers(nworkers);
    o.queue_capacity = 64;
    asteria::RefreshScheduler s(o);
    constexpr int kProducers = 4, kPer = 1500;
    std::atomic<std::uint64_t> ran_sum{0}, ran_count{0};
    std::atomic<int> producing{kProducers};
    std::atomic<bool> go{false};
    std::vector<std::vector<std::pair<asteria::JobId, std::uint64_t>>> submitted(kProducers);
    std::vector<std::thread> producers;
    for (int p = 0; p < kProducers; ++p)
      producers.emplace_back([&, p] {
        while (!go.load()) std::this_thread::yield();
        for (int i = 0; i < kPer; ++i) {
          const std::uint64_t token = static_cast<std::uint64_t>(p) * kPer + i + 1;
          for (;;) {
            auto spec = task_job(i % 7, [&ran_sum, &ran_count, token] {
              ran_sum.fetch_add(token);
              ran_count.fetch_add(1);
            });
            spec.block_id = token;
            try {
              submitted[p].emplace_back(s.submit(std::move(spec)), token);
              break;
            } catch (const asteria::Error& e) {
              if (e.category() == asteria::ErrorCategory::kCancelled) return;  // shut down by the timeout below
              ASSERT_EQ(e.category(), asteria::ErrorCategory::kBudgetExhausted) << e.what();
              std::this_thread::yield();
            }
          }
        }
        producing.fetch_sub(1);
      });
    std::map<asteria::JobId, std::uint64_t> collected;  // id -> block
    go = true;
    const auto until = std::chrono::steady_clock::now() + 20s;
    for (;;) {
      const bool last = producing.load() == 0;
      for (auto& r : s.poll()) {
        EXPECT_EQ(r.status, asteria::JobStatus::kOk) << r.message;
        EXPECT_TRUE(collected.emplace(r.id, r.block_id).second) << "job " << r.id << " collected twice";
      }
      if (last && collected.size() >= static_cast<std::size_t>(kProducers) * kPer) break;
      if (std::chrono::steady_clock::now() > until) {
        ADD_FAILURE() << "only " << collected.size() << " results after 20 s";
        s.shutdown();  // the producers' retries end: submit throws kCancelled
        break;
      }
      std::this_thread::yield();
    }
    for (auto& t : producers) t.join();
    std::uint64_t expected_sum = 0;
    std::map<asteria::JobId, std::uint64_t> expected;
    for (const auto& list : submitted)
      for (const auto& [id, token] : list) {
        EXPECT_TRUE(expected.emplace(id, token).second) << "id " << id << " returned twice";
        expected_sum += token;
      }
    EXPECT_EQ(expected.size(), static_cast<std::size_t>(kProducers) * kPer);
    EXPECT_EQ(collected, expected);
    EXPECT_EQ(ran_count.load(), static_cast<std::uint64_t>(kProducers) * kPer);
    EXPECT_EQ(ran_sum.load(), expected_sum);
    EXPECT_EQ(expected.rbegin()->first, static_cast<asteria::JobId>(kProducers) * kPer);  // no id skipped
    const auto st = s.stats();
    EXPECT_EQ(st.submitted, static_cast<std::size_t>(kProducers) * kPer);
    EXPECT_EQ(st.completed, static_cast<std::size_t>(kProducers) * kPer);
    EXPECT_EQ(st.uncollected, 0u);
    EXPECT_TRUE(s.poll().empty());
  }
}

// The job table bounds the jobs submitted and not yet collected: with queue_capacity 4, the fifth would
// take the slot of the first, which is still running; collecting it makes room, and no id was used up.
TEST(Scheduler, FullJobTableRefusesSubmitUntilAResultIsCollected) {
  asteria::SchedulerOptions o = workers(1);
  o.queue_capacity = 3;  // rounded up to 4
  asteria::RefreshScheduler s(o);
  std::atomic<bool> release{false};
  std::vector<asteria::JobId> ids;
  ids.push_back(s.submit(task_job(0, [&] {
    while (!release.load()) std::this_thread::sleep_for(1ms);
  })));
  for (int i = 1; i < 4; ++i) ids.push_back(s.submit(task_job(i, [] {})));
  EXPECT_EQ(ids, (std::vector<asteria::JobId>{1, 2, 3, 4}));
  try {
    s.submit(task_job(9, [] {}));
    FAIL() << "a fifth uncollected job was accepted by a table of 4";
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kBudgetExhausted);
    EXPECT_NE(std::string(e.what()).find("queue_capacity = 4"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("poll()/wait()"), std::string::npos) << e.what();
  }
  release = true;
  // Jobs 2..4 are done too once the first is; collecting them alone frees nothing for id 5.
  for (int i = 1; i < 4; ++i) EXPECT_EQ(s.wait(ids[i]).status, asteria::JobStatus::kOk);
  EXPECT_THROW(s.submit(task_job(9, [] {})), asteria::Error);
  EXPECT_EQ(s.wait(ids[0]).status, asteria::JobStatus::kOk);
  const auto next = s.submit(task_job(9, [] {}));
  EXPECT_EQ(next, 5u);
  EXPECT_EQ(s.wait(next).status, asteria::JobStatus::kOk);
  EXPECT_THROW(s.wait(ids[0]), asteria::Error);  // collected; its slot now belongs to job 5, also collected
  EXPECT_FALSE(s.cancel(ids[0]));
}

// All jobs are queued before the only worker starts them (it is held by a first task): they start in
// (deadline, id) order, over several sorting chunks and run levels, with many equal deadlines.
TEST(Scheduler, EarliestDeadlineFirstWithTiesOverManyQueuedJobs) {
  asteria::RefreshScheduler s(workers(1));
  std::atomic<bool> release{false};
  auto gate = s.submit(task_job(std::numeric_limits<std::int64_t>::min(), [&] {
    while (!release.load()) std::this_thread::sleep_for(1ms);
  }));
  while (s.stats().running == 0) std::this_thread::sleep_for(1ms);
  constexpr int kJobs = 700;
  std::mt19937 rng(11);
  std::vector<std::int64_t> deadlines(kJobs);
  for (auto& d : deadlines) d = static_cast<std::int64_t>(rng() % 90) - 30;  // many ties, negative ones too
  std::vector<int> order;  // submission index of each job, in start order (one worker: no lock needed)
  order.reserve(kJobs);
  std::vector<asteria::JobId> ids(kJobs);
  for (int i = 0; i < kJobs; ++i) ids[i] = s.submit(task_job(deadlines[i], [&order, i] { order.push_back(i); }));
  release = true;
  EXPECT_EQ(s.wait(gate).status, asteria::JobStatus::kOk);
  const auto until = std::chrono::steady_clock::now() + 20s;
  while (s.stats().completed < kJobs + 1 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
  for (auto& r : s.poll()) EXPECT_EQ(r.status, asteria::JobStatus::kOk) << r.message;
  ASSERT_EQ(order.size(), static_cast<std::size_t>(kJobs));
  std::vector<int> expected(kJobs);
  for (int i = 0; i < kJobs; ++i) expected[i] = i;
  std::stable_sort(expected.begin(), expected.end(), [&](int a, int b) { return deadlines[a] < deadlines[b]; });
  EXPECT_EQ(order, expected);  // ties: the smaller id (the earlier submit) first
}

// Cancellations race with the workers taking the same jobs: each job ends exactly one way. cancel() returns
// true exactly for the jobs whose result is kCancelled, and those never ran; the others ran once.
TEST(Scheduler, CancellationsRacingWithWorkers) {
  for (int nworkers : {1, 2}) {
    SCOPED_TRACE("workers=" + std::to_string(nworkers));
    asteria::RefreshScheduler s(workers(nworkers));
    constexpr int kProducers = 2, kPer = 1500;
    std::vector<std::atomic<int>> runs(kProducers * kPer);
    std::mutex mu;
    std::vector<asteria::JobId> fresh;  // submitted, not yet looked at by the canceller
    std::map<asteria::JobId, int> token_of;
    std::atomic<int> producing{kProducers};
    std::vector<std::thread> producers;
    for (int p = 0; p < kProducers; ++p)
      producers.emplace_back([&, p] {
        for (int i = 0; i < kPer; ++i) {
          const int token = p * kPer + i;
          const auto id = s.submit(task_job(i, [&runs, token] { runs[token].fetch_add(1); }));
          std::lock_guard<std::mutex> g(mu);
          fresh.push_back(id);
          token_of.emplace(id, token);
        }
        producing.fetch_sub(1);
      });
    std::set<asteria::JobId> cancelled_ok;
    std::thread canceller([&] {
      std::vector<asteria::JobId> batch;
      unsigned n = 0;
      for (;;) {
        const bool last = producing.load() == 0;
        {
          std::lock_guard<std::mutex> g(mu);
          batch.swap(fresh);
        }
        for (auto id : batch)
          if (n++ % 3 != 2 && s.cancel(id)) cancelled_ok.insert(id);  // two in three; the rest run
        batch.clear();
        if (last) break;
        std::this_thread::yield();
      }
    });
    for (auto& t : producers) t.join();
    canceller.join();
    std::size_t cancelled = 0, ok = 0;
    std::set<asteria::JobId> seen;
    const auto until = std::chrono::steady_clock::now() + 20s;
    while (seen.size() < token_of.size()) {
      if (std::chrono::steady_clock::now() > until) {
        ADD_FAILURE() << "only " << seen.size() << " of " << token_of.size() << " results after 20 s";
        break;
      }
      for (auto& r : s.poll()) {
        EXPECT_TRUE(seen.insert(r.id).second);
        const int token = token_of.at(r.id);
        if (r.status == asteria::JobStatus::kCancelled) {
          ++cancelled;
          EXPECT_EQ(cancelled_ok.count(r.id), 1u) << "job " << r.id << " cancelled, but cancel() said no";
          EXPECT_EQ(runs[token].load(), 0) << "cancelled job " << r.id << " ran";
        } else {
          ASSERT_EQ(r.status, asteria::JobStatus::kOk) << r.message;
          ++ok;
          EXPECT_EQ(cancelled_ok.count(r.id), 0u) << "job " << r.id << " ran, but cancel() said it was cancelled";
          EXPECT_EQ(runs[token].load(), 1) << "job " << r.id;
        }
      }
      std::this_thread::yield();
    }
    EXPECT_EQ(cancelled + ok, static_cast<std::size_t>(kProducers) * kPer);
    EXPECT_EQ(cancelled, cancelled_ok.size());
    const auto st = s.stats();
    EXPECT_EQ(st.cancelled, cancelled);
    EXPECT_EQ(st.completed, st.submitted);
    EXPECT_GT(ok, 0u);
  }
}

// The test hook (SchedulerOptions::test_delay_seconds / test_jitter_seconds) slows every job by at
// least the fixed delay, and shutdown() interrupts a delay in progress instead of waiting it out.
TEST(Scheduler, TestDelayHookSlowsJobsAndShutdownInterruptsIt) {
  asteria::SchedulerOptions o = workers(1);
  o.test_delay_seconds = 0.05;
  o.test_jitter_seconds = 0.02;
  o.test_seed = 7;
  {
    asteria::RefreshScheduler s(o);
    std::atomic<int> ran{0};
    auto id = s.submit(task_job(1, [&] { ran++; }));
    auto r = s.wait(id);
    EXPECT_EQ(r.status, asteria::JobStatus::kOk) << r.message;
    EXPECT_EQ(ran.load(), 1);
    EXPECT_GE(r.run_seconds, 0.05);
    EXPECT_LE(r.run_seconds, 5.0);
  }
  o.test_delay_seconds = 60.0;
  o.test_jitter_seconds = 0.0;
  asteria::RefreshScheduler s(o);
  std::atomic<int> ran{0};
  auto id = s.submit(task_job(1, [&] { ran++; }));
  while (s.stats().running == 0) std::this_thread::sleep_for(1ms);
  const auto t0 = std::chrono::steady_clock::now();
  s.shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  auto r = s.wait(id);
  EXPECT_EQ(r.status, asteria::JobStatus::kCancelled);
  EXPECT_EQ(ran.load(), 0);
}

// ----- the fault-injection test hook (SchedulerOptions::test_fault / set_test_fault) -----

asteria::JobSpec eigh_job(std::uint64_t block, std::int64_t version, unsigned seed) {
  asteria::JobSpec spec;
  spec.kind = asteria::JobKind::kEigh;
  spec.block_id = block;
  spec.version = version;
  spec.deadline = version + 1;
  spec.inputs.push_back(spd(6, seed));
  return spec;
}

TEST(Scheduler, InjectedSolverFailureLooksLikeALapackFailure) {
  asteria::SchedulerOptions o = workers(1);
  o.test_fault.kind = asteria::SchedulerFaultKind::kSolverFailure;
  o.test_fault.job = asteria::JobKind::kEigh;
  o.test_fault.skip = 1;  // the second eigh job fails
  asteria::RefreshScheduler s(o);
  auto t = s.wait(s.submit(task_job(0, [] {})));  // another kind: does not count
  EXPECT_EQ(t.status, asteria::JobStatus::kOk) << t.message;
  auto a = s.wait(s.submit(eigh_job(4, 10, 1)));
  auto b = s.wait(s.submit(eigh_job(5, 11, 2)));
  auto c = s.wait(s.submit(eigh_job(6, 12, 3)));
  EXPECT_EQ(a.status, asteria::JobStatus::kOk) << a.message;
  EXPECT_EQ(c.status, asteria::JobStatus::kOk) << c.message;
  ASSERT_EQ(b.status, asteria::JobStatus::kFailed);
  EXPECT_TRUE(b.outputs.empty());
  for (const char* part : {"block 5", "version 11", "LAPACK syevd info=", "[linalg::eigh]", "ridge/epsilon"})
    EXPECT_NE(b.message.find(part), std::string::npos) << part << " missing from: " << b.message;
  auto st = s.stats();
  EXPECT_EQ(st.failed, 1u);
  EXPECT_EQ(st.faults_injected, 1u);
}

// Both exception types reach the worker's handlers; every job completes exactly once, the failed ones with the
// exception's message, and the workers keep serving (several workers, the hook re-armed while they run: TSan).
TEST(Scheduler, InjectedExceptionsFailTheJobAndTheWorkersKeepServing) {
  for (auto kind : {asteria::SchedulerFaultKind::kRuntimeError, asteria::SchedulerFaultKind::kBadAlloc}) {
    asteria::RefreshScheduler s(workers(3));
    asteria::SchedulerFault f;
    f.kind = kind;
    f.skip = 5;
    f.count = 7;
    std::atomic<int> ran{0};
    std::vector<asteria::JobId> ids;
    for (int i = 0; i < 5; ++i) ids.push_back(s.submit(task_job(i, [&] { ++ran; })));
    s.set_test_fault(f);  // concurrently with the workers taking those jobs
    for (int i = 5; i < 40; ++i) {
      if (i % 4 == 0)
        ids.push_back(s.submit(eigh_job(static_cast<std::uint64_t>(i), i, static_cast<unsigned>(i))));
      else
        ids.push_back(s.submit(task_job(i, [&] { ++ran; })));
    }
    int failed = 0, ok = 0;
    for (auto id : ids) {
      auto r = s.wait(id);
      if (r.status == asteria::JobStatus::kFailed) {
        ++failed;
        EXPECT_NE(r.message.find("(block "), std::string::npos) << r.message;
        EXPECT_NE(r.message.find(", version "), std::string::npos) << r.message;
        const char* what = kind == asteria::SchedulerFaultKind::kBadAlloc ? "std::bad_alloc" : "runtime_error thrown";
        EXPECT_NE(r.message.find(what), std::string::npos) << r.message;
      } else {
        EXPECT_EQ(r.status, asteria::JobStatus::kOk) << r.message;
        ++ok;
      }
    }
    EXPECT_EQ(failed, 7);
    EXPECT_EQ(ok, 40 - 7);
    auto st = s.stats();
    EXPECT_EQ(st.failed, 7u);
    EXPECT_EQ(st.faults_injected, 7u);
    EXPECT_EQ(st.completed, 40u);
    // Served after the faults: one more job on every worker.
    std::vector<asteria::JobId> more;
    for (int i = 0; i < 6; ++i) more.push_back(s.submit(eigh_job(100, i, 50u + i)));
    for (auto id : more) EXPECT_EQ(s.wait(id).status, asteria::JobStatus::kOk);
  }
}

TEST(Scheduler, NonFiniteResultIsRejectedByTheWorker) {
  asteria::SchedulerOptions o = workers(1);
  o.test_fault.kind = asteria::SchedulerFaultKind::kNonFiniteResult;
  o.test_fault.count = 2;
  asteria::RefreshScheduler s(o);
  EXPECT_EQ(s.wait(s.submit(task_job(0, [] {}))).status, asteria::JobStatus::kOk);  // no outputs: not counted
  asteria::JobSpec root;
  root.kind = asteria::JobKind::kInverseRoot;
  root.block_id = 8;
  root.version = 20;
  root.root = 2;
  root.epsilon = 1e-6;
  root.inputs.push_back(spd(5, 4));
  auto r = s.wait(s.submit(std::move(root)));
  ASSERT_EQ(r.status, asteria::JobStatus::kFailed);
  EXPECT_TRUE(r.outputs.empty());
  EXPECT_NE(r.message.find("block 8, version 20"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("output 'root' holds NaN or Inf"), std::string::npos) << r.message;
  asteria::JobSpec refresh;
  refresh.kind = asteria::JobKind::kEigenbasisRefresh;
  refresh.inputs.push_back(spd(5, 5));
  auto q = asteria::HostTensor::empty(asteria::DType::kFloat64, {5, 5});
  for (int i = 0; i < 25; ++i) q.ptr<double>()[i] = i % 6 == 0 ? 1.0 : 0.0;
  refresh.inputs.push_back(q);
  auto r2 = s.wait(s.submit(std::move(refresh)));
  EXPECT_EQ(r2.status, asteria::JobStatus::kFailed);
  EXPECT_NE(r2.message.find("output 'basis' holds NaN or Inf"), std::string::npos) << r2.message;
  auto r3 = s.wait(s.submit(eigh_job(1, 1, 9)));  // the hook is spent
  EXPECT_EQ(r3.status, asteria::JobStatus::kOk) << r3.message;
  EXPECT_EQ(s.stats().faults_injected, 2u);
}

// SchedulerOptions::cpus pins every worker to the set: jobs run only there, and the thread's affinity is
// exactly the set. A CPU the process may not use is refused when the workers start.
TEST(Scheduler, WorkersRunOnlyOnTheirCpus) {
  cpu_set_t allowed;
  ASSERT_EQ(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
  int last = -1;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed)) last = c;
  ASSERT_GE(last, 0);
  asteria::SchedulerOptions o = workers(2);
  o.cpus = {last};
  asteria::RefreshScheduler s(o);
  std::atomic<int> elsewhere{0}, ran{0}, set_size{0};
  std::vector<asteria::JobId> ids;
  for (int i = 0; i < 20; ++i)
    ids.push_back(s.submit(task_job(i, [&] {
      cpu_set_t mine;
      sched_getaffinity(0, sizeof(mine), &mine);
      set_size.store(CPU_COUNT(&mine));
      if (sched_getcpu() != last || !CPU_ISSET(last, &mine)) elsewhere.fetch_add(1);
      ran.fetch_add(1);
    })));
  for (auto id : ids) EXPECT_EQ(s.wait(id).status, asteria::JobStatus::kOk);
  EXPECT_EQ(ran.load(), 20);
  EXPECT_EQ(elsewhere.load(), 0);
  EXPECT_EQ(set_size.load(), 1);

  asteria::SchedulerOptions bad = workers(1);
  bad.cpus = {CPU_SETSIZE - 1};  // no machine this runs on has it
  try {
    asteria::RefreshScheduler refused(bad);
    FAIL() << "a CPU outside the process's set was accepted";
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("cannot pin the workers to CPUs " + std::to_string(CPU_SETSIZE - 1)),
              std::string::npos)
        << e.what();
  }
  asteria::SchedulerOptions negative = workers(1);
  negative.cpus = {-1};
  EXPECT_THROW(asteria::RefreshScheduler refused(negative), asteria::Error);
}

TEST(Scheduler, BadTestFaultIsInvalidArgument) {
  asteria::SchedulerOptions o = workers(1);
  o.test_fault.kind = asteria::SchedulerFaultKind::kSolverFailure;
  o.test_fault.count = 0;
  EXPECT_THROW(asteria::RefreshScheduler bad(o), asteria::Error);
  asteria::RefreshScheduler s(workers(1));
  asteria::SchedulerFault f;
  f.kind = static_cast<asteria::SchedulerFaultKind>(42);
  EXPECT_THROW(s.set_test_fault(f), asteria::Error);
}

TEST(Scheduler, TestDelayHookRejectsBadValues) {
  asteria::SchedulerOptions o = workers(1);
  o.test_delay_seconds = -1.0;
  EXPECT_THROW(asteria::RefreshScheduler s(o), asteria::Error);
}

}  // namespace
