#include "asteria/mpmc_queue.h"

#include "asteria/errors.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace asteria::mpmc_detail {

std::size_t ring_capacity(std::size_t requested) {
  ASTERIA_CHECK(requested >= 1, kInvalidArgument, "[mpmc_queue] capacity must be at least 1, got 0");
  ASTERIA_CHECK(requested <= (std::size_t{1} << 40), kInvalidArgument,
                "[mpmc_queue] capacity " << requested << " is too large (at most 2^40 slots)");
  std::size_t c = 1;
  while (c < requested) c <<= 1;
  return c;
}

void backoff(unsigned& spins) noexcept {
  if (spins < 64) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
    ++spins;
  } else {
    std::this_thread::yield();
  }
}

}  // namespace asteria::mpmc_detail
