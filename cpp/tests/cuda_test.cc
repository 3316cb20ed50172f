// GPU tests of the CUDA backend: the RefreshEngine against the CPU linalg functions, failure
// reporting, stream ordering, non-blocking completion checks, priorities and host registration.
// Every test skips without a visible CUDA device.
#include "asteria/cuda.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <type_traits>
#include <vector>

#include "asteria/errors.h"
#include "asteria/linalg.h"

namespace {

namespace ac = asteria::cuda;
using Clock = std::chrono::steady_clock;

#define SKIP_WITHOUT_GPU()                                                          \
  do {                                                                              \
    if (ac::device_count() == 0) GTEST_SKIP() << "no CUDA device is visible";       \
  } while (0)

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

// Device memory for the tests (plain cudaMalloc is fine here).
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t count) : count_(count) {
    if (cudaMalloc(&p_, std::max<std::size_t>(count, 1) * sizeof(T)) != cudaSuccess) p_ = nullptr;
  }
  DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() {
    if (p_) cudaFree(p_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return p_; }
  void upload(const std::vector<T>& host) {
    ASSERT_EQ(host.size(), count_);
    ASSERT_EQ(cudaMemcpy(p_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> h(count_);
    EXPECT_EQ(cudaMemcpy(h.data(), p_, count_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }

 private:
  T* p_ = nullptr;
  std::size_t count_;
};

template <typename T>
constexpr bool kF32 = std::is_same_v<T, float>;

template <typename T>
constexpr ac::Precision precision_of() {
  return kF32<T> ? ac::Precision::kFloat32 : ac::Precision::kFloat64;
}

// G·Gᵀ/rank + shift·I for a random G: symmetric positive (semi)definite, row-major.
template <typename T>
std::vector<T> random_spd(int n, int rank, double shift, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::vector<double> g(static_cast<std::size_t>(n) * rank);
  for (auto& x : g) x = nd(rng);
  std::vector<T> a(static_cast<std::size_t>(n) * n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) {
      double s = 0;
      for (int k = 0; k < rank; ++k) s += g[i * rank + k] * g[j * rank + k];
      s /= rank;
      if (i == j) s += shift;
      a[i * n + j] = a[j * n + i] = static_cast<T>(s);
    }
  return a;
}

template <typename T>
std::vector<T> concat(const std::vector<std::vector<T>>& parts) {
  std::vector<T> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

template <typename T>
std::vector<T> slice(const std::vector<T>& v, std::size_t index, std::size_t per) {
  return std::vector<T>(v.begin() + index * per, v.begin() + (index + 1) * per);
}

template <typename T>
double max_abs(const std::vector<T>& a) {
  double m = 0;
  for (T x : a) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

template <typename T>
double max_abs_diff(const std::vector<T>& a, const std::vector<T>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// Max difference of the eigenvector columns of two row-major n×n matrices, each column of `b`
// first flipped to the sign that best matches `a` (eigenvectors are defined up to sign).
template <typename T>
double max_diff_up_to_sign(int n, const std::vector<T>& a, const std::vector<T>& b) {
  double worst = 0;
  for (int j = 0; j < n; ++j) {
    double dot = 0;
    for (int i = 0; i < n; ++i) dot += static_cast<double>(a[i * n + j]) * b[i * n + j];
    const double s = dot < 0 ? -1.0 : 1.0;
    for (int i = 0; i < n; ++i) worst = std::max(worst, std::abs(a[i * n + j] - s * b[i * n + j]));
  }
  return worst;
}

void host_sleep(void* ms) { std::this_thread::sleep_for(std::chrono::milliseconds(*static_cast<int*>(ms))); }

template <typename T>
T tol() {
  return kF32<T> ? T(1e-3) : T(1e-10);
}

// ----- eigh --------------------------------------------------------------------------------------
template <typename T>
void check_eigh(int n, int batch, double ridge, bool descending, unsigned seed) {
  std::vector<std::vector<T>> mats;
  for (int b = 0; b < batch; ++b) mats.push_back(random_spd<T>(n, n, 0.5, seed + b));
  const auto a = concat(mats);
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  DeviceArray<T> da(a), dw(static_cast<std::size_t>(batch) * n), dv(batch * nn);
  ac::RefreshEngine engine;
  const auto id = engine.submit_eigh({3, 10, 12}, precision_of<T>(), batch, n, da.get(), dw.get(), dv.get(), ridge,
                                     descending);
  const auto r = engine.wait(id);
  ASSERT_TRUE(r.ok) << r.message;
  EXPECT_EQ(r.block_id, 3u);
  EXPECT_EQ(r.version, 10);
  EXPECT_EQ(r.deadline, 12);
  EXPECT_GE(r.run_seconds, 0.0);
  const auto w = dw.download(), v = dv.download();
  for (int b = 0; b < batch; ++b) {
    std::vector<T> wc(n), vc(nn);
    asteria::linalg::EighOptions o;
    o.ridge = ridge;
    o.descending = descending;
    asteria::linalg::eigh<T>(n, mats[b].data(), wc.data(), vc.data(), o);
    const auto wg = slice(w, b, n), vg = slice(v, b, nn);
    const double scale = max_abs(wc);
    EXPECT_LT(max_abs_diff(wg, wc), tol<T>() * scale) << "matrix " << b;
    EXPECT_LT(max_diff_up_to_sign(n, vc, vg), kF32<T> ? 5e-3 : 1e-8) << "matrix " << b;
    // Reconstruction: V·diag(w)·Vᵀ = A + ridge·I.
    double worst = 0;
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < n; ++k) {
        double s = 0;
        for (int j = 0; j < n; ++j) s += static_cast<double>(vg[i * n + j]) * wg[j] * vg[k * n + j];
        worst = std::max(worst, std::abs(s - mats[b][i * n + k] - (i == k ? ridge : 0.0)));
      }
    EXPECT_LT(worst, tol<T>() * scale) << "matrix " << b;
    for (int j = 1; j < n; ++j) {
      if (descending) EXPECT_GE(wg[j - 1], wg[j]);
      else EXPECT_LE(wg[j - 1], wg[j]);
    }
  }
}

TEST(CudaEngine, EighFp64MatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_eigh<double>(48, 1, 0.0, false, 11);
  check_eigh<double>(40, 2, 1e-3, true, 12);  // per-matrix syevd path, ridge, descending
}

TEST(CudaEngine, EighFp32MatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_eigh<float>(64, 1, 0.0, false, 21);
  check_eigh<float>(96, 1, 1e-2, true, 22);
}

TEST(CudaEngine, EighBatchedSmallBlocksMatchCpu) {
  SKIP_WITHOUT_GPU();
  check_eigh<double>(16, 5, 0.0, false, 31);  // cusolverDnXsyevBatched path (n <= 32, batch > 1)
  check_eigh<double>(32, 3, 1e-4, true, 32);
  check_eigh<float>(8, 7, 0.0, true, 33);
}

TEST(CudaEngine, EighBatchedPathAgreesWithPerMatrixPath) {
  SKIP_WITHOUT_GPU();
  const int n = 24, batch = 4;
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  std::vector<std::vector<double>> mats;
  for (int b = 0; b < batch; ++b) mats.push_back(random_spd<double>(n, n, 0.1, 40 + b));
  DeviceArray<double> da(concat(mats)), dw(batch * n), dv(batch * nn), dw1(batch * n), dv1(batch * nn);
  ac::RefreshEngine engine;
  const auto all = engine.submit_eigh({}, ac::Precision::kFloat64, batch, n, da.get(), dw.get(), dv.get(), 0.0, false);
  std::vector<ac::JobId> singles;
  for (int b = 0; b < batch; ++b)
    singles.push_back(engine.submit_eigh({}, ac::Precision::kFloat64, 1, n, da.get() + b * nn, dw1.get() + b * n,
                                         dv1.get() + b * nn, 0.0, false));
  ASSERT_TRUE(engine.wait(all).ok);
  for (auto id : singles) ASSERT_TRUE(engine.wait(id).ok);
  const auto w = dw.download(), w1 = dw1.download(), v = dv.download(), v1 = dv1.download();
  EXPECT_LT(max_abs_diff(w, w1), 1e-11 * max_abs(w));
  for (int b = 0; b < batch; ++b) EXPECT_LT(max_diff_up_to_sign(n, slice(v1, b, nn), slice(v, b, nn)), 1e-9);
}

// ----- inverse root ----------------------------------------------------------------------------
template <typename T>
void check_inverse_root(int n, int batch, int rank, double root, double eps, unsigned seed) {
  std::vector<std::vector<T>> mats;
  for (int b = 0; b < batch; ++b) mats.push_back(random_spd<T>(n, rank, 0.0, seed + b));
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  DeviceArray<T> da(concat(mats)), dx(batch * nn);
  ac::RefreshEngine engine;
  const auto r = engine.wait(
      engine.submit_inverse_root({5, 1, 2}, precision_of<T>(), batch, n, da.get(), dx.get(), root, eps));
  ASSERT_TRUE(r.ok) << r.message;
  const auto x = dx.download();
  for (int b = 0; b < batch; ++b) {
    std::vector<T> xc(nn);
    asteria::linalg::inverse_root<T>(n, mats[b].data(), xc.data(), root, eps);
    const auto xg = slice(x, b, nn);
    EXPECT_LT(max_abs_diff(xg, xc), (kF32<T> ? 5e-3 : 1e-9) * max_abs(xc))
        << "matrix " << b << " n=" << n << " root=" << root << " eps=" << eps;
  }
}

TEST(CudaEngine, InverseRootMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_inverse_root<double>(48, 1, 48, 2.0, 1e-6, 51);
  check_inverse_root<double>(40, 2, 10, 4.0, 1e-3, 52);  // rank-deficient: the eps shift kicks in
  check_inverse_root<float>(64, 1, 64, 2.0, 1e-4, 53);
  check_inverse_root<double>(24, 3, 24, 2.0, 1e-6, 54);  // batched small path
  check_inverse_root<float>(16, 4, 6, 4.0, 1e-2, 55);
}

// An fp32 factor that is PSD up to rounding has a slightly negative smallest eigenvalue, |λ_min| ≫ eps.
// Lifting it as (λ − λ_min) + eps in double keeps eps, as linalg::inverse_root does; eps − λ_min in
// fp32 rounds to −λ_min and leaves an exact 0 (an infinite root, a failed matrix).
TEST(CudaEngine, InverseRootKeepsEpsWhenTheSmallestEigenvalueIsNegativeInFp32) {
  SKIP_WITHOUT_GPU();
  const int n = 5;
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  std::vector<double> q = random_spd<double>(n, n, 1.0, 11), w(n), v(nn);
  asteria::linalg::eigh<double>(n, q.data(), w.data(), v.data());  // an orthonormal basis v
  const double lambda[5] = {-1e-3, 0.5, 1.0, 2.0, 3.0};
  std::vector<float> a(nn);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += v[i * n + k] * lambda[k] * v[j * n + k];
      a[i * n + j] = static_cast<float>(s);
    }
  for (int i = 0; i < n; ++i)  // exactly symmetric in fp32
    for (int j = 0; j < i; ++j) a[i * n + j] = a[j * n + i];
  ac::RefreshEngine engine;
  for (int batch : {1, 3}) {  // per-matrix syevd, and the batched solver
    std::vector<float> as;
    for (int b = 0; b < batch; ++b) as.insert(as.end(), a.begin(), a.end());
    DeviceArray<float> da(as), dx(batch * nn);
    const auto r = engine.wait(engine.submit_inverse_root({}, ac::Precision::kFloat32, batch, n, da.get(), dx.get(),
                                                          4.0, 1e-12));
    ASSERT_TRUE(r.ok) << "batch " << batch << ": " << r.message;
    const auto x = dx.download();
    for (float e : x) ASSERT_TRUE(std::isfinite(e)) << "batch " << batch;
    // (eps)^(-1/4) = 1e3 along the lifted direction.
    EXPECT_GT(*std::max_element(x.begin(), x.end()), 100.0f) << "batch " << batch;
  }
}

// ----- eigenbasis refresh ------------------------------------------------------------------------
template <typename T>
void check_eigenbasis(int n, int batch, bool sort, unsigned seed) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  std::vector<std::vector<T>> ls, qs;
  for (int b = 0; b < batch; ++b) {
    // Q: the eigenbasis of an older statistic (ascending, so sorting really permutes); L: a newer one.
    auto old = random_spd<T>(n, n, 0.1, seed + 100 * b);
    std::vector<T> w(n), q(nn);
    asteria::linalg::eigh<T>(n, old.data(), w.data(), q.data());
    auto l = random_spd<T>(n, n, 0.1, seed + 100 * b + 1);
    for (std::size_t k = 0; k < nn; ++k) l[k] = static_cast<T>(0.2 * l[k] + old[k]);
    ls.push_back(l);
    qs.push_back(q);
  }
  DeviceArray<T> dl(concat(ls)), dq(concat(qs)), dout(batch * nn);
  DeviceArray<std::int64_t> dperm(static_cast<std::size_t>(batch) * n);
  ac::RefreshEngine engine;
  const auto r = engine.wait(engine.submit_eigenbasis_refresh({9, 4, 6}, precision_of<T>(), batch, n, dl.get(),
                                                              dq.get(), dout.get(), dperm.get(), sort));
  ASSERT_TRUE(r.ok) << r.message;
  const auto out = dout.download();
  const auto perm = dperm.download();
  for (int b = 0; b < batch; ++b) {
    std::vector<T> qc(nn);
    std::vector<std::int64_t> pc(n);
    asteria::linalg::eigenbasis_refresh<T>(n, ls[b].data(), qs[b].data(), qc.data(), pc.data(), sort);
    EXPECT_EQ(slice(perm, b, n), pc) << "matrix " << b;
    const auto qg = slice(out, b, nn);
    EXPECT_LT(max_diff_up_to_sign(n, qc, qg), kF32<T> ? 2e-3 : 1e-9) << "matrix " << b;
    // QR signs follow the same Householder convention as LAPACK: the columns agree exactly in sign.
    EXPECT_LT(max_abs_diff(qg, qc), kF32<T> ? 2e-3 : 1e-9) << "matrix " << b << " (signs)";
  }
}

TEST(CudaEngine, EigenbasisRefreshMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_eigenbasis<double>(48, 1, true, 61);
  check_eigenbasis<double>(40, 2, false, 62);
  check_eigenbasis<float>(64, 1, true, 63);
  check_eigenbasis<double>(16, 4, true, 64);  // small blocks, one batched group
  check_eigenbasis<float>(12, 3, false, 65);
}

// ----- failures ----------------------------------------------------------------------------------
TEST(CudaEngine, NonFiniteInputFailsThatMatrixOnlyAndTheEngineGoesOn) {
  SKIP_WITHOUT_GPU();
  const int n = 20, batch = 3;
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  auto a = concat<double>({random_spd<double>(n, n, 1, 1), random_spd<double>(n, n, 1, 2),
                           random_spd<double>(n, n, 1, 3)});
  a[nn + 5] = std::numeric_limits<double>::quiet_NaN();
  DeviceArray<double> da(a), dw(batch * n), dv(batch * nn), dx(batch * nn);
  ac::RefreshEngine engine;
  auto r = engine.wait(engine.submit_eigh({7, 42, 45}, ac::Precision::kFloat64, batch, n, da.get(), dw.get(), dv.get(),
                                          0.0, false));
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.failed, std::vector<std::int64_t>{1});
  EXPECT_NE(r.message.find("block 7"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("version 42"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("matrix 1"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("NaN"), std::string::npos) << r.message;
  // The other matrices were still computed.
  std::vector<double> wc(n), vc(nn);
  asteria::linalg::eigh<double>(n, a.data() + 2 * nn, wc.data(), vc.data());
  EXPECT_LT(max_abs_diff(slice(dw.download(), 2, n), wc), 1e-10 * max_abs(wc));

  // Large path (per-matrix syevd) and the inverse root.
  r = engine.wait(engine.submit_inverse_root({8, 1, 1}, ac::Precision::kFloat64, 1, n, da.get() + nn, dx.get(), 2.0,
                                             1e-6));
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.failed, std::vector<std::int64_t>{0});

  // Inf in the basis of an eigenbasis refresh: only that matrix fails.
  DeviceArray<double> dl(concat<double>({random_spd<double>(n, n, 1, 4), random_spd<double>(n, n, 1, 5)}));
  auto q = concat<double>({random_spd<double>(n, n, 1, 6), random_spd<double>(n, n, 1, 7)});
  q[nn + 3] = std::numeric_limits<double>::infinity();
  DeviceArray<double> dq(q), dout(2 * nn);
  DeviceArray<std::int64_t> dperm(2 * n);
  r = engine.wait(engine.submit_eigenbasis_refresh({9, 2, 3}, ac::Precision::kFloat64, 2, n, dl.get(), dq.get(),
                                                   dout.get(), dperm.get(), true));
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.failed, std::vector<std::int64_t>{1});
  // Even for the failed matrix the permutation is a permutation.
  auto p1 = slice(dperm.download(), 1, n);
  std::sort(p1.begin(), p1.end());
  for (int j = 0; j < n; ++j) EXPECT_EQ(p1[j], j);

  // The context is still healthy: a clean job succeeds.
  a[nn + 5] = 1.0;
  da.upload(a);
  r = engine.wait(engine.submit_eigh({7, 43, 46}, ac::Precision::kFloat64, batch, n, da.get(), dw.get(), dv.get(), 0.0,
                                     false));
  EXPECT_TRUE(r.ok) << r.message;
  const auto st = engine.stats();
  EXPECT_EQ(st.submitted, 4u);
  EXPECT_EQ(st.completed, 4u);
  EXPECT_EQ(st.failed, 3u);
}

TEST(CudaEngine, InvalidArgumentsThrow) {
  SKIP_WITHOUT_GPU();
  ac::RefreshEngine engine;
  DeviceArray<double> d(16);
  std::vector<double> host(16);
  auto expect_category = [](auto&& fn, asteria::ErrorCategory c) {
    try {
      fn();
      ADD_FAILURE() << "no exception";
    } catch (const asteria::Error& e) {
      EXPECT_EQ(e.category(), c) << e.what();
    }
  };
  using C = asteria::ErrorCategory;
  expect_category([&] { engine.submit_eigh({}, ac::Precision::kFloat64, 1, 4, host.data(), d.get(), d.get(), 0, false); },
                  C::kInvalidArgument);
  expect_category([&] { engine.submit_eigh({}, ac::Precision::kFloat64, 1, 0, d.get(), d.get(), d.get(), 0, false); },
                  C::kInvalidArgument);
  expect_category([&] { engine.submit_inverse_root({}, ac::Precision::kFloat64, 1, 4, d.get(), d.get(), -1.0, 0.0); },
                  C::kInvalidArgument);
  expect_category([&] { engine.wait(12345); }, C::kInvalidArgument);
  expect_category([&] { engine.is_done(12345); }, C::kInvalidArgument);
  engine.close();
  expect_category([&] { engine.submit_eigh({}, ac::Precision::kFloat64, 1, 4, d.get(), d.get(), d.get(), 0, false); },
                  C::kCancelled);
  expect_category([] { ac::RefreshEngine bad(ac::EngineOptions{1000, true}); }, C::kInvalidArgument);
}

// ----- the fp64 retry of failed fp32 matrices (test hook: fp32 fails, fp64 does not) --------------
// fp32 matrices and the same values exactly in fp64.
std::vector<float> spd_f32(int n, int rank, double shift, unsigned seed) { return random_spd<float>(n, rank, shift, seed); }
std::vector<double> widen(const std::vector<float>& a) { return std::vector<double>(a.begin(), a.end()); }
std::vector<float> round_f32(const std::vector<double>& a) { return std::vector<float>(a.begin(), a.end()); }

ac::EngineOptions retry_options(bool fp64_retry) {
  ac::EngineOptions o;
  o.fp64_retry = fp64_retry;
  return o;
}

// Disarms an engine's hook whatever the test does.
struct Fp32Failures {
  Fp32Failures(ac::RefreshEngine& e, int count) : engine(e) { engine.set_test_fp32_failures(count); }
  ~Fp32Failures() { engine.set_test_fp32_failures(0); }
  ac::RefreshEngine& engine;
};

// The fp64 reference of a retried matrix: the same engine's fp64 eigh of the fp32 matrix (exactly
// widened) as a batch-1 job, i.e. per-matrix cusolverDnXsyevd like the retry, rounded to fp32.
struct Eigh32 {
  std::vector<float> w, v;
};
Eigh32 fp64_eigh_rounded(ac::RefreshEngine& engine, int n, const std::vector<float>& a, double ridge, bool descending) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  DeviceArray<double> da(widen(a)), dw(n), dv(nn);
  const auto r =
      engine.wait(engine.submit_eigh({}, ac::Precision::kFloat64, 1, n, da.get(), dw.get(), dv.get(), ridge, descending));
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_TRUE(r.retried.empty());
  return {round_f32(dw.download()), round_f32(dv.download())};
}

// fp32 eigh job of `batch` matrices with the hook armed for `failures` of them: the first
// `failures` (batch order) with finite input are retried and equal the fp64 result rounded to fp32;
// the others are the plain fp32 results.
void check_eigh_retry(int n, int batch, int failures, double ridge, bool descending, unsigned seed) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  std::vector<std::vector<float>> mats;
  for (int b = 0; b < batch; ++b) mats.push_back(spd_f32(n, n, 0.5, seed + b));
  DeviceArray<float> da(concat(mats)), dw(static_cast<std::size_t>(batch) * n), dv(batch * nn);
  ac::RefreshEngine engine;
  const long long before = engine.test_fp32_failures_injected();
  ac::JobResult r;
  {
    Fp32Failures armed(engine, failures);
    r = engine.wait(engine.submit_eigh({2, 5, 6}, ac::Precision::kFloat32, batch, n, da.get(), dw.get(), dv.get(),
                                       ridge, descending));
  }
  const std::string what = "n=" + std::to_string(n) + " batch=" + std::to_string(batch);
  ASSERT_TRUE(r.ok) << what << ": " << r.message;
  EXPECT_TRUE(r.failed.empty()) << what;
  std::vector<std::int64_t> expect_retried;
  for (int b = 0; b < std::min(failures, batch); ++b) expect_retried.push_back(b);
  EXPECT_EQ(r.retried, expect_retried) << what;
  EXPECT_EQ(engine.test_fp32_failures_injected(), before + std::min(failures, batch)) << what;
  EXPECT_EQ(engine.stats().fp64_retries, static_cast<std::size_t>(std::min(failures, batch))) << what;
  const auto w = dw.download(), v = dv.download();
  for (int b = 0; b < batch; ++b) {
    const auto wg = slice(w, b, n), vg = slice(v, b, nn);
    for (int j = 1; j < n; ++j) {
      if (descending) EXPECT_GE(wg[j - 1], wg[j]) << what << " matrix " << b;
      else EXPECT_LE(wg[j - 1], wg[j]) << what << " matrix " << b;
    }
    if (b < failures) {
      // The fp64 decomposition rounded to fp32: within rounding (a few ulps), far tighter than an fp32 solve.
      const Eigh32 ref = fp64_eigh_rounded(engine, n, mats[b], ridge, descending);
      EXPECT_LE(max_abs_diff(wg, ref.w), 4 * std::numeric_limits<float>::epsilon() * max_abs(ref.w))
          << what << " matrix " << b;
      EXPECT_LE(max_diff_up_to_sign(n, ref.v, vg), 1e-6) << what << " matrix " << b;
    } else {
      std::vector<float> wc(n), vc(nn);
      asteria::linalg::EighOptions o;
      o.ridge = ridge;
      o.descending = descending;
      asteria::linalg::eigh<float>(n, mats[b].data(), wc.data(), vc.data(), o);
      EXPECT_LT(max_abs_diff(wg, wc), tol<float>() * max_abs(wc)) << what << " matrix " << b;
      EXPECT_LT(max_diff_up_to_sign(n, vc, vg), 5e-3) << what << " matrix " << b;
    }
  }
}

TEST(CudaEngine, FailedFp32EighIsRetriedInFp64) {
  SKIP_WITHOUT_GPU();
  check_eigh_retry(48, 1, 1, 0.0, false, 101);   // per-matrix syevd
  check_eigh_retry(40, 3, 2, 1e-2, true, 102);   // per-matrix syevd, several matrices, ridge, descending
  check_eigh_retry(16, 4, 2, 0.0, false, 103);   // cusolverDnXsyevBatched (n <= 32, batch > 1), some retried
  check_eigh_retry(32, 3, 3, 1e-3, true, 104);   // batched, all retried
}

TEST(CudaEngine, FailedFp32EighWithoutTheRetryIsReportedFailed) {
  SKIP_WITHOUT_GPU();
  ac::RefreshEngine engine(retry_options(false));
  for (const auto& [n, batch] : {std::pair{40, 1}, std::pair{12, 3}}) {
    const std::size_t nn = static_cast<std::size_t>(n) * n;
    std::vector<std::vector<float>> mats;
    for (int b = 0; b < batch; ++b) mats.push_back(spd_f32(n, n, 0.5, 110 + b));
    DeviceArray<float> da(concat(mats)), dw(static_cast<std::size_t>(batch) * n), dv(batch * nn);
    const long long before = engine.test_fp32_failures_injected();
    ac::JobResult r;
    {
      Fp32Failures armed(engine, 1);
      r = engine.wait(engine.submit_eigh({4, 1, 2}, ac::Precision::kFloat32, batch, n, da.get(), dw.get(), dv.get(),
                                         0.0, false));
    }
    EXPECT_FALSE(r.ok) << "batch " << batch;
    EXPECT_EQ(r.failed, std::vector<std::int64_t>{0}) << "batch " << batch;
    EXPECT_TRUE(r.retried.empty()) << "batch " << batch;
    EXPECT_NE(r.message.find("matrix 0: the solver reported info != 0"), std::string::npos) << r.message;
    EXPECT_EQ(r.message.find("fp64"), std::string::npos) << r.message;
    EXPECT_EQ(engine.test_fp32_failures_injected(), before + 1);
    // The hook is spent: the same job succeeds.
    r = engine.wait(
        engine.submit_eigh({4, 2, 3}, ac::Precision::kFloat32, batch, n, da.get(), dw.get(), dv.get(), 0.0, false));
    EXPECT_TRUE(r.ok) << r.message;
  }
  EXPECT_EQ(engine.stats().fp64_retries, 0u);
}

// fp32 inverse roots with the hook armed: the retried matrices are (A + eps·I)^(-1/root) from the
// fp64 decomposition with the fp32 post-processing (as linalg's retry), so they agree with the
// fp64 root to fp32 accuracy.
void check_inverse_root_retry(ac::RefreshEngine& engine, int n, int batch, int rank, double shift, double root,
                              double eps, int failures, unsigned seed) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  std::vector<std::vector<float>> mats;
  for (int b = 0; b < batch; ++b) mats.push_back(spd_f32(n, rank, shift, seed + b));
  DeviceArray<float> da(concat(mats)), dx(batch * nn);
  DeviceArray<double> da64(widen(concat(mats))), dx64(batch * nn);
  const auto r64 =
      engine.wait(engine.submit_inverse_root({}, ac::Precision::kFloat64, batch, n, da64.get(), dx64.get(), root, eps));
  ASSERT_TRUE(r64.ok) << r64.message;
  const long long before = engine.test_fp32_failures_injected();
  ac::JobResult r;
  {
    Fp32Failures armed(engine, failures);
    r = engine.wait(engine.submit_inverse_root({6, 1, 1}, ac::Precision::kFloat32, batch, n, da.get(), dx.get(), root,
                                               eps));
  }
  const std::string what = "n=" + std::to_string(n) + " batch=" + std::to_string(batch);
  ASSERT_TRUE(r.ok) << what << ": " << r.message;
  std::vector<std::int64_t> expect_retried;
  for (int b = 0; b < std::min(failures, batch); ++b) expect_retried.push_back(b);
  EXPECT_EQ(r.retried, expect_retried) << what;
  EXPECT_EQ(engine.test_fp32_failures_injected(), before + std::min(failures, batch)) << what;
  const auto x = dx.download(), x64 = round_f32(dx64.download());
  for (int b = 0; b < batch; ++b) {
    const auto xg = slice(x, b, nn), xr = slice(x64, b, nn);
    for (float e : xg) ASSERT_TRUE(std::isfinite(e)) << what << " matrix " << b;
    EXPECT_LT(max_abs_diff(xg, xr), 5e-3 * max_abs(xr)) << what << " matrix " << b;
    // And with linalg's fp32 inverse root (which retries in fp64 the same way when it fails).
    std::vector<float> xc(nn);
    asteria::linalg::inverse_root<float>(n, mats[b].data(), xc.data(), root, eps);
    EXPECT_LT(max_abs_diff(xg, xc), 5e-3 * max_abs(xc)) << what << " matrix " << b;
  }
}

TEST(CudaEngine, FailedFp32InverseRootIsRetriedInFp64) {
  SKIP_WITHOUT_GPU();
  ac::RefreshEngine engine;
  check_inverse_root_retry(engine, 40, 1, 40, 0.5, 2.0, 0.1, 1, 121);  // per-matrix syevd; eps matters (λ_min ~ 0.5)
  check_inverse_root_retry(engine, 36, 2, 36, 0.5, 4.0, 1e-2, 1, 122);  // per-matrix, one of two retried
  check_inverse_root_retry(engine, 12, 3, 4, 0.0, 4.0, 1e-3, 3, 123);   // batched, rank-deficient: the lift
  check_inverse_root_retry(engine, 20, 4, 20, 0.5, 2.0, 0.1, 2, 124);   // batched, some retried
  EXPECT_EQ(engine.stats().fp64_retries, 1u + 1u + 3u + 2u);
}

TEST(CudaEngine, FailedFp32InverseRootWithoutTheRetryIsReportedFailed) {
  SKIP_WITHOUT_GPU();
  ac::RefreshEngine engine(retry_options(false));
  for (const auto& [n, batch] : {std::pair{40, 2}, std::pair{16, 4}}) {
    const std::size_t nn = static_cast<std::size_t>(n) * n;
    std::vector<std::vector<float>> mats;
    for (int b = 0; b < batch; ++b) mats.push_back(spd_f32(n, n, 0.5, 130 + b));
    DeviceArray<float> da(concat(mats)), dx(batch * nn);
    ac::JobResult r;
    {
      Fp32Failures armed(engine, 2);
      r = engine.wait(
          engine.submit_inverse_root({7, 1, 1}, ac::Precision::kFloat32, batch, n, da.get(), dx.get(), 2.0, 1e-6));
    }
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.failed, (std::vector<std::int64_t>{0, 1})) << "batch " << batch;
    EXPECT_TRUE(r.retried.empty());
    EXPECT_NE(r.message.find("the solver reported info != 0"), std::string::npos) << r.message;
  }
}

