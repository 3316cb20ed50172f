#include "asteria/pager.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

#include "asteria/errors.h"

#if ASTERIA_WITH_LIBURING
#include <liburing.h>
#endif

namespace asteria {

// ----- CRC32C --------------------------------------------------------------------------------
namespace {

struct Crc32cTable {
  std::uint32_t t[256];
  Crc32cTable() {
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
  }
};

std::uint32_t crc32c_table(const unsigned char* p, std::size_t n, std::uint32_t crc) noexcept {
  static const Crc32cTable table;
  for (std::size_t i = 0; i < n; ++i) crc = table.t[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) std::uint32_t crc32c_hw(const unsigned char* p, std::size_t n,
                                                           std::uint32_t crc) noexcept {
  std::uint64_t c = crc;
  while (n >= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    n -= 8;
  }
  auto c32 = static_cast<std::uint32_t>(c);
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}
#endif

std::string errno_text(int e) { return std::string(std::strerror(e)); }

// Full pread/pwrite of len bytes (retrying short transfers and EINTR). Returns 0 or an errno.
int full_io(bool write, int fd, void* buf, std::size_t len, std::uint64_t offset) {
  auto* p = static_cast<unsigned char*>(buf);
  std::size_t done = 0;
  while (done < len) {
    const ssize_t r = write ? ::pwrite(fd, p + done, len - done, static_cast<off_t>(offset + done))
                            : ::pread(fd, p + done, len - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) return write ? ENOSPC : EIO;  // no progress: treat as device full / truncated file
    done += static_cast<std::size_t>(r);
  }
  return 0;
}

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t bytes, std::uint32_t crc) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  crc = hw ? crc32c_hw(p, bytes, crc) : crc32c_table(p, bytes, crc);
#else
  crc = crc32c_table(p, bytes, crc);
#endif
  return ~crc;
}

// ----- backends ------------------------------------------------------------------------------
struct Pager::Backend {
  explicit Backend(Pager* p) : pager(p) {}
  virtual ~Backend() = default;
  virtual void submit(TicketId id, bool write, void* buf, std::size_t len, std::uint64_t offset) = 0;
  virtual const char* name() const noexcept = 0;
  void done(TicketId id, int error) { pager->complete(id, error); }
  Pager* pager;
};

namespace {

class ThreadBackend final : public Pager::Backend {
 public:
  ThreadBackend(Pager* p, int fd, int threads) : Backend(p), fd_(fd) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
  }
  ~ThreadBackend() override {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void submit(TicketId id, bool write, void* buf, std::size_t len, std::uint64_t offset) override {
    {
      std::lock_guard<std::mutex> g(mu_);
      q_.push_back({id, write, buf, len, offset});
    }
    cv_.notify_one();
  }
  const char* name() const noexcept override { return "threads"; }

 private:
  struct Req {
    TicketId id;
    bool write;
    void* buf;
    std::size_t len;
    std::uint64_t offset;
  };
  void run() {
    for (;;) {
      Req r;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !q_.empty(); });
        if (q_.empty()) return;  // stopping and drained
        r = q_.front();
        q_.pop_front();
      }
      done(r.id, full_io(r.write, fd_, r.buf, r.len, r.offset));
    }
  }
  int fd_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Req> q_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

