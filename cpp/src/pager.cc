#include "asteria/pager.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
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

namespace {

std::string errno_text(int e) { return std::string(std::strerror(e)); }

// Internal completion code of a transfer that stopped short and made no further progress (reported
// to the caller as EIO with the byte counts). Not an errno value.
constexpr int kShortError = 100001;

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

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

// Performs a request that the test hook chose to fail (see PagerFaultKind): half of the data (rounded
// down to whole 4 KiB blocks, as O_DIRECT needs) really moves, then the fault. Returns 0, an errno or
// kShortError; *moved is the bytes transferred.
int faulty_io(bool write, int fd, void* buf, std::size_t len, std::uint64_t offset, PagerFaultKind kind,
              std::size_t* moved) {
  auto* p = static_cast<unsigned char*>(buf);
  const std::size_t half = len / 2 / 4096 * 4096;
  const int e = half ? full_io(write, fd, p, half, offset) : 0;
  *moved = e == 0 ? half : 0;
  if (e != 0) return e;
  switch (kind) {
    case PagerFaultKind::kEio:
      return EIO;
    case PagerFaultKind::kNoSpace:
      return ENOSPC;
    case PagerFaultKind::kShortTransfer:
      return kShortError;
    case PagerFaultKind::kPartialTransfer: {
      const int rest = full_io(write, fd, p + half, len - half, offset + half);
      *moved = rest == 0 ? len : half;
      return rest;
    }
    case PagerFaultKind::kNone:
      break;
  }
  return full_io(write, fd, p, len, offset);
}

bool is_error_fault(PagerFaultKind k) {
  return k == PagerFaultKind::kEio || k == PagerFaultKind::kNoSpace || k == PagerFaultKind::kShortTransfer;
}

void check_fault(const PagerFault& f) {
  ASTERIA_CHECK(static_cast<int>(f.kind) >= 0 && static_cast<int>(f.kind) <= 4, kInvalidArgument,
                "[pager] unknown test fault kind " << static_cast<int>(f.kind));
  ASTERIA_CHECK(f.kind == PagerFaultKind::kNone || f.count >= 1, kInvalidArgument,
                "[pager] a test fault needs count >= 1");
}

}  // namespace

