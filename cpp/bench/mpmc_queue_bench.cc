// ns per push+pop of the lock-free MpmcQueue against a mutex-protected std::deque, with 1 and
// 2 producer/consumer pairs. Prints one line per configuration and the ratio.
#include <cstdio>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "asteria/mpmc_queue.h"
#include "bench_util.h"

namespace {

struct MutexDeque {
  std::mutex mu;
  std::deque<long> d;
  bool try_push(long v) {
    std::lock_guard<std::mutex> g(mu);
    d.push_back(v);
    return true;
  }
  bool try_pop(long& v) {
    std::lock_guard<std::mutex> g(mu);
    if (d.empty()) return false;
    v = d.front();
    d.pop_front();
    return true;
  }
};

template <typename Q>
double ns_per_op(Q& q, int pairs, long items_per_producer) {
  auto run = [&] {
    std::vector<std::thread> ts;
    for (int p = 0; p < pairs; ++p) {
      ts.emplace_back([&] {
        for (long i = 0; i < items_per_producer; ++i)
          while (!q.try_push(i)) std::this_thread::yield();
      });
      ts.emplace_back([&] {
        long v;
        for (long i = 0; i < items_per_producer; ++i)
          while (!q.try_pop(v)) std::this_thread::yield();
      });
    }
    for (auto& t : ts) t.join();
  };
  const double s = asteria_bench::median_seconds(run, 5);
  return s * 1e9 / (static_cast<double>(items_per_producer) * pairs);
}

}  // namespace

int main(int argc, char** argv) {
  const long items = asteria_bench::quick(argc, argv) ? 20000 : 1000000;
  std::printf("mpmc_queue_bench: ns per item (push+pop), median of 5\n");
  for (int pairs : {1, 2}) {
    asteria::MpmcQueue<long> q(1024);
    MutexDeque m;
    const double a = ns_per_op(q, pairs, items);
    const double b = ns_per_op(m, pairs, items);
    std::printf("  pairs=%d  mpmc %.1f ns  mutex+deque %.1f ns  ratio(mutex/mpmc) %.2f\n", pairs, a, b, b / a);
  }
  return 0;
}
