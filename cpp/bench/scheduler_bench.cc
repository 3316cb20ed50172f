// RefreshScheduler benchmarks (Google Benchmark):
//
// intake: the job intake, lock-free (asteria::RefreshScheduler) against the previous locked intake
//   (LockedScheduler, locked_scheduler.h: mutex + std::map on submit, mutex + std::priority_queue on a
//   worker's pop), side by side in this binary. P producer threads (1..4) submit trivial kTask jobs to
//   W workers (1, 2); each producer keeps at most `window` of its jobs outstanding and collects the
//   oldest with wait() before it submits the next.
//     window 1:   every job is alone in its producer's hands: submit-to-start latency (median, p99).
//     window 256: jobs/s from the first submit to the last result (throughput), and the latency under
//                 that load.
//   Submit-to-start latency: steady_clock in the job's body minus steady_clock just before submit().
//   submit_ns: the median time inside one submit() call (the producer's side of the intake).
//   Both schedulers get queue_capacity 65536 (as the Python runtime uses) and run the same job body.
// inverse_root_batch: 32 inverse roots of n=512 (fp32) with 1 and 2 workers (n=128 with --quick).
//
// By default every benchmark runs 5 times, the repetitions of all benchmarks interleaved at random
// (--benchmark_repetitions, --benchmark_enable_random_interleaving override this), and the end of the
// output is a table of new/old ratios per configuration, from the medians over the repetitions.
// --quick (ctest) runs few, small iterations. Other flags are Google Benchmark's.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "asteria/scheduler.h"
#include "locked_scheduler.h"

namespace {

bool g_quick = false;

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr std::size_t kCapacity = 1 << 16;

struct Record {
  std::int64_t submit_ns = 0;    // written by the producer before submit()
  std::int64_t returned_ns = 0;  // written by the producer when submit() returned
  std::int64_t start_ns = 0;     // written by the job body; read after wait() returned the job
};

// One producer: `count` jobs, at most `window` outstanding; the oldest is collected first.
template <typename S>
void produce(S& s, Record* rec, int count, int window) {
  std::vector<asteria::JobId> outstanding(static_cast<std::size_t>(window));
  std::size_t head = 0, n = 0;
  const auto w = static_cast<std::size_t>(window);
  for (int i = 0; i < count; ++i) {
    if (n == w) {
      s.wait(outstanding[head]);
      head = (head + 1) % w;
      --n;
    }
    Record* r = &rec[i];
    asteria::JobSpec spec;
    spec.kind = asteria::JobKind::kTask;
    spec.task = [r] { r->start_ns = now_ns(); };
    r->submit_ns = now_ns();
    spec.deadline = r->submit_ns;  // later submits are due later, across producers too
    outstanding[(head + n) % w] = s.submit(std::move(spec));
    r->returned_ns = now_ns();
    ++n;
  }
  for (; n > 0; --n, head = (head + 1) % w) s.wait(outstanding[head]);
}

std::unique_ptr<asteria::RefreshScheduler> make_new(int workers) {
  asteria::SchedulerOptions o;
  o.workers = workers;
  o.queue_capacity = kCapacity;
  return std::make_unique<asteria::RefreshScheduler>(o);
}
std::unique_ptr<asteria_bench::LockedScheduler> make_old(int workers) {
  return std::make_unique<asteria_bench::LockedScheduler>(workers, kCapacity);
}

double percentile(std::vector<std::int64_t>& v, double q) {
  if (v.empty()) return 0;
  const auto k = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return static_cast<double>(v[k]);
}

template <typename Make>
void bm_intake(benchmark::State& state, Make make, int producers, int workers, int window) {
  const int per_producer = window == 1 ? (g_quick ? 50 : 500) : (g_quick ? 400 : 4000);
  auto s = make(workers);
  std::vector<std::vector<Record>> rec(static_cast<std::size_t>(producers),
                                       std::vector<Record>(static_cast<std::size_t>(per_producer)));
  std::vector<std::int64_t> latency, submit_call;
  double seconds = 0;
  double jobs = 0;
  for (auto _ : state) {
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    for (int p = 0; p < producers; ++p)
      threads.emplace_back([&, p] {
        ready.fetch_add(1);
        while (!go.load()) std::this_thread::yield();
        produce(*s, rec[static_cast<std::size_t>(p)].data(), per_producer, window);
      });
    while (ready.load() < producers) std::this_thread::yield();
    const std::int64_t t0 = now_ns();
    go = true;
    for (auto& t : threads) t.join();
    const double dt = static_cast<double>(now_ns() - t0) * 1e-9;
    state.SetIterationTime(dt);
    seconds += dt;
    jobs += static_cast<double>(producers) * per_producer;
    for (const auto& list : rec)
      for (const auto& r : list) {
        latency.push_back(r.start_ns - r.submit_ns);
        submit_call.push_back(r.returned_ns - r.submit_ns);
      }
  }
  state.counters["jobs_per_s"] = jobs / seconds;
  state.counters["p50_us"] = percentile(latency, 0.50) * 1e-3;
  state.counters["p99_us"] = percentile(latency, 0.99) * 1e-3;
  state.counters["submit_ns"] = percentile(submit_call, 0.50);
}

asteria::HostTensor spd(int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  auto t = asteria::HostTensor::empty(asteria::DType::kFloat32, {n, n});
  std::vector<float> g(static_cast<std::size_t>(n) * 8);
  for (auto& x : g) x = nd(rng);
  float* a = t.ptr<float>();
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      float s = 0;
      for (int k = 0; k < 8; ++k) s += g[i * 8 + k] * g[j * 8 + k];
      a[i * n + j] = s + (i == j ? 1.0f : 0.0f);
    }
  return t;
}

