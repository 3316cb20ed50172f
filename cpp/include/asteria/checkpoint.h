#pragma once
// asteria::checkpoint — a crash-safe checkpoint file: a fixed header, a small metadata block and an
// opaque payload (the bytes torch.save produces), each protected by a CRC32C.
//
// On-disk layout (version 1, all integers little-endian):
//
//   offset size  field
//        0    8  magic "ASTERIA\x1a"
//        8    4  format version (1)
//       12    4  header size in bytes (64)
//       16    8  metadata size in bytes (<= kMaxMetadataBytes)
//       24    8  payload size in bytes
//       32    4  CRC32C of the metadata block
//       36    4  CRC32C of the payload
//       40   20  reserved, zero
//       60    4  CRC32C of header bytes 0..59
//       64    -  metadata block: u32 entry count, then per entry u16 key size, key, u32 value size,
//                value; keys strictly ascending (so every metadata map has exactly one encoding)
//   64+meta  -  payload
//
// The file size must equal header + metadata + payload: a torn (cut short) or appended file is
// refused. parse_header() and encode_header() are pure functions (no I/O, no globals) and are the
// fuzz target. Writer creates the file out of place and renames it over the target only once every
// byte is on stable storage, so the previous file at the target survives any failure or crash.
// Reader verifies a file before anything reads its payload.
// Thread safety: Writer and Reader are single-owner objects (one thread at a time); the free
// functions may be called from any thread.

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "asteria/errors.h"

namespace asteria::checkpoint {

inline constexpr char kMagic[8] = {'A', 'S', 'T', 'E', 'R', 'I', 'A', '\x1a'};
inline constexpr std::uint32_t kFormatVersion = 1;
inline constexpr std::size_t kHeaderBytes = 64;
// Metadata limits: a small block of labels (step, versions, user notes), never bulk data.
inline constexpr std::size_t kMaxMetadataEntries = 64;
inline constexpr std::size_t kMaxKeyBytes = 64;        // keys: [A-Za-z0-9_.-], 1..64 bytes
inline constexpr std::size_t kMaxValueBytes = 4096;    // values: printable UTF-8, 0..4096 bytes
inline constexpr std::size_t kMaxMetadataBytes = 64 * 1024;
// The largest payload a header may record (2^62 bytes): keeps every offset sum far from overflow.
inline constexpr std::uint64_t kMaxPayloadBytes = std::uint64_t{1} << 62;

using Metadata = std::map<std::string, std::string>;

// Why bytes were refused.
enum class FormatReason : int {
  kNotACheckpoint = 0,  // no magic: some other file
  kTorn = 1,            // cut short (or longer than its header says)
  kCorrupted = 2,       // a CRC mismatch or a field no writer produces
  kUnsupported = 3,     // a format version this build does not read
  kInvalidMetadata = 4, // metadata a writer was asked to store breaks the limits
};
const char* reason_name(FormatReason r) noexcept;  // "not_a_checkpoint", "torn", ...

// A file that is not a checkpoint, or one that is torn or corrupted, or metadata that cannot be
// stored. Category kInvalidArgument; the Python binding raises it as asteria.CheckpointError (a
// ValueError) with the reason in its `reason` attribute.
class FormatError : public Error {
 public:
  FormatError(FormatReason reason, const std::string& message)
      : Error(ErrorCategory::kInvalidArgument, message), reason_(reason) {}
  FormatReason reason() const noexcept { return reason_; }

 private:
  FormatReason reason_;
};

// Everything in front of the payload.
struct Header {
  std::uint32_t version = kFormatVersion;
  std::uint64_t payload_size = 0;
  std::uint32_t payload_crc = 0;  // CRC32C of the payload
  Metadata metadata;
  // Filled in by parse_header (encode_header computes them): sizes and CRC of the metadata block.
  std::uint64_t metadata_size = 0;
  std::uint32_t metadata_crc = 0;

