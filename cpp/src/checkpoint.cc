#include "asteria/checkpoint.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <sstream>
#include <thread>

#include "asteria/crc32c.h"

namespace asteria::checkpoint {
namespace {

// Header field offsets (see checkpoint.h).
constexpr std::size_t kOffVersion = 8, kOffHeaderSize = 12, kOffMetaSize = 16, kOffPayloadSize = 24,
                      kOffMetaCrc = 32, kOffPayloadCrc = 36, kOffReserved = 40, kOffHeaderCrc = 60;
static_assert(kOffHeaderCrc + 4 == kHeaderBytes, "the header CRC must be the last field of the fixed header.");
static_assert(sizeof(kMagic) == 8, "the magic is 8 bytes.");

constexpr std::size_t kWriteBuffer = 1 << 20;  // payload bytes gathered before a write(2)
constexpr std::size_t kReadChunk = 1 << 20;    // verify() reads this much at a time

std::uint32_t load_u32(const std::uint8_t* p) noexcept {
  return std::uint32_t{p[0]} | std::uint32_t{p[1]} << 8 | std::uint32_t{p[2]} << 16 | std::uint32_t{p[3]} << 24;
}
std::uint64_t load_u64(const std::uint8_t* p) noexcept {
  return std::uint64_t{load_u32(p)} | std::uint64_t{load_u32(p + 4)} << 32;
}
std::uint16_t load_u16(const std::uint8_t* p) noexcept {
  return static_cast<std::uint16_t>(p[0] | p[1] << 8);
}
void store_u16(std::uint8_t* p, std::uint16_t v) noexcept {
  p[0] = static_cast<std::uint8_t>(v);
  p[1] = static_cast<std::uint8_t>(v >> 8);
}
void store_u32(std::uint8_t* p, std::uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}
void store_u64(std::uint8_t* p, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

[[noreturn]] void refuse(FormatReason reason, const std::string& msg) { throw FormatError(reason, msg); }

std::string hex32(std::uint32_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

bool key_char(unsigned char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
         c == '-';
}

// Printable, well-formed UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF, no C0 or
// C1 control characters and no DEL. Returns an empty string when valid, else what is wrong.
std::string utf8_problem(const std::uint8_t* s, std::size_t n) {
  std::size_t i = 0;
  while (i < n) {
    const std::uint8_t b = s[i];
    std::uint32_t cp;
    std::size_t len;
    std::uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b < 0x80) {
      cp = b;
      len = 1;
    } else if (b >= 0xC2 && b <= 0xDF) {
      cp = b & 0x1F;
      len = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      cp = b & 0x0F;
      len = 3;
      if (b == 0xE0) lo = 0xA0;  // no overlong forms
      if (b == 0xED) hi = 0x9F;  // no surrogates
    } else if (b >= 0xF0 && b <= 0xF4) {
      cp = b & 0x07;
      len = 4;
      if (b == 0xF0) lo = 0x90;  // no overlong forms
      if (b == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
    } else {
      return "byte " + std::to_string(i) + " (" + hex32(b) + ") cannot start a UTF-8 character";
    }
    if (len > n - i) return "the UTF-8 character at byte " + std::to_string(i) + " is cut off";
    for (std::size_t k = 1; k < len; ++k) {
      const std::uint8_t c = s[i + k];
      const std::uint8_t min = k == 1 ? lo : 0x80, max = k == 1 ? hi : 0xBF;
      if (c < min || c > max) return "byte " + std::to_string(i + k) + " is not valid UTF-8";
      cp = (cp << 6) | (c & 0x3F);
    }
    if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F))
      return "byte " + std::to_string(i) + " is a control character (" + hex32(cp) + "); values are printable text";
    i += len;
  }
  return {};
}

// A key as error messages show it: at most kMaxKeyBytes, every byte outside [A-Za-z0-9_.-] as \xNN (a key
// read from a damaged file may hold any bytes).
std::string printable_key(const std::string& key) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : key.substr(0, kMaxKeyBytes)) {
    if (key_char(c)) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 0xF];
    }
  }
  return out;
}

