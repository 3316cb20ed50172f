#include "asteria/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "asteria/crc32c.h"
#include "asteria/errors.h"

namespace ck = asteria::checkpoint;

// ----- system call log --------------------------------------------------------------------------
// This test executable defines fsync() and renameat() itself, so the Writer's calls (linked in from the
// static core library) land here: each is logged, then done with the raw system call. That makes the
// durability order observable: the file's fsync, then (for an unnamed file) its link to a temporary
// name, then the rename, then the directory's fsync.
namespace syslog_ {
bool enabled = false;
std::vector<std::string> events;
}  // namespace syslog_

extern "C" int fsync(int fd) {
  if (syslog_::enabled) {
    struct stat st {};
    ::fstat(fd, &st);
    syslog_::events.push_back(S_ISDIR(st.st_mode) ? "fsync(dir)" : "fsync(file)");
  }
  return static_cast<int>(::syscall(SYS_fsync, fd));
}

extern "C" int linkat(int olddirfd, const char* oldpath, int newdirfd, const char* newpath, int flags) {
  if (syslog_::enabled) syslog_::events.push_back("link");
  return static_cast<int>(::syscall(SYS_linkat, olddirfd, oldpath, newdirfd, newpath, flags));
}

extern "C" int renameat(int olddirfd, const char* oldpath, int newdirfd, const char* newpath) {
  if (syslog_::enabled) syslog_::events.push_back(std::string("rename(") + newpath + ")");
#ifdef SYS_renameat
  return static_cast<int>(::syscall(SYS_renameat, olddirfd, oldpath, newdirfd, newpath));
#else
  return static_cast<int>(::syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, 0));
#endif
}

namespace {

using Bytes = std::vector<std::uint8_t>;

// A fresh directory removed (with its files) at the end of the test.
class TempDir {
 public:
  TempDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/asteria-ckpt-test-XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = buf.data();
  }
  ~TempDir() {
    for (const auto& name : entries()) {
      const std::string p = path_ + "/" + name;
      struct stat st {};
      if (::lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) ::rmdir(p.c_str());
      else ::unlink(p.c_str());
    }
    ::rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  std::set<std::string> entries() const {
    std::set<std::string> out;
    if (DIR* d = ::opendir(path_.c_str())) {
      while (dirent* e = ::readdir(d))
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.insert(e->d_name);
      ::closedir(d);
    }
    return out;
  }

 private:
  std::string path_;
};

Bytes random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  Bytes b(n);
  for (auto& x : b) x = static_cast<std::uint8_t>(rng());
  return b;
}

Bytes read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

const ck::Metadata kMeta = {{"asteria.version", "0.1.0"}, {"step", "1200"}, {"note", "grüße € 😀"}};

// Writes `payload` as a checkpoint at `path` in chunks of `chunk` bytes.
void write_checkpoint(const std::string& path, const Bytes& payload, const ck::Metadata& meta = kMeta,
                      std::size_t chunk = 4096, const ck::WriterOptions& opts = {}) {
  ck::Writer w(path, meta, opts);
  for (std::size_t off = 0; off < payload.size(); off += chunk)
    w.write(payload.data() + off, std::min(chunk, payload.size() - off));
  w.commit();
}

Bytes read_payload(ck::Reader& r) {
  Bytes out(static_cast<std::size_t>(r.header().payload_size));
  EXPECT_EQ(r.read(0, out.data(), out.size()), out.size());
  return out;
}

// The reason of the FormatError that `f` throws (fails the test when it throws nothing else).
ck::FormatReason refusal(const std::function<void()>& f, std::string* message = nullptr) {
  try {
    f();
  } catch (const ck::FormatError& e) {
    if (message) *message = e.what();
    return e.reason();
  }
  ADD_FAILURE() << "expected a FormatError";
  return ck::FormatReason::kInvalidMetadata;
}

