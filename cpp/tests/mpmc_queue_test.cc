#include "asteria/mpmc_queue.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "asteria/errors.h"

namespace {

// Counts live instances to catch leaks and double destruction.
struct Tracked {
  static std::atomic<int> live;
  int v = 0;
  Tracked() { ++live; }
  explicit Tracked(int x) : v(x) { ++live; }
  Tracked(const Tracked& o) : v(o.v) { ++live; }
  Tracked(Tracked&& o) noexcept : v(o.v) { ++live; }
  Tracked& operator=(const Tracked&) = default;
  Tracked& operator=(Tracked&&) noexcept = default;
  ~Tracked() { --live; }
};
std::atomic<int> Tracked::live{0};

TEST(MpmcQueue, CapacityRoundsUpToPowerOfTwo) {
  asteria::MpmcQueue<int> q(5);
  EXPECT_EQ(q.capacity(), 8u);
  EXPECT_THROW(asteria::MpmcQueue<int>(0), asteria::Error);
}

TEST(MpmcQueue, FifoFullAndEmpty) {
  asteria::MpmcQueue<int> q(4);
  int out = 0;
  EXPECT_FALSE(q.try_pop(out));
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(q.try_push(i));
  EXPECT_FALSE(q.try_push(99));
  EXPECT_EQ(q.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(q.try_pop(out));
    EXPECT_EQ(out, i);
  }
  EXPECT_TRUE(q.empty());
  // Wrap around many times.
  for (int round = 0; round < 100; ++round) {
    EXPECT_TRUE(q.try_push(round));
    ASSERT_TRUE(q.try_pop(out));
    EXPECT_EQ(out, round);
  }
}

TEST(MpmcQueue, ElementsDestroyedExactlyOnce) {
  Tracked::live = 0;
  {
    asteria::MpmcQueue<Tracked> q(8);
    for (int i = 0; i < 6; ++i) q.push(Tracked(i));
    Tracked t;
    ASSERT_TRUE(q.try_pop(t));
    EXPECT_EQ(t.v, 0);
    EXPECT_EQ(Tracked::live.load(), 6);  // 5 queued + t
  }
  EXPECT_EQ(Tracked::live.load(), 0);
}

TEST(MpmcQueue, MoveOnlyElements) {
  asteria::MpmcQueue<std::unique_ptr<int>> q(2);
  q.push(std::make_unique<int>(7));
  std::unique_ptr<int> p;
  q.pop(p);
  ASSERT_TRUE(p);
  EXPECT_EQ(*p, 7);
}

// Several producers and consumers move 4·200k items; the sum and count are conserved.
TEST(MpmcQueue, StressConservesSumAndCount) {
  constexpr int kProducers = 4, kConsumers = 4, kPerProducer = 200000;
  asteria::MpmcQueue<std::uint64_t> q(1024);
  std::atomic<bool> go{false};
  std::atomic<std::uint64_t> sum{0}, count{0};
  std::vector<std::thread> threads;
  for (int p = 0; p < kProducers; ++p)
    threads.emplace_back([&, p] {
      while (!go.load()) std::this_thread::yield();
      for (int i = 1; i <= kPerProducer; ++i) q.push(static_cast<std::uint64_t>(p) * kPerProducer + i);
    });
  for (int c = 0; c < kConsumers; ++c)
    threads.emplace_back([&] {
      while (!go.load()) std::this_thread::yield();
      std::uint64_t v = 0, local_sum = 0, local_count = 0;
      while (count.load() + local_count < static_cast<std::uint64_t>(kProducers) * kPerProducer) {
        if (q.try_pop(v)) {
          local_sum += v;
          ++local_count;
        } else if (local_count > 0) {
          sum += local_sum;
          count += local_count;
          local_sum = local_count = 0;
        } else {
          std::this_thread::yield();
        }
      }
      sum += local_sum;
      count += local_count;
    });
  go = true;
  for (auto& t : threads) t.join();
  const std::uint64_t n = static_cast<std::uint64_t>(kProducers) * kPerProducer;
  EXPECT_EQ(count.load(), n);
  EXPECT_EQ(sum.load(), n * (n + 1) / 2);
  EXPECT_TRUE(q.empty());
}

}  // namespace