#if ASTERIA_WITH_LIBURING
class UringBackend final : public Pager::Backend {
 public:
  // Throws Error kUnavailable (with the reason) when io_uring cannot be set up.
  UringBackend(Pager* p, int fd, unsigned depth) : Backend(p), fd_(fd), depth_(depth) {
    const int r = io_uring_queue_init(depth, &ring_, 0);
    if (r < 0) throw Error(ErrorCategory::kUnavailable, "io_uring_queue_init: " + errno_text(-r), -r);
    const int rf = io_uring_register_files(&ring_, &fd_, 1);
    if (rf < 0) {
      io_uring_queue_exit(&ring_);
      throw Error(ErrorCategory::kUnavailable, "io_uring_register_files: " + errno_text(-rf), -rf);
    }
    reaper_ = std::thread([this] { reap(); });
  }
  ~UringBackend() override {
    {
      std::unique_lock<std::mutex> lk(mu_);
      room_.wait(lk, [&] { return in_flight_ < depth_; });
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data64(sqe, 0);  // the reaper's stop signal
      io_uring_submit(&ring_);
    }
    reaper_.join();
    io_uring_queue_exit(&ring_);
  }
  void submit(TicketId id, bool write, void* buf, std::size_t len, std::uint64_t offset) override {
    std::unique_lock<std::mutex> lk(mu_);
    room_.wait(lk, [&] { return in_flight_ + 1 < depth_; });  // keep one slot for the stop signal
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    ASTERIA_ASSERT(sqe != nullptr);
    if (write)
      io_uring_prep_write(sqe, 0, buf, static_cast<unsigned>(len), offset);
    else
      io_uring_prep_read(sqe, 0, buf, static_cast<unsigned>(len), offset);
    sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, id);
    reqs_[id] = {write, buf, len, offset};
    ++in_flight_;
    const int r = io_uring_submit(&ring_);
    if (r < 0) {
      --in_flight_;
      reqs_.erase(id);
      lk.unlock();
      done(id, -r);
    }
  }
  const char* name() const noexcept override { return "io_uring"; }

 private:
  struct Req {
    bool write;
    void* buf;
    std::size_t len;
    std::uint64_t offset;
  };
  void reap() {
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      const int r = io_uring_wait_cqe(&ring_, &cqe);
      if (r == -EINTR) continue;
      ASTERIA_ASSERT(r == 0);
      const TicketId id = io_uring_cqe_get_data64(cqe);
      const int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      if (id == 0) return;
      Req req;
      {
        std::lock_guard<std::mutex> g(mu_);
        req = reqs_.at(id);
        reqs_.erase(id);
        --in_flight_;
      }
      room_.notify_all();
      int err = res < 0 ? -res : 0;
      if (err == 0 && static_cast<std::size_t>(res) < req.len) {
        // A short transfer: finish the remainder synchronously.
        err = full_io(req.write, fd_, static_cast<unsigned char*>(req.buf) + res, req.len - res, req.offset + res);
      }
      done(id, err);
    }
  }
  int fd_;
  unsigned depth_;
  io_uring ring_{};
  std::mutex mu_;
  std::condition_variable room_;
  unsigned in_flight_ = 0;
  std::map<TicketId, Req> reqs_;
  std::thread reaper_;
};
#endif

}  // namespace

// ----- Pager ---------------------------------------------------------------------------------
Pager::Pager(const PagerOptions& opts) : opts_(opts) {
  ASTERIA_CHECK(opts.queue_depth >= 1 && opts.queue_depth <= 4096, kInvalidArgument,
                "[pager] queue_depth must be in 1..4096, got " << opts.queue_depth);
  ASTERIA_CHECK(opts.io_threads >= 1 && opts.io_threads <= 64, kInvalidArgument,
                "[pager] io_threads must be in 1..64, got " << opts.io_threads);
  std::string parent = opts.parent_dir;
  if (parent.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    parent = (tmp && *tmp) ? tmp : "/tmp";
  }
  std::string templ = parent + "/asteria-swap-XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) {
    const int e = errno;
    throw Error(ErrorCategory::kIo,
                "[pager] cannot create a private swap directory in '" + parent + "': " + errno_text(e) +
                    "; choose a writable nvme_path",
                e);
  }
  dir_ = buf.data();  // mkdtemp creates it with mode 0700
  path_ = dir_ + "/extents.swap";
  const int base = O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
  if (opts.direct_io) {
    fd_ = ::open(path_.c_str(), base | O_DIRECT, 0600);
    direct_ = fd_ >= 0;
    if (fd_ < 0 && errno != EINVAL) {
      const int e = errno;
      ::rmdir(dir_.c_str());
      throw Error(ErrorCategory::kIo, "[pager] cannot create '" + path_ + "': " + errno_text(e), e);
    }
  }
  if (fd_ < 0) {
    fd_ = ::open(path_.c_str(), base, 0600);
    if (fd_ < 0) {
      const int e = errno;
      ::rmdir(dir_.c_str());
      throw Error(ErrorCategory::kIo, "[pager] cannot create '" + path_ + "': " + errno_text(e), e);
    }
  }
  stats_.direct_io = direct_;
  stats_.directory = dir_;
  if (opts.backend != PagerBackend::kThreads) {
#if ASTERIA_WITH_LIBURING
    try {
      backend_ = std::make_unique<UringBackend>(this, fd_, opts.queue_depth + 1);
    } catch (const Error& e) {
      if (opts.backend == PagerBackend::kIoUring) {
        ::close(fd_);
        ::unlink(path_.c_str());
        ::rmdir(dir_.c_str());
        throw Error(ErrorCategory::kUnavailable,
                    std::string("[pager] io_uring was requested but cannot be set up (") + e.what() +
                        "); use backend='auto' or 'threads'");
      }
      stats_.fallback_reason = std::string("io_uring unavailable: ") + e.what();
    }
#else
    if (opts.backend == PagerBackend::kIoUring) {
      ::close(fd_);
      ::unlink(path_.c_str());
      ::rmdir(dir_.c_str());
      throw Error(ErrorCategory::kUnavailable,
                  "[pager] io_uring was requested but asteria was built without liburing "
                  "(apt-get install liburing-dev, then rebuild)");
    }
    stats_.fallback_reason = "asteria was built without liburing";
#endif
  }
  if (!backend_) backend_ = std::make_unique<ThreadBackend>(this, fd_, opts.io_threads);
  stats_.backend = backend_->name();
}