// The error other than a FormatError that `f` throws (fails the test, saying `what`, when it throws none).
asteria::Error error_of(const std::function<void()>& f, const std::string& what) {
  try {
    f();
  } catch (const ck::FormatError& e) {
    ADD_FAILURE() << what << ": a FormatError, expected another error: " << e.what();
    return e;
  } catch (const asteria::Error& e) {
    return e;
  }
  ADD_FAILURE() << what;
  return asteria::Error(asteria::ErrorCategory::kInternal, "no error");
}

// The checkpoint at `path` opens, verifies and holds `payload`.
void expect_checkpoint(const std::string& path, const Bytes& payload) {
  ck::Reader r(path);
  r.verify();
  EXPECT_EQ(read_payload(r), payload) << path;
}

ck::Header sample_header() {
  ck::Header h;
  h.payload_size = 123456789;
  h.payload_crc = 0xDEADBEEF;
  h.metadata = kMeta;
  return h;
}

void put_u32(Bytes& b, std::size_t off, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) b[off + i] = static_cast<std::uint8_t>(v >> (8 * i));
}
void put_u64(Bytes& b, std::size_t off, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) b[off + i] = static_cast<std::uint8_t>(v >> (8 * i));
}
void reseal_header(Bytes& b) { put_u32(b, 60, asteria::crc32c(b.data(), 60)); }
// After editing the metadata block: fix its size and CRC in the header, then the header CRC.
void reseal_metadata(Bytes& b) {
  put_u64(b, 16, b.size() - ck::kHeaderBytes);
  put_u32(b, 32, asteria::crc32c(b.data() + ck::kHeaderBytes, b.size() - ck::kHeaderBytes));
  reseal_header(b);
}

// A metadata block from raw entries (any order, any bytes).
Bytes raw_metadata(const std::vector<std::pair<std::string, std::string>>& entries) {
  Bytes m(4);
  put_u32(m, 0, static_cast<std::uint32_t>(entries.size()));
  for (const auto& [k, v] : entries) {
    m.push_back(static_cast<std::uint8_t>(k.size()));
    m.push_back(static_cast<std::uint8_t>(k.size() >> 8));
    m.insert(m.end(), k.begin(), k.end());
    const std::size_t at = m.size();
    m.resize(at + 4);
    put_u32(m, at, static_cast<std::uint32_t>(v.size()));
    m.insert(m.end(), v.begin(), v.end());
  }
  return m;
}

Bytes with_metadata(const Bytes& block) {
  Bytes b = ck::encode_header(sample_header());
  b.resize(ck::kHeaderBytes);
  b.insert(b.end(), block.begin(), block.end());
  reseal_metadata(b);
  return b;
}

// ----- pure parser and encoder ------------------------------------------------------------------

TEST(CheckpointFormat, EncodeParseRoundTripAndCanonicalBytes) {
  for (const ck::Metadata& meta : {ck::Metadata{}, kMeta}) {
    ck::Header h = sample_header();
    h.metadata = meta;
    const Bytes b = ck::encode_header(h);
    const ck::Header p = ck::parse_header(b.data(), b.size());
    EXPECT_EQ(p.metadata, meta);
    EXPECT_EQ(p.payload_size, h.payload_size);
    EXPECT_EQ(p.payload_crc, h.payload_crc);
    EXPECT_EQ(p.payload_offset(), b.size());
    EXPECT_EQ(ck::encode_header(p), b);  // one encoding per header
    EXPECT_EQ(ck::parse_header(ck::encode_header(p).data(), b.size()), p);
    EXPECT_EQ(std::memcmp(b.data(), "ASTERIA\x1a", 8), 0);
  }
}

TEST(CheckpointFormat, EveryFlippedHeaderByteIsRefused) {
  const Bytes good = ck::encode_header(sample_header());
  for (std::size_t i = 0; i < ck::kHeaderBytes; ++i) {
    for (int bit : {0, 7}) {
      Bytes b = good;
      b[i] ^= static_cast<std::uint8_t>(1u << bit);
      std::string msg;
      const auto reason = refusal([&] { ck::parse_header(b.data(), b.size()); }, &msg);
      if (i < 8) EXPECT_EQ(reason, ck::FormatReason::kNotACheckpoint) << i;
      else if (i < 12) EXPECT_EQ(reason, ck::FormatReason::kUnsupported) << i;
      else EXPECT_EQ(reason, ck::FormatReason::kCorrupted) << i << ": " << msg;
      if (i >= 12) {
        EXPECT_NE(msg.find("header's CRC32C"), std::string::npos) << msg;
      }
    }
  }
}

