#include <pybind11/pybind11.h>

#include "asteria/cuda.h"

namespace py = pybind11;

void init_cuda(py::module_& m) {
  m.def("cuda_built", &asteria::cuda::built_with_cuda, "True when this build contains the CUDA backend.");
  m.def("cuda_device_count", &asteria::cuda::device_count,
        "Visible CUDA devices; raises AsteriaError in a build without CUDA.");
}
