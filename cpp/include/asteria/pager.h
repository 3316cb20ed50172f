#pragma once
// asteria::Pager — stores extents of optimizer state in a private swap file and moves them to and
// from caller buffers (pinned leases) asynchronously.
//
// Backends: io_uring through liburing (registered file, optional registered buffers for fixed
// reads/writes, O_DIRECT, one reaper thread) and a portable pool of threads doing pread/pwrite.
// kAuto picks io_uring and falls back to the thread pool when io_uring cannot be set up (old kernel,
// seccomp) or asteria was built without liburing; stats().fallback_reason says why, so the choice is
// never silent.
// Integrity: every extent carries a CRC32C computed at write; a read whose data does not match
// fails with an error naming the extent — wrong data is never returned as good.
// Writes are out of place: a rewrite goes to a fresh location of the file and the extent moves there
// only when the write succeeded, so a failed write (EIO, ENOSPC, short) leaves the extent's previous
// contents readable and the caller's buffer untouched — nothing is lost.
// Files: a fresh private directory (mkdtemp, mode 0700) inside the chosen parent gets one swap file
// (created with O_EXCL | O_NOFOLLOW, mode 0600). By default the file's name and the directory are
// removed right after the file is opened: the open descriptor keeps the storage, nothing else can open
// it, and the kernel frees it when the process ends, however it ends (SIGKILL, OOM kill), so no swap
// file holding model-derived data is ever left on disk. PagerOptions::keep_swap_name keeps both names
// until the Pager is destroyed (for debugging). O_DIRECT is used when the file system accepts it,
// buffered I/O otherwise.
// Thread safety: every method may be called from any thread. write()/read() never wait for data to
// move (a write that needs new space reserves it first, a file-system metadata call); wait() blocks
// until the request completes. Buffers passed to write()/read() must stay valid and
// untouched until wait() returns for that ticket.

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "asteria/crc32c.h"  // crc32c(), the checksum of every extent