TEST(CheckpointFormat, EveryHeaderFieldOutOfRangeIsRefusedEvenWithAValidCrc) {
  const Bytes good = ck::encode_header(sample_header());
  struct Case {
    std::function<void(Bytes&)> edit;
    ck::FormatReason reason;
    const char* says;
  };
  const std::vector<Case> cases = {
      {[](Bytes& b) { put_u32(b, 8, 2); }, ck::FormatReason::kUnsupported, "format version is 2"},
      {[](Bytes& b) { put_u32(b, 8, 0); }, ck::FormatReason::kUnsupported, "format version is 0"},
      {[](Bytes& b) { put_u32(b, 12, 65); }, ck::FormatReason::kCorrupted, "header size of 65"},
      {[](Bytes& b) { put_u64(b, 16, 3); }, ck::FormatReason::kCorrupted, "metadata size of 3"},
      {[](Bytes& b) { put_u64(b, 16, ck::kMaxMetadataBytes + 1); }, ck::FormatReason::kCorrupted, "metadata size"},
      {[](Bytes& b) { put_u64(b, 16, ~std::uint64_t{0}); }, ck::FormatReason::kCorrupted, "metadata size"},
      {[](Bytes& b) { put_u64(b, 24, ck::kMaxPayloadBytes + 1); }, ck::FormatReason::kCorrupted, "payload size"},
      {[](Bytes& b) { put_u64(b, 24, ~std::uint64_t{0}); }, ck::FormatReason::kCorrupted, "payload size"},
      {[](Bytes& b) { put_u32(b, 32, 0x12345678); }, ck::FormatReason::kCorrupted, "metadata block's CRC32C"},
      {[](Bytes& b) { b[40] = 1; }, ck::FormatReason::kCorrupted, "reserved header byte 40"},
      {[](Bytes& b) { b[59] = 0x80; }, ck::FormatReason::kCorrupted, "reserved header byte 59"},
  };
  for (const auto& c : cases) {
    Bytes b = good;
    c.edit(b);
    reseal_header(b);
    std::string msg;
    EXPECT_EQ(refusal([&] { ck::parse_header(b.data(), b.size()); }, &msg), c.reason) << c.says;
    EXPECT_NE(msg.find(c.says), std::string::npos) << msg;
  }
  // The payload CRC field is covered by the header CRC only: a changed value is caught when the
  // payload is verified (Reader tests below).
  Bytes b = good;
  put_u32(b, 36, 1);
  reseal_header(b);
  EXPECT_EQ(ck::parse_header(b.data(), b.size()).payload_crc, 1u);
}

TEST(CheckpointFormat, FlippedMetadataBytesAreRefused) {
  const Bytes good = ck::encode_header(sample_header());
  for (std::size_t i = ck::kHeaderBytes; i < good.size(); ++i) {
    Bytes b = good;
    b[i] ^= 0x04;
    std::string msg;
    EXPECT_EQ(refusal([&] { ck::parse_header(b.data(), b.size()); }, &msg), ck::FormatReason::kCorrupted) << i;
    EXPECT_NE(msg.find("metadata block's CRC32C"), std::string::npos) << msg;
  }
}