void check_entry(const std::string& key, const std::string& value) {
  if (key.empty() || key.size() > kMaxKeyBytes)
    refuse(FormatReason::kInvalidMetadata, "metadata key '" + printable_key(key) + "' has " +
                                               std::to_string(key.size()) + " bytes; keys have 1.." +
                                               std::to_string(kMaxKeyBytes));
  for (unsigned char c : key)
    if (!key_char(c))
      refuse(FormatReason::kInvalidMetadata, "metadata key '" + printable_key(key) +
                                                 "' has a character outside [A-Za-z0-9_.-] (" + hex32(c) + ")");
  if (value.size() > kMaxValueBytes)
    refuse(FormatReason::kInvalidMetadata, "the value of metadata key '" + key + "' has " +
                                               std::to_string(value.size()) + " bytes; values have at most " +
                                               std::to_string(kMaxValueBytes));
  const std::string bad = utf8_problem(reinterpret_cast<const std::uint8_t*>(value.data()), value.size());
  if (!bad.empty()) refuse(FormatReason::kInvalidMetadata, "the value of metadata key '" + key + "': " + bad);
}

std::size_t metadata_bytes(const Metadata& m) noexcept {
  std::size_t n = 4;
  for (const auto& [k, v] : m) n += 2 + k.size() + 4 + v.size();
  return n;
}

std::string errno_name(int e) {
  switch (e) {
    case ENOSPC: return "ENOSPC";
    case EDQUOT: return "EDQUOT";
    case EIO: return "EIO";
    case EROFS: return "EROFS";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case ELOOP: return "ELOOP";
    case EFBIG: return "EFBIG";
    case EBUSY: return "EBUSY";
    case EXDEV: return "EXDEV";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    default: return "errno " + std::to_string(e);
  }
}

std::string os_text(int e) { return std::string(std::strerror(e)) + " (" + errno_name(e) + ")"; }

bool no_space(int e) { return e == ENOSPC || e == EDQUOT || e == EFBIG; }

std::string with_commas(std::uint64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<std::size_t>(i), ",");
  return s;
}

// 16 random hexadecimal digits for a temporary file name.
std::string random_suffix() {
  std::uint64_t r = 0;
  if (::getrandom(&r, sizeof(r), GRND_NONBLOCK) != static_cast<ssize_t>(sizeof(r))) {
    // No entropy yet (early boot): the time and the address of a local still make collisions rare,
    // and O_EXCL makes a collision a retry, never a clash.
    static std::atomic<std::uint64_t> counter{0};  // writers in several threads may get here at once
    const std::uint64_t n = counter.fetch_add(1, std::memory_order_relaxed) + 1;
    r = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
        (reinterpret_cast<std::uintptr_t>(&r) << 16) ^ (n * 0x9E3779B97F4A7C15ull) ^
        static_cast<std::uint64_t>(::getpid());
  }
  static const char* digits = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 0; i < 16; ++i) s[static_cast<std::size_t>(i)] = digits[(r >> (4 * i)) & 0xF];
  return s;
}

// Full pread of `size` bytes; returns 0, or an errno, or -1 when the file ended first.
int pread_full(int fd, void* dst, std::size_t size, std::uint64_t offset, std::size_t* got) {
  auto* p = static_cast<std::uint8_t*>(dst);
  std::size_t done = 0;
  while (done < size) {
    const ssize_t r = ::pread(fd, p + done, size - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      *got = done;
      return errno;
    }
    if (r == 0) {
      *got = done;
      return -1;
    }
    done += static_cast<std::size_t>(r);
  }
  *got = done;
  return 0;
}

}  // namespace

const char* reason_name(FormatReason r) noexcept {
  switch (r) {
    case FormatReason::kNotACheckpoint: return "not_a_checkpoint";
    case FormatReason::kTorn: return "torn";
    case FormatReason::kCorrupted: return "corrupted";
    case FormatReason::kUnsupported: return "unsupported";
    case FormatReason::kInvalidMetadata: return "invalid_metadata";
  }
  return "unknown";
}

