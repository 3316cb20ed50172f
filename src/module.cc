// asteria._core — the table of contents of the Python bindings. Each component binds itself in
// its own src/bind_<component>.cc.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_errors(py::module_& m);
void init_host_memory(py::module_& m);
void init_linalg(py::module_& m);
void init_scheduler(py::module_& m);
void init_pager(py::module_& m);
void init_cuda(py::module_& m);
void init_checkpoint(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "asteria's C++ runtime core (private: use the public `asteria` package)";
  m.attr("__version__") = ASTERIA_VERSION;
  init_errors(m);
  init_host_memory(m);
  init_linalg(m);
  init_scheduler(m);
  init_pager(m);
  init_cuda(m);
  init_checkpoint(m);
}