Pager::~Pager() {
  {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] {
      for (auto& [id, t] : tickets_)
        if (!t.done) return false;
      return true;
    });
  }
  backend_.reset();
  ::close(fd_);
  ::unlink(path_.c_str());
  ::rmdir(dir_.c_str());
}

ExtentId Pager::allocate(std::size_t bytes) {
  ASTERIA_CHECK(bytes > 0, kInvalidArgument, "[pager::allocate] an extent needs at least 1 byte");
  const std::size_t cap = pager_io_size(bytes);
  std::lock_guard<std::mutex> g(mu_);
  Extent e;
  e.capacity = cap;
  if (auto it = free_.find(cap); it != free_.end()) {
    e.offset = it->second;
    free_.erase(it);
  } else {
    e.offset = file_end_;
    file_end_ += cap;
  }
  const ExtentId id = next_extent_++;
  extents_.emplace(id, e);
  stats_.extents = extents_.size();
  stats_.file_bytes = file_end_;
  return id;
}

void Pager::release(ExtentId extent) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = extents_.find(extent);
  ASTERIA_CHECK(it != extents_.end(), kInvalidArgument, "[pager::release] unknown extent " << extent);
  ASTERIA_CHECK(it->second.in_flight == 0, kInvalidArgument,
                "[pager::release] extent " << extent << " has I/O in flight; wait for it first");
  free_.emplace(it->second.capacity, it->second.offset);
  extents_.erase(it);
  stats_.extents = extents_.size();
}

TicketId Pager::write(ExtentId extent, const void* src, std::size_t bytes) {
  ASTERIA_CHECK(src != nullptr && reinterpret_cast<std::uintptr_t>(src) % 4096 == 0, kInvalidArgument,
                "[pager::write] the source buffer must be 4096-byte aligned (use a PinnedPool lease)");
  const std::uint32_t crc = crc32c(src, bytes);
  TicketId id;
  std::uint64_t offset;
  std::size_t len;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = extents_.find(extent);
    ASTERIA_CHECK(it != extents_.end(), kInvalidArgument, "[pager::write] unknown extent " << extent);
    Extent& e = it->second;
    ASTERIA_CHECK(bytes > 0 && bytes <= e.capacity, kInvalidArgument,
                  "[pager::write] extent " << extent << " holds " << e.capacity << " bytes, asked to write " << bytes);
    ASTERIA_CHECK(e.in_flight == 0, kInvalidArgument,
                  "[pager::write] extent " << extent << " has I/O in flight; wait for it before writing again");
    e.in_flight += 1;
    id = next_ticket_++;
    Ticket t;
    t.write = true;
    t.extent = extent;
    t.bytes = bytes;
    t.crc = crc;
    tickets_.emplace(id, t);
    offset = e.offset;
    len = pager_io_size(bytes);
  }
  backend_->submit(id, true, const_cast<void*>(src), len, offset);
  return id;
}

