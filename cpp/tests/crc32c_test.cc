#include "asteria/crc32c.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

namespace {

// Bit-at-a-time CRC-32C, straight from the definition (reflected polynomial 0x82F63B78): the reference
// the fast paths (SSE4.2 instruction, three interleaved lanes) must match.
std::uint32_t crc32c_bitwise(const unsigned char* p, std::size_t n, std::uint32_t crc = 0) {
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
  }
  return ~crc;
}

TEST(Crc32c, KnownVector) {
  // The standard check value of CRC-32C for "123456789".
  EXPECT_EQ(asteria::crc32c("123456789", 9), 0xE3069283u);
  // Incremental computation equals one pass.
  EXPECT_EQ(asteria::crc32c("6789", 4, asteria::crc32c("12345", 5)), 0xE3069283u);
  EXPECT_EQ(asteria::crc32c("", 0), 0u);
}

// Lengths around the three-lane block (3 x 4096 bytes) and its multiples, odd lengths and unaligned
// starts, with and without a running CRC: every path agrees with the definition.
TEST(Crc32c, MatchesTheDefinitionAtEveryLengthAndAlignment) {
  std::mt19937 rng(7);
  std::vector<unsigned char> buf(5 * 12288 + 64);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  const std::size_t lens[] = {0,     1,     7,     8,     9,     4095,  4096,  12287, 12288,
                              12289, 12295, 24576, 24583, 36863, 40000, 5 * 12288};
  for (std::size_t len : lens)
    for (std::size_t off : {0, 1, 3, 8, 13}) {
      const unsigned char* p = buf.data() + off;
      EXPECT_EQ(asteria::crc32c(p, len), crc32c_bitwise(p, len)) << "length " << len << " offset " << off;
      EXPECT_EQ(asteria::crc32c(p, len, 0x12345678u), crc32c_bitwise(p, len, 0x12345678u)) << len << " " << off;
    }
}

TEST(Crc32c, SplitAnywhereEqualsOnePass) {
  std::mt19937 rng(11);
  std::vector<unsigned char> buf(100000);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  const std::uint32_t whole = asteria::crc32c(buf.data(), buf.size());
  for (std::size_t cut : {std::size_t{1}, std::size_t{12288}, std::size_t{12289}, std::size_t{50001}, buf.size() - 1})
    EXPECT_EQ(asteria::crc32c(buf.data() + cut, buf.size() - cut, asteria::crc32c(buf.data(), cut)), whole) << cut;
}

}  // namespace
