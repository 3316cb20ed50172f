#include "asteria/host_memory.h"

#include <sys/mman.h>
#include <sys/resource.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>

#include "asteria/errors.h"

namespace asteria {
namespace host_memory_detail {

struct Arena {
  PinnedPoolOptions opts;
  std::size_t max_locked = 0;
  mutable std::mutex mu;
  PoolStats st;
  std::size_t unlocked_live = 0;                       // live leases that are not locked
  std::multimap<std::size_t, std::pair<void*, bool>> cache;  // capacity -> (ptr, locked)

  void unmap(void* p, std::size_t cap, bool locked) noexcept {
    if (opts.on_unmap) {
      try {
        opts.on_unmap(p);
      } catch (...) {  // an unregistration failure must not leak the mapping
      }
    }
    if (locked) {
      munlock(p, cap);
      st.locked -= cap;
    }
    munmap(p, cap);
    st.reserved -= cap;
  }

  void give_back(void* p, std::size_t cap, bool locked) noexcept {
    std::lock_guard<std::mutex> g(mu);
    st.in_use -= cap;
    st.leases -= 1;
    if (!locked) unlocked_live -= 1;
    st.all_locked = unlocked_live == 0;
    if (opts.cache_released) {
      cache.emplace(cap, std::make_pair(p, locked));
    } else {
      unmap(p, cap, locked);
    }
  }

  ~Arena() {
    for (auto& [cap, e] : cache) unmap(e.first, cap, e.second);
  }
};

}  // namespace host_memory_detail

using host_memory_detail::Arena;

Lease::Lease(Lease&& o) noexcept
    : arena_(std::move(o.arena_)), data_(o.data_), size_(o.size_), capacity_(o.capacity_), locked_(o.locked_) {
  o.data_ = nullptr;
  o.size_ = o.capacity_ = 0;
}

Lease& Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    release();
    arena_ = std::move(o.arena_);
    data_ = o.data_;
    size_ = o.size_;
    capacity_ = o.capacity_;
    locked_ = o.locked_;
    o.data_ = nullptr;
    o.size_ = o.capacity_ = 0;
  }
  return *this;
}

void Lease::release() noexcept {
  if (data_ != nullptr && arena_) arena_->give_back(data_, capacity_, locked_);
  data_ = nullptr;
  size_ = capacity_ = 0;
  arena_.reset();
}