// A matrix with non-finite input is never retried and does not take the hook; the next ones do.
TEST(CudaEngine, NonFiniteInputIsNotRetriedAndDoesNotTakeTheHook) {
  SKIP_WITHOUT_GPU();
  ac::RefreshEngine engine;
  for (const int n : {12, 40}) {  // batched and per-matrix
    const int batch = 3;
    const std::size_t nn = static_cast<std::size_t>(n) * n;
    auto a = concat<float>({spd_f32(n, n, 0.5, 141), spd_f32(n, n, 0.5, 142), spd_f32(n, n, 0.5, 143)});
    a[3] = std::numeric_limits<float>::quiet_NaN();  // matrix 0
    DeviceArray<float> da(a), dw(static_cast<std::size_t>(batch) * n), dv(batch * nn), dx(batch * nn);
    const long long before = engine.test_fp32_failures_injected();
    ac::JobResult r, rx;
    {
      Fp32Failures armed(engine, 2);
      r = engine.wait(
          engine.submit_eigh({}, ac::Precision::kFloat32, batch, n, da.get(), dw.get(), dv.get(), 0.0, false));
      rx = engine.wait(engine.submit_inverse_root({}, ac::Precision::kFloat32, batch, n, da.get(), dx.get(), 2.0, 1e-6));
    }
    EXPECT_EQ(engine.test_fp32_failures_injected(), before + 2) << "n=" << n;
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.failed, std::vector<std::int64_t>{0}) << "n=" << n;
    EXPECT_EQ(r.retried, (std::vector<std::int64_t>{1, 2})) << "n=" << n;
    EXPECT_NE(r.message.find("NaN"), std::string::npos) << r.message;
    // The hook was spent by the eigh job: the inverse root only fails its NaN matrix, retries nothing.
    EXPECT_FALSE(rx.ok);
    EXPECT_EQ(rx.failed, std::vector<std::int64_t>{0}) << "n=" << n;
    EXPECT_TRUE(rx.retried.empty()) << "n=" << n;
    const auto w = dw.download();
    for (int b = 1; b < batch; ++b) {
      const Eigh32 ref = fp64_eigh_rounded(engine, n, slice(a, b, nn), 0.0, false);
      EXPECT_LE(max_abs_diff(slice(w, b, n), ref.w), 4 * std::numeric_limits<float>::epsilon() * max_abs(ref.w))
          << "n=" << n << " matrix " << b;
    }
  }
}

