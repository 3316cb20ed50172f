#pragma once
// numpy <-> asteria::HostTensor conversion shared by the binding files.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>

#include "asteria/errors.h"
#include "asteria/host_memory.h"
#include "asteria/scheduler.h"

namespace asteria_py {
namespace py = pybind11;

// The pinned-pool Lease whose memory the array views (through numpy bases and memoryviews), or null.
inline std::shared_ptr<asteria::Lease> viewed_lease(const py::array& a) {
  py::object obj = a.attr("base");
  for (int depth = 0; depth < 16 && !obj.is_none(); ++depth) {
    if (py::isinstance<asteria::Lease>(obj)) return obj.cast<std::shared_ptr<asteria::Lease>>();
    if (py::isinstance<py::array>(obj)) {
      obj = obj.attr("base");
    } else if (PyMemoryView_Check(obj.ptr())) {
      obj = obj.attr("obj");
    } else {
      break;
    }
  }
  return nullptr;
}

// A float32/float64 square matrix as a HostTensor. When the array is a C-contiguous, 64-byte-aligned
// view of a pinned-pool Lease (a shadow snapshot), the tensor shares that memory and keeps the lease
// alive; otherwise the data are copied into an owned tensor (a snapshot).
inline asteria::HostTensor square_from_numpy(const py::array& a, const char* what) {
  ASTERIA_CHECK(a.ndim() == 2 && a.shape(0) == a.shape(1) && a.shape(0) >= 1, kInvalidArgument,
                "[" << what << "] expected a non-empty square 2-D array, got shape with " << a.ndim() << " dims");
  asteria::DType dt;
  if (a.dtype().is(py::dtype::of<float>())) {
    dt = asteria::DType::kFloat32;
  } else if (a.dtype().is(py::dtype::of<double>())) {
    dt = asteria::DType::kFloat64;
  } else {
    ASTERIA_CHECK(false, kInvalidArgument,
                  "[" << what << "] expected a float32 or float64 array, got dtype " << std::string(py::str(a.dtype())));
  }
  if (a.flags() & py::array::c_style) {
    if (auto lease = viewed_lease(a)) {
      const auto* begin = static_cast<const unsigned char*>(lease->data());
      const auto* p = static_cast<const unsigned char*>(a.data());
      const std::size_t bytes = static_cast<std::size_t>(a.nbytes());
      if (p >= begin && p + bytes <= begin + lease->size() && reinterpret_cast<std::uintptr_t>(p) % 64 == 0) {
        asteria::HostTensor t;
        t.dtype = dt;
        t.shape = {a.shape(0), a.shape(1)};
        t.storage = std::shared_ptr<unsigned char[]>(lease, const_cast<unsigned char*>(p));
        return t;
      }
    }
  }
  auto c = py::array::ensure(a, py::array::c_style);
  auto t = asteria::HostTensor::empty(dt, {a.shape(0), a.shape(1)});
  std::memcpy(t.data(), c.data(), t.nbytes());
  return t;
}

// A numpy array viewing the tensor's storage; the array keeps the storage alive.
inline py::array to_numpy(const asteria::HostTensor& t) {
  auto* keep = new std::shared_ptr<unsigned char[]>(t.storage);
  py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<unsigned char[]>*>(p); });
  std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
  switch (t.dtype) {
    case asteria::DType::kFloat32: return py::array_t<float>(shape, t.ptr<float>(), owner);
    case asteria::DType::kFloat64: return py::array_t<double>(shape, t.ptr<double>(), owner);
    case asteria::DType::kInt64: return py::array_t<std::int64_t>(shape, t.ptr<std::int64_t>(), owner);
  }
  return py::array();
}

}  // namespace asteria_py