PinnedPool::PinnedPool(const PinnedPoolOptions& opts) : arena_(std::make_shared<Arena>()) {
  ASTERIA_CHECK(opts.budget_bytes > 0, kInvalidArgument,
                "[host_memory::PinnedPool] budget_bytes must be positive, got 0");
  arena_->opts = opts;
  arena_->st.budget = opts.budget_bytes;
  if (opts.max_locked_bytes) {
    arena_->max_locked = *opts.max_locked_bytes;
  } else {
    rlimit rl{};
    arena_->max_locked = (getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
                             ? static_cast<std::size_t>(rl.rlim_cur)
                             : SIZE_MAX;
  }
}

PinnedPool::~PinnedPool() = default;

Lease PinnedPool::acquire(std::size_t bytes) {
  ASTERIA_CHECK(bytes > 0, kInvalidArgument, "[host_memory::acquire] a lease needs at least 1 byte");
  const std::size_t cap = (bytes + kPageSize - 1) / kPageSize * kPageSize;
  Arena& a = *arena_;
  std::lock_guard<std::mutex> g(a.mu);
  void* p = nullptr;
  bool locked = false;
  if (auto it = a.cache.find(cap); it != a.cache.end()) {
    p = it->second.first;
    locked = it->second.second;
    a.cache.erase(it);
  } else {
    // Make room by dropping cached mappings of other sizes before refusing.
    while (a.st.reserved + cap > a.st.budget && !a.cache.empty()) {
      auto victim = a.cache.begin();
      a.unmap(victim->second.first, victim->first, victim->second.second);
      a.cache.erase(victim);
    }
    ASTERIA_CHECK(a.st.reserved + cap <= a.st.budget, kBudgetExhausted,
                  "[host_memory::acquire] pinned pool budget exhausted: requested "
                      << bytes << " bytes with " << a.st.in_use << " of " << a.st.budget
                      << " bytes in use; raise host_budget by at least " << (a.st.reserved + cap - a.st.budget)
                      << " bytes or release leases");
    p = mmap(nullptr, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      throw Error(ErrorCategory::kBudgetExhausted,
                  std::string("[host_memory::acquire] mmap of ") + std::to_string(cap) +
                      " bytes failed: " + std::strerror(e) + "; the machine is out of memory for the host tier",
                  e);
    }
    a.st.reserved += cap;
    if (a.opts.lock) {
      if (a.st.locked + cap <= a.max_locked && mlock(p, cap) == 0) {
        locked = true;
        a.st.locked += cap;
      } else {
        a.st.lock_failures += 1;
        if (a.st.warning.empty()) {
          a.st.warning =
              "asteria: pinned host memory could not be page-locked (memlock limit " +
              (a.max_locked == SIZE_MAX ? std::string("unlimited") : std::to_string(a.max_locked) + " bytes") +
              "); using unlocked memory, which is slower for device copies and O_DIRECT. Fix: raise the limit "
              "(ulimit -l, or LimitMEMLOCK= in systemd, or --ulimit memlock=-1 in containers).";
        }
      }
    }
    if (a.opts.on_map) {
      try {
        a.opts.on_map(p, cap);
      } catch (...) {
        if (locked) {
          munlock(p, cap);
          a.st.locked -= cap;
        }
        munmap(p, cap);
        a.st.reserved -= cap;
        throw;
      }
    }
  }
  a.st.in_use += cap;
  a.st.peak_in_use = std::max(a.st.peak_in_use, a.st.in_use);
  a.st.leases += 1;
  if (!locked) a.unlocked_live += 1;
  a.st.all_locked = a.unlocked_live == 0;
  Lease l;
  l.arena_ = arena_;
  l.data_ = p;
  l.size_ = bytes;
  l.capacity_ = cap;
  l.locked_ = locked;
  return l;
}

PoolStats PinnedPool::stats() const {
  std::lock_guard<std::mutex> g(arena_->mu);
  return arena_->st;
}

std::size_t PinnedPool::trim() {
  Arena& a = *arena_;
  std::lock_guard<std::mutex> g(a.mu);
  std::size_t freed = 0;
  for (auto& [cap, e] : a.cache) {
    a.unmap(e.first, cap, e.second);
    freed += cap;
  }
  a.cache.clear();
  return freed;
}

DeferredCopy::DeferredCopy(std::vector<Piece> pieces, std::vector<std::shared_ptr<const void>> keep_alive)
    : pieces_(std::move(pieces)), keep_alive_(std::move(keep_alive)) {
  for (const auto& p : pieces_) {
    ASTERIA_CHECK(p.bytes == 0 || (p.dst != nullptr && p.src != nullptr), kInvalidArgument,
                  "[DeferredCopy] a copy of " << p.bytes << " bytes needs a source and a destination");
    bytes_ += p.bytes;
  }
}

bool DeferredCopy::run() {
  bool made = false;
  std::call_once(once_, [&] {
    for (const auto& p : pieces_)
      if (p.bytes != 0) std::memcpy(p.dst, p.src, p.bytes);
    done_.store(true, std::memory_order_release);
    made = true;
  });
  return made;
}

void CopyQueue::push(std::shared_ptr<DeferredCopy> copy) {
  ASTERIA_CHECK(copy != nullptr, kInvalidArgument, "[CopyQueue] cannot queue a null copy");
  std::lock_guard<std::mutex> lock(mu_);
  queue_.push_back(std::move(copy));
}

std::size_t CopyQueue::drain() {
  std::deque<std::shared_ptr<DeferredCopy>> taken;
  {
    std::lock_guard<std::mutex> lock(mu_);
    taken.swap(queue_);
  }
  std::size_t made = 0;
  for (auto& c : taken) made += c->run() ? 1 : 0;  // one taken by another drain is waited for by run()
  return made;
}

std::size_t CopyQueue::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size();
}

}  // namespace asteria