void check_metadata(const Metadata& metadata) {
  if (metadata.size() > kMaxMetadataEntries)
    refuse(FormatReason::kInvalidMetadata, "metadata has " + std::to_string(metadata.size()) +
                                               " entries; at most " + std::to_string(kMaxMetadataEntries) +
                                               " are stored");
  for (const auto& [k, v] : metadata) check_entry(k, v);
  const std::size_t n = metadata_bytes(metadata);
  if (n > kMaxMetadataBytes)
    refuse(FormatReason::kInvalidMetadata, "metadata takes " + std::to_string(n) + " bytes encoded; at most " +
                                               std::to_string(kMaxMetadataBytes) + " are stored");
}

// ----- parsing and encoding (pure) ------------------------------------------------------------
Header parse_fixed_header(const std::uint8_t* data, std::size_t size) {
  if (size == 0) refuse(FormatReason::kNotACheckpoint, "it is empty");
  const std::size_t m = std::min(size, sizeof(kMagic));
  if (std::memcmp(data, kMagic, m) != 0)
    refuse(FormatReason::kNotACheckpoint, "it does not start with the checkpoint magic \"ASTERIA\\x1a\"");
  if (size < kHeaderBytes)
    refuse(FormatReason::kTorn, "the header is cut short: " + std::to_string(size) + " of its " +
                                    std::to_string(kHeaderBytes) + " bytes are present");
  Header h;
  h.version = load_u32(data + kOffVersion);
  if (h.version != kFormatVersion)
    refuse(FormatReason::kUnsupported,
           "its format version is " + std::to_string(h.version) + " but this asteria reads version " +
               std::to_string(kFormatVersion) + " (a newer asteria wrote it, or its header is corrupted)");
  const std::uint32_t stored = load_u32(data + kOffHeaderCrc), computed = crc32c(data, kOffHeaderCrc);
  if (stored != computed)
    refuse(FormatReason::kCorrupted, "the header's CRC32C is " + hex32(computed) + " but the header records " +
                                         hex32(stored) + ": the header bytes changed after it was written");
  const std::uint32_t header_size = load_u32(data + kOffHeaderSize);
  if (header_size != kHeaderBytes)
    refuse(FormatReason::kCorrupted, "the header records a header size of " + std::to_string(header_size) +
                                         " bytes; version 1 has " + std::to_string(kHeaderBytes));
  for (std::size_t i = kOffReserved; i < kOffHeaderCrc; ++i)
    if (data[i] != 0)
      refuse(FormatReason::kCorrupted, "reserved header byte " + std::to_string(i) + " is " + hex32(data[i]) +
                                           " instead of 0");
  h.metadata_size = load_u64(data + kOffMetaSize);
  h.payload_size = load_u64(data + kOffPayloadSize);
  h.metadata_crc = load_u32(data + kOffMetaCrc);
  h.payload_crc = load_u32(data + kOffPayloadCrc);
  if (h.metadata_size < 4 || h.metadata_size > kMaxMetadataBytes)
    refuse(FormatReason::kCorrupted, "the header records a metadata size of " + std::to_string(h.metadata_size) +
                                         " bytes; it must be 4.." + std::to_string(kMaxMetadataBytes));
  if (h.payload_size > kMaxPayloadBytes)
    refuse(FormatReason::kCorrupted, "the header records a payload size of " + std::to_string(h.payload_size) +
                                         " bytes, above the limit of 2^62");
  return h;
}

