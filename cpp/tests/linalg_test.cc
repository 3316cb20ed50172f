#include "asteria/linalg.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "asteria/errors.h"

namespace {

using Mat = std::vector<double>;

Mat matmul(int n, const Mat& a, const Mat& b) {
  Mat c(static_cast<std::size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < n; ++k)
      for (int j = 0; j < n; ++j) c[i * n + j] += a[i * n + k] * b[k * n + j];
  return c;
}
Mat transpose(int n, const Mat& a) {
  Mat t(a.size());
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) t[j * n + i] = a[i * n + j];
  return t;
}
// G·Gᵀ + shift·I for a random G: symmetric positive (semi)definite.
Mat random_spd(int n, int rank, double shift, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  Mat g(static_cast<std::size_t>(n) * rank);
  for (auto& x : g) x = nd(rng);
  Mat a(static_cast<std::size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < rank; ++k) a[i * n + j] += g[i * rank + k] * g[j * rank + k];
  for (int i = 0; i < n; ++i) a[i * n + i] += shift;
  return a;
}
double max_abs_diff(const Mat& a, const Mat& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}
double max_abs(const Mat& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::abs(x));
  return m;
}

TEST(Linalg, EighReconstructsAndIsOrthonormal) {
  const int n = 24;
  Mat a = random_spd(n, n, 0.1, 1), w(n), v(a.size());
  asteria::linalg::eigh<double>(n, a.data(), w.data(), v.data());
  for (int i = 1; i < n; ++i) EXPECT_LE(w[i - 1], w[i]);
  Mat vd(a.size(), 0.0);  // V·diag(w)
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) vd[i * n + j] = v[i * n + j] * w[j];
  EXPECT_LT(max_abs_diff(matmul(n, vd, transpose(n, v)), a), 1e-10 * max_abs(a));
  Mat vtv = matmul(n, transpose(n, v), v);
  for (int i = 0; i < n; ++i) vtv[i * n + i] -= 1.0;
  EXPECT_LT(max_abs(vtv), 1e-12);
}

TEST(Linalg, EighDescendingReversesOrder) {
  const int n = 8;
  Mat a = random_spd(n, n, 0.0, 2), w(n), v(a.size()), wd(n), vd(a.size());
  asteria::linalg::eigh<double>(n, a.data(), w.data(), v.data());
  asteria::linalg::EighOptions o;
  o.descending = true;
  asteria::linalg::eigh<double>(n, a.data(), wd.data(), vd.data(), o);
  for (int j = 0; j < n; ++j) {
    EXPECT_DOUBLE_EQ(wd[j], w[n - 1 - j]);
    for (int i = 0; i < n; ++i) EXPECT_DOUBLE_EQ(vd[i * n + j], v[i * n + n - 1 - j]);
  }
}

TEST(Linalg, InverseRootMatchesDefinition) {
  const int n = 16;
  Mat a = random_spd(n, n, 0.5, 3), x(a.size());
  asteria::linalg::inverse_root<double>(n, a.data(), x.data(), 4.0, 0.0);
  // X^4 · A = I
  Mat x2 = matmul(n, x, x), x4 = matmul(n, x2, x2), p = matmul(n, x4, a);
  for (int i = 0; i < n; ++i) p[i * n + i] -= 1.0;
  EXPECT_LT(max_abs(p), 1e-10);
}

TEST(Linalg, InverseRootShiftsRankDeficientInput) {
  const int n = 12;
  Mat a = random_spd(n, 2, 0.0, 4), x(a.size());  // rank 2
  const double eps = 1e-6;
  asteria::linalg::inverse_root<double>(n, a.data(), x.data(), 2.0, eps);
  for (double v : x) ASSERT_TRUE(std::isfinite(v));
  // In the null space the eigenvalue is about eps, so X has a value of order eps^(-1/2) there.
  EXPECT_GT(max_abs(x), 0.1 / std::sqrt(eps));
}

