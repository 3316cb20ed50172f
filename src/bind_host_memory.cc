#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>

#include "asteria/cuda.h"
#include "asteria/errors.h"
#include "asteria/host_memory.h"
#include "convert.h"

namespace py = pybind11;
using asteria::DeferredCopy;
using asteria::Lease;
using asteria::PinnedPool;

void init_host_memory(py::module_& m) {
  // A Lease is exposed as a writable 1-D byte buffer. Every view of it (memoryview, numpy,
  // torch.frombuffer) holds a reference to the Lease object, so the memory cannot be returned to
  // the pool while a view exists; there is deliberately no explicit release().
  py::class_<Lease, std::shared_ptr<Lease>>(m, "Lease", py::buffer_protocol(),
                                            "Page-aligned pinned host memory from a PinnedPool.")
      .def_buffer([](Lease& l) -> py::buffer_info {
        return py::buffer_info(l.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(l.size())}, {1}, /*readonly=*/false);
      })
      .def_property_readonly("nbytes", &Lease::size)
      .def_property_readonly("capacity", &Lease::capacity)
      .def_property_readonly("locked", &Lease::locked)
      .def_property_readonly("address", [](const Lease& l) { return reinterpret_cast<std::uintptr_t>(l.data()); })
      .def("__len__", &Lease::size);

  py::class_<PinnedPool, std::shared_ptr<PinnedPool>>(m, "PinnedPool",
                                                      "Page-locked host memory under a byte budget.")
      .def(py::init([](std::size_t budget_bytes, bool lock, std::optional<std::size_t> max_locked_bytes,
                       bool cache_released, bool cuda_register) {
             asteria::PinnedPoolOptions o;
             o.budget_bytes = budget_bytes;
             o.lock = lock;
             o.max_locked_bytes = max_locked_bytes;
             o.cache_released = cache_released;
             if (cuda_register) {
               ASTERIA_CHECK(asteria::cuda::built_with_cuda(), kUnavailable,
                             "[PinnedPool] cuda_register=True needs asteria built with -DASTERIA_ENABLE_CUDA=ON "
                             "(pip install . -Ccmake.define.ASTERIA_ENABLE_CUDA=ON)");
               o.on_map = [](void* p, std::size_t n) { asteria::cuda::host_register(p, n); };
               o.on_unmap = [](void* p) { asteria::cuda::host_unregister(p); };
             }
             return std::make_shared<PinnedPool>(o);
           }),
           py::kw_only(), py::arg("budget_bytes"), py::arg("lock") = true, py::arg("max_locked_bytes") = py::none(),
           py::arg("cache_released") = true, py::arg("cuda_register") = false,
           "cuda_register: register every mapping with CUDA (cudaHostRegister) so device copies to and from "
           "leases are asynchronous DMA (CUDA builds only).")
      .def("acquire", [](PinnedPool& p, std::size_t nbytes) { return std::make_shared<Lease>(p.acquire(nbytes)); },
           py::arg("nbytes"), "A Lease of at least nbytes bytes, 4 KiB-aligned.")
      .def("trim", &PinnedPool::trim, "Unmap cached mappings; returns the bytes freed.")
      .def("stats", [](const PinnedPool& p) {
        auto s = p.stats();
        py::dict d;
        d["budget"] = s.budget;
        d["reserved"] = s.reserved;
        d["in_use"] = s.in_use;
        d["peak_in_use"] = s.peak_in_use;
        d["locked"] = s.locked;
        d["leases"] = s.leases;
        d["lock_failures"] = s.lock_failures;
        d["all_locked"] = s.all_locked;
        d["warning"] = s.warning;
        return d;
      });

  py::class_<DeferredCopy, std::shared_ptr<DeferredCopy>>(
      m, "DeferredCopy",
      "Copies into pinned leases made once, by whichever thread calls run() first (a refresh worker before the "
      "job that reads the leases, or the training thread before it writes the sources again).")
      .def(py::init([](const std::vector<py::tuple>& pieces) {
             std::vector<DeferredCopy::Piece> out;
             std::vector<std::shared_ptr<const void>> keep;
             out.reserve(pieces.size());
             for (const auto& t : pieces) {
               ASTERIA_CHECK(t.size() == 3, kInvalidArgument,
                             "[DeferredCopy] each piece is (destination array, source address, bytes)");
               auto dst = t[0].cast<py::array>();
               const auto src = t[1].cast<std::uintptr_t>();
               const auto bytes = t[2].cast<std::size_t>();
               auto lease = asteria_py::viewed_lease(dst);
               ASTERIA_CHECK(lease != nullptr, kInvalidArgument,
                             "[DeferredCopy] the destination must be a view of a PinnedPool lease");
               const auto* begin = static_cast<const unsigned char*>(lease->data());
               auto* p = static_cast<unsigned char*>(dst.mutable_data());
               ASTERIA_CHECK(bytes <= static_cast<std::size_t>(dst.nbytes()) && p >= begin &&
                                 p + bytes <= begin + lease->size(),
                             kInvalidArgument,
                             "[DeferredCopy] a copy of " << bytes << " bytes does not fit its destination view of "
                                                         << dst.nbytes() << " bytes");
               out.push_back({p, reinterpret_cast<const void*>(src), bytes});
               keep.push_back(std::move(lease));
             }
             return std::make_shared<DeferredCopy>(std::move(out), std::move(keep));
           }),
           py::arg("pieces"),
           "pieces: (destination: a numpy view of a Lease, source address, bytes) triples. The caller keeps every "
           "source alive and unwritten until run() has returned on some thread.")
      .def("run", &DeferredCopy::run, py::call_guard<py::gil_scoped_release>(),
           "Make the copies unless they were made (waiting while another thread makes them); True when this "
           "call made them.")
      .def_property_readonly("done", &DeferredCopy::done)
      .def_property_readonly("nbytes", &DeferredCopy::bytes);

  py::class_<asteria::CopyQueue, std::shared_ptr<asteria::CopyQueue>>(
      m, "CopyQueue", "Deferred copies not made yet; a refresh worker makes all of them before its next job.")
      .def(py::init<>())
      .def("push", &asteria::CopyQueue::push, py::arg("copy"))
      .def("drain", &asteria::CopyQueue::drain, py::call_guard<py::gil_scoped_release>(),
           "Make every queued copy and empty the queue; returns how many this call made.")
      .def("__len__", &asteria::CopyQueue::size);
}