TEST(CheckpointFormat, MalformedMetadataIsRefusedEvenWithValidCrcs) {
  struct Case {
    Bytes block;
    const char* says;
  };
  Bytes too_many(4);
  put_u32(too_many, 0, 65);
  Bytes trailing = raw_metadata({{"a", "1"}});
  trailing.push_back(0);
  Bytes cut_key = raw_metadata({{"abc", "1"}});
  cut_key.resize(4 + 2 + 1);
  Bytes cut_value = raw_metadata({{"a", "12345"}});
  cut_value.pop_back();
  Bytes count_only(4);
  put_u32(count_only, 0, 1);
  const std::vector<Case> cases = {
      {too_many, "65 entries"},
      {trailing, "1 bytes follow the last entry"},
      {cut_key, "key is cut off"},
      {cut_value, "value is cut off"},
      {count_only, "cut off before its key size"},
      {raw_metadata({{"b", "1"}, {"a", "2"}}), "strictly ascending"},
      {raw_metadata({{"a", "1"}, {"a", "2"}}), "strictly ascending"},
      {raw_metadata({{"", "1"}}), "0-byte key"},
      {raw_metadata({{std::string(65, 'k'), "1"}}), "65-byte key"},
      {raw_metadata({{"bad key", "1"}}), "outside [A-Za-z0-9_.-]"},
      {raw_metadata({{"k/../x", "1"}}), "outside [A-Za-z0-9_.-]"},
      {raw_metadata({{"k\xff", "1"}}), "key 'k\\xff' has a character"},  // shown escaped, never raw
      {raw_metadata({{"k", std::string(4097, 'v')}}), "4097-byte value"},
      {raw_metadata({{"k", "line\nbreak"}}), "control character"},
      {raw_metadata({{"k", std::string("nul\0x", 5)}}), "control character"},
      {raw_metadata({{"k", "\x7f"}}), "control character"},
      {raw_metadata({{"k", "\xc2\x85"}}), "control character"},       // U+0085, a C1 control
      {raw_metadata({{"k", "\xc0\xaf"}}), "cannot start"},            // overlong '/'
      {raw_metadata({{"k", "\xe0\x80\xaf"}}), "not valid UTF-8"},     // overlong
      {raw_metadata({{"k", "\xed\xa0\x80"}}), "not valid UTF-8"},     // a surrogate
      {raw_metadata({{"k", "\xf4\x90\x80\x80"}}), "not valid UTF-8"}, // above U+10FFFF
      {raw_metadata({{"k", "\xe2\x82"}}), "cut off"},
      {raw_metadata({{"k", "\xff"}}), "cannot start"},
  };
  for (const auto& c : cases) {
    const Bytes b = with_metadata(c.block);
    std::string msg;
    EXPECT_EQ(refusal([&] { ck::parse_header(b.data(), b.size()); }, &msg), ck::FormatReason::kCorrupted) << c.says;
    EXPECT_NE(msg.find(c.says), std::string::npos) << msg;
  }
  // The same builder accepts a well-formed block.
  const Bytes ok = with_metadata(raw_metadata({{"a", "1"}, {"b", "\xe2\x82\xac"}}));
  EXPECT_EQ(ck::parse_header(ok.data(), ok.size()).metadata.at("b"), "\xe2\x82\xac");
}

TEST(CheckpointFormat, TruncatedBytesAreTornAtEveryLength) {
  const Bytes good = ck::encode_header(sample_header());
  for (std::size_t n = 0; n < good.size(); ++n) {
    std::string msg;
    const auto reason = refusal([&] { ck::parse_header(good.data(), n); }, &msg);
    EXPECT_EQ(reason, n == 0 ? ck::FormatReason::kNotACheckpoint : ck::FormatReason::kTorn) << n << ": " << msg;
  }
  // Bytes after the metadata (the payload) are not the parser's business.
  Bytes longer = good;
  longer.resize(good.size() + 100, 0xAB);
  EXPECT_EQ(ck::parse_header(longer.data(), longer.size()).payload_offset(), good.size());
}

