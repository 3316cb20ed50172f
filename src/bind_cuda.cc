// Bindings of asteria/cuda.h: device queries, host registration, event helpers and the
// cuSOLVER refresh engine. Arrays are taken through __cuda_array_interface__ (torch CUDA tensors,
// CuPy arrays, ...): only the data pointer, shape and dtype are read; no Python reference is kept,
// so the caller keeps inputs and outputs alive (and unmodified) until the job completes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "asteria/cuda.h"
#include "asteria/errors.h"

namespace py = pybind11;
namespace ac = asteria::cuda;

namespace {

struct CudaArray {
  std::uintptr_t ptr = 0;
  std::vector<std::int64_t> shape;
  std::string typestr;
};

std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

// Reads a C-contiguous array from __cuda_array_interface__ (version 2 or 3).
CudaArray cuda_array(const py::handle& obj, const char* where, const char* name, bool writable) {
  ASTERIA_CHECK(py::hasattr(obj, "__cuda_array_interface__"), kInvalidArgument,
                "[" << where << "] " << name << " must be a CUDA array (a torch CUDA tensor or any object with "
                    << "__cuda_array_interface__), got " << std::string(py::str(py::type::of(obj))));
  const py::dict d = obj.attr("__cuda_array_interface__");
  CudaArray a;
  const py::tuple data = d["data"].cast<py::tuple>();
  a.ptr = data[0].cast<std::uintptr_t>();
  const bool readonly = data[1].cast<bool>();
  ASTERIA_CHECK(!(writable && readonly), kInvalidArgument, "[" << where << "] " << name << " is read-only");
  for (const auto& s : d["shape"].cast<py::tuple>()) a.shape.push_back(s.cast<std::int64_t>());
  a.typestr = d["typestr"].cast<std::string>();
  ASTERIA_CHECK(!d.contains("mask") || d["mask"].is_none(), kInvalidArgument,
                "[" << where << "] " << name << " is a masked array; pass a plain one");
  if (d.contains("strides") && !d["strides"].is_none()) {
    const std::size_t item = a.typestr.size() >= 3 ? std::stoul(a.typestr.substr(2)) : 1;
    const py::tuple strides = d["strides"].cast<py::tuple>();
    std::int64_t expected = static_cast<std::int64_t>(item);
    for (std::size_t k = a.shape.size(); k-- > 0;) {
      ASTERIA_CHECK(a.shape[k] <= 1 || strides[k].cast<std::int64_t>() == expected, kInvalidArgument,
                    "[" << where << "] " << name << " must be C-contiguous (call .contiguous()), got shape "
                        << shape_str(a.shape) << " with strides " << std::string(py::str(strides)));
      expected *= a.shape[k];
    }
  }
  return a;
}

// The matrices argument: (n, n) or (batch, n, n), float32 or float64.
struct Matrices {
  ac::Precision precision = ac::Precision::kFloat32;
  int batch = 1;
  int n = 0;
  bool batched = false;  // given as 3-D
  std::string typestr;
};

Matrices matrices(const CudaArray& a, const char* where, const char* name) {
  Matrices m;
  ASTERIA_CHECK((a.shape.size() == 2 || a.shape.size() == 3) && a.shape.back() == a.shape[a.shape.size() - 2] &&
                    a.shape.back() >= 1,
                kInvalidArgument,
                "[" << where << "] " << name << " must have shape (n, n) or (batch, n, n) with n >= 1, got "
                    << shape_str(a.shape));
  ASTERIA_CHECK(a.typestr == "<f4" || a.typestr == "<f8", kInvalidArgument,
                "[" << where << "] " << name << " must be float32 or float64, got typestr '" << a.typestr << "'");
  ASTERIA_CHECK(a.shape.back() <= 65536, kInvalidArgument,
                "[" << where << "] matrix size must be at most 65536, got " << a.shape.back());
  m.precision = a.typestr == "<f4" ? ac::Precision::kFloat32 : ac::Precision::kFloat64;
  m.typestr = a.typestr;
  m.n = static_cast<int>(a.shape.back());
  m.batched = a.shape.size() == 3;
  if (m.batched) {
    ASTERIA_CHECK(a.shape[0] >= 1 && a.shape[0] <= (1 << 24), kInvalidArgument,
                  "[" << where << "] batch must be in 1..16777216, got " << a.shape[0]);
    m.batch = static_cast<int>(a.shape[0]);
  }
  return m;
}

// Checks that `x` has the shape of the matrices (square = true) or of one vector per matrix, and
// the given dtype.
void expect_like(const CudaArray& x, const Matrices& m, bool square, const std::string& typestr, const char* where,
                 const char* name) {
  std::vector<std::int64_t> want;
  if (m.batched) want.push_back(m.batch);
  want.push_back(m.n);
  if (square) want.push_back(m.n);
  ASTERIA_CHECK(x.shape == want, kInvalidArgument,
                "[" << where << "] " << name << " must have shape " << shape_str(want) << ", got "
                    << shape_str(x.shape));
  ASTERIA_CHECK(x.typestr == typestr, kInvalidArgument,
                "[" << where << "] " << name << " must have typestr '" << typestr << "', got '" << x.typestr << "'");
}

// None: no stream; an int: a cudaStream_t value (0 is the legacy default stream); or an object with
// a `cuda_stream` attribute (torch.cuda.Stream).
std::uintptr_t stream_handle(const py::object& s) {
  if (s.is_none()) return ac::kNoStream;
  if (py::hasattr(s, "cuda_stream")) return s.attr("cuda_stream").cast<std::uintptr_t>();
  return s.cast<std::uintptr_t>();
}

void* as_ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

py::dict device_info_dict(int device) {
  const ac::DeviceInfo i = ac::device_info(device);
  py::dict d;
  d["device"] = i.device;
  d["name"] = i.name;
  d["major"] = i.major;
  d["minor"] = i.minor;
  d["compute_capability"] = py::make_tuple(i.major, i.minor);
  d["total_memory"] = i.total_memory;
  d["multiprocessors"] = i.multiprocessors;
  d["integrated"] = i.integrated;
  d["pageable_memory_access"] = i.pageable_memory_access;
  d["pageable_memory_access_uses_host_page_tables"] = i.pageable_memory_access_uses_host_page_tables;
  d["concurrent_managed_access"] = i.concurrent_managed_access;
  d["can_use_host_pointer_for_registered_mem"] = i.can_use_host_pointer_for_registered_mem;
  d["host_native_atomic_supported"] = i.host_native_atomic_supported;
  d["stream_priority_least"] = i.stream_priority_least;
  d["stream_priority_greatest"] = i.stream_priority_greatest;
  return d;
}

}  // namespace

