#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "asteria/checkpoint.h"
#include "asteria/errors.h"
#include "message.h"

namespace py = pybind11;
namespace ck = asteria::checkpoint;

namespace {

// A contiguous buffer of a Python object (bytes, bytearray, memoryview, numpy array...), released on
// destruction.
struct BufferView {
  Py_buffer view{};
  BufferView(const py::handle& obj, bool writable) {
    if (PyObject_GetBuffer(obj.ptr(), &view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~BufferView() { PyBuffer_Release(&view); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  void* data() const { return view.buf; }
  std::size_t size() const { return static_cast<std::size_t>(view.len); }
};

// Writes smaller than this keep the GIL (torch.save issues many tiny writes; releasing costs more).
constexpr std::size_t kReleaseGilBytes = 64 * 1024;

// The Python objects hold shared pointers, and each call that releases the GIL keeps its own copy
// (`get()`), so a close() or abort() from another thread meanwhile cannot free the object mid-call.
struct PyWriter {
  std::shared_ptr<ck::Writer> w;
  std::string path;
  std::shared_ptr<ck::Writer> get() const {
    ASTERIA_CHECK(w != nullptr, kInvalidArgument,
                  "[checkpoint] the writer for '" << path << "' is closed (committed, aborted or failed); start a new one");
    return w;
  }
};

struct PyReader {
  std::shared_ptr<ck::Reader> r;
  std::string path;
  std::shared_ptr<ck::Reader> get() const {
    ASTERIA_CHECK(r != nullptr, kInvalidArgument, "[checkpoint] the reader of '" << path << "' is closed");
    return r;
  }
};

ck::WriterFaultKind parse_fault(const std::string& kind) {
  if (kind == "none") return ck::WriterFaultKind::kNone;
  if (kind == "enospc") return ck::WriterFaultKind::kNoSpace;
  if (kind == "eio") return ck::WriterFaultKind::kEio;
  if (kind == "fsync") return ck::WriterFaultKind::kFsync;
  if (kind == "rename") return ck::WriterFaultKind::kRename;
  ASTERIA_CHECK(false, kInvalidArgument,
                "[checkpoint] test fault kind must be 'none', 'enospc', 'eio', 'fsync' or 'rename', got '" << kind << "'");
  return ck::WriterFaultKind::kNone;
}

py::dict header_dict(const ck::Header& h) {
  py::dict d;
  d["format_version"] = h.version;
  d["header_bytes"] = ck::kHeaderBytes;
  d["metadata_bytes"] = h.metadata_size;
  d["payload_bytes"] = h.payload_size;
  d["payload_offset"] = h.payload_offset();
  d["file_bytes"] = h.file_size();
  d["metadata_crc32c"] = h.metadata_crc;
  d["payload_crc32c"] = h.payload_crc;
  d["metadata"] = h.metadata;
  return d;
}

}  // namespace

void init_checkpoint(py::module_& m) {
  // asteria.CheckpointError: a ValueError with `reason` ("not_a_checkpoint", "torn", "corrupted",
  // "unsupported", "invalid_metadata"). Registered after init_errors, so this translator runs first.
  static py::handle checkpoint_error = py::exception<ck::FormatError>(m, "CheckpointError", PyExc_ValueError).release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ck::FormatError& e) {
      const py::object msg = asteria_py::message_text(e.what());
      if (!msg) return;  // out of memory: that error is set
      py::object err = py::reinterpret_steal<py::object>(PyObject_CallFunction(checkpoint_error.ptr(), "O", msg.ptr()));
      if (!err) return;  // the call set a Python error already
      err.attr("reason") = ck::reason_name(e.reason());
      PyErr_SetObject(checkpoint_error.ptr(), err.ptr());
    }
  });

  auto c = m.def_submodule("checkpoint", "Crash-safe checkpoint files (private: use asteria.save_checkpoint/load_checkpoint)");
  c.attr("HEADER_BYTES") = ck::kHeaderBytes;
  c.attr("FORMAT_VERSION") = ck::kFormatVersion;
  c.attr("MAX_METADATA_ENTRIES") = ck::kMaxMetadataEntries;
  c.attr("MAX_KEY_BYTES") = ck::kMaxKeyBytes;
  c.attr("MAX_VALUE_BYTES") = ck::kMaxValueBytes;
  c.attr("MAX_METADATA_BYTES") = ck::kMaxMetadataBytes;

