#include "asteria/pager.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <csignal>
#include <cstdlib>
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

// A second descriptor on the pager's swap file, found through /proc/self/fd: by default the file has no
// name left (it was unlinked once open), so this is how anything outside the pager can still reach it.
int reopen_swap_file(const asteria::Pager& pager, int flags) {
  const std::string target = pager.swap_path() + " (deleted)";
  for (int fd = 0; fd < 4096; ++fd) {
    char link[4096];
    const std::string proc = "/proc/self/fd/" + std::to_string(fd);
    const ssize_t n = ::readlink(proc.c_str(), link, sizeof(link) - 1);
    if (n <= 0) continue;
    link[n] = '\0';
    if (target == link || pager.swap_path() == link) return ::open(proc.c_str(), flags);
  }
  return -1;
}

std::string parent_of(const std::string& dir) { return dir.substr(0, dir.rfind('/')); }

// Whether this platform must run the io_uring backend: always, unless the build has none (configured with
// ASTERIA_WITH_LIBURING=OFF) or ASTERIA_NO_IO_URING says the platform lacks it (an old kernel, a seccomp
// profile that blocks io_uring). Otherwise a pager that cannot set io_uring up fails the tests, not skips them.
bool io_uring_expected(std::string* why) {
  if (!asteria::pager_built_with_io_uring()) {
    *why = "asteria was built without liburing (ASTERIA_WITH_LIBURING=OFF)";
    return false;
  }
  const char* off = std::getenv("ASTERIA_NO_IO_URING");
  if (off != nullptr && *off != '\0' && std::string(off) != "0") {
    *why = std::string("ASTERIA_NO_IO_URING=") + off + " says this platform has no io_uring";
    return false;
  }
  return true;
}

// Stands in for a full disk: while set, the process may not grow a file past `bytes` (RLIMIT_FSIZE, with
// SIGXFSZ ignored so the system call fails with EFBIG instead of killing the test). Restores both on
// destruction.
class FileSizeLimit {
 public:
  FileSizeLimit() {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigaction(SIGXFSZ, &ign, &old_action_);
    getrlimit(RLIMIT_FSIZE, &saved_);
  }
  ~FileSizeLimit() { lift(); }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;
  bool set(rlim_t bytes) {
    rlimit lim = saved_;
    lim.rlim_cur = bytes;
    return setrlimit(RLIMIT_FSIZE, &lim) == 0;
  }
  void lift() {
    if (lifted_) return;
    setrlimit(RLIMIT_FSIZE, &saved_);
    sigaction(SIGXFSZ, &old_action_, nullptr);
    lifted_ = true;
  }

 private:
  struct sigaction old_action_ {};
  rlimit saved_{};
  bool lifted_ = false;
};

class PagerBackends : public ::testing::TestWithParam<asteria::PagerBackend> {
 protected:
  void SetUp() override {
    std::string why;
    if (GetParam() == asteria::PagerBackend::kIoUring && !io_uring_expected(&why)) GTEST_SKIP() << why;
  }
  asteria::PagerOptions opts() const {
    asteria::PagerOptions o;
    o.backend = GetParam();
    return o;
  }
};

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
  EXPECT_EQ(s.backend, GetParam() == asteria::PagerBackend::kThreads ? "threads" : "io_uring");
}