TEST(CheckpointFormat, MetadataLimitsAreEnforcedByTheEncoder) {
  ck::Header h;
  for (int i = 0; i < 65; ++i) h.metadata["k" + std::to_string(1000 + i)] = "v";
  std::string msg;
  EXPECT_EQ(refusal([&] { ck::encode_header(h); }, &msg), ck::FormatReason::kInvalidMetadata);
  EXPECT_NE(msg.find("65 entries"), std::string::npos) << msg;
  h.metadata.clear();
  for (int i = 0; i < 20; ++i) h.metadata["k" + std::to_string(i)] = std::string(4000, 'x');
  EXPECT_EQ(refusal([&] { ck::encode_header(h); }, &msg), ck::FormatReason::kInvalidMetadata);
  EXPECT_NE(msg.find("at most 65536"), std::string::npos) << msg;
  h.metadata = {{"key with space", "v"}};
  EXPECT_EQ(refusal([&] { ck::encode_header(h); }), ck::FormatReason::kInvalidMetadata);
  h.metadata = {{"k", "tab\there"}};
  EXPECT_EQ(refusal([&] { ck::encode_header(h); }), ck::FormatReason::kInvalidMetadata);
  h.metadata = {{std::string(64, 'k'), std::string(4096, 'v')}};  // both at their limits
  const Bytes b = ck::encode_header(h);
  EXPECT_EQ(ck::parse_header(b.data(), b.size()).metadata, h.metadata);
}

// ----- Writer and Reader --------------------------------------------------------------------------

TEST(CheckpointFile, WriteReadRoundTripWithChunksOfEverySize) {
  TempDir dir;
  const std::string path = dir / "model.ckpt";
  const Bytes payload = random_bytes(3 * 1024 * 1024 + 17, 1);
  for (std::size_t chunk : {std::size_t{1} << 22, std::size_t{1} << 20, std::size_t{65536}, std::size_t{777}}) {
    write_checkpoint(path, payload, kMeta, chunk);
    EXPECT_EQ(dir.entries(), std::set<std::string>{"model.ckpt"}) << "no temporary file is left";
    ck::Reader r(path);
    EXPECT_EQ(r.header().metadata, kMeta);
    EXPECT_EQ(r.header().payload_size, payload.size());
    EXPECT_EQ(r.header().payload_crc, asteria::crc32c(payload.data(), payload.size()));
    r.verify();
    EXPECT_EQ(read_payload(r), payload);
    std::uint8_t tail[64];
    EXPECT_EQ(r.read(payload.size() - 10, tail, sizeof(tail)), 10u);  // clipped at the end
    EXPECT_EQ(std::memcmp(tail, payload.data() + payload.size() - 10, 10), 0);
    EXPECT_EQ(r.read(payload.size(), tail, sizeof(tail)), 0u);
    EXPECT_EQ(read_file(path).size(), r.header().file_size());
  }
}

ck::WriterOptions with_temp(ck::TempFile t) {
  ck::WriterOptions o;
  o.temp_file = t;
  return o;
}

TEST(CheckpointFile, CommitSyncsTheFileThenRenamesThenSyncsTheDirectory) {
  for (const auto mode : {ck::TempFile::kAuto, ck::TempFile::kNamed}) {
    TempDir dir;
    const std::string path = dir / "c";
    syslog_::events.clear();
    syslog_::enabled = true;
    bool unnamed;
    {
      ck::Writer w(path, kMeta, with_temp(mode));
      unnamed = w.unnamed();
      w.write("payload", 7);
      EXPECT_TRUE(syslog_::events.empty()) << "nothing is synced or renamed before commit()";
      w.commit();
    }
    syslog_::enabled = false;
    if (unnamed) {
      EXPECT_EQ(syslog_::events, (std::vector<std::string>{"fsync(file)", "link", "rename(c)", "fsync(dir)"}));
    } else {
      EXPECT_EQ(syslog_::events, (std::vector<std::string>{"fsync(file)", "rename(c)", "fsync(dir)"}));
    }
    ck::Reader r(path);
    r.verify();
  }
}

TEST(CheckpointFile, AnUnnamedTemporaryFileIsInvisibleUntilCommit) {
  TempDir dir;
  const std::string path = dir / "c";
  ck::Writer w(path, kMeta);
  if (!w.unnamed()) GTEST_SKIP() << "this file system has no O_TMPFILE; the named temporary file is used";
  const Bytes big = random_bytes(3 << 20, 12);
  w.write(big.data(), big.size());
  EXPECT_TRUE(dir.entries().empty()) << "a crash now would leave nothing behind";
  w.commit();
  EXPECT_EQ(dir.entries(), std::set<std::string>{"c"});
  expect_checkpoint(path, big);
}