  c.def(
      "parse_header",
      [](const py::buffer& data) {
        BufferView v(data, false);
        return header_dict(ck::parse_header(static_cast<const std::uint8_t*>(v.data()), v.size()));
      },
      py::arg("data"), "Parse the header and metadata block at the start of `data` (raises CheckpointError).");
  c.def(
      "encode_header",
      [](std::uint64_t payload_size, std::uint32_t payload_crc32c, const ck::Metadata& metadata) {
        ck::Header h;
        h.payload_size = payload_size;
        h.payload_crc = payload_crc32c;
        h.metadata = metadata;
        const auto bytes = ck::encode_header(h);
        return py::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
      },
      py::arg("payload_size"), py::arg("payload_crc32c"), py::arg("metadata"),
      "The header and metadata bytes of a checkpoint with this payload size, payload CRC and metadata.");

  py::class_<PyWriter>(c, "Writer", "Writes one checkpoint out of place; commit() renames it over the target.")
      .def(py::init([](const std::string& path, const ck::Metadata& metadata, std::uint64_t expected_bytes,
                       bool named_temp, const std::string& test_fault, std::uint64_t fault_after_bytes,
                       double chunk_delay_s) {
             ck::WriterOptions o;
             o.expected_bytes = expected_bytes;
             o.temp_file = named_temp ? ck::TempFile::kNamed : ck::TempFile::kAuto;
             o.test_fault.kind = parse_fault(test_fault);
             o.test_fault.after_bytes = fault_after_bytes;
             o.test_fault.chunk_delay_s = chunk_delay_s;
             auto p = std::make_unique<PyWriter>();
             p->path = path;
             p->w = std::make_shared<ck::Writer>(path, metadata, o);
             return p;
           }),
           py::arg("path"), py::arg("metadata") = ck::Metadata{}, py::kw_only(), py::arg("expected_bytes") = 0,
           py::arg("named_temp") = false, py::arg("test_fault") = "none", py::arg("fault_after_bytes") = 0, py::arg("chunk_delay_s") = 0.0)
      .def(
          "write",
          [](PyWriter& p, const py::buffer& data) {
            const auto w = p.get();
            BufferView v(data, false);
            try {
              if (v.size() >= kReleaseGilBytes) {
                py::gil_scoped_release nogil;
                w->write(v.data(), v.size());
              } else {
                w->write(v.data(), v.size());
              }
            } catch (...) {
              p.w.reset();  // the writer aborted itself; this object is closed now
              throw;
            }
            return v.size();
          },
          py::arg("data"), "Append payload bytes; returns how many. A failure removes the temporary file and raises OSError.")
      .def(
          "commit",
          [](PyWriter& p) {
            const auto w = p.get();
            struct Close {
              PyWriter& p;
              ~Close() { p.w.reset(); }
            } close{p};
            py::gil_scoped_release nogil;
            w->commit();
          },
          "Write the header, fsync, rename over the target and fsync the directory (GIL released).")
      .def("abort", [](PyWriter& p) { p.w.reset(); }, "Remove the temporary file; the target is untouched.")
      .def_property_readonly("path", [](const PyWriter& p) { return p.path; })
      .def_property_readonly("temp_path", [](const PyWriter& p) { return p.w ? p.w->temp_path() : std::string(); })
      .def_property_readonly("payload_bytes", [](const PyWriter& p) { return p.w ? p.w->payload_bytes() : 0; })
      .def_property_readonly("unnamed", [](const PyWriter& p) { return p.w && p.w->unnamed(); })
      .def_property_readonly("closed", [](const PyWriter& p) { return p.w == nullptr; });

  py::class_<PyReader>(c, "Reader", "An opened, size-checked checkpoint file.")
      .def(py::init([](const std::string& path) {
             auto p = std::make_unique<PyReader>();
             p->path = path;
             py::gil_scoped_release nogil;
             p->r = std::make_shared<ck::Reader>(path);
             return p;
           }),
           py::arg("path"))
      .def("header", [](PyReader& p) { return header_dict(p.get()->header()); })
      .def(
          "verify",
          [](PyReader& p) {
            const auto r = p.get();
            py::gil_scoped_release nogil;
            r->verify();
          },
          "Check the payload CRC32C, reading the payload once (GIL released); raises CheckpointError.")
      .def(
          "readinto",
          [](PyReader& p, std::uint64_t offset, const py::buffer& out) {
            const auto r = p.get();
            BufferView v(out, true);
            if (v.size() >= kReleaseGilBytes) {
              py::gil_scoped_release nogil;
              return r->read(offset, v.data(), v.size());
            }
            return r->read(offset, v.data(), v.size());
          },
          py::arg("offset"), py::arg("buffer"),
          "Copy payload bytes from `offset` into the writable buffer; returns how many (0 at the end).")
      .def_property_readonly("payload_bytes", [](PyReader& p) { return p.get()->header().payload_size; })
      .def_property_readonly("closed", [](const PyReader& p) { return p.r == nullptr; })
      .def("close", [](PyReader& p) { p.r.reset(); })
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyReader& p, py::args) { p.r.reset(); });
}