Header parse_header(const std::uint8_t* data, std::size_t size) {
  Header h = parse_fixed_header(data, size);
  const std::size_t msize = static_cast<std::size_t>(h.metadata_size);
  if (size - kHeaderBytes < msize)
    refuse(FormatReason::kTorn, "the metadata block is cut short: " + std::to_string(size - kHeaderBytes) +
                                    " of its " + std::to_string(msize) + " bytes are present");
  const std::uint8_t* m = data + kHeaderBytes;
  const std::uint32_t crc = crc32c(m, msize);
  if (crc != h.metadata_crc)
    refuse(FormatReason::kCorrupted, "the metadata block's CRC32C is " + hex32(crc) + " but the header records " +
                                         hex32(h.metadata_crc) + ": the metadata changed after it was written");
  // From here on a failure means a writer produced bytes no asteria writer produces (the CRC matched).
  auto bad = [](const std::string& what) { refuse(FormatReason::kCorrupted, "malformed metadata: " + what); };
  std::size_t pos = 0;
  const std::uint32_t count = load_u32(m);
  pos = 4;
  if (count > kMaxMetadataEntries)
    bad(std::to_string(count) + " entries, at most " + std::to_string(kMaxMetadataEntries) + " are allowed");
  const std::string* previous = nullptr;
  for (std::uint32_t i = 0; i < count; ++i) {
    const std::string entry = "entry " + std::to_string(i);
    if (msize - pos < 2) bad(entry + " is cut off before its key size");
    const std::size_t klen = load_u16(m + pos);
    pos += 2;
    if (klen == 0 || klen > kMaxKeyBytes)
      bad(entry + " has a " + std::to_string(klen) + "-byte key; keys have 1.." + std::to_string(kMaxKeyBytes));
    if (msize - pos < klen) bad(entry + "'s key is cut off");
    std::string key(reinterpret_cast<const char*>(m + pos), klen);
    pos += klen;
    if (msize - pos < 4) bad(entry + " is cut off before its value size");
    const std::size_t vlen = load_u32(m + pos);
    pos += 4;
    if (vlen > kMaxValueBytes)
      bad(entry + " has a " + std::to_string(vlen) + "-byte value; values have at most " +
          std::to_string(kMaxValueBytes));
    if (msize - pos < vlen) bad(entry + "'s value is cut off");
    std::string value(reinterpret_cast<const char*>(m + pos), vlen);
    pos += vlen;
    try {
      check_entry(key, value);
    } catch (const FormatError& e) {
      bad(e.what());
    }
    if (previous != nullptr && !(*previous < key))
      bad("keys are not in strictly ascending order at " + entry + " ('" + key + "')");
    previous = &h.metadata.emplace_hint(h.metadata.end(), std::move(key), std::move(value))->first;
  }
  if (pos != msize) bad(std::to_string(msize - pos) + " bytes follow the last entry");
  return h;
}

std::vector<std::uint8_t> encode_header(const Header& h) {
  check_metadata(h.metadata);
  if (h.payload_size > kMaxPayloadBytes)
    refuse(FormatReason::kInvalidMetadata, "a payload of " + std::to_string(h.payload_size) +
                                               " bytes is above the limit of 2^62");
  const std::size_t msize = metadata_bytes(h.metadata);
  std::vector<std::uint8_t> out(kHeaderBytes + msize, 0);
  std::uint8_t* m = out.data() + kHeaderBytes;
  store_u32(m, static_cast<std::uint32_t>(h.metadata.size()));
  std::size_t pos = 4;
  for (const auto& [k, v] : h.metadata) {
    store_u16(m + pos, static_cast<std::uint16_t>(k.size()));
    pos += 2;
    std::memcpy(m + pos, k.data(), k.size());
    pos += k.size();
    store_u32(m + pos, static_cast<std::uint32_t>(v.size()));
    pos += 4;
    std::memcpy(m + pos, v.data(), v.size());
    pos += v.size();
  }
  ASTERIA_ASSERT(pos == msize);
  std::memcpy(out.data(), kMagic, sizeof(kMagic));
  store_u32(out.data() + kOffVersion, kFormatVersion);
  store_u32(out.data() + kOffHeaderSize, static_cast<std::uint32_t>(kHeaderBytes));
  store_u64(out.data() + kOffMetaSize, msize);
  store_u64(out.data() + kOffPayloadSize, h.payload_size);
  store_u32(out.data() + kOffMetaCrc, crc32c(m, msize));
  store_u32(out.data() + kOffPayloadCrc, h.payload_crc);
  store_u32(out.data() + kOffHeaderCrc, crc32c(out.data(), kOffHeaderCrc));
  return out;
}