TicketId Pager::read(ExtentId extent, void* dst) {
  ASTERIA_CHECK(dst != nullptr && reinterpret_cast<std::uintptr_t>(dst) % 4096 == 0, kInvalidArgument,
                "[pager::read] the destination buffer must be 4096-byte aligned (use a PinnedPool lease)");
  TicketId id;
  std::uint64_t offset;
  std::size_t len;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = extents_.find(extent);
    ASTERIA_CHECK(it != extents_.end(), kInvalidArgument, "[pager::read] unknown extent " << extent);
    Extent& e = it->second;
    ASTERIA_CHECK(e.written, kInvalidArgument,
                  "[pager::read] extent " << extent << " holds no valid data (never written, or its last write failed)");
    e.in_flight += 1;
    id = next_ticket_++;
    Ticket t;
    t.extent = extent;
    t.dst = dst;
    t.bytes = e.bytes;
    t.crc = e.crc;
    tickets_.emplace(id, t);
    offset = e.offset;
    len = pager_io_size(e.bytes);
  }
  backend_->submit(id, false, dst, len, offset);
  return id;
}

void Pager::complete(TicketId id, int error) {
  std::unique_lock<std::mutex> lk(mu_);
  Ticket& t = tickets_.at(id);
  Extent& e = extents_.at(t.extent);
  e.in_flight -= 1;
  if (error == 0 && !t.write) {
    const void* dst = t.dst;
    const std::size_t n = t.bytes;
    lk.unlock();  // checksum outside the lock
    const std::uint32_t crc = crc32c(dst, n);
    lk.lock();
    if (crc != t.crc) {
      error = EBADMSG;
      stats_.crc_failures += 1;
    }
  }
  if (t.write) {
    if (error == 0) {
      e.bytes = t.bytes;
      e.crc = t.crc;
      e.written = true;
      stats_.writes += 1;
      stats_.bytes_written += t.bytes;
    } else {
      e.written = false;  // the file may hold a partial write: never read it back as valid
    }
  } else if (error == 0) {
    stats_.reads += 1;
    stats_.bytes_read += t.bytes;
  }
  if (error != 0 && error != EBADMSG) stats_.io_errors += 1;
  t.error = error;
  t.done = true;
  lk.unlock();
  cv_.notify_all();
}

bool Pager::ready(TicketId ticket) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = tickets_.find(ticket);
  ASTERIA_CHECK(it != tickets_.end(), kInvalidArgument, "[pager::ready] unknown ticket " << ticket);
  return it->second.done;
}

void Pager::wait(TicketId ticket) {
  std::unique_lock<std::mutex> lk(mu_);
  auto it = tickets_.find(ticket);
  ASTERIA_CHECK(it != tickets_.end(), kInvalidArgument,
                "[pager::wait] unknown ticket " << ticket << " (never issued, or already waited for)");
  cv_.wait(lk, [&] { return it->second.done; });
  const Ticket t = it->second;
  tickets_.erase(it);
  if (t.error == 0) return;
  const std::uint64_t offset = extents_.count(t.extent) ? extents_.at(t.extent).offset : 0;
  std::string what;
  if (t.error == EBADMSG) {
    throw Error(ErrorCategory::kIo,
                "[pager::read] extent " + std::to_string(t.extent) + " failed its CRC32C check (" + path_ +
                    " at offset " + std::to_string(offset) + "): the swap file was corrupted; the data is not used",
                EIO);
  }
  if (t.write && (t.error == ENOSPC || t.error == EDQUOT || t.error == EFBIG)) {
    throw Error(ErrorCategory::kIo,
                "[pager::write] " + errno_text(t.error) + ": needed " + std::to_string(pager_io_size(t.bytes)) +
                    " bytes at offset " + std::to_string(offset) + " of " + path_ +
                    "; the data stays in memory. Free space there or choose another nvme_path",
                t.error);
  }
  throw Error(ErrorCategory::kIo,
              std::string("[pager::") + (t.write ? "write" : "read") + "] extent " + std::to_string(t.extent) +
                  " at offset " + std::to_string(offset) + " of " + path_ + ": " + errno_text(t.error),
              t.error);
}

std::size_t Pager::extent_bytes(ExtentId extent) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = extents_.find(extent);
  ASTERIA_CHECK(it != extents_.end(), kInvalidArgument, "[pager] unknown extent " << extent);
  return it->second.bytes;
}

PagerStats Pager::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  return stats_;
}

}  // namespace asteria
