#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <memory>

#include "asteria/errors.h"
#include "asteria/host_memory.h"
#include "asteria/pager.h"

namespace py = pybind11;
using asteria::Lease;
using asteria::Pager;

namespace {

// Keeps the Lease of every request in flight alive until its wait() returns.
struct PyPager {
  std::unique_ptr<Pager> pager;
  std::map<asteria::TicketId, std::shared_ptr<Lease>> pinned;

  Pager& get() {
    ASTERIA_CHECK(pager != nullptr, kInvalidArgument, "[pager] the pager is closed");
    return *pager;
  }
};

asteria::PagerBackend parse_backend(const std::string& b) {
  if (b == "auto") return asteria::PagerBackend::kAuto;
  if (b == "io_uring") return asteria::PagerBackend::kIoUring;
  if (b == "threads") return asteria::PagerBackend::kThreads;
  ASTERIA_CHECK(false, kInvalidArgument, "[pager] backend must be 'auto', 'io_uring' or 'threads', got '" << b << "'");
  return asteria::PagerBackend::kAuto;
}

}  // namespace

void init_pager(py::module_& m) {
  m.def("crc32c", [](py::buffer b) {
    py::buffer_info info = b.request();
    return asteria::crc32c(info.ptr, static_cast<std::size_t>(info.size * info.itemsize));
  }, py::arg("data"), "CRC32C (Castagnoli) of a buffer.");

  py::class_<PyPager>(m, "Pager", "Extents of a private swap file, read and written asynchronously (io_uring or threads).")
      .def(py::init([](const std::string& directory, const std::string& backend, unsigned queue_depth, int io_threads,
                       bool direct_io) {
             asteria::PagerOptions o;
             o.parent_dir = directory;
             o.backend = parse_backend(backend);
             o.queue_depth = queue_depth;
             o.io_threads = io_threads;
             o.direct_io = direct_io;
             auto p = std::make_unique<PyPager>();
             p->pager = std::make_unique<Pager>(o);
             return p;
           }),
           py::kw_only(), py::arg("directory") = "", py::arg("backend") = "auto", py::arg("queue_depth") = 64,
           py::arg("io_threads") = 2, py::arg("direct_io") = true)
      .def("allocate", [](PyPager& p, std::size_t nbytes) { return p.get().allocate(nbytes); }, py::arg("nbytes"))
      .def("release", [](PyPager& p, asteria::ExtentId e) { p.get().release(e); }, py::arg("extent"))
      .def(
          "write",
          [](PyPager& p, asteria::ExtentId e, std::shared_ptr<Lease> lease, std::size_t nbytes) {
            ASTERIA_CHECK(lease && lease->valid(), kInvalidArgument, "[pager.write] invalid lease");
            if (nbytes == 0) nbytes = lease->size();
            ASTERIA_CHECK(nbytes <= lease->size(), kInvalidArgument,
                          "[pager.write] nbytes " << nbytes << " exceeds the lease's " << lease->size() << " bytes");
            auto t = p.get().write(e, lease->data(), nbytes);
            p.pinned[t] = std::move(lease);
            return t;
          },
          py::arg("extent"), py::arg("lease"), py::arg("nbytes") = 0,
          "Queue a write of the lease's first nbytes bytes (all when 0); returns a ticket.")
      .def(
          "read",
          [](PyPager& p, asteria::ExtentId e, std::shared_ptr<Lease> lease) {
            ASTERIA_CHECK(lease && lease->valid(), kInvalidArgument, "[pager.read] invalid lease");
            ASTERIA_CHECK(lease->capacity() >= asteria::pager_io_size(p.get().extent_bytes(e)), kInvalidArgument,
                          "[pager.read] the lease is smaller than extent " << e);
            auto t = p.get().read(e, lease->data());
            p.pinned[t] = std::move(lease);
            return t;
          },
          py::arg("extent"), py::arg("lease"), "Queue a read of the extent into the lease; returns a ticket.")
      .def(
          "wait",
          [](PyPager& p, asteria::TicketId t) {
            Pager& pager = p.get();
            struct Unpin {
              PyPager& p;
              asteria::TicketId t;
              ~Unpin() { p.pinned.erase(t); }
            } unpin{p, t};
            py::gil_scoped_release nogil;
            pager.wait(t);
          },
          py::arg("ticket"), "Block until the request completes (GIL released); raises OSError on failure.")
      .def("ready", [](PyPager& p, asteria::TicketId t) { return p.get().ready(t); }, py::arg("ticket"))
      .def_property_readonly("directory", [](PyPager& p) { return p.get().directory(); })
      .def_property_readonly("swap_path", [](PyPager& p) { return p.get().swap_path(); })
      .def("stats", [](PyPager& p) {
        auto s = p.get().stats();
        py::dict d;
        d["backend"] = s.backend;
        d["fallback_reason"] = s.fallback_reason;
        d["direct_io"] = s.direct_io;
        d["directory"] = s.directory;
        d["writes"] = s.writes;
        d["reads"] = s.reads;
        d["bytes_written"] = s.bytes_written;
        d["bytes_read"] = s.bytes_read;
        d["extents"] = s.extents;
        d["file_bytes"] = s.file_bytes;
        d["io_errors"] = s.io_errors;
        d["crc_failures"] = s.crc_failures;
        return d;
      })
      .def("close", [](PyPager& p) {
        {
          py::gil_scoped_release nogil;
          p.pager.reset();
        }
        p.pinned.clear();
      }, "Wait for I/O in flight, then remove the swap directory (idempotent).")
      .def("__enter__", [](PyPager& p) -> PyPager& { return p; }, py::return_value_policy::reference)
      .def("__exit__", [](PyPager& p, py::args) {
        {
          py::gil_scoped_release nogil;
          p.pager.reset();
        }
        p.pinned.clear();
      });
}