TEST(CudaEngine, Fp64JobsAndEigenbasisRefreshesNeverTakeTheFp32FailureHook) {
  SKIP_WITHOUT_GPU();
  ac::RefreshEngine engine;
  const long long before = engine.test_fp32_failures_injected();
  Fp32Failures armed(engine, 1);
  for (const auto& [n, batch] : {std::pair{40, 1}, std::pair{16, 3}}) {
    const std::size_t nn = static_cast<std::size_t>(n) * n;
    std::vector<std::vector<double>> mats;
    for (int b = 0; b < batch; ++b) mats.push_back(random_spd<double>(n, n, 0.5, 150 + b));
    DeviceArray<double> da(concat(mats)), dw(static_cast<std::size_t>(batch) * n), dv(batch * nn), dx(batch * nn);
    auto r = engine.wait(
        engine.submit_eigh({}, ac::Precision::kFloat64, batch, n, da.get(), dw.get(), dv.get(), 0.0, false));
    EXPECT_TRUE(r.ok) << r.message;
    EXPECT_TRUE(r.retried.empty());
    r = engine.wait(engine.submit_inverse_root({}, ac::Precision::kFloat64, batch, n, da.get(), dx.get(), 2.0, 1e-6));
    EXPECT_TRUE(r.ok) << r.message;
    EXPECT_TRUE(r.retried.empty());
    // An fp32 eigenbasis refresh has no eigendecomposition: it does not take the hook either.
    std::vector<float> l = spd_f32(n, n, 0.5, 160), q(nn), wq(n);
    asteria::linalg::eigh<float>(n, l.data(), wq.data(), q.data());
    DeviceArray<float> dl(l), dq(q), dout(nn);
    DeviceArray<std::int64_t> dperm(n);
    r = engine.wait(engine.submit_eigenbasis_refresh({}, ac::Precision::kFloat32, 1, n, dl.get(), dq.get(), dout.get(),
                                                     dperm.get(), true));
    EXPECT_TRUE(r.ok) << r.message;
  }
  EXPECT_EQ(engine.test_fp32_failures_injected(), before);
  // Still armed: the next fp32 decomposition takes it.
  const int n = 24;
  DeviceArray<float> da(spd_f32(n, n, 0.5, 170)), dw(n), dv(n * n);
  const auto r =
      engine.wait(engine.submit_eigh({}, ac::Precision::kFloat32, 1, n, da.get(), dw.get(), dv.get(), 0.0, false));
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_EQ(r.retried, std::vector<std::int64_t>{0});
  EXPECT_EQ(engine.test_fp32_failures_injected(), before + 1);
  EXPECT_EQ(engine.stats().fp64_retries, 1u);
}

