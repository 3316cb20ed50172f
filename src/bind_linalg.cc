#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "asteria/linalg.h"
#include "convert.h"

namespace py = pybind11;
using asteria_py::square_from_numpy;
using asteria_py::to_numpy;

namespace {

template <typename F>
auto dispatch(const asteria::HostTensor& t, F&& f) {
  if (t.dtype == asteria::DType::kFloat32) return f(float{});
  return f(double{});
}

}  // namespace

void init_linalg(py::module_& m) {
  auto l = m.def_submodule("linalg", "LAPACK/BLAS-backed matrix functions (synchronous; the GIL is released)");

  l.def("provider", [] {
    auto p = asteria::linalg::provider();
    py::dict d;
    d["name"] = p.name;
    d["library"] = p.library;
    d["threads"] = p.threads;
    return d;
  }, "The LAPACK provider in use: {'name', 'library', 'threads'}.");
  l.def("load_provider", &asteria::linalg::load_provider, py::arg("name"), py::arg("library") = "",
        "Switch to the LAPACK provider 'openblas' (linked) or 'mkl' (path of libmkl_rt).");
  l.def("set_num_threads", &asteria::linalg::set_num_threads, py::arg("threads"),
        "Threads each BLAS/LAPACK call may use (1..256).");
  l.def("scratch_bytes", &asteria::linalg::scratch_bytes,
        "Bytes of scratch space all threads hold now (each thread's grows to its largest call and is freed "
        "when the thread exits): the refresh workers' working memory.");
  l.def("set_test_fp32_eigh_failures", &asteria::linalg::set_test_fp32_eigh_failures, py::arg("count"),
        "TEST HOOK: the next `count` fp32 symmetric eigendecompositions report a failed syevd, so the fp64 retry "
        "runs (fp64 ones never fail); 0 disarms it.");
  l.def("test_fp32_eigh_failures_injected", &asteria::linalg::test_fp32_eigh_failures_injected,
        "How many fp32 eigendecompositions the test hook has failed since the process started.");

  l.def(
      "eigh",
      [](const py::array& a, double ridge, bool descending, bool fp64_retry) {
        auto t = square_from_numpy(a, "linalg.eigh");
        const int n = static_cast<int>(t.shape[0]);
        auto w = asteria::HostTensor::empty(t.dtype, {n});
        auto v = asteria::HostTensor::empty(t.dtype, {n, n});
        {
          py::gil_scoped_release nogil;
          dispatch(t, [&](auto x) {
            using T = decltype(x);
            asteria::linalg::eigh<T>(n, t.ptr<T>(), w.ptr<T>(), v.ptr<T>(), {ridge, descending, fp64_retry});
            return 0;
          });
        }
        return py::make_tuple(to_numpy(w), to_numpy(v));
      },
      py::arg("a"), py::kw_only(), py::arg("ridge") = 0.0, py::arg("descending") = false,
      py::arg("fp64_retry") = true,
      "(eigenvalues, eigenvectors) of a symmetric matrix; eigenvectors in columns.");

  l.def(
      "inverse_root",
      [](const py::array& a, double root, double epsilon) {
        auto t = square_from_numpy(a, "linalg.inverse_root");
        const int n = static_cast<int>(t.shape[0]);
        auto x = asteria::HostTensor::empty(t.dtype, {n, n});
        {
          py::gil_scoped_release nogil;
          dispatch(t, [&](auto z) {
            using T = decltype(z);
            asteria::linalg::inverse_root<T>(n, t.ptr<T>(), x.ptr<T>(), root, epsilon);
            return 0;
          });
        }
        return to_numpy(x);
      },
      py::arg("a"), py::kw_only(), py::arg("root"), py::arg("epsilon"),
      "(A + eps·I)^(-1/root) through eigh with Distributed Shampoo's eigenvalue shift.");

  l.def(
      "newton_inverse_root",
      [](const py::array& a, int p, double epsilon, int max_iterations, double tolerance) {
        auto t = square_from_numpy(a, "linalg.newton_inverse_root");
        const int n = static_cast<int>(t.shape[0]);
        auto x = asteria::HostTensor::empty(t.dtype, {n, n});
        asteria::linalg::NewtonReport rep;
        {
          py::gil_scoped_release nogil;
          dispatch(t, [&](auto z) {
            using T = decltype(z);
            rep = asteria::linalg::newton_inverse_root<T>(n, t.ptr<T>(), x.ptr<T>(), p, epsilon,
                                                          {max_iterations, tolerance});
            return 0;
          });
        }
        py::dict info;
        info["iterations"] = rep.iterations;
        info["residual"] = rep.residual;
        info["converged"] = rep.converged;
        return py::make_tuple(to_numpy(x), info);
      },
      py::arg("a"), py::kw_only(), py::arg("p"), py::arg("epsilon"), py::arg("max_iterations") = 100,
      py::arg("tolerance") = 1e-6, "(X, info): coupled Newton iteration for (A + eps·I)^(-1/p).");

  l.def(
      "eigenbasis_refresh",
      [](const py::array& lmat, const py::array& q, bool sort) {
        auto lt = square_from_numpy(lmat, "linalg.eigenbasis_refresh");
        auto qt = square_from_numpy(q, "linalg.eigenbasis_refresh");
        ASTERIA_CHECK(lt.shape == qt.shape && lt.dtype == qt.dtype, kInvalidArgument,
                      "[linalg.eigenbasis_refresh] statistic and basis must have the same shape and dtype");
        const int n = static_cast<int>(lt.shape[0]);
        auto qn = asteria::HostTensor::empty(lt.dtype, {n, n});
        auto perm = asteria::HostTensor::empty(asteria::DType::kInt64, {n});
        {
          py::gil_scoped_release nogil;
          dispatch(lt, [&](auto z) {
            using T = decltype(z);
            asteria::linalg::eigenbasis_refresh<T>(n, lt.ptr<T>(), qt.ptr<T>(), qn.ptr<T>(),
                                                   perm.ptr<std::int64_t>(), sort);
            return 0;
          });
        }
        return py::make_tuple(to_numpy(qn), to_numpy(perm));
      },
      py::arg("l"), py::arg("q"), py::kw_only(), py::arg("sort") = true,
      "(Q_new, permutation): SOAP (sort=True) or KL (sort=False) eigenbasis refresh.");
}