// An fp32 factor that is PSD up to rounding has a slightly negative smallest eigenvalue, |λ_min| ≫ eps.
// Lifting it as λ − λ_min + eps keeps eps; (eps − λ_min) in fp32 would round to −λ_min and leave an
// exact 0 (an infinite root).
TEST(Linalg, InverseRootKeepsEpsWhenTheSmallestEigenvalueIsNegativeInFp32) {
  const int n = 5;
  Mat q = random_spd(n, n, 1.0, 11), w(n), v(q.size());
  asteria::linalg::eigh<double>(n, q.data(), w.data(), v.data());  // an orthonormal basis v
  const double lambda[5] = {-1e-3, 0.5, 1.0, 2.0, 3.0};
  std::vector<float> a(static_cast<std::size_t>(n) * n), x(a.size());
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += v[i * n + k] * lambda[k] * v[j * n + k];
      a[i * n + j] = static_cast<float>(s);
    }
  for (int i = 0; i < n; ++i)  // exactly symmetric in fp32
    for (int j = 0; j < i; ++j) a[i * n + j] = a[j * n + i];
  asteria::linalg::inverse_root<float>(n, a.data(), x.data(), 4.0, 1e-12);
  for (float e : x) ASSERT_TRUE(std::isfinite(e));
  EXPECT_GT(*std::max_element(x.begin(), x.end()), 100.0f);  // (eps)^(-1/4) = 1e3 along the null direction
}

TEST(Linalg, NewtonAgreesWithEigh) {
  const int n = 16;
  Mat a = random_spd(n, n, 1.0, 5), xe(a.size()), xn(a.size());
  asteria::linalg::inverse_root<double>(n, a.data(), xe.data(), 4.0, 1e-12);
  auto rep = asteria::linalg::newton_inverse_root<double>(n, a.data(), xn.data(), 4, 1e-12, {200, 1e-12});
  EXPECT_TRUE(rep.converged);
  EXPECT_LT(max_abs_diff(xe, xn), 1e-8 * max_abs(xe));
}

TEST(Linalg, EigenbasisRefreshSortsAndOrthonormalises) {
  const int n = 10;
  Mat l = random_spd(n, n, 0.0, 6), q(l.size(), 0.0), qn(l.size());
  for (int i = 0; i < n; ++i) q[i * n + i] = 1.0;
  std::vector<std::int64_t> perm(n);
  asteria::linalg::eigenbasis_refresh<double>(n, l.data(), q.data(), qn.data(), perm.data(), true);
  // With Q = I the Rayleigh quotients are the diagonal: π sorts it descending.
  for (int j = 1; j < n; ++j) EXPECT_GE(l[perm[j - 1] * n + perm[j - 1]], l[perm[j] * n + perm[j]]);
  Mat qtq = matmul(n, transpose(n, qn), qn);
  for (int i = 0; i < n; ++i) qtq[i * n + i] -= 1.0;
  EXPECT_LT(max_abs(qtq), 1e-12);
  // Without sort the permutation is the identity.
  asteria::linalg::eigenbasis_refresh<double>(n, l.data(), q.data(), qn.data(), perm.data(), false);
  for (int j = 0; j < n; ++j) EXPECT_EQ(perm[j], j);
}