// The retry's wait for the fp32 pass happens on the engine's queueing thread: submitting, polling
// and is_done still return at once while the job waits for a slow producer stream.
TEST(CudaEngine, TheRetryNeverBlocksTheSubmittingThread) {
  SKIP_WITHOUT_GPU();
  const int n = 64;
  DeviceArray<float> da(spd_f32(n, n, 1.0, 180)), dw(n), dv(n * n);
  cudaStream_t gate;
  CUDA_OK(cudaStreamCreateWithFlags(&gate, cudaStreamNonBlocking));
  ac::RefreshEngine engine;  // before the gate: construction may synchronize the device
  Fp32Failures armed(engine, 1);
  static int delay_ms = 600;
  CUDA_OK(cudaLaunchHostFunc(gate, host_sleep, &delay_ms));
  const auto t0 = Clock::now();
  const auto id = engine.submit_eigh({}, ac::Precision::kFloat32, 1, n, da.get(), dw.get(), dv.get(), 0.0, false,
                                     reinterpret_cast<std::uintptr_t>(gate));
  const auto id2 = engine.submit_eigh({}, ac::Precision::kFloat32, 1, n, da.get(), dw.get(), dv.get(), 0.0, false);
  EXPECT_TRUE(engine.poll().empty());
  EXPECT_FALSE(engine.is_done(id));
  EXPECT_FALSE(engine.is_done(id2));
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 0.3);
  const auto r = engine.wait(id), r2 = engine.wait(id2);
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_EQ(r.retried, std::vector<std::int64_t>{0});
  EXPECT_TRUE(r2.ok) << r2.message;
  EXPECT_TRUE(r2.retried.empty());
  EXPECT_GT(r.queued_seconds, 0.3);
  CUDA_OK(cudaStreamSynchronize(gate));
  CUDA_OK(cudaStreamDestroy(gate));
}