// ----- Writer -----------------------------------------------------------------------------------
Writer::Writer(const std::string& path, const Metadata& metadata, const WriterOptions& opts)
    : path_(path), opts_(opts) {
  ASTERIA_CHECK(!path.empty(), kInvalidArgument, "[checkpoint] the checkpoint path is empty; pass a file path");
  const auto slash = path.rfind('/');
  name_ = slash == std::string::npos ? path : path.substr(slash + 1);
  dir_ = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  ASTERIA_CHECK(!name_.empty() && name_ != "." && name_ != "..", kInvalidArgument,
                "[checkpoint] '" << path << "' names a directory; pass a file path such as '" << path
                                 << (path.back() == '/' ? "" : "/") << "checkpoint.pt'");
  const auto& f = opts.test_fault;
  ASTERIA_CHECK(static_cast<int>(f.kind) >= 0 && static_cast<int>(f.kind) <= 4, kInvalidArgument,
                "[checkpoint] unknown test fault kind " << static_cast<int>(f.kind));
  ASTERIA_CHECK(f.chunk_delay_s >= 0.0 && f.chunk_delay_s <= 60.0, kInvalidArgument,
                "[checkpoint] the test fault's chunk delay must be 0..60 seconds, got " << f.chunk_delay_s);
  header_.metadata = metadata;
  prefix_ = encode_header(header_);  // checks the metadata; rewritten with the payload's size and CRC at commit
  dir_fd_ = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd_ < 0) {
    const int e = errno;
    throw Error(ErrorCategory::kIo,
                "[checkpoint] cannot open the directory '" + dir_ + "' of checkpoint '" + path_ + "': " + os_text(e) +
                    ". Fix: create the directory first, or save to an existing, writable directory",
                e);
  }
  auto refuse_create = [&](const std::string& what, int e) {
    ::close(dir_fd_);
    dir_fd_ = -1;
    std::string fix = no_space(e) ? "free space (or inodes) on that file system, or save to another directory"
                                  : "save to a directory you can write to";
    throw Error(ErrorCategory::kIo,
                "[checkpoint] cannot create " + what + " for checkpoint '" + path_ + "': " + os_text(e) + ". Fix: " + fix,
                e);
  };
  // An unnamed file (O_TMPFILE): a crash leaves nothing behind. It gets its name at commit() through
  // /proc/self/fd, so both must be available; otherwise (or on a file system without O_TMPFILE) a
  // named file is used.
  if (opts.temp_file == TempFile::kAuto && ::access("/proc/self/fd", X_OK) == 0) {
    fd_ = ::openat(dir_fd_, ".", O_WRONLY | O_TMPFILE | O_CLOEXEC, 0600);
    if (fd_ < 0 && errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL && errno != ENOENT)
      refuse_create("a temporary file in '" + dir_ + "'", errno);
    if (fd_ >= 0) temp_path_ = dir_ + "/(unnamed temporary file)";
  }
  for (int attempt = 0; fd_ < 0; ++attempt) {
    temp_name_ = temp_name();
    fd_ = ::openat(dir_fd_, temp_name_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd_ >= 0) break;
    const int e = errno;
    if (e == EEXIST && attempt < 16) continue;
    const std::string tried = temp_name_;
    temp_name_.clear();
    refuse_create("the temporary file '" + dir_ + "/" + tried + "'", e);
  }
  if (!temp_name_.empty()) temp_path_ = dir_ + "/" + temp_name_;
  // Owner-only whatever the umask (which can only clear bits of the mode given to open).
  if (::fchmod(fd_, 0600) != 0) fail("cannot make the temporary file private (mode 0600)", errno);
  buffer_.reserve(kWriteBuffer);
}

Writer::~Writer() { abort(); }

std::string Writer::temp_name() const {
  // The name keeps the target's visible in listings and stays far below NAME_MAX (255).
  return "." + name_.substr(0, 200) + "." + random_suffix() + ".tmp";
}

void Writer::abort() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (!committed_ && !temp_name_.empty() && dir_fd_ >= 0) ::unlinkat(dir_fd_, temp_name_.c_str(), 0);
  temp_name_.clear();
  temp_path_.clear();
  if (dir_fd_ >= 0) {
    ::close(dir_fd_);
    dir_fd_ = -1;
  }
  buffer_.clear();
  buffer_.shrink_to_fit();
}

