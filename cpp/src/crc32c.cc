#include "asteria/crc32c.h"

#include <cstring>

namespace asteria {
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
#define ASTERIA_SSE42 __attribute__((target("sse4.2")))

ASTERIA_SSE42 inline std::uint64_t crc_step(std::uint64_t c, const unsigned char* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return __builtin_ia32_crc32di(c, v);
}

// One lane of the three-lane loop. The CRC instruction has a latency of several cycles but can start one
// per cycle, so three independent lanes run about three times faster than one chain.
constexpr std::size_t kLane = 4096;

// The CRC register is linear over GF(2): running it over A||B from r gives run(run(r, A), zeros) ^
// run(0, B) with |B| zero bytes. shift(x) = run(x, kLane zero bytes) is linear in x, so it is the XOR of
// four byte tables, built once by running the instruction over the zeros.
struct LaneShift {
  std::uint32_t t[4][256];
  ASTERIA_SSE42 LaneShift() noexcept {
    static const unsigned char zeros[8] = {};
    for (int k = 0; k < 4; ++k)
      for (std::uint32_t v = 0; v < 256; ++v) {
        std::uint64_t c = static_cast<std::uint64_t>(v) << (8 * k);
        for (std::size_t i = 0; i < kLane; i += 8) c = crc_step(c, zeros);
        t[k][v] = static_cast<std::uint32_t>(c);
      }
  }
  std::uint32_t operator()(std::uint32_t x) const noexcept {
    return t[0][x & 0xFF] ^ t[1][(x >> 8) & 0xFF] ^ t[2][(x >> 16) & 0xFF] ^ t[3][x >> 24];
  }
};

ASTERIA_SSE42 std::uint32_t crc32c_hw(const unsigned char* p, std::size_t n, std::uint32_t crc) noexcept {
  std::uint64_t c = crc;
  if (n >= 3 * kLane) {
    static const LaneShift shift;
    do {
      std::uint64_t a = c, b = 0, d = 0;
      for (std::size_t i = 0; i < kLane; i += 8) {
        a = crc_step(a, p + i);
        b = crc_step(b, p + kLane + i);
        d = crc_step(d, p + 2 * kLane + i);
      }
      c = shift(shift(static_cast<std::uint32_t>(a)) ^ static_cast<std::uint32_t>(b)) ^ static_cast<std::uint32_t>(d);
      p += 3 * kLane;
      n -= 3 * kLane;
    } while (n >= 3 * kLane);
  }
  for (; n >= 8; p += 8, n -= 8) c = crc_step(c, p);
  auto c32 = static_cast<std::uint32_t>(c);
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}
#endif

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

}  // namespace asteria