TEST(CudaEngine, Fp32FailureHookRefusesANegativeCount) {
  SKIP_WITHOUT_GPU();
  ac::RefreshEngine engine;
  try {
    engine.set_test_fp32_failures(-1);
    ADD_FAILURE() << "no exception";
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kInvalidArgument) << e.what();
  }
  EXPECT_EQ(engine.test_fp32_failures_injected(), 0);
}

// ----- streams, ordering, non-blocking checks -------------------------------------------------
TEST(CudaEngine, WaitStreamOrdersTheJobAfterTheProducer) {
  SKIP_WITHOUT_GPU();
  const int n = 32;
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  const auto good = random_spd<double>(n, n, 1.0, 77);
  std::vector<double> nan(nn, std::numeric_limits<double>::quiet_NaN());
  DeviceArray<double> da(nan), dw(n), dv(nn);
  double* pinned = nullptr;
  CUDA_OK(cudaMallocHost(&pinned, nn * sizeof(double)));
  std::copy(good.begin(), good.end(), pinned);
  cudaStream_t producer;
  CUDA_OK(cudaStreamCreateWithFlags(&producer, cudaStreamNonBlocking));
  ac::RefreshEngine engine;  // before the producer's work: construction may synchronize the device
  static int delay_ms = 300;
  // The producer first sleeps, then writes the good matrix over the NaNs. A job that did not wait
  // for it would read NaN and fail.
  CUDA_OK(cudaLaunchHostFunc(producer, host_sleep, &delay_ms));
  CUDA_OK(cudaMemcpyAsync(da.get(), pinned, nn * sizeof(double), cudaMemcpyHostToDevice, producer));
  const auto id = engine.submit_eigh({}, ac::Precision::kFloat64, 1, n, da.get(), dw.get(), dv.get(), 0.0, false,
                                     reinterpret_cast<std::uintptr_t>(producer));
  const auto r = engine.wait(id);
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_GT(r.queued_seconds, 0.1);  // it really waited for the producer
  CUDA_OK(cudaStreamSynchronize(producer));
  CUDA_OK(cudaStreamDestroy(producer));
  CUDA_OK(cudaFreeHost(pinned));
}