void bm_inverse_root_batch(benchmark::State& state, int workers) {
  const int n = g_quick ? 128 : 512;
  std::vector<asteria::HostTensor> mats;
  for (int i = 0; i < 32; ++i) mats.push_back(spd(n, static_cast<unsigned>(i)));
  auto s = make_new(workers);
  for (auto _ : state) {
    std::vector<asteria::JobId> ids;
    for (std::size_t i = 0; i < mats.size(); ++i) {
      asteria::JobSpec spec;
      spec.kind = asteria::JobKind::kInverseRoot;
      spec.block_id = i;
      spec.root = 4;
      spec.epsilon = 1e-6;
      spec.inputs.push_back(mats[i]);
      ids.push_back(s->submit(std::move(spec)));
    }
    for (auto id : ids) s->wait(id);
  }
}

// What a benchmark name stands for, for the summary.
struct Config {
  bool lock_free = false;  // RefreshScheduler (new) or LockedScheduler (old)
  int producers = 0, workers = 0, window = 0;
};
std::map<std::string, Config> g_configs;

// Console output (the medians when there are repetitions), then the table of new/old ratios.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  explicit RatioReporter(bool color) : ConsoleReporter(color ? OO_ColorTabular : OO_Tabular) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> shown;
    for (const auto& r : runs) {
      if (r.error_occurred) {
        shown.push_back(r);
        continue;
      }
      if (r.run_type == Run::RT_Iteration) {
        for (const auto& [name, c] : r.counters) values_[r.run_name.function_name][name].push_back(c.value);
        values_[r.run_name.function_name]["seconds_per_iteration"].push_back(
            r.real_accumulated_time / static_cast<double>(r.iterations));
        if (r.repetitions <= 1) shown.push_back(r);
      } else if (r.aggregate_name == "median") {
        shown.push_back(r);
      }
    }
    if (!shown.empty()) ConsoleReporter::ReportRuns(shown);
  }

  void Summarize() const {
    bool intake = false;
    for (const auto& [name, v] : values_) intake = intake || name.rfind("intake/", 0) == 0;
    if (intake) intake_table();
    const double one = median("inverse_root_batch/workers:1", "seconds_per_iteration");
    const double two = median("inverse_root_batch/workers:2", "seconds_per_iteration");
    if (one > 0 && two > 0)
      std::printf("\nscheduler_bench: 32 inverse roots n=%d fp32: 1 worker %.3f s, 2 workers %.3f s, speed-up %.2fx\n",
                  g_quick ? 128 : 512, one, two, one / two);
  }

 private:
  void intake_table() const {
    std::printf("\nscheduler_bench intake: new = lock-free RefreshScheduler, old = mutex + std::priority_queue "
                "(LockedScheduler); medians over the repetitions\n");
    std::printf("%-9s %-7s | %-30s | %-30s | %-30s | %-30s | %-30s\n", "producers", "workers",
                "throughput, jobs/s (window 256)", "latency p50, us (window 1)", "latency p99, us (window 1)",
                "p99 under load, us (window 256)", "submit() call, ns (window 256)");
    std::printf("%-9s %-7s | %9s %9s %10s | %9s %9s %10s | %9s %9s %10s | %9s %9s %10s | %9s %9s %10s\n", "", "",
                "old", "new", "new/old", "old", "new", "new/old", "old", "new", "new/old", "old", "new", "new/old",
                "old", "new", "new/old");
    for (int w : {1, 2})
      for (int p = 1; p <= 4; ++p) {
        const double t_old = median(find(false, p, w, 256), "jobs_per_s"), t_new = median(find(true, p, w, 256), "jobs_per_s");
        const double l50_old = median(find(false, p, w, 1), "p50_us"), l50_new = median(find(true, p, w, 1), "p50_us");
        const double l99_old = median(find(false, p, w, 1), "p99_us"), l99_new = median(find(true, p, w, 1), "p99_us");
        const double u99_old = median(find(false, p, w, 256), "p99_us"), u99_new = median(find(true, p, w, 256), "p99_us");
        const double s_old = median(find(false, p, w, 256), "submit_ns"), s_new = median(find(true, p, w, 256), "submit_ns");
        if (t_old == 0 && t_new == 0 && l50_old == 0 && l50_new == 0) continue;  // not run (--benchmark_filter)
        std::printf("%-9d %-7d | %9.0f %9.0f %10.2f | %9.1f %9.1f %10.2f | %9.1f %9.1f %10.2f | %9.0f %9.0f %10.2f | "
                    "%9.0f %9.0f %10.2f\n",
                    p, w, t_old, t_new, ratio(t_new, t_old), l50_old, l50_new, ratio(l50_new, l50_old), l99_old,
                    l99_new, ratio(l99_new, l99_old), u99_old, u99_new, ratio(u99_new, u99_old), s_old, s_new,
                    ratio(s_new, s_old));
      }
  }
  static std::string find(bool lock_free, int p, int w, int window) {
    for (const auto& [name, c] : g_configs)
      if (c.lock_free == lock_free && c.producers == p && c.workers == w && c.window == window) return name;
    return "";
  }
  double median(const std::string& name, const char* counter) const {
    auto it = values_.find(name);
    if (it == values_.end()) return 0;
    auto jt = it->second.find(counter);
    if (jt == it->second.end() || jt->second.empty()) return 0;
    std::vector<double> v = jt->second;
    std::sort(v.begin(), v.end());
    const std::size_t m = v.size() / 2;
    return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
  }
  static double ratio(double a, double b) { return b > 0 ? a / b : 0; }

  std::map<std::string, std::map<std::string, std::vector<double>>> values_;
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  bool repetitions = false, interleaving = false, color = true;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      g_quick = true;
      continue;
    }
    if (std::strncmp(argv[i], "--benchmark_repetitions", 23) == 0) repetitions = true;
    if (std::strncmp(argv[i], "--benchmark_enable_random_interleaving", 38) == 0) interleaving = true;
    if (std::strcmp(argv[i], "--benchmark_color=false") == 0) color = false;
    args.push_back(argv[i]);
  }
  std::string reps = g_quick ? "--benchmark_repetitions=2" : "--benchmark_repetitions=5";
  std::string interleave = "--benchmark_enable_random_interleaving=true";
  std::string min_time = "--benchmark_min_time=0.01";
  if (!repetitions) args.push_back(reps.data());
  if (!interleaving) args.push_back(interleave.data());
  if (g_quick) args.push_back(min_time.data());
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);

  for (int window : {1, 256})
    for (int w : {1, 2})
      for (int p = 1; p <= 4; ++p)
        for (bool lock_free : {false, true}) {
          const std::string name = std::string("intake/") + (lock_free ? "new" : "old") + "/window:" +
                                   std::to_string(window) + "/producers:" + std::to_string(p) +
                                   "/workers:" + std::to_string(w);
          g_configs[name] = Config{lock_free, p, w, window};
          benchmark::internal::Benchmark* b =
              lock_free ? benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
                            bm_intake(st, make_new, p, w, window);
                          })
                        : benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
                            bm_intake(st, make_old, p, w, window);
                          });
          b->UseManualTime()->Unit(benchmark::kMillisecond);
        }
  for (int w : {1, 2})
    benchmark::RegisterBenchmark(("inverse_root_batch/workers:" + std::to_string(w)).c_str(),
                                 [=](benchmark::State& st) { bm_inverse_root_batch(st, w); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);

  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  RatioReporter reporter(color && isatty(fileno(stdout)));
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.Summarize();
  benchmark::Shutdown();
  return 0;
}
