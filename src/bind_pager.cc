#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

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
  std::vector<std::shared_ptr<Lease>> registered;  // buffers registered for fixed I/O

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

asteria::PagerFault parse_fault(const std::string& kind, const std::string& op, std::uint64_t skip,
                                std::uint64_t count) {
  asteria::PagerFault f;
  if (kind == "none") f.kind = asteria::PagerFaultKind::kNone;
  else if (kind == "eio") f.kind = asteria::PagerFaultKind::kEio;
  else if (kind == "short") f.kind = asteria::PagerFaultKind::kShortTransfer;
  else if (kind == "enospc") f.kind = asteria::PagerFaultKind::kNoSpace;
  else if (kind == "partial") f.kind = asteria::PagerFaultKind::kPartialTransfer;
  else
    ASTERIA_CHECK(false, kInvalidArgument,
                  "[pager] test fault kind must be 'none', 'eio', 'short', 'enospc' or 'partial', got '" << kind << "'");
  if (op == "any") f.op = asteria::PagerFaultOp::kAny;
  else if (op == "read") f.op = asteria::PagerFaultOp::kRead;
  else if (op == "write") f.op = asteria::PagerFaultOp::kWrite;
  else ASTERIA_CHECK(false, kInvalidArgument, "[pager] test fault op must be 'any', 'read' or 'write', got '" << op << "'");
  f.skip = skip;
  f.count = count;
  return f;
}

void close_pager(PyPager& p) {
  {
    py::gil_scoped_release nogil;
    p.pager.reset();
  }
  p.pinned.clear();
  p.registered.clear();
}

}  // namespace

void init_pager(py::module_& m) {
  m.def("pager_built_with_io_uring", &asteria::pager_built_with_io_uring,
        "Whether this build has the pager's io_uring backend (liburing linked).");
  m.def("crc32c", [](py::buffer b) {
    py::buffer_info info = b.request();
    return asteria::crc32c(info.ptr, static_cast<std::size_t>(info.size * info.itemsize));
  }, py::arg("data"), "CRC32C (Castagnoli) of a buffer.");

  py::class_<PyPager>(m, "Pager", "Extents of a private swap file, read and written asynchronously (io_uring or threads).")
      .def(py::init([](const std::string& directory, const std::string& backend, unsigned queue_depth, int io_threads,
                       bool direct_io, bool keep_swap_name) {
             asteria::PagerOptions o;
             o.parent_dir = directory;
             o.backend = parse_backend(backend);
             o.queue_depth = queue_depth;
             o.io_threads = io_threads;
             o.direct_io = direct_io;  // the test hook is armed with set_test_fault()
             o.keep_swap_name = keep_swap_name;
             auto p = std::make_unique<PyPager>();
             p->pager = std::make_unique<Pager>(o);
             return p;
           }),
           py::kw_only(), py::arg("directory") = "", py::arg("backend") = "auto", py::arg("queue_depth") = 64,
           py::arg("io_threads") = 2, py::arg("direct_io") = true, py::arg("keep_swap_name") = false,
           "directory: parent of the private swap directory ('' : $TMPDIR or /tmp). keep_swap_name: keep the swap "
           "file's name and its directory until close() (for debugging); by default both are removed as soon as "
           "the file is open, so nothing is left on disk even when the process is killed.")
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
      .def(
          "register_buffers",
          [](PyPager& p, std::vector<std::shared_ptr<Lease>> leases) {
            std::vector<std::pair<void*, std::size_t>> bufs;
            for (const auto& l : leases) {
              ASTERIA_CHECK(l && l->valid(), kInvalidArgument, "[pager.register_buffers] invalid lease");
              bufs.emplace_back(l->data(), l->capacity());
            }
            const bool ok = p.get().register_buffers(bufs);
            p.registered = ok ? std::move(leases) : std::vector<std::shared_ptr<Lease>>{};
            return ok;
          },
          py::arg("leases"),
          "Register leases for fixed io_uring reads/writes (replacing earlier ones; [] unregisters). No request "
          "may be in flight. Returns False (stats()['registration_error'] says why) when the backend cannot; "
          "the pager keeps the leases alive while they are registered.")
      .def(
          "set_test_fault",
          [](PyPager& p, const std::string& kind, const std::string& op, std::uint64_t skip, std::uint64_t count) {
            p.get().set_test_fault(parse_fault(kind, op, skip, count));
          },
          py::arg("kind"), py::kw_only(), py::arg("op") = "any", py::arg("skip") = 0, py::arg("count") = 1,
          "TEST HOOK: after `skip` matching requests succeed, the next `count` fail: 'eio', 'short' (half moves, "
          "then no progress), 'enospc' (writes), 'partial' (half moves first; the pager must finish it), 'none' "
          "disarms. Never use it in production.")
      .def_property_readonly("directory", [](PyPager& p) { return p.get().directory(); },
                             "The private swap directory (removed at creation unless keep_swap_name).")
      .def_property_readonly("swap_path", [](PyPager& p) { return p.get().swap_path(); },
                             "The swap file's path (unlinked at creation unless keep_swap_name).")
      .def("stats", [](PyPager& p) {
        auto s = p.get().stats();
        py::dict d;
        d["backend"] = s.backend;
        d["fallback_reason"] = s.fallback_reason;
        d["direct_io"] = s.direct_io;
        d["directory"] = s.directory;
        d["swap_name_kept"] = s.swap_name_kept;
        d["writes"] = s.writes;
        d["reads"] = s.reads;
        d["bytes_written"] = s.bytes_written;
        d["bytes_read"] = s.bytes_read;
        d["extents"] = s.extents;
        d["file_bytes"] = s.file_bytes;
        d["preallocated_bytes"] = s.preallocated_bytes;
        d["preallocation_error"] = s.preallocation_error;
        d["io_errors"] = s.io_errors;
        d["crc_failures"] = s.crc_failures;
        d["faults_injected"] = s.faults_injected;
        d["registered_buffers"] = s.registered_buffers;
        d["registered_bytes"] = s.registered_bytes;
        d["fixed_ops"] = s.fixed_ops;
        d["registration_error"] = s.registration_error;
        d["read_busy_s"] = s.read_busy_s;
        d["write_busy_s"] = s.write_busy_s;
        return d;
      })
      .def("close", &close_pager,
           "Wait for I/O in flight, then close the swap file, which frees its space, and remove a kept name "
           "(idempotent).")
      .def_property_readonly("closed", [](PyPager& p) { return p.pager == nullptr; })
      .def("__enter__", [](PyPager& p) -> PyPager& { return p; }, py::return_value_policy::reference)
      .def("__exit__", [](PyPager& p, py::args) { close_pager(p); });
}
