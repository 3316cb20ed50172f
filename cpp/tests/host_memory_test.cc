#include "asteria/host_memory.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "asteria/errors.h"

namespace {

asteria::PinnedPoolOptions opts(std::size_t budget) {
  asteria::PinnedPoolOptions o;
  o.budget_bytes = budget;
  return o;
}

TEST(PinnedPool, LeasesArePageAlignedAndWritable) {
  asteria::PinnedPool pool(opts(1 << 20));
  auto l = pool.acquire(100);
  ASSERT_TRUE(l.valid());
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(l.data()) % asteria::kPageSize, 0u);
  EXPECT_EQ(l.size(), 100u);
  EXPECT_EQ(l.capacity(), asteria::kPageSize);
  std::memset(l.data(), 0xAB, l.size());
  auto s = pool.stats();
  EXPECT_EQ(s.in_use, asteria::kPageSize);
  EXPECT_EQ(s.leases, 1u);
}

TEST(PinnedPool, BudgetExhaustionIsTypedAndNamesNumbers) {
  asteria::PinnedPool pool(opts(3 * asteria::kPageSize));
  auto a = pool.acquire(2 * asteria::kPageSize);
  try {
    auto b = pool.acquire(2 * asteria::kPageSize);
    FAIL() << "expected budget exhaustion";
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kBudgetExhausted);
    EXPECT_NE(std::string(e.what()).find("12288"), std::string::npos) << e.what();
  }
  // Nothing was lost: the first lease is intact and the pool still works after a release.
  a.release();
  EXPECT_NO_THROW(pool.acquire(2 * asteria::kPageSize));
}

TEST(PinnedPool, ReleasedMemoryIsReusedAndPeakTracked) {
  asteria::PinnedPool pool(opts(1 << 20));
  void* first = nullptr;
  {
    auto l = pool.acquire(8192);
    first = l.data();
  }
  auto s = pool.stats();
  EXPECT_EQ(s.in_use, 0u);
  EXPECT_EQ(s.reserved, 8192u);
  EXPECT_EQ(s.peak_in_use, 8192u);
  auto l2 = pool.acquire(8000);
  EXPECT_EQ(l2.data(), first);
  l2.release();
  EXPECT_EQ(pool.trim(), 8192u);
  EXPECT_EQ(pool.stats().reserved, 0u);
}

TEST(PinnedPool, CachedMappingsAreDroppedBeforeRefusing) {
  asteria::PinnedPool pool(opts(4 * asteria::kPageSize));
  { auto l = pool.acquire(3 * asteria::kPageSize); }
  // Another size: the cached 3-page mapping is unmapped to make room.
  EXPECT_NO_THROW(pool.acquire(2 * asteria::kPageSize));
}

TEST(PinnedPool, FallsBackToUnlockedMemoryWithOneWarning) {
  auto o = opts(1 << 20);
  o.max_locked_bytes = 0;
  asteria::PinnedPool pool(o);
  auto a = pool.acquire(4096);
  auto b = pool.acquire(8192);
  EXPECT_FALSE(a.locked());
  auto s = pool.stats();
  EXPECT_FALSE(s.all_locked);
  EXPECT_EQ(s.lock_failures, 2u);
  EXPECT_NE(s.warning.find("ulimit -l"), std::string::npos);
}

TEST(PinnedPool, LeaseOutlivesPool) {
  asteria::Lease l;
  {
    asteria::PinnedPool pool(opts(1 << 20));
    l = pool.acquire(4096);
  }
  std::memset(l.data(), 1, l.size());  // still mapped (ASan would flag a use-after-unmap)
  l.release();
  EXPECT_FALSE(l.valid());
}

TEST(PinnedPool, ConcurrentAcquireReleaseKeepsAccounting) {
  asteria::PinnedPool pool(opts(64 << 20));
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&] {
      for (int i = 0; i < 500; ++i) {
        auto l = pool.acquire(4096 * (1 + i % 4));
        static_cast<char*>(l.data())[0] = 1;
      }
    });
  for (auto& t : ts) t.join();
  auto s = pool.stats();
  EXPECT_EQ(s.in_use, 0u);
  EXPECT_EQ(s.leases, 0u);
  EXPECT_LE(s.peak_in_use, 4u * 4 * 4096);
}

TEST(PinnedPool, MapHooksSeeEveryMappingOnceAndFailuresLeaveNoTrace) {
  std::vector<std::pair<void*, std::size_t>> mapped;
  std::vector<void*> unmapped;
  auto o = opts(1 << 20);
  o.cache_released = false;
  o.on_map = [&](void* p, std::size_t n) { mapped.emplace_back(p, n); };
  o.on_unmap = [&](void* p) { unmapped.push_back(p); };
  {
    asteria::PinnedPool pool(o);
    void* first = nullptr;
    {
      auto l = pool.acquire(5000);
      first = l.data();
      ASSERT_EQ(mapped.size(), 1u);
      EXPECT_EQ(mapped[0].first, first);
      EXPECT_EQ(mapped[0].second, 8192u);  // page-rounded capacity
      EXPECT_TRUE(unmapped.empty());
    }
    ASSERT_EQ(unmapped.size(), 1u);  // without caching, the release unmaps (and unregisters) at once
    EXPECT_EQ(unmapped[0], first);
  }
  auto failing = opts(1 << 20);
  failing.on_map = [](void*, std::size_t) { throw std::runtime_error("cannot register"); };
  asteria::PinnedPool pool(failing);
  EXPECT_THROW(pool.acquire(4096), std::runtime_error);
  auto s = pool.stats();
  EXPECT_EQ(s.reserved, 0u);
  EXPECT_EQ(s.in_use, 0u);
  EXPECT_EQ(s.leases, 0u);
  EXPECT_EQ(s.locked, 0u);
}

