#pragma once
// C++ error messages as Python text. A message may carry bytes that are not UTF-8 (a file name, a key
// read from a damaged file): they become \xNN escapes instead of a UnicodeDecodeError that would hide
// the real error.
#include <pybind11/pybind11.h>

#include <cstring>

namespace asteria_py {

// A new str, or a null object with a Python error set (out of memory).
inline pybind11::object message_text(const char* s) {
  return pybind11::reinterpret_steal<pybind11::object>(
      PyUnicode_DecodeUTF8(s, static_cast<Py_ssize_t>(std::strlen(s)), "backslashreplace"));
}

}  // namespace asteria_py