// The refresh jobs write their results over their private snapshots (JobSpec::reuse_inputs): every
// function whose output may be its input's buffer gives the same bits in place as into a fresh buffer.
TEST(Linalg, OutputsWrittenOverTheInputAreBitIdenticalToFreshBuffers) {
  const int n = 37;
  const Mat a = random_spd(n, n, 0.5, 21);
  Mat q(a.size(), 0.0);
  for (int i = 0; i < n; ++i) q[i * n + i] = 1.0;
  {
    Mat w(n), v(a.size()), in_place = a, w2(n);
    asteria::linalg::EighOptions o;
    o.descending = true;
    o.ridge = 1e-3;
    asteria::linalg::eigh<double>(n, a.data(), w.data(), v.data(), o);
    asteria::linalg::eigh<double>(n, in_place.data(), w2.data(), in_place.data(), o);
    EXPECT_EQ(v, in_place);
    EXPECT_EQ(w, w2);
  }
  {
    Mat x(a.size()), in_place = a;
    asteria::linalg::inverse_root<double>(n, a.data(), x.data(), 4.0, 1e-6);
    asteria::linalg::inverse_root<double>(n, in_place.data(), in_place.data(), 4.0, 1e-6);
    EXPECT_EQ(x, in_place);
  }
  {
    Mat x(a.size()), in_place = a;
    asteria::linalg::newton_inverse_root<double>(n, a.data(), x.data(), 4, 1e-6);
    asteria::linalg::newton_inverse_root<double>(n, in_place.data(), in_place.data(), 4, 1e-6);
    EXPECT_EQ(x, in_place);
  }
  {
    // a slightly rotated basis, so the rotation is not the identity
    Mat w(n), q0(a.size());
    asteria::linalg::eigh<double>(n, random_spd(n, n, 0.1, 22).data(), w.data(), q0.data());
    Mat qn(a.size()), r(a.size()), l_in_place = a, q_in_place = q0;
    std::vector<std::int64_t> p1(n), p2(n);
    asteria::linalg::eigenbasis_refresh<double>(n, a.data(), q0.data(), qn.data(), p1.data(), true);
    asteria::linalg::matmul_tn<double>(n, q0.data(), qn.data(), r.data());
    asteria::linalg::eigenbasis_refresh<double>(n, l_in_place.data(), q_in_place.data(), l_in_place.data(), p2.data(), true);
    asteria::linalg::matmul_tn_into_a<double>(n, q_in_place.data(), l_in_place.data());
    EXPECT_EQ(qn, l_in_place);
    EXPECT_EQ(r, q_in_place);
    EXPECT_EQ(p1, p2);
  }
}

TEST(Linalg, ScratchBytesCountEachThreadsWorkspaceUntilItExits) {
  const std::size_t before = asteria::linalg::scratch_bytes();
  std::size_t during = 0;
  std::thread t([&] {
    const int n = 64;
    Mat a = random_spd(n, n, 0.5, 23), w(n), v(a.size());
    asteria::linalg::eigh<double>(n, a.data(), w.data(), v.data());
    during = asteria::linalg::scratch_bytes();
  });
  t.join();
  // the thread's copy of the matrix alone is n² doubles
  EXPECT_GE(during, before + 64 * 64 * sizeof(double));
  EXPECT_EQ(asteria::linalg::scratch_bytes(), before);
}

TEST(Linalg, RepeatedRefreshConvergesToEigenvectors) {
  const int n = 6;
  Mat l = random_spd(n, n, 0.0, 7), q(l.size(), 0.0), qn(l.size()), w(n), v(l.size());
  for (int i = 0; i < n; ++i) q[i * n + i] = 1.0;
  std::vector<std::int64_t> perm(n);
  for (int it = 0; it < 400; ++it) {
    asteria::linalg::eigenbasis_refresh<double>(n, l.data(), q.data(), qn.data(), perm.data(), true);
    q = qn;
  }
  asteria::linalg::EighOptions o;
  o.descending = true;
  asteria::linalg::eigh<double>(n, l.data(), w.data(), v.data(), o);
  for (int j = 0; j < n; ++j) {
    double dot = 0;
    for (int i = 0; i < n; ++i) dot += q[i * n + j] * v[i * n + j];
    EXPECT_NEAR(std::abs(dot), 1.0, 1e-6) << "column " << j;
  }
}

TEST(Linalg, Float32WorksAndRejectsNonFinite) {
  const int n = 8;
  Mat ad = random_spd(n, n, 0.1, 8);
  std::vector<float> a(ad.begin(), ad.end()), w(n), v(a.size());
  EXPECT_NO_THROW(asteria::linalg::eigh<float>(n, a.data(), w.data(), v.data()));
  a[3] = std::numeric_limits<float>::quiet_NaN();
  try {
    asteria::linalg::eigh<float>(n, a.data(), w.data(), v.data());
    FAIL();
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kNumerical);
  }
  std::vector<float> x(a.size());
  EXPECT_THROW(asteria::linalg::inverse_root<float>(n, a.data(), x.data(), 2.0, 1e-6), asteria::Error);
}

TEST(Linalg, BadArgumentsAreInvalidArgument) {
  Mat a(4, 1.0), x(4);
  EXPECT_THROW(asteria::linalg::inverse_root<double>(2, a.data(), x.data(), 0.0, 1e-6), asteria::Error);
  EXPECT_THROW(asteria::linalg::inverse_root<double>(0, a.data(), x.data(), 2.0, 1e-6), asteria::Error);
  EXPECT_THROW(asteria::linalg::set_num_threads(0), asteria::Error);
  EXPECT_THROW(asteria::linalg::load_provider("nonsense"), asteria::Error);
}