TEST(CheckpointFile, EmptyPayloadAndReplacingAnExistingCheckpoint) {
  TempDir dir;
  const std::string path = dir / "c";
  write_checkpoint(path, {}, {});
  {
    ck::Reader r(path);
    r.verify();
    EXPECT_EQ(r.header().payload_size, 0u);
    EXPECT_TRUE(r.header().metadata.empty());
  }
  const Bytes payload = random_bytes(5000, 2);
  write_checkpoint(path, payload);
  expect_checkpoint(path, payload);
}

TEST(CheckpointFile, TruncationAtEveryInterestingOffsetIsRefused) {
  TempDir dir;
  const std::string path = dir / "c";
  const Bytes payload = random_bytes(10000, 3);
  write_checkpoint(path, payload);
  const Bytes good = read_file(path);
  std::size_t meta_end;
  {
    ck::Reader r(path);
    meta_end = static_cast<std::size_t>(r.header().payload_offset());
  }
  const std::size_t offsets[] = {0, 1, 7, 8, 12, 63, 64, 65, meta_end - 1, meta_end, meta_end + 1,
                                 meta_end + 4096, good.size() - 1};
  for (std::size_t n : offsets) {
    const std::string torn = dir / "torn";
    write_file(torn, Bytes(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n)));
    std::string msg;
    const auto reason = refusal([&] { ck::Reader r(torn); }, &msg);
    EXPECT_EQ(reason, n == 0 ? ck::FormatReason::kNotACheckpoint : ck::FormatReason::kTorn) << n << ": " << msg;
    EXPECT_NE(msg.find(torn), std::string::npos) << "names the file: " << msg;
    if (n > 0) {
      EXPECT_NE(msg.find("resume from an earlier checkpoint"), std::string::npos) << msg;
    }
    if (n >= meta_end) {
      EXPECT_NE(msg.find("cut short"), std::string::npos) << msg;
    }
  }
}

TEST(CheckpointFile, AppendedBytesAreRefused) {
  TempDir dir;
  const std::string path = dir / "c";
  write_checkpoint(path, random_bytes(1000, 4));
  Bytes b = read_file(path);
  b.push_back(0);
  write_file(path, b);
  std::string msg;
  EXPECT_EQ(refusal([&] { ck::Reader r(path); }, &msg), ck::FormatReason::kTorn);
  EXPECT_NE(msg.find("appended"), std::string::npos) << msg;
}

TEST(CheckpointFile, PayloadBitFlipIsCaughtByVerify) {
  TempDir dir;
  const std::string path = dir / "c";
  const Bytes payload = random_bytes(2 * 1024 * 1024 + 5, 5);
  write_checkpoint(path, payload);
  const Bytes good = read_file(path);
  for (std::size_t at : {good.size() - payload.size(), good.size() - payload.size() / 2, good.size() - 1}) {
    Bytes b = good;
    b[at] ^= 0x10;
    write_file(path, b);
    ck::Reader r(path);  // the header is intact: opening works
    std::string msg;
    EXPECT_EQ(refusal([&] { r.verify(); }, &msg), ck::FormatReason::kCorrupted) << at;
    EXPECT_NE(msg.find("payload's CRC32C"), std::string::npos) << msg;
    EXPECT_NE(msg.find("is corrupted"), std::string::npos) << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
  }
  // A changed payload CRC field (header resealed) is caught the same way.
  Bytes b = good;
  put_u32(b, 36, 0);
  reseal_header(b);
  write_file(path, b);
  ck::Reader r(path);
  EXPECT_EQ(refusal([&] { r.verify(); }), ck::FormatReason::kCorrupted);
}

TEST(CheckpointFile, OtherFilesAreNotCheckpoints) {
  TempDir dir;
  const std::string path = dir / "notes.txt";
  write_file(path, Bytes{'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd'});
  std::string msg;
  EXPECT_EQ(refusal([&] { ck::Reader r(path); }, &msg), ck::FormatReason::kNotACheckpoint);
  EXPECT_NE(msg.find("is not an asteria checkpoint"), std::string::npos) << msg;
  EXPECT_NE(msg.find("torch.load"), std::string::npos) << msg;
  EXPECT_EQ(error_of([&] { ck::Reader r(dir.path()); }, "a directory was opened").os_errno(), EISDIR);
  const asteria::Error missing = error_of([&] { ck::Reader r(dir / "missing"); }, "a missing file was opened");
  EXPECT_EQ(missing.category(), asteria::ErrorCategory::kIo);
  EXPECT_EQ(missing.os_errno(), ENOENT);
}

