#include "asteria/pager.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <csignal>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "asteria/errors.h"
#include "asteria/host_memory.h"

namespace {

asteria::PinnedPool& pool() {
  static asteria::PinnedPool p([] {
    asteria::PinnedPoolOptions o;
    o.budget_bytes = 64u << 20;
    return o;
  }());
  return p;
}

void fill(void* p, std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  auto* b = static_cast<unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<unsigned char>(rng());
}

class PagerBackends : public ::testing::TestWithParam<asteria::PagerBackend> {
 protected:
  asteria::PagerOptions opts() const {
    asteria::PagerOptions o;
    o.backend = GetParam();
    return o;
  }
};

TEST(Crc32c, KnownVector) {
  // The standard check value of CRC-32C for "123456789".
  EXPECT_EQ(asteria::crc32c("123456789", 9), 0xE3069283u);
  // Incremental computation equals one pass.
  EXPECT_EQ(asteria::crc32c("6789", 4, asteria::crc32c("12345", 5)), 0xE3069283u);
}

TEST_P(PagerBackends, RoundTripIsBitIdentical) {
  asteria::Pager pager(opts());
  std::vector<asteria::ExtentId> ids;
  std::vector<asteria::Lease> src;
  const std::size_t sizes[] = {1, 4096, 5000, 1 << 20, 3 * 4096 + 17};
  for (std::size_t i = 0; i < std::size(sizes); ++i) {
    src.push_back(pool().acquire(asteria::pager_io_size(sizes[i])));
    fill(src.back().data(), sizes[i], static_cast<unsigned>(i));
    ids.push_back(pager.allocate(sizes[i]));
  }
  std::vector<asteria::TicketId> tickets;
  for (std::size_t i = 0; i < ids.size(); ++i) tickets.push_back(pager.write(ids[i], src[i].data(), sizes[i]));
  for (auto t : tickets) pager.wait(t);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    auto dst = pool().acquire(asteria::pager_io_size(sizes[i]));
    pager.wait(pager.read(ids[i], dst.data()));
    EXPECT_EQ(std::memcmp(dst.data(), src[i].data(), sizes[i]), 0) << "extent " << i;
  }
  auto s = pager.stats();
  EXPECT_EQ(s.writes, ids.size());
  EXPECT_EQ(s.reads, ids.size());
  EXPECT_EQ(s.backend, GetParam() == asteria::PagerBackend::kThreads ? "threads" : s.backend);
}

TEST_P(PagerBackends, CorruptionIsDetectedAndNamesTheExtent) {
  asteria::Pager pager(opts());
  auto buf = pool().acquire(8192);
  fill(buf.data(), 8192, 7);
  auto a = pager.allocate(8192);
  auto b = pager.allocate(8192);
  pager.wait(pager.write(a, buf.data(), 8192));
  pager.wait(pager.write(b, buf.data(), 8192));
  // Flip one byte of extent b behind the pager's back.
  const int fd = ::open(pager.swap_path().c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  const unsigned char x = 0x5A;
  ASSERT_EQ(::pwrite(fd, &x, 1, 8192 + 100), 1);
  ::fsync(fd);
  ::close(fd);
  auto dst = pool().acquire(8192);
  pager.wait(pager.read(a, dst.data()));  // untouched extent still fine
  try {
    pager.wait(pager.read(b, dst.data()));
    FAIL() << "a corrupted extent was returned as good";
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kIo);
    EXPECT_NE(std::string(e.what()).find("extent " + std::to_string(b)), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("CRC32C"), std::string::npos);
  }
  EXPECT_EQ(pager.stats().crc_failures, 1u);
}