namespace asteria {

enum class PagerBackend : int { kAuto = 0, kIoUring = 1, kThreads = 2 };

// TEST HOOK, off by default: makes chosen requests fail on purpose so that the callers' error paths
// (and the promise that nothing is lost) can be tested without a failing drive. Never set it in
// production code.
enum class PagerFaultKind : int {
  kNone = 0,
  kEio = 1,              // the request fails with EIO (a write first writes half of its data: torn)
  kShortTransfer = 2,    // half of the data moves, then the device makes no progress: an error
  kNoSpace = 3,          // writes only: half of the data is written, then ENOSPC
  kPartialTransfer = 4,  // half of the data moves in the first transfer; the pager must finish it (no error)
};
enum class PagerFaultOp : int { kAny = 0, kRead = 1, kWrite = 2 };
struct PagerFault {
  PagerFaultKind kind = PagerFaultKind::kNone;
  PagerFaultOp op = PagerFaultOp::kAny;  // which requests count (kNoSpace counts writes only)
  std::uint64_t skip = 0;                // matching requests that succeed first (0: the next one fails)
  std::uint64_t count = 1;               // matching requests that fail after those (>= 1)
};

struct PagerOptions {
  // Parent directory of the private swap directory (for the NVMe tier: a directory on the NVMe
  // drive). Empty: $TMPDIR or /tmp.
  std::string parent_dir;
  PagerBackend backend = PagerBackend::kAuto;
  // io_uring submission-queue entries, i.e. requests in flight (1..4096).
  unsigned queue_depth = 64;
  // Threads of the portable backend (1..64).
  int io_threads = 2;
  // Ask for O_DIRECT (bypassing the page cache); buffered I/O is used when the file system refuses.
  bool direct_io = true;
  // Keep the swap file's name (and its private directory) until the Pager is destroyed, e.g. to inspect
  // the file while debugging. false (the default): both are removed as soon as the file is open, so a
  // killed process leaves nothing behind. Removing them from outside while the Pager runs is harmless.
  bool keep_swap_name = false;
  // Test hook (see PagerFault); kNone in production. set_test_fault() re-arms it later.
  PagerFault test_fault;
};

struct PagerStats {
  std::string backend;          // "io_uring" or "threads"
  std::string fallback_reason;  // why io_uring is not used (empty when it is, or was not asked for)
  bool direct_io = false;       // O_DIRECT in effect
  std::string directory;        // the private swap directory (removed at creation unless swap_name_kept)
  bool swap_name_kept = false;  // the swap file and its directory still have names (keep_swap_name)
  std::uint64_t writes = 0, reads = 0, bytes_written = 0, bytes_read = 0;
  std::uint64_t extents = 0, file_bytes = 0;
  // Bytes of the swap file reserved on disk ahead of the writes (fallocate): writes then go to blocks
  // the file system has already allocated. preallocation_error says why the file system refused (the
  // pager then lets the writes allocate, as before); empty when preallocation works.
  std::uint64_t preallocated_bytes = 0;
  std::string preallocation_error;
  std::uint64_t io_errors = 0, crc_failures = 0;
  std::uint64_t faults_injected = 0;     // requests failed by the test hook
  // Registered buffers (io_uring only): how many are registered, their bytes, how many requests
  // used fixed reads/writes, and why registration was refused (empty when it worked or was not asked).
  std::uint64_t registered_buffers = 0, registered_bytes = 0, fixed_ops = 0;
  std::string registration_error;
  // Seconds with at least one read (write) in flight: bytes_read / read_busy_s is the read throughput.
  double read_busy_s = 0.0, write_busy_s = 0.0;
};

using ExtentId = std::uint64_t;
using TicketId = std::uint64_t;

// Bytes an I/O buffer for `bytes` bytes must provide: rounded up to 4096.
inline std::size_t pager_io_size(std::size_t bytes) noexcept { return (bytes + 4095) / 4096 * 4096; }

// Whether this build has the io_uring backend (liburing was linked: CMake ASTERIA_WITH_LIBURING=ON,
// the default, which fails the configuration when liburing is missing).
bool pager_built_with_io_uring() noexcept;

class Pager {
 public:
  explicit Pager(const PagerOptions& opts = {});
  // Waits for I/O in flight and closes the file (its storage is freed then); a kept name and the
  // private directory are removed.
  ~Pager();
  // Not copyable or movable: the reaper thread and the ring refer to `this`.
  Pager(const Pager&) = delete;
  Pager& operator=(const Pager&) = delete;

  // Reserves an extent able to hold `bytes` bytes (> 0). Never waits for requests in flight. The
  // space is reserved on disk now (fallocate, growing the file a little ahead of need), so a full disk
  // is reported here — Error kIo with ENOSPC, saying how many bytes were needed and where — before any
  // data depends on it; file systems without fallocate skip the reservation.
  ExtentId allocate(std::size_t bytes);
  // Returns the extent's space for reuse. It must have no request in flight.
  void release(ExtentId extent);
  // Queues a write of `bytes` (<= the extent's size) from `src`. `src` must be 4096-aligned and
  // readable for pager_io_size(bytes) bytes. Returns a ticket for wait(). The data goes to a fresh
  // location; the extent moves there when the write succeeds (its previous contents stay readable
  // until then, and after a failure).
  TicketId write(ExtentId extent, const void* src, std::size_t bytes);
  // Queues a read of the extent's last written data into `dst` (4096-aligned, writable for
  // pager_io_size(size) bytes). The CRC is checked when the read completes.
  TicketId read(ExtentId extent, void* dst);
  // Blocks until the request completes. Throws Error kIo (with errno: ENOSPC says how many bytes
  // were needed and where; EIO names the extent; a short transfer says how many bytes moved; a CRC
  // mismatch is reported as EIO naming the extent). A failed write leaves the extent's previous
  // contents (and the caller's buffer) intact; a failed read leaves the extent intact.
  void wait(TicketId ticket);
  // True when the request has completed (wait() then returns at once).
  bool ready(TicketId ticket);
  // Bytes last written to the extent (what read() returns).
  std::size_t extent_bytes(ExtentId extent) const;
  PagerStats stats() const;
  // Registers caller buffers with the io_uring backend so that requests whose buffer lies inside one
  // of them use fixed (pre-mapped) reads and writes. Replaces an earlier registration; an empty list
  // unregisters. No request may be in flight. The buffers must stay mapped until they are
  // unregistered or the Pager is destroyed. Returns true when the backend uses them; false when it
  // cannot (thread backend, memlock limit, kernel), with stats().registration_error saying why —
  // requests then work as before.
  bool register_buffers(const std::vector<std::pair<void*, std::size_t>>& buffers);
  // Re-arms the test hook (see PagerFault): counting starts from the next request.
  void set_test_fault(const PagerFault& fault);
  // The private directory and the swap file's path. Unless keep_swap_name was set, neither exists any
  // more (both were removed once the file was open); they still say where the storage lives.
  const std::string& directory() const noexcept { return dir_; }
  const std::string& swap_path() const noexcept { return path_; }

