#pragma once
// asteria::Error — the one exception type of the C++ core, with a category that the Python
// bindings map to a built-in exception (ValueError, MemoryError, OSError) or asteria.AsteriaError.
//
// Two tiers (docs/style.md pattern 7):
//   ASTERIA_CHECK(cond, category, msg)  caller mistakes and environment failures: throws.
//   ASTERIA_ASSERT(cond)                broken internal invariants: reports and aborts, always on.
// Messages are prefixed with the component and say what to do about the problem.

#include <sstream>
#include <stdexcept>
#include <string>

namespace asteria {

enum class ErrorCategory {
  kInvalidArgument,  // a caller passed a bad value (Python: ValueError)
  kIo,               // the operating system refused an I/O operation (Python: OSError)
  kBudgetExhausted,  // a memory budget is too small (Python: MemoryError)
  kNumerical,        // a solver failed or produced non-finite values (Python: AsteriaError)
  kCancelled,        // the work was cancelled before it ran (Python: AsteriaError)
  kUnavailable,      // a feature is not built or not supported here (Python: AsteriaError)
  kInternal,         // anything else (Python: AsteriaError)
};

const char* category_name(ErrorCategory c) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCategory category, const std::string& message, int os_errno = 0)
      : std::runtime_error(message), category_(category), os_errno_(os_errno) {}
  ErrorCategory category() const noexcept { return category_; }
  // errno of the failed system call for kIo errors, 0 otherwise.
  int os_errno() const noexcept { return os_errno_; }

 private:
  ErrorCategory category_;
  int os_errno_;
};

namespace detail {
[[noreturn]] void assert_fail(const char* expr, const char* func, const char* file, int line) noexcept;
}  // namespace detail

}  // namespace asteria

// Throws asteria::Error(category, msg) when cond is false. msg may use stream syntax:
//   ASTERIA_CHECK(n > 0, kInvalidArgument, "[linalg::eigh] n must be positive, got " << n);
#define ASTERIA_CHECK(cond, category, msg)                                                 \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::ostringstream asteria_check_os_;                                                \
      asteria_check_os_ << msg;                                                            \
      throw ::asteria::Error(::asteria::ErrorCategory::category, asteria_check_os_.str()); \
    }                                                                                      \
  } while (0)

// Aborts with the expression, function and location when an internal invariant is broken.
#define ASTERIA_ASSERT(cond)                                                         \
  do {                                                                               \
    if (!(cond)) ::asteria::detail::assert_fail(#cond, __func__, __FILE__, __LINE__); \
  } while (0)
