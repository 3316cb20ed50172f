#include "asteria/errors.h"

#include <cstdio>
#include <cstdlib>

namespace asteria {

const char* category_name(ErrorCategory c) noexcept {
  switch (c) {
    case ErrorCategory::kInvalidArgument: return "invalid argument";
    case ErrorCategory::kIo: return "I/O";
    case ErrorCategory::kBudgetExhausted: return "budget exhausted";
    case ErrorCategory::kNumerical: return "numerical";
    case ErrorCategory::kCancelled: return "cancelled";
    case ErrorCategory::kUnavailable: return "unavailable";
    case ErrorCategory::kInternal: return "internal";
  }
  return "unknown";
}

namespace detail {
void assert_fail(const char* expr, const char* func, const char* file, int line) noexcept {
  std::fprintf(stderr, "asteria: internal invariant broken: %s in %s at %s:%d\n", expr, func, file, line);
  std::fflush(stderr);
  std::abort();
}
}  // namespace detail

}  // namespace asteria