TEST(CudaEngine, LegacyDefaultStreamIsAValidWaitStream) {
  SKIP_WITHOUT_GPU();
  const int n = 8;
  DeviceArray<double> da(random_spd<double>(n, n, 1.0, 5)), dw(n), dv(n * n);
  ac::RefreshEngine engine;
  const auto r = engine.wait(engine.submit_eigh({}, ac::Precision::kFloat64, 1, n, da.get(), dw.get(), dv.get(), 0.0,
                                                false, /*legacy default stream*/ 0));
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(CudaEngine, PollAndIsDoneNeverBlock) {
  SKIP_WITHOUT_GPU();
  const int n = 64;
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  DeviceArray<double> da(random_spd<double>(n, n, 1.0, 88)), dw(n), dv(nn);
  cudaStream_t gate;
  CUDA_OK(cudaStreamCreateWithFlags(&gate, cudaStreamNonBlocking));
  ac::RefreshEngine engine;  // before the gate: construction may synchronize the device
  static int delay_ms = 800;
  CUDA_OK(cudaLaunchHostFunc(gate, host_sleep, &delay_ms));
  auto t0 = Clock::now();
  const auto id = engine.submit_eigh({1, 2, 3}, ac::Precision::kFloat64, 1, n, da.get(), dw.get(), dv.get(), 0.0,
                                     false, reinterpret_cast<std::uintptr_t>(gate));
  const auto id2 = engine.submit_eigh({1, 3, 4}, ac::Precision::kFloat64, 1, n, da.get(), dw.get(), dv.get(), 0.0,
                                      false);
  const double submit_s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(submit_s, 0.3);
  t0 = Clock::now();
  const auto early = engine.poll();
  EXPECT_FALSE(engine.is_done(id));
  EXPECT_FALSE(engine.is_done(id2));  // queued behind the first on the engine stream
  const auto st = engine.stats();
  const double check_s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_TRUE(early.empty());
  EXPECT_EQ(st.in_flight, 2u);
  EXPECT_LT(check_s, 0.05);
  const auto r = engine.wait(id);
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_GT(std::chrono::duration<double>(Clock::now() - t0).count(), 0.3);
  // The second job is returned exactly once, by poll or by wait.
  std::vector<ac::JobResult> rest;
  while (rest.empty()) {
    rest = engine.poll();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(rest.size(), 1u);
  EXPECT_EQ(rest[0].id, id2);
  EXPECT_TRUE(engine.is_done(id2));
  EXPECT_TRUE(engine.poll().empty());
  CUDA_OK(cudaStreamSynchronize(gate));
  CUDA_OK(cudaStreamDestroy(gate));
}

TEST(CudaEngine, ManyJobsCompleteInOrderWithStats) {
  SKIP_WITHOUT_GPU();
  const int n = 96, jobs = 12;
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  DeviceArray<float> da(random_spd<float>(n, n, 1.0, 99)), dx(jobs * nn);
  ac::RefreshEngine engine;
  std::vector<ac::JobId> ids;
  for (int k = 0; k < jobs; ++k)
    ids.push_back(engine.submit_inverse_root({static_cast<std::uint64_t>(k), k, k + 1}, ac::Precision::kFloat32, 1, n,
                                             da.get(), dx.get() + k * nn, 2.0, 1e-6));
  const auto last = engine.wait(ids.back());
  EXPECT_TRUE(last.ok) << last.message;
  const auto rest = engine.poll();
  ASSERT_EQ(rest.size(), static_cast<std::size_t>(jobs - 1));
  for (int k = 0; k + 1 < jobs; ++k) {
    EXPECT_EQ(rest[k].id, ids[k]);
    EXPECT_EQ(rest[k].block_id, static_cast<std::uint64_t>(k));
    EXPECT_TRUE(rest[k].ok) << rest[k].message;
  }
  const auto st = engine.stats();
  EXPECT_EQ(st.submitted, static_cast<std::size_t>(jobs));
  EXPECT_EQ(st.completed, static_cast<std::size_t>(jobs));
  EXPECT_EQ(st.failed, 0u);
  EXPECT_EQ(st.in_flight, 0u);
  EXPECT_EQ(st.uncollected, 0u);
  EXPECT_GT(st.total_run_seconds, 0.0);
  EXPECT_GE(st.total_run_seconds, st.max_run_seconds);
}

TEST(CudaEngine, ConcurrentWaitAndPollReturnEachResultOnce) {
  SKIP_WITHOUT_GPU();
  const int n = 256, jobs = 16;
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  DeviceArray<double> da(random_spd<double>(n, n, 1.0, 7)), dx(jobs * nn);
  ac::RefreshEngine engine;
  std::vector<ac::JobId> ids;
  for (int k = 0; k < jobs; ++k)
    ids.push_back(engine.submit_inverse_root({}, ac::Precision::kFloat64, 1, n, da.get(), dx.get() + k * nn, 2.0, 0.0));
  // Waiters on the even jobs race a poller: every result must arrive exactly once, either from
  // wait() or from poll() (a waiter that comes too late is told the job was already collected).
  std::vector<std::vector<ac::JobId>> waited(jobs / 2);
  std::vector<std::thread> waiters;
  for (int k = 0; k < jobs / 2; ++k)
    waiters.emplace_back([&, k] {
      try {
        waited[k].push_back(engine.wait(ids[2 * k]).id);
      } catch (const asteria::Error& e) {
        EXPECT_NE(std::string(e.what()).find("already collected"), std::string::npos) << e.what();
      }
    });
  std::vector<ac::JobId> seen;
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (Clock::now() < deadline) {
    for (const auto& r : engine.poll()) seen.push_back(r.id);
    if (engine.stats().in_flight == 0) break;
  }
  for (auto& t : waiters) t.join();
  for (const auto& r : engine.poll()) seen.push_back(r.id);
  for (const auto& w : waited) seen.insert(seen.end(), w.begin(), w.end());
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(seen, ids);
}

TEST(CudaEngine, EngineStreamHasTheLowestPriority) {
  SKIP_WITHOUT_GPU();
  int least = 0, greatest = 0;
  CUDA_OK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  ac::RefreshEngine low;
  int p = 1;
  CUDA_OK(cudaStreamGetPriority(reinterpret_cast<cudaStream_t>(low.stream()), &p));
  EXPECT_EQ(p, least);
  EXPECT_EQ(low.priority(), least);
  unsigned flags = 0;
  CUDA_OK(cudaStreamGetFlags(reinterpret_cast<cudaStream_t>(low.stream()), &flags));
  EXPECT_EQ(flags & cudaStreamNonBlocking, static_cast<unsigned>(cudaStreamNonBlocking));
  ac::RefreshEngine high(ac::EngineOptions{0, false});
  CUDA_OK(cudaStreamGetPriority(reinterpret_cast<cudaStream_t>(high.stream()), &p));
  EXPECT_EQ(p, greatest);
}

// ----- device queries, host registration, events --------------------------------------------
TEST(CudaBackend, DeviceInfoIsSane) {
  SKIP_WITHOUT_GPU();
  const auto info = ac::device_info(0);
  EXPECT_FALSE(info.name.empty());
  EXPECT_GT(info.total_memory, std::size_t{1} << 30);
  EXPECT_GE(info.major, 6);
  EXPECT_GT(info.multiprocessors, 0);
  EXPECT_LE(info.stream_priority_greatest, info.stream_priority_least);
  try {
    ac::device_info(ac::device_count());
    ADD_FAILURE() << "no exception for a device out of range";
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kInvalidArgument);
  }
}

TEST(CudaBackend, HostRegisterRoundTrip) {
  SKIP_WITHOUT_GPU();
  const std::size_t bytes = std::size_t{4} << 20;
  void* p = std::aligned_alloc(4096, bytes);
  ASSERT_NE(p, nullptr);
  std::fill_n(static_cast<unsigned char*>(p), bytes, 0x5a);
  ac::host_register(p, bytes);
  cudaPointerAttributes attr{};
  CUDA_OK(cudaPointerGetAttributes(&attr, p));
  EXPECT_EQ(attr.type, cudaMemoryTypeHost);
  // An asynchronous round trip through the device.
  DeviceArray<unsigned char> d(bytes);
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CUDA_OK(cudaMemcpyAsync(d.get(), p, bytes, cudaMemcpyHostToDevice, s));
  CUDA_OK(cudaMemsetAsync(d.get(), 0x33, 1024, s));
  CUDA_OK(cudaMemcpyAsync(p, d.get(), bytes, cudaMemcpyDeviceToHost, s));
  CUDA_OK(cudaStreamSynchronize(s));
  CUDA_OK(cudaStreamDestroy(s));
  EXPECT_EQ(static_cast<unsigned char*>(p)[0], 0x33);
  EXPECT_EQ(static_cast<unsigned char*>(p)[bytes - 1], 0x5a);
  // Registering twice is a caller mistake.
  try {
    ac::host_register(p, bytes);
    ADD_FAILURE() << "double registration did not throw";
  } catch (const asteria::Error& e) {
    EXPECT_EQ(e.category(), asteria::ErrorCategory::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("bytes"), std::string::npos) << e.what();
  }
  ac::host_unregister(p);
  CUDA_OK(cudaPointerGetAttributes(&attr, p));
  EXPECT_EQ(attr.type, cudaMemoryTypeUnregistered);
  EXPECT_THROW(ac::host_unregister(p), asteria::Error);
  std::free(p);
}

TEST(CudaBackend, EventQueryAndSynchronize) {
  SKIP_WITHOUT_GPU();
  cudaStream_t s;
  cudaEvent_t ev;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CUDA_OK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  static int delay_ms = 300;
  CUDA_OK(cudaLaunchHostFunc(s, host_sleep, &delay_ms));
  CUDA_OK(cudaEventRecord(ev, s));
  const auto h = reinterpret_cast<std::uintptr_t>(ev);
  const auto t0 = Clock::now();
  EXPECT_FALSE(ac::event_query(h));
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 0.05);
  ac::event_synchronize(h);
  EXPECT_TRUE(ac::event_query(h));
  EXPECT_GT(std::chrono::duration<double>(Clock::now() - t0).count(), 0.2);
  CUDA_OK(cudaEventDestroy(ev));
  CUDA_OK(cudaStreamDestroy(s));
}

}  // namespace