  std::uint64_t payload_offset() const noexcept { return kHeaderBytes + metadata_size; }
  std::uint64_t file_size() const noexcept { return payload_offset() + payload_size; }
  // Equality of what the file records (version, sizes, CRCs, metadata).
  bool operator==(const Header&) const = default;
};

// Throws FormatError (reason kInvalidMetadata) unless every key and value may be stored and the
// encoded block fits kMaxMetadataBytes (see the limits above).
void check_metadata(const Metadata& metadata);

// The fixed 64-byte header alone, from the first `size` bytes at `data`: fills every field but
// `metadata` (metadata_size and metadata_crc come from the header). Throws FormatError saying what
// is wrong: not a checkpoint (bad magic), too short, header CRC mismatch, unsupported version,
// non-zero reserved bytes, sizes out of range. Never reads outside [data, data + size).
Header parse_fixed_header(const std::uint8_t* data, std::size_t size);

// Header and metadata block from the first `size` bytes at `data` (bytes after the metadata are
// ignored): parse_fixed_header, then the metadata block (its CRC, then strict parsing: entry count,
// sizes, key character set, UTF-8 of values, ascending unique keys, no trailing bytes). Throws
// FormatError. Pure: no I/O, never reads outside [data, data + size).
Header parse_header(const std::uint8_t* data, std::size_t size);

// The bytes of the fixed header and the metadata block (payload_offset() bytes) for `h` (its
// metadata_size and metadata_crc are computed, the given values ignored). parse_header(encode_header(h))
// equals h with those two fields filled in. Throws FormatError for metadata that cannot be stored or
// a payload size above kMaxPayloadBytes.
std::vector<std::uint8_t> encode_header(const Header& h);

// TEST HOOK, off by default: makes a Writer fail on purpose at a chosen point, so that the promise
// "the previous file at the target survives" can be tested without a failing drive. Never set it
// in production code.
enum class WriterFaultKind : int {
  kNone = 0,
  kNoSpace = 1,  // the payload write fails with ENOSPC once `after_bytes` payload bytes are written
  kEio = 2,      // the payload write fails with EIO once `after_bytes` payload bytes are written
  kFsync = 3,    // fsync of the finished temporary file fails with EIO
  kRename = 4,   // renaming the temporary file over the target fails with EIO
};
struct WriterFault {
  WriterFaultKind kind = WriterFaultKind::kNone;
  std::uint64_t after_bytes = 0;  // kNoSpace/kEio: payload bytes that reach the file first
  // Seconds slept at every write() call (0..60), so a test can kill the process in the middle of a
  // checkpoint write.
  double chunk_delay_s = 0.0;
};

enum class TempFile : int {
  kAuto = 0,   // an unnamed file (O_TMPFILE) when the file system and /proc allow it, else kNamed
  kNamed = 1,  // a named file ".<name>.<random>.tmp" from the start
};

struct WriterOptions {
  // Expected payload bytes (0: unknown). Only used to say how much space is needed when the device
  // fills up.
  std::uint64_t expected_bytes = 0;
  // How the temporary file is created (kNamed: for tests of that path; kAuto in production).
  TempFile temp_file = TempFile::kAuto;
  // Test hook (see WriterFault); kNone in production.
  WriterFault test_fault;
};

// Writes a checkpoint crash-safely. The constructor creates a temporary file in the target's
// directory, mode 0600 whatever the umask: an unnamed one (O_TMPFILE) where the file system allows
// it, else one with a random name (O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC). write() streams payload
// bytes into it (buffered, CRC computed on the way). commit() writes the header, fsyncs the file,
// gives an unnamed file its random temporary name (linkat), renames it over the target (a symbolic
// link at the target is replaced, never followed) and fsyncs the directory. Any failure removes the
// temporary file and throws; the previous file at the target is never modified. abort() and the
// destructor remove the temporary file of an uncommitted writer. A crash (SIGKILL, power loss)
// leaves nothing behind with an unnamed file, except in the instant between linkat and rename
// (then a complete ".<name>.<random>.tmp"); a named temporary file stays behind, but it never has
// a valid header (the header is written last) and can be deleted.
// Errors: kIo with errno (naming the paths, the bytes written and needed, and the fix), FormatError
// for metadata that cannot be stored. Not thread-safe; write() blocks on I/O.
class Writer {
 public:
  Writer(const std::string& path, const Metadata& metadata, const WriterOptions& opts = {});
  ~Writer();
  // Not copyable or movable: owns the file descriptors and the temporary file.
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Appends `size` payload bytes. Throws kIo (the writer is then aborted).
  void write(const void* data, std::size_t size);
  // Makes the file the checkpoint at the target path (see the class comment). Throws kIo (the writer
  // is then aborted and the target untouched, except for a failed directory sync after the rename,
  // which the message says). At most once.
  void commit();
  // Removes the temporary file; the target is untouched. Safe to call at any time, repeatedly.
  void abort() noexcept;

