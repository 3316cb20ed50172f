// libFuzzer harness: asteria::checkpoint::Reader end to end on arbitrary file contents.
// Each input is written to a scratch file (see LLVMFuzzerInitialize) and opened, validated (header,
// metadata, file size), verified (payload CRC32C) and read back in pieces of input-chosen sizes.
// Properties: no crash or out-of-bounds access; a refusal is a FormatError naming the file; an
// accepted file's sizes add up to the file size; verify() passes exactly when the payload's CRC
// matches the header's; positioned reads return exactly the payload bytes, clipped at its end.
// Each input is also tried with its CRCs and payload size repaired (fuzz_util.h).
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "asteria/checkpoint.h"
#include "asteria/crc32c.h"
#include "fuzz_util.h"

namespace ck = asteria::checkpoint;

namespace {

std::string g_path;
int g_fd = -1;

void remove_scratch() {
  if (!g_path.empty()) ::unlink(g_path.c_str());
}

void put_file(const std::uint8_t* data, std::size_t size) {
  FUZZ_CHECK(::ftruncate(g_fd, 0) == 0);
  std::size_t done = 0;
  while (done < size) {
    const ssize_t r = ::pwrite(g_fd, data + done, size - done, static_cast<off_t>(done));
    FUZZ_CHECK(r > 0);
    done += static_cast<std::size_t>(r);
  }
}

void check_reader(const std::uint8_t* data, std::size_t size) {
  put_file(data, size);
  try {
    ck::Reader r(g_path);
    const ck::Header& h = r.header();
    FUZZ_CHECK(h.file_size() == size);
    const std::size_t off = static_cast<std::size_t>(h.payload_offset());
    const std::size_t n = static_cast<std::size_t>(h.payload_size);
    // Positioned reads in pieces whose sizes the input picks, then past the end.
    std::vector<std::uint8_t> got(n + 16);
    const std::size_t step = 1 + (size ? data[size / 2] % 97 : 0);
    for (std::size_t pos = 0; pos < n + 8; pos += step) {
      const std::size_t want = std::min<std::size_t>(step, got.size() - pos);
      const std::size_t k = r.read(pos, got.data() + pos, want);
      FUZZ_CHECK(k == (pos >= n ? 0 : std::min(want, n - pos)));
    }
    FUZZ_CHECK(std::memcmp(got.data(), data + off, n) == 0);
    const bool crc_ok = asteria::crc32c(data + off, n) == h.payload_crc;
    try {
      r.verify();
      FUZZ_CHECK(crc_ok);
    } catch (const ck::FormatError& e) {
      FUZZ_CHECK(!crc_ok && e.reason() == ck::FormatReason::kCorrupted);
      FUZZ_CHECK(std::string(e.what()).find(g_path) != std::string::npos);
    }
  } catch (const ck::FormatError& e) {
    FUZZ_CHECK(e.reason() != ck::FormatReason::kInvalidMetadata);
    FUZZ_CHECK(std::string(e.what()).find(g_path) != std::string::npos);
  }
  // Any other exception (an I/O error on a healthy scratch file, bad_alloc) escapes and is reported.
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // $ASTERIA_FUZZ_SCRATCH_DIR (run.sh: a directory it removes at the end, even after a crash), else
  // /dev/shm, else $TMPDIR or /tmp.
  const char* chosen = std::getenv("ASTERIA_FUZZ_SCRATCH_DIR");
  std::string dir = chosen && *chosen ? chosen : "/dev/shm";
  if (::access(dir.c_str(), W_OK) != 0) {
    const char* tmp = std::getenv("TMPDIR");
    dir = tmp && *tmp ? tmp : "/tmp";
  }
  std::string templ = dir + "/asteria-fuzz-checkpoint-XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  g_fd = ::mkstemp(buf.data());
  FUZZ_CHECK(g_fd >= 0);
  g_path = buf.data();
  std::atexit(remove_scratch);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  check_reader(data, size);
  std::vector<std::uint8_t> repaired(data, data + size);
  if (fuzz::repair_crcs(repaired, true)) check_reader(repaired.data(), repaired.size());
  return 0;
}