TEST_P(PagerBackends, FailedWriteIsReportedAndInvalidatesTheExtent) {
  // RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, a stand-in for a full disk.
  struct sigaction ign {}, old {};
  ign.sa_handler = SIG_IGN;
  sigaction(SIGXFSZ, &ign, &old);
  rlimit saved{};
  getrlimit(RLIMIT_FSIZE, &saved);
  asteria::Pager pager(opts());
  auto buf = pool().acquire(1 << 20);
  fill(buf.data(), 1 << 20, 3);
  auto small = pager.allocate(4096);
  pager.wait(pager.write(small, buf.data(), 4096));
  auto big = pager.allocate(1 << 20);
  rlimit lim = saved;
  lim.rlim_cur = 64 * 1024;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  std::string msg;
  try {
    pager.wait(pager.write(big, buf.data(), 1 << 20));
  } catch (const asteria::Error& e) {
    msg = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &saved);
  sigaction(SIGXFSZ, &old, nullptr);
  ASSERT_FALSE(msg.empty()) << "the failed write was not reported";
  EXPECT_NE(msg.find("needed 1048576 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find(pager.swap_path()), std::string::npos) << msg;
  auto dst = pool().acquire(1 << 20);
  EXPECT_THROW(pager.read(big, dst.data()), asteria::Error);  // never read back as valid
  pager.wait(pager.read(small, dst.data()));                  // other extents unharmed
  EXPECT_EQ(std::memcmp(dst.data(), buf.data(), 4096), 0);
}

TEST_P(PagerBackends, PrivateDirectoryAndCleanup) {
  std::string dir, path;
  {
    asteria::Pager pager(opts());
    dir = pager.directory();
    path = pager.swap_path();
    struct stat st {};
    ASSERT_EQ(::stat(dir.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u);
    ASSERT_EQ(::lstat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_TRUE(S_ISREG(st.st_mode));
  }
  struct stat st {};
  EXPECT_NE(::stat(dir.c_str(), &st), 0) << "the swap directory was left behind";
}

TEST_P(PagerBackends, ManyConcurrentRequests) {
  asteria::Pager pager(opts());
  constexpr int kN = 200;
  std::vector<asteria::Lease> bufs;
  std::vector<asteria::ExtentId> ids;
  std::vector<asteria::TicketId> tickets;
  for (int i = 0; i < kN; ++i) {
    bufs.push_back(pool().acquire(4096));
    fill(bufs.back().data(), 4096, static_cast<unsigned>(100 + i));
    ids.push_back(pager.allocate(4096));
    tickets.push_back(pager.write(ids.back(), bufs.back().data(), 4096));
  }
  for (auto t : tickets) pager.wait(t);
  tickets.clear();
  std::vector<asteria::Lease> out;
  for (int i = 0; i < kN; ++i) {
    out.push_back(pool().acquire(4096));
    tickets.push_back(pager.read(ids[i], out.back().data()));
  }
  for (int i = 0; i < kN; ++i) {
    pager.wait(tickets[i]);
    ASSERT_EQ(std::memcmp(out[i].data(), bufs[i].data(), 4096), 0) << i;
  }
}

TEST_P(PagerBackends, MisuseIsInvalidArgument) {
  asteria::Pager pager(opts());
  auto buf = pool().acquire(8192);
  auto id = pager.allocate(100);
  EXPECT_THROW(pager.write(id, static_cast<char*>(buf.data()) + 1, 10), asteria::Error);  // unaligned
  EXPECT_THROW(pager.write(id, buf.data(), 8192), asteria::Error);                         // too large
  EXPECT_THROW(pager.read(id, buf.data()), asteria::Error);                                // never written
  EXPECT_THROW(pager.write(999, buf.data(), 10), asteria::Error);                          // unknown extent
  EXPECT_THROW(pager.wait(12345), asteria::Error);
  EXPECT_THROW(pager.allocate(0), asteria::Error);
}

TEST(Pager, ReleasedSpaceIsReused) {
  asteria::Pager pager;
  auto a = pager.allocate(8192);
  pager.allocate(4096);
  const auto end = pager.stats().file_bytes;
  pager.release(a);
  pager.allocate(8000);
  EXPECT_EQ(pager.stats().file_bytes, end);
}

TEST(Pager, UnwritableParentIsAClearIoError) {
  asteria::PagerOptions o;
  o.parent_dir = "/proc/asteria-does-not-exist";
  try {
    asteria::Pager p(o);
    FAIL();
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kIo);
    EXPECT_NE(std::string(e.what()).find("nvme_path"), std::string::npos);
  }
}

TEST(Pager, AutoReportsItsBackend) {
  asteria::Pager pager;
  auto s = pager.stats();
  EXPECT_TRUE(s.backend == "io_uring" || !s.fallback_reason.empty()) << "a fallback must say why";
}

INSTANTIATE_TEST_SUITE_P(Backends, PagerBackends,
                         ::testing::Values(asteria::PagerBackend::kThreads, asteria::PagerBackend::kAuto),
                         [](const auto& info) {
                           return info.param == asteria::PagerBackend::kThreads ? std::string("threads")
                                                                                : std::string("auto");
                         });

}  // namespace