void Writer::fail(const std::string& what, int err) {
  std::ostringstream os;
  os << "[checkpoint] " << what << " while writing checkpoint '" << path_ << "' (temporary file '" << temp_path_
     << "'): " << os_text(err) << ". ";
  if (no_space(err)) {
    const std::uint64_t written = prefix_.size() + file_payload_;
    os << with_commas(written) << " bytes reached the file before the device was full";
    if (opts_.expected_bytes > 0)
      os << "; the checkpoint needs about " << with_commas(prefix_.size() + opts_.expected_bytes) << " bytes";
    os << ". The temporary file was removed and the previous file at the target is untouched. Fix: free space "
          "on the file system of '"
       << dir_ << "' (df -h '" << dir_ << "') or save to a directory with more room";
  } else if (err == EROFS || err == EACCES || err == EPERM) {
    os << "The temporary file was removed and the previous file at the target is untouched. Fix: save to a "
          "directory you can write to";
  } else {
    os << "The temporary file was removed and the previous file at the target is untouched. Fix: check the "
          "device (dmesg) and try again, or save to another directory";
  }
  abort();
  throw Error(ErrorCategory::kIo, os.str(), err);
}

void Writer::write_at(const void* data, std::size_t size, std::uint64_t offset, bool payload) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  std::size_t allowed = size;
  const auto& f = opts_.test_fault;
  const bool faulty = payload && (f.kind == WriterFaultKind::kNoSpace || f.kind == WriterFaultKind::kEio);
  if (faulty) allowed = f.after_bytes > file_payload_ ? static_cast<std::size_t>(std::min<std::uint64_t>(size, f.after_bytes - file_payload_)) : 0;
  std::size_t done = 0;
  while (done < allowed) {
    const ssize_t r = ::pwrite(fd_, p + done, allowed - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail(payload ? "writing the payload failed" : "writing the header failed", errno);
    }
    if (r == 0) fail(payload ? "writing the payload made no progress" : "writing the header made no progress", ENOSPC);
    done += static_cast<std::size_t>(r);
    if (payload) file_payload_ += static_cast<std::uint64_t>(r);
  }
  if (done < size)
    fail("writing the payload failed (test fault)", f.kind == WriterFaultKind::kNoSpace ? ENOSPC : EIO);
}

void Writer::flush() {
  if (buffer_.empty()) return;
  write_at(buffer_.data(), buffer_.size(), prefix_.size() + file_payload_, true);
  buffer_.clear();
}

void Writer::write(const void* data, std::size_t size) {
  ASTERIA_CHECK(fd_ >= 0, kInvalidArgument,
                "[checkpoint] the writer for '" << path_ << "' is closed (committed, aborted or failed); start a new one");
  ASTERIA_CHECK(size <= kMaxPayloadBytes - payload_bytes_, kInvalidArgument,
                "[checkpoint] a payload above 2^62 bytes cannot be stored");
  if (opts_.test_fault.chunk_delay_s > 0)
    std::this_thread::sleep_for(std::chrono::duration<double>(opts_.test_fault.chunk_delay_s));
  if (size == 0) return;
  crc_ = crc32c(data, size, crc_);
  payload_bytes_ += size;
  if (buffer_.size() + size <= kWriteBuffer) {
    const auto* p = static_cast<const std::uint8_t*>(data);
    buffer_.insert(buffer_.end(), p, p + size);
    return;
  }
  flush();
  if (size >= kWriteBuffer) {
    write_at(data, size, prefix_.size() + file_payload_, true);
  } else {
    const auto* p = static_cast<const std::uint8_t*>(data);
    buffer_.insert(buffer_.end(), p, p + size);
  }
}