TEST(Linalg, MissingMklIsUnavailableAndKeepsOpenBlas) {
  try {
    asteria::linalg::load_provider("mkl", "/nonexistent/libmkl_rt.so.2");
    FAIL();
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kUnavailable);
    EXPECT_NE(std::string(e.what()).find("pip install"), std::string::npos);
  }
  EXPECT_EQ(asteria::linalg::provider().name, "openblas");
}

}  // namespace

// ----- the fp64 retry of a failed fp32 eigendecomposition (test hook: fp32 fails, fp64 does not) -------------
namespace {
std::vector<float> to_float(const Mat& a) { return std::vector<float>(a.begin(), a.end()); }

// Disarms the hook whatever the test does.
struct Fp32Failures {
  explicit Fp32Failures(int count) { asteria::linalg::set_test_fp32_eigh_failures(count); }
  ~Fp32Failures() { asteria::linalg::set_test_fp32_eigh_failures(0); }
};
}  // namespace

TEST(Linalg, FailedFp32EighIsRetriedInFp64) {
  const int n = 16;
  const auto af = to_float(random_spd(n, n, 0.5, 7));
  const Mat a(af.begin(), af.end());  // the fp32 matrix, exactly, in fp64
  Mat w64(n), v64(a.size());
  asteria::linalg::eigh<double>(n, a.data(), w64.data(), v64.data());
  std::vector<float> w(n), v(af.size());
  const long long before = asteria::linalg::test_fp32_eigh_failures_injected();
  {
    Fp32Failures armed(1);
    asteria::linalg::eigh<float>(n, af.data(), w.data(), v.data());  // fp32 fails, the fp64 retry succeeds
  }
  EXPECT_EQ(asteria::linalg::test_fp32_eigh_failures_injected(), before + 1);
  // The retry is the fp64 decomposition rounded to fp32: its eigenvalues, not fp32-accurate ones.
  for (int i = 0; i < n; ++i) EXPECT_EQ(w[i], static_cast<float>(w64[i])) << i;
  for (std::size_t i = 0; i < v.size(); ++i) EXPECT_EQ(v[i], static_cast<float>(v64[i])) << i;
}

TEST(Linalg, FailedFp32EighWithoutTheRetryIsANumericalError) {
  const int n = 8;
  const auto af = to_float(random_spd(n, n, 0.5, 8));
  std::vector<float> w(n), v(af.size());
  Fp32Failures armed(1);
  asteria::linalg::EighOptions opts;
  opts.fp64_retry = false;
  try {
    asteria::linalg::eigh<float>(n, af.data(), w.data(), v.data(), opts);
    FAIL() << "expected a numerical error";
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kNumerical);
    EXPECT_NE(std::string(e.what()).find("syevd info=" + std::to_string(n + 1)), std::string::npos) << e.what();
  }
}

TEST(Linalg, FailedFp32InverseRootIsRetriedInFp64AndFp64IsNeverFailed) {
  const int n = 12;
  const Mat a = random_spd(n, n, 0.5, 9);
  Mat x64(a.size());
  const long long before = asteria::linalg::test_fp32_eigh_failures_injected();
  Fp32Failures armed(1);
  asteria::linalg::inverse_root<double>(n, a.data(), x64.data(), 2.0, 1e-6);  // fp64: the hook is not consumed
  EXPECT_EQ(asteria::linalg::test_fp32_eigh_failures_injected(), before);
  const auto af = to_float(a);
  std::vector<float> x(af.size());
  asteria::linalg::inverse_root<float>(n, af.data(), x.data(), 2.0, 1e-6);
  EXPECT_EQ(asteria::linalg::test_fp32_eigh_failures_injected(), before + 1);
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], x64[i], 1e-4 * max_abs(x64)) << i;
}

TEST(Linalg, Fp32FailureHookRefusesANegativeCount) {
  EXPECT_THROW(asteria::linalg::set_test_fp32_eigh_failures(-1), asteria::Error);
}