TEST(PinnedPool, CachedMappingsAreUnhookedWhenThePoolDies) {
  int maps = 0, unmaps = 0;
  auto o = opts(1 << 20);
  o.on_map = [&](void*, std::size_t) { ++maps; };
  o.on_unmap = [&](void*) { ++unmaps; };
  {
    asteria::PinnedPool pool(o);
    { auto l = pool.acquire(4096); }
    { auto l = pool.acquire(4096); }  // reuses the cached mapping: no second registration
    EXPECT_EQ(maps, 1);
    EXPECT_EQ(unmaps, 0);
  }
  EXPECT_EQ(unmaps, 1);
}

TEST(PinnedPool, RejectsZero) {
  EXPECT_THROW(asteria::PinnedPool(opts(0)), asteria::Error);
  asteria::PinnedPool pool(opts(1 << 20));
  EXPECT_THROW(pool.acquire(0), asteria::Error);
}

// -- DeferredCopy -------------------------------------------------------------------------------------

TEST(DeferredCopy, CopiesExactlyOnceWhicheverThreadAsksFirst) {
  asteria::PinnedPool pool(opts(8 << 20));
  auto lease = std::make_shared<asteria::Lease>(pool.acquire(3 << 20));
  std::vector<float> src(3 << 18);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<float>(i);
  auto* dst = static_cast<unsigned char*>(lease->data());
  // two pieces, the second at an offset, copied in one go
  const std::size_t half = src.size() * sizeof(float) / 2;
  asteria::DeferredCopy copy({{dst, src.data(), half}, {dst + half, reinterpret_cast<unsigned char*>(src.data()) + half, half}},
                             {lease});
  EXPECT_FALSE(copy.done());
  EXPECT_EQ(copy.bytes(), 2 * half);
  std::vector<std::thread> threads;
  std::atomic<int> made{0};
  std::atomic<int> saw_complete{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      if (copy.run()) made.fetch_add(1);
      // whoever made it, run() returns only once the copy is complete
      if (std::memcmp(dst, src.data(), 2 * half) == 0) saw_complete.fetch_add(1);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(made.load(), 1);
  EXPECT_EQ(saw_complete.load(), 8);
  EXPECT_TRUE(copy.done());
  // later writes to the source are not copied again
  src[0] = -1.0f;
  EXPECT_FALSE(copy.run());
  EXPECT_EQ(reinterpret_cast<float*>(dst)[0], 0.0f);
}

TEST(DeferredCopy, KeepsItsLeasesAlive) {
  asteria::PinnedPool pool(opts(1 << 20));
  std::vector<unsigned char> src(4096, 7);
  std::unique_ptr<asteria::DeferredCopy> copy;
  {
    auto lease = std::make_shared<asteria::Lease>(pool.acquire(4096));
    copy = std::make_unique<asteria::DeferredCopy>(
        std::vector<asteria::DeferredCopy::Piece>{{lease->data(), src.data(), src.size()}},
        std::vector<std::shared_ptr<const void>>{lease});
  }
  EXPECT_EQ(pool.stats().leases, 1u);  // only the copy holds it now
  EXPECT_TRUE(copy->run());
  copy.reset();
  EXPECT_EQ(pool.stats().leases, 0u);
}

TEST(DeferredCopy, RejectsAPieceWithoutPointers) {
  std::vector<unsigned char> src(16);
  EXPECT_THROW(asteria::DeferredCopy({{nullptr, src.data(), 16}}, {}), asteria::Error);
  asteria::DeferredCopy empty({{nullptr, nullptr, 0}}, {});  // an empty piece needs none
  EXPECT_TRUE(empty.run());
}

TEST(CopyQueue, DrainMakesEveryQueuedCopyOnce) {
  asteria::PinnedPool pool(opts(1 << 20));
  std::vector<std::vector<unsigned char>> src;
  std::vector<std::shared_ptr<asteria::DeferredCopy>> copies;
  std::vector<std::shared_ptr<asteria::Lease>> leases;
  asteria::CopyQueue queue;
  for (int i = 0; i < 16; ++i) {
    src.emplace_back(4096, static_cast<unsigned char>(i + 1));
    leases.push_back(std::make_shared<asteria::Lease>(pool.acquire(4096)));
    copies.push_back(std::make_shared<asteria::DeferredCopy>(
        std::vector<asteria::DeferredCopy::Piece>{{leases.back()->data(), src.back().data(), 4096}},
        std::vector<std::shared_ptr<const void>>{leases.back()}));
    queue.push(copies.back());
  }
  EXPECT_EQ(queue.size(), 16u);
  EXPECT_TRUE(copies[3]->run());  // one made early by its owner is not made again
  std::atomic<std::size_t> made{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      made.fetch_add(queue.drain());
      // what a worker does before its job: its own copy is complete once run() returns
      if (copies[static_cast<std::size_t>(t) * 4]->run()) made.fetch_add(1);
      EXPECT_EQ(static_cast<unsigned char*>(leases[static_cast<std::size_t>(t) * 4]->data())[4095], t * 4 + 1);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(made.load(), 15u);  // each copy made exactly once, by a drain or by its owner's run()
  EXPECT_EQ(queue.size(), 0u);
  for (int i = 0; i < 16; ++i) {
    EXPECT_TRUE(copies[static_cast<std::size_t>(i)]->done());
    EXPECT_EQ(std::memcmp(leases[static_cast<std::size_t>(i)]->data(), src[static_cast<std::size_t>(i)].data(), 4096), 0);
  }
  EXPECT_EQ(queue.drain(), 0u);
}

}  // namespace