// ----- backends ------------------------------------------------------------------------------
struct Pager::Backend {
  explicit Backend(Pager* p) : pager(p) {}
  virtual ~Backend() = default;
  virtual void submit(TicketId id, bool write, void* buf, std::size_t len, std::uint64_t offset,
                      PagerFaultKind fault) = 0;
  virtual const char* name() const noexcept = 0;
  // Registers buffers for fixed I/O (replacing earlier ones; empty: unregister). Returns "" when the
  // backend uses them, else why not. No request is in flight.
  virtual std::string register_buffers(const std::vector<iovec>& buffers) {
    return buffers.empty() ? std::string()
                           : std::string("the thread-pool backend does pread/pwrite; registered buffers are an io_uring feature");
  }
  virtual std::uint64_t fixed_ops() const noexcept { return 0; }
  void done(TicketId id, int error, std::size_t moved) { pager->complete(id, error, moved); }
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
  void submit(TicketId id, bool write, void* buf, std::size_t len, std::uint64_t offset,
              PagerFaultKind fault) override {
    {
      std::lock_guard<std::mutex> g(mu_);
      q_.push_back({id, write, buf, len, offset, fault});
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
    PagerFaultKind fault;
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
      std::size_t moved = r.len;
      const int err = r.fault == PagerFaultKind::kNone
                          ? full_io(r.write, fd_, r.buf, r.len, r.offset)
                          : faulty_io(r.write, fd_, r.buf, r.len, r.offset, r.fault, &moved);
      done(r.id, err, err == 0 ? r.len : moved);
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
  void submit(TicketId id, bool write, void* buf, std::size_t len, std::uint64_t offset,
              PagerFaultKind fault) override {
    std::unique_lock<std::mutex> lk(mu_);
    room_.wait(lk, [&] { return in_flight_ + 1 < depth_; });  // keep one slot for the stop signal
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    ASTERIA_ASSERT(sqe != nullptr);
    // The test hook moves half of the data (whole 4 KiB blocks) and then reports its fault; a
    // partial transfer goes through the same path as a short transfer from the kernel.
    std::size_t sub_len = len;
    bool nop = false;
    if (fault != PagerFaultKind::kNone) {
      const std::size_t half = len / 2 / 4096 * 4096;
      if (half != 0)
        sub_len = half;
      else
        nop = fault != PagerFaultKind::kPartialTransfer;
    }
    if (nop) {
      io_uring_prep_nop(sqe);
    } else {
      const int idx = fixed_index(buf, sub_len);
      if (idx >= 0) {
        if (write)
          io_uring_prep_write_fixed(sqe, 0, buf, static_cast<unsigned>(sub_len), offset, idx);
        else
          io_uring_prep_read_fixed(sqe, 0, buf, static_cast<unsigned>(sub_len), offset, idx);
        fixed_ops_.fetch_add(1, std::memory_order_relaxed);
      } else if (write) {
        io_uring_prep_write(sqe, 0, buf, static_cast<unsigned>(sub_len), offset);
      } else {
        io_uring_prep_read(sqe, 0, buf, static_cast<unsigned>(sub_len), offset);
      }
      sqe->flags |= IOSQE_FIXED_FILE;
    }
    io_uring_sqe_set_data64(sqe, id);
    reqs_[id] = {write, buf, len, offset, fault, nop};
    ++in_flight_;
    const int r = io_uring_submit(&ring_);
    if (r < 0) {
      --in_flight_;
      reqs_.erase(id);
      lk.unlock();
      done(id, -r, 0);
    }
  }
  std::string register_buffers(const std::vector<iovec>& buffers) override {
    std::lock_guard<std::mutex> g(mu_);
    ASTERIA_ASSERT(in_flight_ == 0);
    if (!bufs_.empty()) {
      io_uring_unregister_buffers(&ring_);
      bufs_.clear();
    }
    if (buffers.empty()) return {};
    const int r = io_uring_register_buffers(&ring_, buffers.data(), static_cast<unsigned>(buffers.size()));
    if (r < 0)
      return "io_uring_register_buffers: " + errno_text(-r) +
             (r == -ENOMEM ? " (the memlock limit is too small: ulimit -l)" : "");
    bufs_ = buffers;
    return {};
  }
  std::uint64_t fixed_ops() const noexcept override { return fixed_ops_.load(std::memory_order_relaxed); }
  const char* name() const noexcept override { return "io_uring"; }

 private:
  struct Req {
    bool write;
    void* buf;
    std::size_t len;
    std::uint64_t offset;
    PagerFaultKind fault;
    bool nop;
  };
  // Index of the registered buffer holding [buf, buf + len), or -1. mu_ held.
  int fixed_index(const void* buf, std::size_t len) const noexcept {
    const auto* p = static_cast<const unsigned char*>(buf);
    for (std::size_t i = 0; i < bufs_.size(); ++i) {
      const auto* base = static_cast<const unsigned char*>(bufs_[i].iov_base);
      if (p >= base && p + len <= base + bufs_[i].iov_len) return static_cast<int>(i);
    }
    return -1;
  }
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
      std::size_t moved = (err != 0 || req.nop) ? 0 : static_cast<std::size_t>(res);
      if (is_error_fault(req.fault)) {
        if (err == 0)
          err = req.fault == PagerFaultKind::kEio ? EIO : req.fault == PagerFaultKind::kNoSpace ? ENOSPC : kShortError;
      } else if (err == 0 && moved < req.len) {
        // A short transfer (from the kernel, or the test hook's partial one): finish the remainder
        // synchronously.
        err = full_io(req.write, fd_, static_cast<unsigned char*>(req.buf) + moved, req.len - moved,
                      req.offset + moved);
        if (err == 0) moved = req.len;
      }
      done(id, err, moved);
    }
  }
  int fd_;
  unsigned depth_;
  io_uring ring_{};
  std::mutex mu_;
  std::condition_variable room_;
  unsigned in_flight_ = 0;
  std::map<TicketId, Req> reqs_;
  std::vector<iovec> bufs_;  // registered buffers, in registration order
  std::atomic<std::uint64_t> fixed_ops_{0};
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
  check_fault(opts.test_fault);
  fault_ = opts.test_fault;
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
  parent_ = parent;
  const int base = O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
  if (opts.direct_io) {
    fd_ = ::open(path_.c_str(), base | O_DIRECT, 0600);
    direct_ = fd_ >= 0;
    if (fd_ < 0 && errno != EINVAL) {
      const int e = errno;
      ::rmdir(dir_.c_str());
      throw Error(ErrorCategory::kIo,
                  "[pager] cannot create '" + path_ + "': " + errno_text(e) + "; choose a writable nvme_path", e);
    }
  }
  if (fd_ < 0) {
    fd_ = ::open(path_.c_str(), base, 0600);
    if (fd_ < 0) {
      const int e = errno;
      ::rmdir(dir_.c_str());
      throw Error(ErrorCategory::kIo,
                  "[pager] cannot create '" + path_ + "': " + errno_text(e) + "; choose a writable nvme_path", e);
    }
  }
  named_ = true;
  if (!opts.keep_swap_name) {
    // The open descriptor keeps the storage; with no name left, nothing stays on disk when the process
    // dies, however it dies (SIGKILL, OOM kill): the kernel frees the space at the last close.
    if (::unlink(path_.c_str()) == 0) {
      named_ = false;
      ::rmdir(dir_.c_str());
    }
  }
  file_desc_ = named_ ? "'" + path_ + "'" : "the unlinked swap file in '" + parent_ + "'";
  stats_.direct_io = direct_;
  stats_.directory = dir_;
  stats_.swap_name_kept = named_;
  if (opts.backend != PagerBackend::kThreads) {
#if ASTERIA_WITH_LIBURING
    try {
      backend_ = std::make_unique<UringBackend>(this, fd_, opts.queue_depth + 1);
    } catch (const Error& e) {
      if (opts.backend == PagerBackend::kIoUring) {
        ::close(fd_);
        remove_names();
        throw Error(ErrorCategory::kUnavailable,
                    std::string("[pager] io_uring was requested but cannot be set up (") + e.what() +
                        "); use backend='auto' or 'threads'");
      }
      stats_.fallback_reason = std::string("io_uring unavailable: ") + e.what();
    }
#else
    if (opts.backend == PagerBackend::kIoUring) {
      ::close(fd_);
      remove_names();
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
  remove_names();
}

void Pager::remove_names() noexcept {
  if (!named_) return;  // removed at creation: never touch a path someone else may have created since
  ::unlink(path_.c_str());  // either may be gone already (removed from outside): nothing to do then
  ::rmdir(dir_.c_str());
  named_ = false;
}

std::uint64_t Pager::take_location(std::size_t capacity) {
  if (auto it = free_.find(capacity); it != free_.end()) {
    const std::uint64_t offset = it->second;
    free_.erase(it);
    return offset;
  }
  const std::uint64_t offset = file_end_;
  file_end_ += capacity;
  stats_.file_bytes = file_end_;
  return offset;
}

int Pager::preallocate(std::uint64_t end) {
  if (preallocate_off_ || end <= reserved_end_) return 0;
  // Grow by a quarter of the file (1..64 MiB) beyond what is needed: few calls, little unused space.
  constexpr std::uint64_t kMiB = 1u << 20;
  const std::uint64_t ahead = std::min<std::uint64_t>(64 * kMiB, std::max<std::uint64_t>(kMiB, reserved_end_ / 4));
  const std::uint64_t target = (end + ahead + kMiB - 1) / kMiB * kMiB;
  int err = 0;
  for (const std::uint64_t upto : {target, end}) {  // then only what is needed when the disk is nearly full
    int r;
    do {
      r = ::fallocate(fd_, 0, static_cast<off_t>(reserved_end_), static_cast<off_t>(upto - reserved_end_));
    } while (r != 0 && errno == EINTR);
    if (r == 0) {
      reserved_end_ = upto;
      stats_.preallocated_bytes = upto;
      return 0;
    }
    err = errno;
    if (err != ENOSPC && err != EDQUOT && err != EFBIG) {
      // Not a lack of space: the file system cannot reserve (EOPNOTSUPP, ...). The writes allocate.
      preallocate_off_ = true;
      stats_.preallocation_error = "fallocate: " + errno_text(err) + " (the writes allocate the file's blocks)";
      return 0;
    }
  }
  return err;
}

ExtentId Pager::allocate(std::size_t bytes) {
  ASTERIA_CHECK(bytes > 0, kInvalidArgument, "[pager::allocate] an extent needs at least 1 byte");
  const std::size_t cap = pager_io_size(bytes);
  std::lock_guard<std::mutex> g(mu_);
  Extent e;
  e.capacity = cap;
  e.offset = take_location(cap);
  if (const int err = preallocate(e.offset + cap); err != 0) {
    if (e.offset + cap == file_end_) {  // hand the location back: later, smaller extents may still fit
      file_end_ = e.offset;
      stats_.file_bytes = file_end_;
    } else {
      free_.emplace(cap, e.offset);
    }
    throw Error(ErrorCategory::kIo,
                "[pager::allocate] " + errno_text(err) + ": needed " + std::to_string(cap) + " bytes at offset " +
                    std::to_string(e.offset) + " of " + file_desc_ + ". Free space in '" + parent_ +
                    "', choose another nvme_path or raise host_budget.",
                err);
  }
  const ExtentId id = next_extent_++;
  extents_.emplace(id, e);
  stats_.extents = extents_.size();
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

PagerFaultKind Pager::take_fault(bool write) {
  const PagerFault& f = fault_;
  if (f.kind == PagerFaultKind::kNone) return PagerFaultKind::kNone;
  const bool match = f.kind == PagerFaultKind::kNoSpace
                         ? write
                         : f.op == PagerFaultOp::kAny || (f.op == PagerFaultOp::kWrite) == write;
  if (!match) return PagerFaultKind::kNone;
  const std::uint64_t n = fault_seen_++;
  if (n < f.skip || n - f.skip >= f.count) return PagerFaultKind::kNone;
  stats_.faults_injected += 1;
  return f.kind;
}

void Pager::set_test_fault(const PagerFault& fault) {
  check_fault(fault);
  std::lock_guard<std::mutex> g(mu_);
  fault_ = fault;
  fault_seen_ = 0;
}

void Pager::note_start(bool write) {
  int& n = write ? writes_in_flight_ : reads_in_flight_;
  if (n++ == 0) (write ? write_busy_since_ns_ : read_busy_since_ns_) = now_ns();
}

void Pager::note_end(bool write) {
  int& n = write ? writes_in_flight_ : reads_in_flight_;
  if (--n == 0) (write ? write_busy_ns_ : read_busy_ns_) += now_ns() - (write ? write_busy_since_ns_ : read_busy_since_ns_);
}

Pager::Extent& Pager::idle_extent(ExtentId extent, const char* what) {
  auto it = extents_.find(extent);
  ASTERIA_CHECK(it != extents_.end(), kInvalidArgument, "[pager::" << what << "] unknown extent " << extent);
  ASTERIA_CHECK(it->second.in_flight == 0, kInvalidArgument,
                "[pager::" << what << "] extent " << extent << " has I/O in flight; wait for it before the next "
                           << what);
  return it->second;
}

TicketId Pager::issue(Extent& e, const Ticket& t, PagerFaultKind& fault) {
  e.in_flight += 1;
  const TicketId id = next_ticket_++;
  tickets_.emplace(id, t);
  fault = take_fault(t.write);
  note_start(t.write);
  return id;
}

TicketId Pager::write(ExtentId extent, const void* src, std::size_t bytes) {
  ASTERIA_CHECK(src != nullptr && reinterpret_cast<std::uintptr_t>(src) % 4096 == 0, kInvalidArgument,
                "[pager::write] the source buffer must be 4096-byte aligned (use a PinnedPool lease)");
  const std::uint32_t crc = crc32c(src, bytes);
  TicketId id;
  std::uint64_t offset;
  std::size_t len;
  PagerFaultKind fault;
  {
    std::lock_guard<std::mutex> g(mu_);
    Extent& e = idle_extent(extent, "write");
    ASTERIA_CHECK(bytes > 0 && bytes <= e.capacity, kInvalidArgument,
                  "[pager::write] extent " << extent << " holds " << e.capacity << " bytes, asked to write " << bytes);
    // Out of place once the extent holds valid data: its current contents stay readable until the
    // new copy is complete.
    offset = e.written ? take_location(e.capacity) : e.offset;
    // Reserve new space ahead of the write (a metadata-only call on most file systems). A failure is left
    // to the write itself, which reports it through wait() like any failed write.
    if (e.written) (void)preallocate(offset + e.capacity);
    Ticket t;
    t.write = true;
    t.extent = extent;
    t.bytes = bytes;
    t.crc = crc;
    t.offset = offset;
    id = issue(e, t, fault);
    len = pager_io_size(bytes);
  }
  backend_->submit(id, true, const_cast<void*>(src), len, offset, fault);
  return id;
}

TicketId Pager::read(ExtentId extent, void* dst) {
  ASTERIA_CHECK(dst != nullptr && reinterpret_cast<std::uintptr_t>(dst) % 4096 == 0, kInvalidArgument,
                "[pager::read] the destination buffer must be 4096-byte aligned (use a PinnedPool lease)");
  TicketId id;
  std::uint64_t offset;
  std::size_t len;
  PagerFaultKind fault;
  {
    std::lock_guard<std::mutex> g(mu_);
    Extent& e = idle_extent(extent, "read");
    ASTERIA_CHECK(e.written, kInvalidArgument,
                  "[pager::read] extent " << extent << " holds no valid data (it was never written successfully)");
    Ticket t;
    t.extent = extent;
    t.dst = dst;
    t.bytes = e.bytes;
    t.crc = e.crc;
    t.offset = e.offset;
    id = issue(e, t, fault);
    offset = e.offset;
    len = pager_io_size(e.bytes);
  }
  backend_->submit(id, false, dst, len, offset, fault);
  return id;
}

void Pager::complete(TicketId id, int error, std::size_t moved) {
  std::unique_lock<std::mutex> lk(mu_);
  Ticket& t = tickets_.at(id);
  Extent& e = extents_.at(t.extent);
  e.in_flight -= 1;
  note_end(t.write);
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
      if (t.offset != e.offset) {
        free_.emplace(e.capacity, e.offset);  // the previous copy
        e.offset = t.offset;
      }
      e.bytes = t.bytes;
      e.crc = t.crc;
      e.written = true;
      stats_.writes += 1;
      stats_.bytes_written += t.bytes;
    } else if (t.offset != e.offset) {
      free_.emplace(e.capacity, t.offset);  // the failed copy; the extent keeps its previous one
    } else {
      e.written = false;  // a first write failed in place: the file may hold part of it
    }
  } else if (error == 0) {
    stats_.reads += 1;
    stats_.bytes_read += t.bytes;
  }
  if (error != 0 && error != EBADMSG) stats_.io_errors += 1;
  t.error = error;
  t.moved = moved;
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
  const std::string where = " at offset " + std::to_string(t.offset) + " of " + file_desc_;
  const std::string ext = "extent " + std::to_string(t.extent);
  const std::string kept = t.write ? "; the extent keeps its previous contents and the data stays in memory"
                                   : "; the extent is intact and the read can be retried";
  if (t.error == EBADMSG) {
    throw Error(ErrorCategory::kIo,
                "[pager::read] " + ext + " failed its CRC32C check (" + file_desc_ + " at offset " + std::to_string(t.offset) +
                    "): the swap file was corrupted; the data is not used",
                EIO);
  }
  if (t.error == kShortError) {
    const std::size_t expected = pager_io_size(t.bytes);
    throw Error(ErrorCategory::kIo,
                std::string("[pager::") + (t.write ? "write] short write to " : "read] short read of ") + ext + ": " +
                    std::to_string(t.moved) + " of " + std::to_string(expected) + " bytes" +
                    (t.write ? " reached " : " came from ") + file_desc_ + " at offset " + std::to_string(t.offset) +
                    " before the device stopped making progress: " + errno_text(EIO) + kept,
                EIO);
  }
  if (t.write && (t.error == ENOSPC || t.error == EDQUOT || t.error == EFBIG)) {
    throw Error(ErrorCategory::kIo,
                "[pager::write] " + errno_text(t.error) + ": needed " + std::to_string(pager_io_size(t.bytes)) +
                    " bytes" + where + " for " + ext + kept + ". Free space in '" + parent_ + "' or choose another nvme_path",
                t.error);
  }
  throw Error(ErrorCategory::kIo,
              std::string("[pager::") + (t.write ? "write] " : "read] ") + ext + where + ": " + errno_text(t.error) + kept,
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
  PagerStats s = stats_;
  s.fixed_ops = backend_->fixed_ops();
  const std::int64_t now = now_ns();
  s.read_busy_s = static_cast<double>(read_busy_ns_ + (reads_in_flight_ ? now - read_busy_since_ns_ : 0)) / 1e9;
  s.write_busy_s = static_cast<double>(write_busy_ns_ + (writes_in_flight_ ? now - write_busy_since_ns_ : 0)) / 1e9;
  return s;
}

bool Pager::register_buffers(const std::vector<std::pair<void*, std::size_t>>& buffers) {
  std::lock_guard<std::mutex> g(mu_);
  for (const auto& [id, t] : tickets_)
    ASTERIA_CHECK(t.done, kInvalidArgument,
                  "[pager::register_buffers] request " << id << " is in flight; wait for every request first");
  std::vector<iovec> iov;
  std::uint64_t total = 0;
  for (const auto& [p, n] : buffers) {
    ASTERIA_CHECK(p != nullptr && n > 0, kInvalidArgument, "[pager::register_buffers] empty buffer");
    iov.push_back({p, n});
    total += n;
  }
  const std::string why = backend_->register_buffers(iov);
  const bool ok = why.empty() && !iov.empty();
  stats_.registered_buffers = ok ? iov.size() : 0;
  stats_.registered_bytes = ok ? total : 0;
  stats_.registration_error = why;
  return ok;
}

bool pager_built_with_io_uring() noexcept {
#ifdef ASTERIA_WITH_LIBURING
  return true;
#else
  return false;
#endif
}

}  // namespace asteria