void init_cuda(py::module_& m) {
  m.def("cuda_built", &ac::built_with_cuda, "True when this build contains the CUDA backend.");
  m.def("cuda_device_count", &ac::device_count,
        "Visible CUDA devices (0 without a device or driver); raises AsteriaError in a build without CUDA.");
  m.def("cuda_device_info", &device_info_dict, py::arg("device") = 0,
        "Properties of a device for the platform detection: name, compute capability, total memory, "
        "multiprocessors, integrated, pageable_memory_access(_uses_host_page_tables), concurrent_managed_access, "
        "can_use_host_pointer_for_registered_mem, host_native_atomic_supported, stream priority range.");
  m.def(
      "cuda_host_register",
      [](std::uintptr_t address, std::size_t nbytes) {
        py::gil_scoped_release nogil;
        ac::host_register(as_ptr(address), nbytes);
      },
      py::arg("address"), py::arg("nbytes"),
      "Page-lock existing host memory (cudaHostRegister); unregister it before freeing it.");
  m.def(
      "cuda_host_unregister",
      [](std::uintptr_t address) {
        py::gil_scoped_release nogil;
        ac::host_unregister(as_ptr(address));
      },
      py::arg("address"), "Undo cuda_host_register (cudaHostUnregister).");
  m.def("cuda_event_synchronize", &ac::event_synchronize, py::arg("event"), py::call_guard<py::gil_scoped_release>(),
        "Block the calling thread (GIL released) until the cudaEvent_t (torch.cuda.Event().cuda_event) completes.");
  m.def("cuda_event_query", &ac::event_query, py::arg("event"),
        "True when the cudaEvent_t has completed; never blocks.");

  py::class_<ac::JobResult>(m, "CudaJobResult", "The outcome of one CUDA refresh job.")
      .def_readonly("job_id", &ac::JobResult::id)
      .def_readonly("block_id", &ac::JobResult::block_id)
      .def_readonly("version", &ac::JobResult::version)
      .def_readonly("deadline", &ac::JobResult::deadline)
      .def_readonly("ok", &ac::JobResult::ok)
      .def_property_readonly("status", [](const ac::JobResult& r) { return r.ok ? "ok" : "failed"; })
      .def_readonly("failed", &ac::JobResult::failed, "Batch indices of the matrices that failed.")
      .def_readonly("retried", &ac::JobResult::retried,
                    "Batch indices of the fp32 matrices redone in fp64 after their fp32 decomposition failed "
                    "(those not in `failed` succeeded in fp64).")
      .def_readonly("message", &ac::JobResult::message)
      .def_readonly("run_s", &ac::JobResult::run_seconds, "Device time of the job on the engine stream.")
      .def_readonly("queued_s", &ac::JobResult::queued_seconds,
                    "Submission to start on the engine stream (waiting for wait_stream and earlier jobs).")
      .def_property_readonly("latency_s", [](const ac::JobResult& r) { return r.queued_seconds + r.run_seconds; })
      .def("__repr__", [](const ac::JobResult& r) {
        return "<CudaJobResult id=" + std::to_string(r.id) + " block=" + std::to_string(r.block_id) +
               " version=" + std::to_string(r.version) + " status=" + (r.ok ? "ok" : "failed") + ">";
      });

  py::class_<ac::RefreshEngine>(
      m, "CudaRefreshEngine",
      "Refresh jobs with cuSOLVER/cuBLAS on one dedicated low-priority CUDA stream (see asteria/cuda.h).\n\n"
      "Arrays are CUDA arrays (__cuda_array_interface__, C-contiguous) on the engine's device: matrices of shape "
      "(n, n) or (batch, n, n), float32 or float64. The engine keeps no reference to them: keep every input and "
      "output alive and unmodified until the job completes. wait_stream (None, an int cudaStream_t value where 0 "
      "is the legacy default stream, or a torch.cuda.Stream) orders the job after the work already queued there, "
      "without blocking the host.")
      .def(py::init([](int device, bool low_priority, bool fp64_retry) {
             ac::EngineOptions o;
             o.device = device;
             o.priority_low = low_priority;
             o.fp64_retry = fp64_retry;
             py::gil_scoped_release nogil;
             return std::make_unique<ac::RefreshEngine>(o);
           }),
           py::arg("device") = 0, py::kw_only(), py::arg("low_priority") = true, py::arg("fp64_retry") = true)
      .def_property_readonly("stream", &ac::RefreshEngine::stream,
                             "The engine stream as an int (torch.cuda.ExternalStream(engine.stream)).")
      .def_property_readonly("device", &ac::RefreshEngine::device)
      .def_property_readonly("priority", &ac::RefreshEngine::priority)
      .def(
          "submit_eigh",
          [](ac::RefreshEngine& e, std::uint64_t block_id, std::int64_t version, std::int64_t deadline,
             const py::object& a, const py::object& w_out, const py::object& v_out, double ridge, bool descending,
             const py::object& wait_stream) {
            const char* where = "CudaRefreshEngine.submit_eigh";
            const auto A = cuda_array(a, where, "a", false);
            const auto W = cuda_array(w_out, where, "w_out", true);
            const auto V = cuda_array(v_out, where, "v_out", true);
            const Matrices mm = matrices(A, where, "a");
            expect_like(W, mm, false, mm.typestr, where, "w_out");
            expect_like(V, mm, true, mm.typestr, where, "v_out");
            const std::uintptr_t ws = stream_handle(wait_stream);
            py::gil_scoped_release nogil;
            return e.submit_eigh({block_id, version, deadline}, mm.precision, mm.batch, mm.n, as_ptr(A.ptr),
                                 as_ptr(W.ptr), as_ptr(V.ptr), ridge, descending, ws);
          },
          py::arg("block_id"), py::arg("version"), py::arg("deadline"), py::arg("a"), py::arg("w_out"),
          py::arg("v_out"), py::kw_only(), py::arg("ridge") = 0.0, py::arg("descending") = false,
          py::arg("wait_stream") = py::none(),
          "Queue eigh of each matrix (+ ridge·I): eigenvalues to w_out ((n,) or (batch, n)), eigenvectors to the "
          "columns of v_out. Returns the job id.")
      .def(
          "submit_inverse_root",
          [](ac::RefreshEngine& e, std::uint64_t block_id, std::int64_t version, std::int64_t deadline,
             const py::object& a, const py::object& out, double root, double epsilon, const py::object& wait_stream) {
            const char* where = "CudaRefreshEngine.submit_inverse_root";
            const auto A = cuda_array(a, where, "a", false);
            const auto X = cuda_array(out, where, "out", true);
            const Matrices mm = matrices(A, where, "a");
            expect_like(X, mm, true, mm.typestr, where, "out");
            const std::uintptr_t ws = stream_handle(wait_stream);
            py::gil_scoped_release nogil;
            return e.submit_inverse_root({block_id, version, deadline}, mm.precision, mm.batch, mm.n, as_ptr(A.ptr),
                                         as_ptr(X.ptr), root, epsilon, ws);
          },
          py::arg("block_id"), py::arg("version"), py::arg("deadline"), py::arg("a"), py::arg("out"), py::kw_only(),
          py::arg("root"), py::arg("epsilon"), py::arg("wait_stream") = py::none(),
          "Queue out = (A + eps·I)^(-1/root) per matrix (linalg.inverse_root's epsilon rules). Returns the job id.")
      .def(
          "submit_eigenbasis_refresh",
          [](ac::RefreshEngine& e, std::uint64_t block_id, std::int64_t version, std::int64_t deadline,
             const py::object& a, const py::object& q, const py::object& basis_out, const py::object& perm_out,
             bool sort, const py::object& wait_stream) {
            const char* where = "CudaRefreshEngine.submit_eigenbasis_refresh";
            const auto A = cuda_array(a, where, "a", false);
            const auto Q = cuda_array(q, where, "q", false);
            const auto B = cuda_array(basis_out, where, "basis_out", true);
            const auto P = cuda_array(perm_out, where, "perm_out", true);
            const Matrices mm = matrices(A, where, "a");
            expect_like(Q, mm, true, mm.typestr, where, "q");
            expect_like(B, mm, true, mm.typestr, where, "basis_out");
            expect_like(P, mm, false, "<i8", where, "perm_out");
            const std::uintptr_t ws = stream_handle(wait_stream);
            py::gil_scoped_release nogil;
            return e.submit_eigenbasis_refresh({block_id, version, deadline}, mm.precision, mm.batch, mm.n,
                                               as_ptr(A.ptr), as_ptr(Q.ptr), as_ptr(B.ptr),
                                               static_cast<std::int64_t*>(as_ptr(P.ptr)), sort, ws);
          },
          py::arg("block_id"), py::arg("version"), py::arg("deadline"), py::arg("a"), py::arg("q"),
          py::arg("basis_out"), py::arg("perm_out"), py::kw_only(), py::arg("sort") = true,
          py::arg("wait_stream") = py::none(),
          "Queue a SOAP (sort=True) or KL (sort=False) eigenbasis refresh: basis_out = qr(A·Q[:, perm]).Q and "
          "perm_out (int64) = the stable descending order of diag(QᵀAQ). Returns the job id.")
      .def("set_test_fp32_failures", &ac::RefreshEngine::set_test_fp32_failures, py::arg("count"),
           "TEST HOOK: the next `count` fp32 matrices of eigh / inverse-root jobs of this engine report a failed "
           "solve after it, so the fp64 retry can be tested (fp64 jobs never consume it); 0 disarms it.")
      .def("test_fp32_failures_injected", &ac::RefreshEngine::test_fp32_failures_injected,
           "fp32 matrices the set_test_fp32_failures hook has failed on this engine so far.")
      .def("poll", &ac::RefreshEngine::poll, py::call_guard<py::gil_scoped_release>(),
           "Completed jobs not yet collected, in id order (never blocks).")
      .def("wait", &ac::RefreshEngine::wait, py::arg("job_id"), py::call_guard<py::gil_scoped_release>(),
           "Block the calling thread until the job completes (the GIL is released) and return its CudaJobResult.")
      .def("is_done", &ac::RefreshEngine::is_done, py::arg("job_id"), py::call_guard<py::gil_scoped_release>(),
           "True when the job has completed (never blocks).")
      .def("stats",
           [](ac::RefreshEngine& e) {
             ac::EngineStats st;
             {
               py::gil_scoped_release nogil;
               st = e.stats();
             }
             py::dict d;
             d["submitted"] = st.submitted;
             d["completed"] = st.completed;
             d["failed"] = st.failed;
             d["fp64_retries"] = st.fp64_retries;
             d["in_flight"] = st.in_flight;
             d["uncollected"] = st.uncollected;
             d["total_run_s"] = st.total_run_seconds;
             d["max_run_s"] = st.max_run_seconds;
             d["max_queued_s"] = st.max_queued_seconds;
             return d;
           })
      .def("close", &ac::RefreshEngine::close, py::call_guard<py::gil_scoped_release>(),
           "Wait for the engine stream and release it (idempotent); later submissions raise.")
      .def("__enter__", [](ac::RefreshEngine& e) -> ac::RefreshEngine& { return e; },
           py::return_value_policy::reference)
      .def("__exit__", [](ac::RefreshEngine& e, py::args) {
        py::gil_scoped_release nogil;
        e.close();
      });
}