TEST(CheckpointFile, FileIsOwnerOnlyWhateverTheUmask) {
  TempDir dir;
  for (mode_t mask : {mode_t{0}, mode_t{077}, mode_t{0277}}) {
    const mode_t old = ::umask(mask);
    const std::string path = dir / ("c" + std::to_string(mask));
    {
      ck::Writer w(path, {}, with_temp(ck::TempFile::kNamed));
      struct stat st {};
      ASSERT_EQ(::stat(w.temp_path().c_str(), &st), 0);
      EXPECT_EQ(st.st_mode & 07777, 0600u) << "temporary file, umask " << mask;
      w.write("x", 1);
      w.commit();
    }
    {
      ck::Writer w(path + "u", {});  // unnamed where possible
      w.write("x", 1);
      w.commit();
    }
    ::umask(old);
    for (const std::string& p : {path, path + "u"}) {
      struct stat st {};
      ASSERT_EQ(::stat(p.c_str(), &st), 0);
      EXPECT_EQ(st.st_mode & 07777, 0600u) << p << ", umask " << mask;
    }
  }
}

TEST(CheckpointFile, SymlinkAtTheTargetIsReplacedNotFollowed) {
  TempDir dir;
  const std::string victim = dir / "victim", link = dir / "ckpt";
  write_file(victim, Bytes{'k', 'e', 'e', 'p'});
  ASSERT_EQ(::symlink(victim.c_str(), link.c_str()), 0);
  // Reading never goes through a link.
  const asteria::Error refused = error_of([&] { ck::Reader r(link); }, "a symbolic link was opened");
  EXPECT_EQ(refused.os_errno(), ELOOP);
  EXPECT_NE(std::string(refused.what()).find("symbolic link"), std::string::npos) << refused.what();
  const Bytes payload = random_bytes(100, 6);
  write_checkpoint(link, payload);
  struct stat st {};
  ASSERT_EQ(::lstat(link.c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode)) << "the link itself was replaced by the checkpoint";
  EXPECT_EQ(read_file(victim), (Bytes{'k', 'e', 'e', 'p'})) << "the link's target is untouched";
  expect_checkpoint(link, payload);
}

TEST(CheckpointFile, AbortAndDestructorRemoveTheTemporaryFile) {
  TempDir dir;
  const std::string path = dir / "c";
  write_checkpoint(path, random_bytes(100, 7));
  const Bytes before = read_file(path);
  {
    ck::Writer w(path, kMeta, with_temp(ck::TempFile::kNamed));
    w.write(before.data(), before.size());
    EXPECT_EQ(dir.entries().size(), 2u);
    EXPECT_EQ(w.temp_path().rfind(dir / ".c.", 0), 0u) << w.temp_path();
  }  // destroyed without commit
  EXPECT_EQ(dir.entries(), std::set<std::string>{"c"});
  {
    // Until commit() a named temporary file is never a checkpoint (the header is written last), even
    // with more than a buffer's worth of payload in it: a crash cannot leave a valid-looking file.
    ck::Writer w(path, kMeta, with_temp(ck::TempFile::kNamed));
    const Bytes big = random_bytes(3 << 20, 11);
    w.write(big.data(), big.size());
    EXPECT_EQ(refusal([&] { ck::Reader r(w.temp_path()); }), ck::FormatReason::kNotACheckpoint);
  }
  ck::Writer w(path, kMeta);
  w.write("abc", 3);
  w.abort();
  w.abort();  // repeated: harmless
  EXPECT_EQ(dir.entries(), std::set<std::string>{"c"});
  EXPECT_EQ(read_file(path), before);
  EXPECT_EQ(error_of([&] { w.write("x", 1); }, "an aborted writer accepted bytes").category(),
            asteria::ErrorCategory::kInvalidArgument);
}

