#pragma once
// asteria::crc32c — CRC-32C (Castagnoli), the checksum of pager extents and checkpoint files.
// Pure: no I/O, no allocation, thread-safe. Uses the SSE4.2 instruction when the CPU has it.

#include <cstddef>
#include <cstdint>

namespace asteria {

// CRC32C (Castagnoli) of `bytes` bytes, continuing from `crc` (0 to start):
// crc32c(b, m + n) == crc32c(b + m, n, crc32c(b, m)).
std::uint32_t crc32c(const void* data, std::size_t bytes, std::uint32_t crc = 0) noexcept;

}  // namespace asteria
