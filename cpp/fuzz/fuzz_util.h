#pragma once
// Helpers shared by the checkpoint fuzz harnesses.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "asteria/checkpoint.h"
#include "asteria/crc32c.h"

// A broken property: report it and abort, so that libFuzzer saves the input as a crash.
#define FUZZ_CHECK(cond)                                                                      \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      std::fprintf(stderr, "fuzz property broken: %s at %s:%d\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                           \
    }                                                                                         \
  } while (0)

namespace fuzz {

inline std::uint64_t load_u64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline void store_u32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}
inline void store_u64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

// Random bytes almost never carry matching CRCs, which would stop the fuzzer at the first check.
// This rewrites the checksums of an input that starts like a checkpoint so that the checks behind
// them (metadata parsing, sizes, payload reads) are explored too: the metadata CRC (when the block
// is present), with `whole_file` the payload size and CRC (everything after the metadata), and
// the header CRC last. Returns false when the input is too short to have a header.
inline bool repair_crcs(std::vector<std::uint8_t>& b, bool whole_file) {
  namespace ck = asteria::checkpoint;
  if (b.size() < ck::kHeaderBytes) return false;
  std::memcpy(b.data(), ck::kMagic, sizeof(ck::kMagic));
  const std::uint64_t meta = load_u64(b.data() + 16);
  const std::uint64_t avail = b.size() - ck::kHeaderBytes;
  if (meta <= avail) {
    store_u32(b.data() + 32, asteria::crc32c(b.data() + ck::kHeaderBytes, static_cast<std::size_t>(meta)));
    if (whole_file) {
      const std::uint64_t payload = avail - meta;
      store_u64(b.data() + 24, payload);
      store_u32(b.data() + 36, asteria::crc32c(b.data() + ck::kHeaderBytes + meta, static_cast<std::size_t>(payload)));
    }
  }
  store_u32(b.data() + 60, asteria::crc32c(b.data(), 60));
  return true;
}

}  // namespace fuzz