TEST(CheckpointFile, EveryInjectedFaultKeepsThePreviousCheckpointAndLeavesNoTemporaryFile) {
  struct Case {
    ck::WriterFaultKind kind;
    std::uint64_t after;
    int err;
    const char* says;
  };
  const std::vector<Case> cases = {
      {ck::WriterFaultKind::kNoSpace, 0, ENOSPC, "free space"},
      {ck::WriterFaultKind::kNoSpace, 100000, ENOSPC, "bytes reached the file before the device was full"},
      {ck::WriterFaultKind::kNoSpace, 2500000, ENOSPC, "needs about"},
      {ck::WriterFaultKind::kEio, 0, EIO, "check the device"},
      {ck::WriterFaultKind::kEio, 1500000, EIO, "writing the payload failed"},
      {ck::WriterFaultKind::kFsync, 0, EIO, "fsync"},
      {ck::WriterFaultKind::kRename, 0, EIO, "renaming"},
  };
  TempDir dir;
  const std::string path = dir / "c";
  const Bytes previous = random_bytes(4096, 8);
  write_checkpoint(path, previous);
  const Bytes before = read_file(path);
  const Bytes payload = random_bytes(3 * 1024 * 1024, 9);
  for (const auto& [c, mode] : [&] {
         std::vector<std::pair<Case, ck::TempFile>> all;
         for (const auto& c : cases)
           for (auto m : {ck::TempFile::kAuto, ck::TempFile::kNamed}) all.emplace_back(c, m);
         return all;
       }()) {
    ck::WriterOptions o = with_temp(mode);
    o.test_fault.kind = c.kind;
    o.test_fault.after_bytes = c.after;
    o.expected_bytes = payload.size();
    const asteria::Error e =
        error_of([&] { write_checkpoint(path, payload, kMeta, 65536, o); }, std::string("the fault did not fire: ") + c.says);
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kIo);
    EXPECT_EQ(e.os_errno(), c.err) << e.what();
    const std::string msg = e.what();
    EXPECT_NE(msg.find(c.says), std::string::npos) << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("previous file at the target is untouched"), std::string::npos) << msg;
    EXPECT_EQ(dir.entries(), std::set<std::string>{"c"}) << c.says;
    EXPECT_EQ(read_file(path), before) << c.says;
    expect_checkpoint(path, previous);
  }
}

TEST(CheckpointFile, ATargetThatIsADirectoryFailsAtRenameAndLeavesNothing) {
  TempDir dir;
  const std::string path = dir / "sub";
  ASSERT_EQ(::mkdir(path.c_str(), 0700), 0);
  const asteria::Error e = error_of([&] { write_checkpoint(path, random_bytes(10, 10)); }, "a checkpoint replaced a directory");
  EXPECT_EQ(e.category(), asteria::ErrorCategory::kIo);
  EXPECT_TRUE(e.os_errno() == EISDIR || e.os_errno() == ENOTEMPTY || e.os_errno() == EEXIST) << e.what();
  EXPECT_EQ(dir.entries(), std::set<std::string>{"sub"});
}

TEST(CheckpointFile, MissingDirectoryAndBadPathsAreClearErrors) {
  TempDir dir;
  const asteria::Error missing = error_of([&] { ck::Writer w(dir / "missing/c", {}); }, "a missing directory");
  EXPECT_EQ(missing.os_errno(), ENOENT);
  EXPECT_NE(std::string(missing.what()).find("create the directory first"), std::string::npos) << missing.what();
  for (const std::string& bad : {std::string(), dir.path() + "/", dir / "."}) {
    const asteria::Error e = error_of([&] { ck::Writer w(bad, {}); }, "accepted the path '" + bad + "'");
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kInvalidArgument) << e.what();
  }
  EXPECT_THROW(ck::Writer(dir / "c", {{"bad key", "v"}}), ck::FormatError);
  EXPECT_TRUE(dir.entries().empty());
}

}  // namespace