  const std::string& path() const noexcept { return path_; }
  // The temporary file ("<dir>/(unnamed temporary file)" while it has no name; "" once committed or
  // aborted).
  const std::string& temp_path() const noexcept { return temp_path_; }
  // True while the temporary file has no name (O_TMPFILE, before commit()).
  bool unnamed() const noexcept { return fd_ >= 0 && temp_name_.empty(); }
  std::uint64_t payload_bytes() const noexcept { return payload_bytes_; }
  bool committed() const noexcept { return committed_; }

 private:
  std::string temp_name() const;                     // a fresh random temporary name
  void flush();                                      // the buffer to the file
  void write_at(const void* data, std::size_t size, std::uint64_t offset, bool payload);
  [[noreturn]] void fail(const std::string& what, int err);  // aborts, then throws kIo

  std::string path_, dir_, name_, temp_name_, temp_path_;
  WriterOptions opts_;
  Header header_;
  std::vector<std::uint8_t> prefix_;  // encoded header + metadata (header CRC filled at commit)
  std::vector<std::uint8_t> buffer_;
  std::uint64_t payload_bytes_ = 0;   // accepted by write()
  std::uint64_t file_payload_ = 0;    // payload bytes that reached the file
  std::uint32_t crc_ = 0;
  int fd_ = -1, dir_fd_ = -1;
  bool committed_ = false;
};

// Opens and verifies a checkpoint. The constructor opens the file (O_RDONLY|O_NOFOLLOW|O_CLOEXEC; a
// symbolic link is refused), reads and parses the header and metadata, and checks that the file
// size equals header + metadata + payload. verify() streams the payload through the CRC (bounded
// memory). read() gives positioned reads of the payload.
// Errors: kIo with errno for the operating system's refusals; FormatError naming the file, saying
// whether it is not a checkpoint, torn or corrupted, and what to do. Not thread-safe (one owner);
// every method may block on I/O.
class Reader {
 public:
  explicit Reader(const std::string& path);
  ~Reader();
  // Not copyable or movable: owns the file descriptor.
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  const Header& header() const noexcept { return header_; }
  const std::string& path() const noexcept { return path_; }
  // Checks the payload CRC (reads the whole payload once, in 1 MiB pieces). Throws FormatError on
  // a mismatch, kIo when reading fails.
  void verify();
  // Copies up to `size` payload bytes from payload offset `offset` to `dst`; returns the bytes copied
  // (fewer only at the end of the payload, 0 at or past it). Throws kIo.
  std::size_t read(std::uint64_t offset, void* dst, std::size_t size) const;
  void close() noexcept;

 private:
  // Closes the file and throws FormatError naming the file, what is wrong and the fix.
  [[noreturn]] void corrupt(FormatReason reason, const std::string& what);

  std::string path_;
  Header header_;
  int fd_ = -1;
};

}  // namespace asteria::checkpoint