void Writer::commit() {
  ASTERIA_CHECK(fd_ >= 0 && !committed_, kInvalidArgument,
                "[checkpoint] the writer for '" << path_ << "' is closed (committed, aborted or failed); start a new one");
  flush();
  header_.payload_size = payload_bytes_;
  header_.payload_crc = crc_;
  prefix_ = encode_header(header_);
  write_at(prefix_.data(), prefix_.size(), 0, false);
  const auto kind = opts_.test_fault.kind;
  if (kind == WriterFaultKind::kFsync) fail("fsync of the finished file failed (test fault)", EIO);
  while (::fsync(fd_) != 0) {
    if (errno == EINTR) continue;
    // Never retried: after a failed fsync the kernel may have dropped the dirty pages.
    fail("fsync of the finished file failed, so its data may not be on stable storage; it was not made the "
         "checkpoint",
         errno);
  }
  if (temp_name_.empty()) {
    // The unnamed file gets a temporary name first (linkat cannot replace the target); only a crash
    // between this and the rename below can leave it behind, complete and synced.
    const std::string proc = "/proc/self/fd/" + std::to_string(fd_);
    for (int attempt = 0;; ++attempt) {
      temp_name_ = temp_name();
      if (::linkat(AT_FDCWD, proc.c_str(), dir_fd_, temp_name_.c_str(), AT_SYMLINK_FOLLOW) == 0) break;
      const int e = errno;
      temp_name_.clear();
      if (e == EEXIST && attempt < 16) continue;
      fail("giving the finished file a name in its directory failed", e);
    }
    temp_path_ = dir_ + "/" + temp_name_;
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0 && errno != EINTR) fail("closing the finished file failed", errno);
  if (kind == WriterFaultKind::kRename) fail("renaming the finished file over the target failed (test fault)", EIO);
  // renameat replaces the directory entry: a symbolic link at the target is replaced, not followed.
  if (::renameat(dir_fd_, temp_name_.c_str(), dir_fd_, name_.c_str()) != 0) {
    const int e = errno;
    fail(e == EISDIR ? "the target is a directory, so the finished file cannot be renamed over it"
                     : "renaming the finished file over the target failed",
         e);
  }
  committed_ = true;
  temp_name_.clear();
  temp_path_.clear();
  int sync_err = 0;
  while (::fsync(dir_fd_) != 0) {
    if (errno == EINTR) continue;
    sync_err = errno;
    break;
  }
  abort();  // closes the directory; nothing to remove
  if (sync_err != 0 && sync_err != EINVAL) {  // EINVAL: a file system without directory sync
    throw Error(ErrorCategory::kIo,
                "[checkpoint] checkpoint '" + path_ + "' was written and renamed into place, but syncing its "
                "directory '" + dir_ + "' failed: " + os_text(sync_err) +
                    ". After a power loss the previous file may reappear at that path. Fix: check the device "
                    "(dmesg) and save again",
                sync_err);
  }
}

// ----- Reader -----------------------------------------------------------------------------------
Reader::Reader(const std::string& path) : path_(path) {
  // O_NONBLOCK: opening a FIFO planted at the path must not hang; it has no effect on regular files.
  fd_ = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) {
    const int e = errno;
    std::string fix = e == ENOENT    ? "check the path"
                      : e == ELOOP   ? "it is a symbolic link, which checkpoints are never read through; pass "
                                       "the path of the file itself (os.path.realpath)"
                      : e == EACCES  ? "make the file readable by this user"
                                     : "check the path and the device";
    throw Error(ErrorCategory::kIo, "[checkpoint] cannot open checkpoint '" + path + "': " + os_text(e) + ". Fix: " + fix,
                e);
  }
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const int e = errno;
    close();
    throw Error(ErrorCategory::kIo, "[checkpoint] cannot stat checkpoint '" + path + "': " + os_text(e), e);
  }
  if (S_ISDIR(st.st_mode)) {
    close();
    throw Error(ErrorCategory::kIo, "[checkpoint] '" + path + "' is a directory, not a checkpoint file. Fix: pass "
                                    "the path of a checkpoint file", EISDIR);
  }
  if (!S_ISREG(st.st_mode)) {
    close();
    throw FormatError(FormatReason::kNotACheckpoint,
                      "[checkpoint] '" + path + "' is not an asteria checkpoint: it is not a regular file. Fix: pass "
                      "the path of a file written by asteria.save_checkpoint");
  }
  const std::uint64_t file_size = static_cast<std::uint64_t>(st.st_size);
  std::vector<std::uint8_t> buf;
  // Reads buf.size() - offset bytes at `offset` into buf.
  auto fill = [&](std::size_t offset) {
    std::size_t got = 0;
    const int e = pread_full(fd_, buf.data() + offset, buf.size() - offset, offset, &got);
    if (e > 0) {
      close();
      throw Error(ErrorCategory::kIo, "[checkpoint] reading checkpoint '" + path_ + "' failed: " + os_text(e) +
                                          ". Fix: check the device (dmesg), or resume from another checkpoint", e);
    }
    if (e < 0) throw FormatError(FormatReason::kTorn, "the file shrank while it was being read");
  };
  try {
    buf.resize(static_cast<std::size_t>(std::min<std::uint64_t>(file_size, kHeaderBytes)));
    fill(0);
    header_ = parse_fixed_header(buf.data(), buf.size());
    // The metadata block, or as much of it as the file has (parse_header reports a cut-off block).
    buf.resize(static_cast<std::size_t>(std::min<std::uint64_t>(file_size, header_.payload_offset())));
    fill(kHeaderBytes);
    header_ = parse_header(buf.data(), buf.size());
  } catch (const FormatError& e) {
    corrupt(e.reason(), e.what());
  }
  if (file_size < header_.file_size())
    corrupt(FormatReason::kTorn, "the file has " + with_commas(file_size) + " bytes but its header records " +
                                     with_commas(header_.file_size()) + " (" + std::to_string(kHeaderBytes) +
                                     " header + " + with_commas(header_.metadata_size) + " metadata + " +
                                     with_commas(header_.payload_size) +
                                     " payload): it was cut short (a crash, a full disk or an interrupted copy)");
  if (file_size > header_.file_size())
    corrupt(FormatReason::kTorn, "the file has " + with_commas(file_size - header_.file_size()) +
                                     " bytes after the end its header records (" + with_commas(header_.file_size()) +
                                     " bytes): something was appended to it");
}

