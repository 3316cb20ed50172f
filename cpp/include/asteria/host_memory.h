#pragma once
// asteria::PinnedPool — page-locked, 4 KiB-aligned host memory under a byte budget, handed out
// as Leases (snapshots of statistics, refresh results, the host tier of optimizer state).
//
// Thread safety: acquire() and stats() may be called from any thread; a Lease may be released
// on any thread. acquire() allocates (mmap) unless a cached mapping of the same size is free;
// nothing blocks on I/O. Memory is locked with mlock while the locked total stays within
// max_locked_bytes (RLIMIT_MEMLOCK by default); beyond it, or when mlock fails, memory is
// unlocked and PoolStats::warning says so once, with the fix.
// Lifetime: a Lease keeps the pool's arena alive, so a lease may outlive its PinnedPool object.
//
// asteria::DeferredCopy — copies into leases made once, by whichever thread asks first (the refresh
// worker before its job, or the training thread before it writes the sources again); asteria::CopyQueue —
// the deferred copies a worker makes, all of them, before its next job.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace asteria {

inline constexpr std::size_t kPageSize = 4096;

struct PinnedPoolOptions {
  // Most bytes the pool may hold mapped at once (leased + cached), > 0. A request beyond it throws
  // ErrorCategory::kBudgetExhausted naming the budget, the bytes in use and the request.
  std::size_t budget_bytes = std::size_t{1} << 30;
  // Try to page-lock memory (mlock) so DMA and O_DIRECT never fault.
  bool lock = true;
  // Most bytes to lock; unset means the RLIMIT_MEMLOCK soft limit, for privileged processes too (the pool keeps
  // to the limit the administrator set even where CAP_IPC_LOCK would let mlock exceed it).
  std::optional<std::size_t> max_locked_bytes;
  // Keep released mappings for reuse by a later lease of the same size (bounded by the budget).
  bool cache_released = true;
  // Called with (pointer, bytes) right after a new mapping is made, and with the pointer right before
  // a mapping is unmapped. The CUDA binding registers mappings with cudaHostRegister here, so device
  // copies from and to leases are asynchronous DMA. An exception from on_map fails the acquire (the
  // mapping is unmapped first); on_unmap must not throw (an exception is swallowed).
  std::function<void(void*, std::size_t)> on_map;
  std::function<void(void*)> on_unmap;
};

struct PoolStats {
  std::size_t budget = 0;       // budget_bytes
  std::size_t reserved = 0;     // bytes mapped (leased + cached)
  std::size_t in_use = 0;       // bytes leased now (page-rounded)
  std::size_t peak_in_use = 0;  // high-water mark of in_use
  std::size_t locked = 0;       // bytes page-locked now
  std::size_t leases = 0;       // live leases
  std::size_t lock_failures = 0;
  bool all_locked = true;       // every live lease is page-locked
  std::string warning;          // non-empty once memory could not be locked, with the fix
};

namespace host_memory_detail {
struct Arena;
}

// A block of pool memory. Move-only; returns its memory to the pool when destroyed or released.
class Lease {
 public:
  Lease() = default;
  ~Lease() { release(); }
  Lease(Lease&& other) noexcept;
  Lease& operator=(Lease&& other) noexcept;
  // Not copyable: exactly one owner returns the memory.
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;

  void* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }          // bytes requested
  std::size_t capacity() const noexcept { return capacity_; }  // bytes mapped (page multiple)
  bool locked() const noexcept { return locked_; }
  bool valid() const noexcept { return data_ != nullptr; }
  void release() noexcept;

 private:
  friend class PinnedPool;
  std::shared_ptr<host_memory_detail::Arena> arena_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
  bool locked_ = false;
};

class PinnedPool {
 public:
  explicit PinnedPool(const PinnedPoolOptions& opts = {});
  ~PinnedPool();
  // Not copyable or movable: leases refer to the arena, which the pool shares with them.
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // A lease of at least `bytes` bytes (> 0), 4 KiB-aligned. Contents are unspecified (zero for
  // fresh mappings). Throws kBudgetExhausted when the budget cannot hold it, kInvalidArgument for 0.
  Lease acquire(std::size_t bytes);
  PoolStats stats() const;
  // Unmaps cached (released) mappings; leased memory is untouched. Returns the bytes freed.
  std::size_t trim();

 private:
  std::shared_ptr<host_memory_detail::Arena> arena_;
};

// Copies into leases that run exactly once, on whichever thread asks first (a deferred shadow snapshot).
//
// The training thread names the copies (from its statistics into pinned leases) instead of making them;
// the refresh worker that starts the first job reading the leases runs them as the job's prerequisite, off
// the training thread, and the training thread runs them itself before it next writes a source (a no-op
// once they are done). run() returns only when every copy is complete, whoever made it, so once any run()
// has returned no thread reads the sources again: the caller keeps the sources alive and unwritten until
// then. The leases are kept alive by the object.
class DeferredCopy {
 public:
  struct Piece {
    void* dst = nullptr;
    const void* src = nullptr;
    std::size_t bytes = 0;
  };
  DeferredCopy(std::vector<Piece> pieces, std::vector<std::shared_ptr<const void>> keep_alive);
  DeferredCopy(const DeferredCopy&) = delete;
  DeferredCopy& operator=(const DeferredCopy&) = delete;

  // Makes the copies unless they were made; waits while another thread is making them. Returns true when
  // this call made them. Thread-safe.
  bool run();
  bool done() const noexcept { return done_.load(std::memory_order_acquire); }
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  std::vector<Piece> pieces_;
  std::vector<std::shared_ptr<const void>> keep_alive_;
  std::size_t bytes_ = 0;
  std::once_flag once_;
  std::atomic<bool> done_{false};
};

// Deferred copies not made yet, oldest first. A refresh worker drains the queue before each job, so the copies
// of every snapshot a step took leave the training thread as soon as a worker is free, not one per job as the
// worker reaches it. Thread-safe.
class CopyQueue {
 public:
  void push(std::shared_ptr<DeferredCopy> copy);
  // Takes every queued copy and makes it (DeferredCopy::run: one another thread is making is waited for).
  // Copies a concurrent drain took are not waited for: run() a copy itself to know it is made. Returns how
  // many copies this call made.
  std::size_t drain();
  std::size_t size() const;

 private:
  mutable std::mutex mu_;
  std::deque<std::shared_ptr<DeferredCopy>> queue_;
};

}  // namespace asteria

