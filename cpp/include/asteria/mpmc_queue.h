#pragma once
// MpmcQueue<T> — a bounded, lock-free, multi-producer multi-consumer ring.
//
// Thread safety: any number of threads may call try_push/try_pop/push/pop concurrently.
// Allocation: the ring is allocated once in the constructor; no method allocates afterwards.
// Blocking: try_push/try_pop never block (they fail on full/empty); push/pop spin, then yield,
// until they succeed. size()/empty() are best-effort snapshots under concurrency.
// Algorithm: per-slot sequence numbers (D. Vyukov's bounded MPMC queue); head and tail live on
// separate cache lines so producers and consumers do not false-share.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>
#include <utility>

namespace asteria {

inline constexpr std::size_t kCacheLine = 64;

namespace mpmc_detail {
// Smallest power of two >= n (n >= 1). Throws asteria::Error for n == 0 or absurd sizes.
std::size_t ring_capacity(std::size_t requested);
// One step of the spin -> yield backoff used by the blocking variants.
void backoff(unsigned& spins) noexcept;
}  // namespace mpmc_detail

template <typename T>
class MpmcQueue {
  static_assert(std::is_nothrow_move_constructible_v<T>,
                "MpmcQueue elements must be nothrow move constructible so a push can never leave a slot half-written.");
  static_assert(std::is_nothrow_destructible_v<T>, "MpmcQueue elements must be nothrow destructible.");

 public:
  // capacity is rounded up to a power of two (see capacity()).
  explicit MpmcQueue(std::size_t capacity)
      : capacity_(mpmc_detail::ring_capacity(capacity)), mask_(capacity_ - 1), slots_(new Slot[capacity_]) {
    for (std::size_t i = 0; i < capacity_; ++i) slots_[i].seq.store(i, std::memory_order_relaxed);
  }
  ~MpmcQueue() {
    // Single-threaded by now: destroy what is left exactly once.
    while (try_pop_into_destroy()) {
    }
  }
  // Not copyable or movable: other threads hold references to the slots.
  MpmcQueue(const MpmcQueue&) = delete;
  MpmcQueue& operator=(const MpmcQueue&) = delete;
  MpmcQueue(MpmcQueue&&) = delete;
  MpmcQueue& operator=(MpmcQueue&&) = delete;

  // Returns false (and leaves v untouched) when the queue is full.
  template <typename U>
  bool try_push(U&& v) noexcept(std::is_nothrow_constructible_v<T, U&&>) {
    std::size_t pos = tail_.load(std::memory_order_relaxed);
    for (;;) {
      Slot& s = slots_[pos & mask_];
      const std::size_t seq = s.seq.load(std::memory_order_acquire);
      const auto diff = static_cast<std::intptr_t>(seq) - static_cast<std::intptr_t>(pos);
      if (diff == 0) {
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
          ::new (static_cast<void*>(s.storage)) T(std::forward<U>(v));
          s.seq.store(pos + 1, std::memory_order_release);
          return true;
        }
      } else if (diff < 0) {
        return false;  // full
      } else {
        pos = tail_.load(std::memory_order_relaxed);
      }
    }
  }

  // Returns false when the queue is empty.
  bool try_pop(T& out) noexcept {
    std::size_t pos = head_.load(std::memory_order_relaxed);
    for (;;) {
      Slot& s = slots_[pos & mask_];
      const std::size_t seq = s.seq.load(std::memory_order_acquire);
      const auto diff = static_cast<std::intptr_t>(seq) - static_cast<std::intptr_t>(pos + 1);
      if (diff == 0) {
        if (head_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
          T* p = std::launder(reinterpret_cast<T*>(s.storage));
          out = std::move(*p);
          p->~T();
          s.seq.store(pos + mask_ + 1, std::memory_order_release);
          return true;
        }
      } else if (diff < 0) {
        return false;  // empty
      } else {
        pos = head_.load(std::memory_order_relaxed);
      }
    }
  }

  // Blocking variants: spin, then yield, until there is room / an element.
  template <typename U>
  void push(U&& v) {
    unsigned spins = 0;
    while (!try_push(std::forward<U>(v))) mpmc_detail::backoff(spins);
  }
  void pop(T& out) noexcept {
    unsigned spins = 0;
    while (!try_pop(out)) mpmc_detail::backoff(spins);
  }

  std::size_t capacity() const noexcept { return capacity_; }
  // Best effort: exact only when no other thread is pushing or popping.
  std::size_t size() const noexcept {
    const std::size_t t = tail_.load(std::memory_order_acquire);
    const std::size_t h = head_.load(std::memory_order_acquire);
    return t > h ? t - h : 0;
  }
  bool empty() const noexcept { return size() == 0; }

 private:
  struct alignas(kCacheLine) Slot {
    std::atomic<std::size_t> seq{0};
    alignas(T) unsigned char storage[sizeof(T)];
  };
  static_assert(alignof(Slot) >= kCacheLine, "Each slot must own a whole cache line to avoid false sharing.");

  bool try_pop_into_destroy() noexcept {
    std::size_t pos = head_.load(std::memory_order_relaxed);
    Slot& s = slots_[pos & mask_];
    if (s.seq.load(std::memory_order_acquire) != pos + 1) return false;
    head_.store(pos + 1, std::memory_order_relaxed);
    std::launder(reinterpret_cast<T*>(s.storage))->~T();
    s.seq.store(pos + mask_ + 1, std::memory_order_relaxed);
    return true;
  }

  const std::size_t capacity_;
  const std::size_t mask_;
  std::unique_ptr<Slot[]> slots_;
  alignas(kCacheLine) std::atomic<std::size_t> head_{0};
  alignas(kCacheLine) std::atomic<std::size_t> tail_{0};
};

}  // namespace asteria