TEST_P(PagerBackends, CorruptionIsDetectedAndNamesTheExtent) {
  asteria::Pager pager(opts());
  auto buf = pool().acquire(8192);
  fill(buf.data(), 8192, 7);
  auto a = pager.allocate(8192);
  auto b = pager.allocate(8192);
  pager.wait(pager.write(a, buf.data(), 8192));
  pager.wait(pager.write(b, buf.data(), 8192));
  // Flip one byte of extent b behind the pager's back (the file has no name: through /proc/self/fd).
  const int fd = reopen_swap_file(pager, O_WRONLY);
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
  // Writes past 64 KiB fail with EFBIG, a stand-in for a full disk.
  FileSizeLimit limit;
  asteria::Pager pager(opts());
  auto buf = pool().acquire(1 << 20);
  fill(buf.data(), 1 << 20, 3);
  auto small = pager.allocate(4096);
  pager.wait(pager.write(small, buf.data(), 4096));
  auto big = pager.allocate(1 << 20);
  ASSERT_TRUE(limit.set(64 * 1024));
  std::string msg;
  try {
    pager.wait(pager.write(big, buf.data(), 1 << 20));
  } catch (const asteria::Error& e) {
    msg = e.what();
  }
  limit.lift();
  ASSERT_FALSE(msg.empty()) << "the failed write was not reported";
  EXPECT_NE(msg.find("needed 1048576 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("Free space in '" + parent_of(pager.directory()) + "'"), std::string::npos) << msg;
  auto dst = pool().acquire(1 << 20);
  EXPECT_THROW(pager.read(big, dst.data()), asteria::Error);  // never read back as valid
  pager.wait(pager.read(small, dst.data()));                  // other extents unharmed
  EXPECT_EQ(std::memcmp(dst.data(), buf.data(), 4096), 0);
}

// A full disk is found when the extent is allocated (its space is reserved with fallocate), before any
// data depends on it: a clear ENOSPC-class error with the bytes and the fix, and the pager keeps working.
TEST_P(PagerBackends, FullDiskIsReportedAtAllocation) {
  FileSizeLimit limit;
  asteria::Pager pager(opts());
  if (!pager.stats().preallocation_error.empty())
    GTEST_SKIP() << "this file system cannot reserve space: " << pager.stats().preallocation_error;
  auto small = pager.allocate(4096);
  const std::uint64_t reserved = pager.stats().preallocated_bytes;
  ASSERT_TRUE(limit.set(reserved));  // the file may not grow past what is reserved now
  std::string msg;
  int err = 0;
  try {
    pager.allocate(reserved + (1 << 20));
  } catch (const asteria::Error& e) {
    msg = e.what();
    err = e.os_errno();
  }
  auto fits = pager.allocate(4096);  // space the file already has is still handed out
  limit.lift();
  ASSERT_FALSE(msg.empty()) << "an extent the disk cannot hold was allocated";
  EXPECT_EQ(err, EFBIG);
  EXPECT_NE(msg.find("[pager::allocate]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("needed " + std::to_string(reserved + (1 << 20)) + " bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("Free space in '" + parent_of(pager.directory()) + "'"), std::string::npos) << msg;
  auto buf = pool().acquire(8192);
  auto dst = pool().acquire(8192);
  for (auto [e, seed] : {std::pair{small, 1u}, std::pair{fits, 2u}}) {
    fill(buf.data(), 4096, seed);
    pager.wait(pager.write(e, buf.data(), 4096));
    pager.wait(pager.read(e, dst.data()));
    EXPECT_EQ(std::memcmp(dst.data(), buf.data(), 4096), 0);
  }
}

// The swap file's blocks are reserved ahead of the writes (fallocate), so writes land in space the file
// system has already allocated; the reservation stays a bounded step ahead of what extents use.
TEST_P(PagerBackends, SpaceIsReservedAheadOfWrites) {
  asteria::PagerOptions o = opts();
  o.keep_swap_name = true;
  asteria::Pager pager(o);
  if (!pager.stats().preallocation_error.empty()) GTEST_SKIP() << pager.stats().preallocation_error;
  std::vector<asteria::ExtentId> ids;
  for (int i = 0; i < 40; ++i) ids.push_back(pager.allocate(1u << 20));
  const auto s = pager.stats();
  EXPECT_EQ(s.file_bytes, 40u << 20);
  EXPECT_GE(s.preallocated_bytes, s.file_bytes);
  EXPECT_LE(s.preallocated_bytes, s.file_bytes + s.file_bytes / 4 + (2u << 20)) << "reserves far more than needed";
  struct stat st {};
  ASSERT_EQ(::stat(pager.swap_path().c_str(), &st), 0);
  EXPECT_GE(static_cast<std::uint64_t>(st.st_blocks) * 512, s.file_bytes) << "no blocks reserved before any write";
  EXPECT_EQ(s.writes, 0u);
  // Out-of-place rewrites reserve their new space as well.
  auto buf = pool().acquire(1u << 20);
  fill(buf.data(), 1u << 20, 5);
  for (auto e : ids) pager.wait(pager.write(e, buf.data(), 1u << 20));
  pager.wait(pager.write(ids[0], buf.data(), 1u << 20));
  EXPECT_GE(pager.stats().preallocated_bytes, pager.stats().file_bytes);
}

// Default: the swap file loses its name (and its directory) as soon as it is open, so a killed process
// leaves nothing on disk; the storage is still private (0600) and works.
TEST_P(PagerBackends, SwapFileIsUnlinkedAtOnceByDefault) {
  asteria::Pager pager(opts());
  struct stat st {};
  EXPECT_NE(::stat(pager.directory().c_str(), &st), 0) << "the swap directory still has a name";
  EXPECT_NE(::lstat(pager.swap_path().c_str(), &st), 0) << "the swap file still has a name";
  EXPECT_FALSE(pager.stats().swap_name_kept);
  const int fd = reopen_swap_file(pager, O_RDONLY);
  ASSERT_GE(fd, 0) << "the pager holds no descriptor on its swap file";
  ASSERT_EQ(::fstat(fd, &st), 0);
  ::close(fd);
  EXPECT_EQ(st.st_nlink, 0u);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  auto buf = pool().acquire(8192);
  fill(buf.data(), 8192, 11);
  auto e = pager.allocate(8192);
  pager.wait(pager.write(e, buf.data(), 8192));
  auto dst = pool().acquire(8192);
  pager.wait(pager.read(e, dst.data()));
  EXPECT_EQ(std::memcmp(dst.data(), buf.data(), 8192), 0);
}

TEST_P(PagerBackends, KeptNameIsPrivateAndRemovedAtDestruction) {
  std::string dir, path;
  {
    asteria::PagerOptions o = opts();
    o.keep_swap_name = true;
    asteria::Pager pager(o);
    dir = pager.directory();
    path = pager.swap_path();
    EXPECT_TRUE(pager.stats().swap_name_kept);
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

// With a kept name, removing the file and its directory from outside (a cleanup script, a user) neither
// breaks I/O nor the destructor: the descriptor keeps the storage.
TEST_P(PagerBackends, KeptNameRemovedFromOutsideKeepsWorking) {
  asteria::PagerOptions o = opts();
  o.keep_swap_name = true;
  std::string dir;
  {
    asteria::Pager pager(o);
    dir = pager.directory();
    auto v1 = pool().acquire(3 * 4096);
    fill(v1.data(), 3 * 4096, 21);
    auto e = pager.allocate(3 * 4096);
    pager.wait(pager.write(e, v1.data(), 3 * 4096));
    ASSERT_EQ(::unlink(pager.swap_path().c_str()), 0);
    ASSERT_EQ(::rmdir(dir.c_str()), 0);
    auto dst = pool().acquire(3 * 4096);
    pager.wait(pager.read(e, dst.data()));
    EXPECT_EQ(std::memcmp(dst.data(), v1.data(), 3 * 4096), 0);
    auto v2 = pool().acquire(3 * 4096);
    fill(v2.data(), 3 * 4096, 22);
    auto f = pager.allocate(4096);
    pager.wait(pager.write(e, v2.data(), 3 * 4096));
    pager.wait(pager.write(f, v1.data(), 4096));
    pager.wait(pager.read(e, dst.data()));
    EXPECT_EQ(std::memcmp(dst.data(), v2.data(), 3 * 4096), 0);
    pager.wait(pager.read(f, dst.data()));
    EXPECT_EQ(std::memcmp(dst.data(), v1.data(), 4096), 0);
  }  // the destructor finds nothing to remove and does not fail
  struct stat st {};
  EXPECT_NE(::stat(dir.c_str(), &st), 0);
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

// ----- the fault-injection test hook: every injected fault is a clear error and loses nothing -----

struct FaultCase {
  asteria::PagerFaultKind kind;
  const char* what;  // text the error must contain
};

TEST_P(PagerBackends, InjectedWriteFaultsAreClearErrorsAndKeepThePreviousContents) {
  const FaultCase cases[] = {
      {asteria::PagerFaultKind::kEio, "Input/output error"},
      {asteria::PagerFaultKind::kNoSpace, "needed 16384 bytes"},
      {asteria::PagerFaultKind::kShortTransfer, "short write"},
  };
  for (const FaultCase& c : cases) {
    asteria::Pager pager(opts());
    auto v1 = pool().acquire(16384);
    auto v2 = pool().acquire(16384);
    fill(v1.data(), 16384, 1);
    fill(v2.data(), 16384, 2);
    std::vector<unsigned char> v2_copy(static_cast<unsigned char*>(v2.data()),
                                       static_cast<unsigned char*>(v2.data()) + 16384);
    auto e = pager.allocate(16384);
    pager.wait(pager.write(e, v1.data(), 16384));
    asteria::PagerFault f;
    f.kind = c.kind;
    f.op = asteria::PagerFaultOp::kWrite;
    pager.set_test_fault(f);
    std::string msg;
    int err = 0;
    try {
      pager.wait(pager.write(e, v2.data(), 16384));
    } catch (const asteria::Error& x) {
      msg = x.what();
      err = x.os_errno();
      EXPECT_EQ(x.category(), asteria::ErrorCategory::kIo);
    }
    ASSERT_FALSE(msg.empty()) << "fault " << c.what << " was not reported";
    EXPECT_NE(msg.find(c.what), std::string::npos) << msg;
    EXPECT_NE(msg.find("extent " + std::to_string(e)), std::string::npos) << msg;
    EXPECT_NE(msg.find("keeps its previous contents"), std::string::npos) << msg;
    EXPECT_NE(err, 0);
    // Nothing lost: the extent still reads back the first version, the caller's buffer is untouched.
    auto dst = pool().acquire(16384);
    pager.wait(pager.read(e, dst.data()));
    EXPECT_EQ(std::memcmp(dst.data(), v1.data(), 16384), 0) << c.what;
    EXPECT_EQ(std::memcmp(v2.data(), v2_copy.data(), 16384), 0) << c.what;
    // The hook fired once; the same write now succeeds.
    pager.wait(pager.write(e, v2.data(), 16384));
    pager.wait(pager.read(e, dst.data()));
    EXPECT_EQ(std::memcmp(dst.data(), v2.data(), 16384), 0) << c.what;
    auto s = pager.stats();
    EXPECT_EQ(s.faults_injected, 1u);
    EXPECT_EQ(s.io_errors, 1u);
  }
}

TEST_P(PagerBackends, InjectedReadFaultsAreClearErrorsAndTheExtentStaysReadable) {
  const FaultCase cases[] = {
      {asteria::PagerFaultKind::kEio, "Input/output error"},
      {asteria::PagerFaultKind::kShortTransfer, "short read"},
  };
  for (const FaultCase& c : cases) {
    asteria::Pager pager(opts());
    auto src = pool().acquire(3 * 4096);
    fill(src.data(), 3 * 4096, 5);
    auto e = pager.allocate(3 * 4096);
    pager.wait(pager.write(e, src.data(), 3 * 4096));
    asteria::PagerFault f;
    f.kind = c.kind;
    f.op = asteria::PagerFaultOp::kRead;
    pager.set_test_fault(f);
    auto dst = pool().acquire(3 * 4096);
    std::string msg;
    try {
      pager.wait(pager.read(e, dst.data()));
    } catch (const asteria::Error& x) {
      msg = x.what();
    }
    ASSERT_FALSE(msg.empty()) << "fault " << c.what << " was not reported";
    EXPECT_NE(msg.find(c.what), std::string::npos) << msg;
    EXPECT_NE(msg.find("can be retried"), std::string::npos) << msg;
    pager.wait(pager.read(e, dst.data()));
    EXPECT_EQ(std::memcmp(dst.data(), src.data(), 3 * 4096), 0) << c.what;
  }
}

TEST_P(PagerBackends, PartialTransfersAreCompleted) {
  asteria::Pager pager(opts());
  auto src = pool().acquire(5 * 4096);
  fill(src.data(), 5 * 4096, 9);
  auto e = pager.allocate(5 * 4096);
  asteria::PagerFault f;
  f.kind = asteria::PagerFaultKind::kPartialTransfer;
  f.count = 2;  // the write and the read
  pager.set_test_fault(f);
  pager.wait(pager.write(e, src.data(), 5 * 4096));
  auto dst = pool().acquire(5 * 4096);
  pager.wait(pager.read(e, dst.data()));
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), 5 * 4096), 0);
  auto s = pager.stats();
  EXPECT_EQ(s.faults_injected, 2u);
  EXPECT_EQ(s.io_errors, 0u);
}

TEST_P(PagerBackends, FaultAtTheNthRequestFromTheOptions) {
  asteria::PagerOptions o = opts();
  o.test_fault.kind = asteria::PagerFaultKind::kEio;
  o.test_fault.op = asteria::PagerFaultOp::kAny;
  o.test_fault.skip = 2;  // the third request fails
  asteria::Pager pager(o);
  auto buf = pool().acquire(4096);
  fill(buf.data(), 4096, 4);
  auto a = pager.allocate(4096);
  auto b = pager.allocate(4096);
  pager.wait(pager.write(a, buf.data(), 4096));  // 1
  pager.wait(pager.write(b, buf.data(), 4096));  // 2
  auto dst = pool().acquire(4096);
  EXPECT_THROW(pager.wait(pager.read(a, dst.data())), asteria::Error);  // 3
  pager.wait(pager.read(a, dst.data()));                               // 4
  EXPECT_EQ(std::memcmp(dst.data(), buf.data(), 4096), 0);
}

TEST_P(PagerBackends, RewritesAreOutOfPlaceAndReuseSpace) {
  asteria::Pager pager(opts());
  auto buf = pool().acquire(8192);
  auto e = pager.allocate(8192);
  for (unsigned i = 0; i < 6; ++i) {
    fill(buf.data(), 8192, 20 + i);
    pager.wait(pager.write(e, buf.data(), 8192));
    auto dst = pool().acquire(8192);
    pager.wait(pager.read(e, dst.data()));
    ASSERT_EQ(std::memcmp(dst.data(), buf.data(), 8192), 0) << i;
  }
  EXPECT_LE(pager.stats().file_bytes, 2u * 8192) << "rewrites must reuse the space of older copies";
}

TEST(Pager, RegisteredBuffersUseFixedIo) {
  std::string why;
  if (!io_uring_expected(&why)) GTEST_SKIP() << why;
  asteria::PagerOptions o;
  o.backend = asteria::PagerBackend::kIoUring;
  asteria::Pager pager(o);
  auto ring = pool().acquire(4 * 8192);
  ASSERT_TRUE(pager.register_buffers({{ring.data(), ring.capacity()}})) << pager.stats().registration_error;
  EXPECT_EQ(pager.stats().registered_buffers, 1u);
  EXPECT_EQ(pager.stats().registered_bytes, ring.capacity());
  auto* base = static_cast<unsigned char*>(ring.data());
  std::vector<asteria::ExtentId> ids;
  for (int i = 0; i < 4; ++i) {
    fill(base + i * 8192, 8192, 40 + i);
    ids.push_back(pager.allocate(8192));
    pager.wait(pager.write(ids.back(), base + i * 8192, 8192));
  }
  auto outside = pool().acquire(8192);  // not registered: a plain read
  for (int i = 0; i < 4; ++i) {
    pager.wait(pager.read(ids[i], outside.data()));
    EXPECT_EQ(std::memcmp(outside.data(), base + i * 8192, 8192), 0) << i;
  }
  EXPECT_EQ(pager.stats().fixed_ops, 4u);
  std::vector<unsigned char> keep(base, base + 4 * 8192);
  std::memset(base, 0, 4 * 8192);
  for (int i = 0; i < 4; ++i) pager.wait(pager.read(ids[i], base + i * 8192));  // fixed reads
  EXPECT_EQ(std::memcmp(base, keep.data(), keep.size()), 0);
  EXPECT_EQ(pager.stats().fixed_ops, 8u);
  // Injected faults go through fixed requests too.
  asteria::PagerFault f;
  f.kind = asteria::PagerFaultKind::kEio;
  f.op = asteria::PagerFaultOp::kWrite;
  pager.set_test_fault(f);
  EXPECT_THROW(pager.wait(pager.write(ids[0], base + 8192, 8192)), asteria::Error);
  pager.wait(pager.read(ids[0], outside.data()));
  EXPECT_EQ(std::memcmp(outside.data(), keep.data(), 8192), 0);
  ASSERT_TRUE(pager.register_buffers({}) == false);  // unregistering reports "not in use"
  EXPECT_EQ(pager.stats().registered_buffers, 0u);
}

TEST(Pager, ThreadBackendSaysWhyItRegistersNoBuffers) {
  asteria::PagerOptions o;
  o.backend = asteria::PagerBackend::kThreads;
  asteria::Pager pager(o);
  auto buf = pool().acquire(4096);
  EXPECT_FALSE(pager.register_buffers({{buf.data(), buf.capacity()}}));
  EXPECT_NE(pager.stats().registration_error.find("io_uring"), std::string::npos);
}

TEST(Pager, BusyTimeIsMeasured) {
  asteria::Pager pager;
  auto buf = pool().acquire(1 << 20);
  fill(buf.data(), 1 << 20, 8);
  auto e = pager.allocate(1 << 20);
  pager.wait(pager.write(e, buf.data(), 1 << 20));
  pager.wait(pager.read(e, buf.data()));
  auto s = pager.stats();
  EXPECT_GT(s.write_busy_s, 0.0);
  EXPECT_GT(s.read_busy_s, 0.0);
}

TEST(Pager, BadTestFaultIsInvalidArgument) {
  asteria::Pager pager;
  asteria::PagerFault f;
  f.kind = asteria::PagerFaultKind::kEio;
  f.count = 0;
  EXPECT_THROW(pager.set_test_fault(f), asteria::Error);
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

TEST(Pager, AutoPicksIoUringWhereThePlatformHasIt) {
  asteria::Pager pager;
  auto s = pager.stats();
  std::string why;
  if (io_uring_expected(&why)) {
    EXPECT_EQ(s.backend, "io_uring") << "io_uring could not be set up: " << s.fallback_reason
                                     << " (set ASTERIA_NO_IO_URING=1 only where the platform lacks it)";
  } else {
    EXPECT_EQ(s.backend, "threads");
    EXPECT_FALSE(s.fallback_reason.empty()) << "a fallback must say why";
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, PagerBackends,
                         ::testing::Values(asteria::PagerBackend::kThreads, asteria::PagerBackend::kIoUring),
                         [](const auto& info) {
                           return info.param == asteria::PagerBackend::kThreads ? std::string("threads")
                                                                                : std::string("io_uring");
                         });

}  // namespace