  struct Backend;  // implementation detail, public for the backends in pager.cc

 private:
  struct Extent {
    std::uint64_t offset = 0;
    std::size_t capacity = 0;   // multiple of 4096
    std::size_t bytes = 0;      // valid bytes after the last successful write
    std::uint32_t crc = 0;
    bool written = false;
    int in_flight = 0;
  };
  struct Ticket {
    bool write = false;
    bool done = false;
    int error = 0;  // errno, 0 on success (kShortError: a short transfer)
    ExtentId extent = 0;
    void* dst = nullptr;
    std::size_t bytes = 0;
    std::size_t moved = 0;          // bytes transferred before a short-transfer error
    std::uint64_t offset = 0;       // where the request went (a write: its fresh location)
    std::uint32_t crc = 0;  // write: CRC of the new data; read: the extent's CRC when submitted
  };
  friend struct Backend;
  // Called by backends when a request finishes; `moved` is the bytes transferred (for short ones).
  void complete(TicketId id, int error, std::size_t moved);
  PagerFaultKind take_fault(bool write);  // the test hook's decision for the next request (mu_ held)
  std::uint64_t take_location(std::size_t capacity);  // mu_ held
  // Reserves the file's blocks up to `end` (and some ahead). Returns 0, or ENOSPC/EDQUOT/EFBIG when
  // [.., end) itself does not fit; any other refusal (no fallocate on this file system) turns
  // reservation off for good, recorded in stats().preallocation_error, and returns 0 (mu_ held).
  int preallocate(std::uint64_t end);
  void remove_names() noexcept;  // unlinks a kept swap file name and removes the directory
  void note_start(bool write);  // busy-time bookkeeping (mu_ held)
  void note_end(bool write);
  // The extent a new request may use: it exists and has no request in flight (mu_ held; throws otherwise).
  Extent& idle_extent(ExtentId extent, const char* what);
  // Records a request on `e` and returns its ticket id; `fault` gets the test hook's decision (mu_ held).
  TicketId issue(Extent& e, const Ticket& t, PagerFaultKind& fault);

  PagerOptions opts_;
  std::string dir_, path_, parent_;
  std::string file_desc_;  // how error messages name the file ("'<path>'", or "the unlinked swap file in '<parent>'")
  bool named_ = false;     // the file's name and directory exist (keep_swap_name, or the unlink failed)
  int fd_ = -1;
  bool direct_ = false;
  std::unique_ptr<Backend> backend_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<ExtentId, Extent> extents_;
  std::multimap<std::size_t, std::uint64_t> free_;  // capacity -> offset
  std::uint64_t file_end_ = 0;
  std::uint64_t reserved_end_ = 0;  // the file's blocks [0, reserved_end_) are allocated (preallocate)
  bool preallocate_off_ = false;    // the file system does not support fallocate
  std::map<TicketId, Ticket> tickets_;
  ExtentId next_extent_ = 1;
  TicketId next_ticket_ = 1;
  PagerStats stats_;
  PagerFault fault_;
  std::uint64_t fault_seen_ = 0;  // matching requests since the hook was armed
  int reads_in_flight_ = 0, writes_in_flight_ = 0;
  std::int64_t read_busy_since_ns_ = 0, write_busy_since_ns_ = 0;
  std::int64_t read_busy_ns_ = 0, write_busy_ns_ = 0;
};

}  // namespace asteria
