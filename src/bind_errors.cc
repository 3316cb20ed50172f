#include <pybind11/pybind11.h>

#include "asteria/errors.h"
#include "message.h"

namespace py = pybind11;

void init_errors(py::module_& m) {
  static py::handle asteria_error =
      py::register_exception<asteria::Error>(m, "AsteriaError", PyExc_RuntimeError).ptr();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const asteria::Error& e) {
      using C = asteria::ErrorCategory;
      const py::object msg = asteria_py::message_text(e.what());
      if (!msg) return;  // out of memory: that error is set
      switch (e.category()) {
        case C::kInvalidArgument: PyErr_SetObject(PyExc_ValueError, msg.ptr()); return;
        case C::kBudgetExhausted: PyErr_SetObject(PyExc_MemoryError, msg.ptr()); return;
        case C::kIo: {
          py::object err = py::reinterpret_steal<py::object>(
              PyObject_CallFunction(PyExc_OSError, "iO", e.os_errno(), msg.ptr()));
          if (err) PyErr_SetObject(PyExc_OSError, err.ptr());
          return;
        }
        default: PyErr_SetObject(asteria_error.ptr(), msg.ptr()); return;
      }
    }
  });
  m.def(
      "_raise_for_test",
      [](const std::string& category, const std::string& msg, int os_errno) {
        using C = asteria::ErrorCategory;
        C c = C::kInternal;
        if (category == "invalid_argument") c = C::kInvalidArgument;
        else if (category == "io") c = C::kIo;
        else if (category == "budget") c = C::kBudgetExhausted;
        else if (category == "numerical") c = C::kNumerical;
        else if (category == "cancelled") c = C::kCancelled;
        else if (category == "unavailable") c = C::kUnavailable;
        throw asteria::Error(c, msg, os_errno);
      },
      py::arg("category"), py::arg("message"), py::arg("os_errno") = 0,
      "Raise an asteria::Error of the given category (used by the tests of the error mapping).");
}