Reader::~Reader() { close(); }

void Reader::close() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void Reader::corrupt(FormatReason reason, const std::string& what) {
  close();
  std::string msg = "[checkpoint] '" + path_ + "' ";
  switch (reason) {
    case FormatReason::kNotACheckpoint:
      msg += "is not an asteria checkpoint: " + what +
             ". Fix: pass a file written by asteria.save_checkpoint (a plain torch.save file loads with "
             "torch.load(path, weights_only=True))";
      break;
    case FormatReason::kUnsupported:
      msg += "cannot be read: " + what + ". Fix: read it with the asteria version that wrote it, or resume from "
             "an earlier checkpoint";
      break;
    default:
      msg += std::string("is ") + (reason == FormatReason::kTorn ? "torn" : "corrupted") + ": " + what +
             ". Fix: resume from an earlier checkpoint (or copy this one again from an intact source); this file "
             "cannot be loaded";
      break;
  }
  throw FormatError(reason, msg);
}

void Reader::verify() {
  ASTERIA_CHECK(fd_ >= 0, kInvalidArgument, "[checkpoint] the reader of '" << path_ << "' is closed");
  std::vector<std::uint8_t> chunk(static_cast<std::size_t>(std::min<std::uint64_t>(header_.payload_size, kReadChunk)));
  std::uint32_t crc = 0;
  for (std::uint64_t done = 0; done < header_.payload_size;) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), header_.payload_size - done));
    const std::size_t got = read(done, chunk.data(), n);
    if (got != n) corrupt(FormatReason::kTorn, "the file shrank while its payload was being verified");
    crc = crc32c(chunk.data(), n, crc);
    done += n;
  }
  if (crc != header_.payload_crc)
    corrupt(FormatReason::kCorrupted, "the payload's CRC32C is " + hex32(crc) + " but the header records " +
                                          hex32(header_.payload_crc) +
                                          ": payload bytes changed after it was written (a failing disk or a bad copy)");
}

std::size_t Reader::read(std::uint64_t offset, void* dst, std::size_t size) const {
  ASTERIA_CHECK(fd_ >= 0, kInvalidArgument, "[checkpoint] the reader of '" << path_ << "' is closed");
  if (offset >= header_.payload_size) return 0;
  const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(size, header_.payload_size - offset));
  std::size_t got = 0;
  const int e = pread_full(fd_, dst, n, header_.payload_offset() + offset, &got);
  if (e > 0)
    throw Error(ErrorCategory::kIo, "[checkpoint] reading checkpoint '" + path_ + "' failed: " + os_text(e) +
                                        ". Fix: check the device (dmesg), or resume from another checkpoint", e);
  return got;  // short only when the file shrank after it was opened
}

}  // namespace asteria::checkpoint
