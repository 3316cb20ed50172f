#include "asteria/errors.h"

#include <gtest/gtest.h>

namespace {

TEST(Errors, CheckThrowsWithCategoryAndMessage) {
  try {
    int n = -3;
    ASTERIA_CHECK(n > 0, kInvalidArgument, "[test] n must be positive, got " << n);
    FAIL() << "ASTERIA_CHECK did not throw";
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kInvalidArgument);
    EXPECT_STREQ(e.what(), "[test] n must be positive, got -3");
  }
}

TEST(Errors, CheckPassesSilently) { EXPECT_NO_THROW(ASTERIA_CHECK(1 + 1 == 2, kInternal, "never")); }

TEST(Errors, CategoryNames) {
  EXPECT_STREQ(asteria::category_name(asteria::ErrorCategory::kBudgetExhausted), "budget exhausted");
  EXPECT_STREQ(asteria::category_name(asteria::ErrorCategory::kIo), "I/O");
}

TEST(Errors, IoErrorCarriesErrno) {
  asteria::Error e(asteria::ErrorCategory::kIo, "disk", 28);
  EXPECT_EQ(e.os_errno(), 28);
}

TEST(ErrorsDeathTest, AssertAbortsWithLocation) {
  EXPECT_DEATH(ASTERIA_ASSERT(1 == 2), "internal invariant broken: 1 == 2");
}

}  // namespace
