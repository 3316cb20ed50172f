// libFuzzer harness: asteria::checkpoint::parse_header on arbitrary bytes.
// Properties: it never reads out of bounds or crashes (ASan, UBSan), refuses only with FormatError
// and a message, and whatever it accepts is the one encoding of what it returns:
// encode_header(parse_header(b)) == b[0, payload_offset) and parse_header(encode_header(h)) == h.
// Each input is also parsed with its CRCs repaired (fuzz_util.h), to reach the checks behind them.
#include <cstdint>
#include <cstring>
#include <vector>

#include "asteria/checkpoint.h"
#include "fuzz_util.h"

namespace ck = asteria::checkpoint;

namespace {

void check_parse(const std::uint8_t* data, std::size_t size) {
  ck::Header h;
  try {
    h = ck::parse_header(data, size);
  } catch (const ck::FormatError& e) {
    FUZZ_CHECK(std::strlen(e.what()) > 0);
    FUZZ_CHECK(e.reason() != ck::FormatReason::kInvalidMetadata);  // that one is for writers only
    return;
  }
  const ck::Header fixed = ck::parse_fixed_header(data, size);
  FUZZ_CHECK(fixed.version == h.version && fixed.payload_size == h.payload_size &&
             fixed.payload_crc == h.payload_crc && fixed.metadata_size == h.metadata_size &&
             fixed.metadata_crc == h.metadata_crc && fixed.metadata.empty());
  FUZZ_CHECK(h.payload_offset() <= size);
  FUZZ_CHECK(h.metadata.size() <= ck::kMaxMetadataEntries);
  const std::vector<std::uint8_t> encoded = ck::encode_header(h);  // must not throw: h came from valid bytes
  FUZZ_CHECK(encoded.size() == h.payload_offset());
  FUZZ_CHECK(std::memcmp(encoded.data(), data, encoded.size()) == 0);
  FUZZ_CHECK(ck::parse_header(encoded.data(), encoded.size()) == h);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  check_parse(data, size);
  std::vector<std::uint8_t> repaired(data, data + size);
  if (fuzz::repair_crcs(repaired, false)) check_parse(repaired.data(), repaired.size());
  return 0;
}
