#include "asteria/linalg.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <new>
#include <numeric>
#include <vector>

#include "asteria/errors.h"

// ---------------------------------------------------------------------------------------------
// The linked OpenBLAS (scipy-openblas32) exports its routines with a prefix, set by the build
// (-DBLAS_SYMBOL_PREFIX=scipy_). Fortran character arguments get hidden length arguments.
// ---------------------------------------------------------------------------------------------
#ifndef BLAS_SYMBOL_PREFIX
#define BLAS_SYMBOL_PREFIX
#endif
#define ASTERIA_CAT2(a, b) a##b
#define ASTERIA_CAT(a, b) ASTERIA_CAT2(a, b)
#define OB(name) ASTERIA_CAT(BLAS_SYMBOL_PREFIX, name)

using flen = std::size_t;

extern "C" {
void OB(ssyevd_)(const char*, const char*, const int*, float*, const int*, float*, float*, const int*, int*,
                 const int*, int*, flen, flen);
void OB(dsyevd_)(const char*, const char*, const int*, double*, const int*, double*, double*, const int*, int*,
                 const int*, int*, flen, flen);
void OB(sgeqrf_)(const int*, const int*, float*, const int*, float*, float*, const int*, int*);
void OB(dgeqrf_)(const int*, const int*, double*, const int*, double*, double*, const int*, int*);
void OB(sorgqr_)(const int*, const int*, const int*, float*, const int*, const float*, float*, const int*, int*);
void OB(dorgqr_)(const int*, const int*, const int*, double*, const int*, const double*, double*, const int*, int*);
void OB(sgemm_)(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
                const float*, const int*, const float*, float*, const int*, flen, flen);
void OB(dgemm_)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                const int*, const double*, const int*, const double*, double*, const int*, flen, flen);
void OB(openblas_set_num_threads)(int);
}

namespace asteria::linalg {
namespace {

template <typename T>
struct Fns;

// One provider: a table of function pointers for each precision.
struct Table {
  using ssyevd_t = decltype(&OB(ssyevd_));
  using dsyevd_t = decltype(&OB(dsyevd_));
  using sgeqrf_t = decltype(&OB(sgeqrf_));
  using dgeqrf_t = decltype(&OB(dgeqrf_));
  using sorgqr_t = decltype(&OB(sorgqr_));
  using dorgqr_t = decltype(&OB(dorgqr_));
  using sgemm_t = decltype(&OB(sgemm_));
  using dgemm_t = decltype(&OB(dgemm_));
  ssyevd_t ssyevd;
  dsyevd_t dsyevd;
  sgeqrf_t sgeqrf;
  dgeqrf_t dgeqrf;
  sorgqr_t sorgqr;
  dorgqr_t dorgqr;
  sgemm_t sgemm;
  dgemm_t dgemm;
  void (*set_threads)(int);  // may be null
};

void openblas_threads(int n) { OB(openblas_set_num_threads)(n); }

const Table kOpenBlas{&OB(ssyevd_), &OB(dsyevd_), &OB(sgeqrf_), &OB(dgeqrf_), &OB(sorgqr_),
                      &OB(dorgqr_), &OB(sgemm_),  &OB(dgemm_),  &openblas_threads};

struct State {
  std::mutex mu;
  Table table = kOpenBlas;
  ProviderInfo info{"openblas", "libscipy_openblas.so (linked)", 1};
  void* handle = nullptr;
};
State& state() {
  static State s;
  return s;
}
const Table& T_() { return state().table; }

template <>
struct Fns<float> {
  static void syevd(const char* j, const char* u, const int* n, float* a, const int* lda, float* w, float* work,
                    const int* lwork, int* iwork, const int* liwork, int* info) {
    T_().ssyevd(j, u, n, a, lda, w, work, lwork, iwork, liwork, info, 1, 1);
  }
  static void geqrf(const int* m, const int* n, float* a, const int* lda, float* tau, float* work, const int* lwork,
                    int* info) {
    T_().sgeqrf(m, n, a, lda, tau, work, lwork, info);
  }
  static void orgqr(const int* m, const int* n, const int* k, float* a, const int* lda, const float* tau, float* work,
                    const int* lwork, int* info) {
    T_().sorgqr(m, n, k, a, lda, tau, work, lwork, info);
  }
  static void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                   float beta, float* c, int ldc) {
    T_().sgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc, 1, 1);
  }
};
template <>
struct Fns<double> {
  static void syevd(const char* j, const char* u, const int* n, double* a, const int* lda, double* w, double* work,
                    const int* lwork, int* iwork, const int* liwork, int* info) {
    T_().dsyevd(j, u, n, a, lda, w, work, lwork, iwork, liwork, info, 1, 1);
  }
  static void geqrf(const int* m, const int* n, double* a, const int* lda, double* tau, double* work,
                    const int* lwork, int* info) {
    T_().dgeqrf(m, n, a, lda, tau, work, lwork, info);
  }
  static void orgqr(const int* m, const int* n, const int* k, double* a, const int* lda, const double* tau,
                    double* work, const int* lwork, int* info) {
    T_().dorgqr(m, n, k, a, lda, tau, work, lwork, info);
  }
  static void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                   int ldb, double beta, double* c, int ldc) {
    T_().dgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc, 1, 1);
  }
};

// 64-byte aligned allocator: LAPACK kernels (MKL especially) take slower paths on less aligned
// matrices.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const noexcept {
    return true;
  }
};

// Bytes of per-thread scratch space held by all threads (scratch_bytes()).
std::atomic<std::size_t> g_scratch_bytes{0};

// One thread's scratch buffers of one element type; they only grow, and their bytes are counted in
// g_scratch_bytes until the thread exits.
template <typename T, int Slots>
struct ScratchSet {
  std::vector<T, Aligned64<T>> buffers[Slots];
  T* get(int slot, std::size_t count) {
    auto& b = buffers[slot];
    if (b.size() < count) {
      const std::size_t before = b.capacity();
      b.resize(count);
      g_scratch_bytes.fetch_add((b.capacity() - before) * sizeof(T), std::memory_order_relaxed);
    }
    return b.data();
  }
  ~ScratchSet() {
    std::size_t held = 0;
    for (const auto& b : buffers) held += b.capacity() * sizeof(T);
    g_scratch_bytes.fetch_sub(held, std::memory_order_relaxed);
  }
};

// Per-thread scratch space that only grows.
template <typename T>
T* scratch(int slot, std::size_t count) {
  thread_local ScratchSet<T, 6> set;
  return set.get(slot, count);
}
int* iscratch(std::size_t count) {
  thread_local ScratchSet<int, 1> set;
  return set.get(0, count);
}

void check_n(int n, const char* where) {
  ASTERIA_CHECK(n >= 1 && n <= 65536, kInvalidArgument,
                "[linalg::" << where << "] matrix size must be in 1..65536, got " << n);
}

// dst = srcᵀ for n×n matrices, in cache-sized tiles (a plain double loop misses the cache on
// every strided write, which costs as much as a small GEMM for n >= 1024).
template <typename T>
void transpose(int n, const T* src, T* dst) {
  constexpr int kTile = 32;
  for (int i0 = 0; i0 < n; i0 += kTile)
    for (int j0 = 0; j0 < n; j0 += kTile) {
      const int i1 = std::min(n, i0 + kTile), j1 = std::min(n, j0 + kTile);
      for (int i = i0; i < i1; ++i)
        for (int j = j0; j < j1; ++j)
          dst[static_cast<std::size_t>(j) * n + i] = src[static_cast<std::size_t>(i) * n + j];
    }
}

// syevd on a column-major copy `z` (overwritten with the eigenvectors). Returns LAPACK's info.
template <typename T>
int syevd_inplace(int n, T* z, T* w) {
  int lwork = -1, liwork = -1, info = 0;
  T wq = 0;
  int iwq = 0;
  Fns<T>::syevd("V", "U", &n, z, &n, w, &wq, &lwork, &iwq, &liwork, &info);
  if (info != 0) return info;
  lwork = std::max(1, static_cast<int>(wq));
  liwork = std::max(1, iwq);
  T* work = scratch<T>(5, static_cast<std::size_t>(lwork));
  int* iwork = iscratch(static_cast<std::size_t>(liwork));
  Fns<T>::syevd("V", "U", &n, z, &n, w, work, &lwork, iwork, &liwork, &info);
  return info;
}

// The fp32 failure test hook (set_test_fp32_eigh_failures): failures still to inject, and injected.
std::atomic<int> g_fp32_eigh_faults{0};
std::atomic<long long> g_fp32_eigh_faults_injected{0};

bool take_fp32_eigh_fault() noexcept {
  int left = g_fp32_eigh_faults.load(std::memory_order_relaxed);
  while (left > 0 && !g_fp32_eigh_faults.compare_exchange_weak(left, left - 1, std::memory_order_relaxed)) {
  }
  if (left <= 0) return false;
  g_fp32_eigh_faults_injected.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// Eigendecomposition into column-major eigenvectors `z` (n×n) and ascending eigenvalues `w`,
// from a row-major symmetric `a` plus ridge·I; fp32 retries in fp64 on failure.
template <typename T>
void eigh_colmajor(int n, const T* a, double ridge, T* w, T* z, bool fp64_retry, const char* where) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  ASTERIA_CHECK(all_finite(nn, a), kNumerical, "[linalg::" << where << "] input matrix contains NaN or Inf");
  // The lower triangle of the row-major matrix is the upper triangle of its column-major view.
  std::copy(a, a + nn, z);
  if (ridge != 0.0)
    for (int i = 0; i < n; ++i) z[static_cast<std::size_t>(i) * n + i] += static_cast<T>(ridge);
  int info = syevd_inplace<T>(n, z, w);
  if constexpr (std::is_same_v<T, float>) {
    if (info == 0 && take_fp32_eigh_fault()) info = n + 1;  // test hook: as LAPACK reports a failed syevd
  }
  bool ok = info == 0 && all_finite(nn, z) && all_finite(static_cast<std::size_t>(n), w);
  if (!ok && std::is_same_v<T, float> && fp64_retry) {
    std::vector<double> zd(a, a + nn), wd(static_cast<std::size_t>(n));
    if (ridge != 0.0)
      for (int i = 0; i < n; ++i) zd[static_cast<std::size_t>(i) * n + i] += ridge;
    info = syevd_inplace<double>(n, zd.data(), wd.data());
    std::transform(zd.begin(), zd.end(), z, [](double x) { return static_cast<T>(x); });
    std::transform(wd.begin(), wd.end(), w, [](double x) { return static_cast<T>(x); });
    ok = info == 0 && all_finite(nn, z) && all_finite(static_cast<std::size_t>(n), w);
  }
  ASTERIA_CHECK(ok, kNumerical,
                "[linalg::" << where << "] symmetric eigendecomposition failed (LAPACK syevd info=" << info
                            << ", n=" << n << (std::is_same_v<T, float> && fp64_retry ? ", fp64 retry included" : "")
                            << "); the previous result is kept. A larger ridge/epsilon usually fixes this.");
}

// QR of the column-major n×n matrix m in place: m <- Q.
template <typename T>
void qr_q_inplace(int n, T* m, const char* where) {
  T* tau = scratch<T>(4, static_cast<std::size_t>(n));
  int lwork = -1, info = 0;
  T wq = 0;
  Fns<T>::geqrf(&n, &n, m, &n, tau, &wq, &lwork, &info);
  T wq2 = 0;
  Fns<T>::orgqr(&n, &n, &n, m, &n, tau, &wq2, &lwork, &info);
  lwork = std::max({1, static_cast<int>(wq), static_cast<int>(wq2)});
  T* work = scratch<T>(5, static_cast<std::size_t>(lwork));
  Fns<T>::geqrf(&n, &n, m, &n, tau, work, &lwork, &info);
  ASTERIA_CHECK(info == 0, kNumerical, "[linalg::" << where << "] QR factorisation failed (geqrf info=" << info << ")");
  Fns<T>::orgqr(&n, &n, &n, m, &n, tau, work, &lwork, &info);
  ASTERIA_CHECK(info == 0, kNumerical, "[linalg::" << where << "] forming Q failed (orgqr info=" << info << ")");
}

}  // namespace

void set_test_fp32_eigh_failures(int count) {
  ASTERIA_CHECK(count >= 0, kInvalidArgument, "[linalg::set_test_fp32_eigh_failures] count must be >= 0, got " << count);
  g_fp32_eigh_faults.store(count);
}

long long test_fp32_eigh_failures_injected() noexcept { return g_fp32_eigh_faults_injected.load(); }

// ----- provider ------------------------------------------------------------------------------
ProviderInfo provider() {
  std::lock_guard<std::mutex> lock(state().mu);
  return state().info;
}

void load_provider(const std::string& name, const std::string& library) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (name == "openblas") {
    s.table = kOpenBlas;
    s.info.name = "openblas";
    s.info.library = "libscipy_openblas.so (linked)";
    if (s.table.set_threads) s.table.set_threads(s.info.threads);
    return;
  }
  ASTERIA_CHECK(name == "mkl", kInvalidArgument,
                "[linalg::load_provider] unknown LAPACK provider '" << name << "'; choose 'openblas' or 'mkl'");
  const std::string lib = library.empty() ? std::string("libmkl_rt.so") : library;
  void* h = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASTERIA_CHECK(h != nullptr, kUnavailable,
                "[linalg::load_provider] cannot load MKL from '" << lib << "': " << dlerror()
                                                                  << ". Fix: pip install 'asteria[mkl]' (or pip install mkl),"
                                                                     " or use the default provider 'openblas'.");
  // Sequential MKL: asteria runs one refresh per worker thread and sets threads per call itself.
  if (auto layer = reinterpret_cast<int (*)(int)>(dlsym(h, "MKL_Set_Threading_Layer"))) layer(1 /*SEQUENTIAL*/);
  Table t{};
  auto need = [&](const char* sym) {
    void* p = dlsym(h, sym);
    if (p == nullptr) {
      dlclose(h);
      ASTERIA_CHECK(false, kUnavailable, "[linalg::load_provider] '" << lib << "' has no symbol " << sym);
    }
    return p;
  };
  t.ssyevd = reinterpret_cast<Table::ssyevd_t>(need("ssyevd_"));
  t.dsyevd = reinterpret_cast<Table::dsyevd_t>(need("dsyevd_"));
  t.sgeqrf = reinterpret_cast<Table::sgeqrf_t>(need("sgeqrf_"));
  t.dgeqrf = reinterpret_cast<Table::dgeqrf_t>(need("dgeqrf_"));
  t.sorgqr = reinterpret_cast<Table::sorgqr_t>(need("sorgqr_"));
  t.dorgqr = reinterpret_cast<Table::dorgqr_t>(need("dorgqr_"));
  t.sgemm = reinterpret_cast<Table::sgemm_t>(need("sgemm_"));
  t.dgemm = reinterpret_cast<Table::dgemm_t>(need("dgemm_"));
  t.set_threads = reinterpret_cast<void (*)(int)>(dlsym(h, "MKL_Set_Num_Threads"));
  if (s.handle != nullptr) dlclose(s.handle);
  s.handle = h;
  s.table = t;
  s.info.name = "mkl";
  s.info.library = lib;
  if (s.table.set_threads) s.table.set_threads(s.info.threads);
}

void set_num_threads(int threads) {
  ASTERIA_CHECK(threads >= 1 && threads <= 256, kInvalidArgument,
                "[linalg::set_num_threads] threads must be in 1..256, got " << threads);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.info.threads = threads;
  if (s.table.set_threads) s.table.set_threads(threads);
}

// ----- matrix functions ----------------------------------------------------------------------
template <typename T>
bool all_finite(std::size_t count, const T* x) noexcept {
  for (std::size_t i = 0; i < count; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

template <typename T>
void eigh(int n, const T* a, T* w, T* v, const EighOptions& opts) {
  check_n(n, "eigh");
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  T* z = scratch<T>(0, nn);
  eigh_colmajor<T>(n, a, opts.ridge, w, z, opts.fp64_retry, "eigh");
  // Column-major z holds eigenvector j in z[j*n .. j*n+n): its transpose, read row-major, has the
  // eigenvectors in columns. Descending order reverses the columns first.
  if (opts.descending) {
    T* r = scratch<T>(1, nn);
    for (int j = 0; j < n; ++j)
      std::copy(z + static_cast<std::size_t>(n - 1 - j) * n, z + static_cast<std::size_t>(n - j) * n,
                r + static_cast<std::size_t>(j) * n);
    z = r;
    std::reverse(w, w + n);
  }
  transpose(n, z, v);
}

template <typename T>
void inverse_root(int n, const T* a, T* x, double root, double eps, bool fp64_retry) {
  check_n(n, "inverse_root");
  ASTERIA_CHECK(root > 0 && std::isfinite(root), kInvalidArgument,
                "[linalg::inverse_root] root must be positive and finite, got " << root);
  ASTERIA_CHECK(eps >= 0 && std::isfinite(eps), kInvalidArgument,
                "[linalg::inverse_root] epsilon must be >= 0 and finite, got " << eps);
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  T* z = scratch<T>(0, nn);
  T* w = scratch<T>(1, static_cast<std::size_t>(n));
  eigh_colmajor<T>(n, a, eps, w, z, fp64_retry, "inverse_root");
  // Eigenvalues below eps are lifted as λ − λ_min + eps (in double, in that order: computing eps − λ_min
  // first loses eps in fp32 when |λ_min| ≫ eps, and the smallest eigenvalue then becomes exactly 0).
  const double lmin = static_cast<double>(*std::min_element(w, w + n));
  const bool lift = lmin < eps;
  // B = Z·diag(λ^(-1/root)); X = B·Zᵀ (symmetric, so row-major and column-major agree).
  T* b = scratch<T>(2, nn);
  for (int j = 0; j < n; ++j) {
    const double lambda = lift ? (static_cast<double>(w[j]) - lmin) + eps : static_cast<double>(w[j]);
    const T s = static_cast<T>(std::pow(lambda, -1.0 / root));
    const T* zc = z + static_cast<std::size_t>(j) * n;
    T* bc = b + static_cast<std::size_t>(j) * n;
    for (int i = 0; i < n; ++i) bc[i] = zc[i] * s;
  }
  Fns<T>::gemm('N', 'T', n, n, n, T(1), b, n, z, n, T(0), x, n);
  ASTERIA_CHECK(all_finite(nn, x), kNumerical, "[linalg::inverse_root] the root is not finite (n=" << n << ")");
}

template <typename T>
NewtonReport newton_inverse_root(int n, const T* a, T* x, int p, double eps, const NewtonOptions& opts) {
  check_n(n, "newton_inverse_root");
  ASTERIA_CHECK(p >= 1 && p <= 64, kInvalidArgument, "[linalg::newton_inverse_root] p must be in 1..64, got " << p);
  ASTERIA_CHECK(opts.max_iterations >= 1 && opts.max_iterations <= 10000, kInvalidArgument,
                "[linalg::newton_inverse_root] max_iterations must be in 1..10000, got " << opts.max_iterations);
  ASTERIA_CHECK(opts.tolerance > 0, kInvalidArgument,
                "[linalg::newton_inverse_root] tolerance must be positive, got " << opts.tolerance);
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  ASTERIA_CHECK(all_finite(nn, a), kNumerical, "[linalg::newton_inverse_root] input matrix contains NaN or Inf");
  T* m = scratch<T>(0, nn);
  T* t = scratch<T>(1, nn);
  T* tmp = scratch<T>(2, nn);
  T* tp = scratch<T>(3, nn);
  // Work in double for the scalars; matrices stay in T.
  double fro = 0;
  for (std::size_t k = 0; k < nn; ++k) {
    double v = a[k];
    if (k % (n + 1) == 0) v += eps;
    fro += v * v;
  }
  fro = std::sqrt(fro);
  ASTERIA_CHECK(fro > 0, kNumerical, "[linalg::newton_inverse_root] A + eps·I is zero; use epsilon > 0");
  const double z = (p + 1.0) / (2.0 * fro);
  // M is built before X is written: X may be A's own buffer
  for (std::size_t k = 0; k < nn; ++k) m[k] = static_cast<T>(z * (a[k] + (k % (n + 1) == 0 ? eps : 0.0)));
  std::fill(x, x + nn, T(0));
  for (int i = 0; i < n; ++i) x[static_cast<std::size_t>(i) * n + i] = static_cast<T>(std::pow(z, 1.0 / p));
  NewtonReport rep;
  auto residual = [&]() {
    double worst = 0;
    for (int i = 0; i < n; ++i) {
      double row = 0;
      for (int j = 0; j < n; ++j) row += std::abs(static_cast<double>(m[static_cast<std::size_t>(i) * n + j]) - (i == j));
      worst = std::max(worst, row);
    }
    return worst;
  };
  rep.residual = residual();
  while (rep.iterations < opts.max_iterations && rep.residual > opts.tolerance) {
    // T = (1 + 1/p)·I − (1/p)·M
    for (std::size_t k = 0; k < nn; ++k) t[k] = static_cast<T>(-m[k] / static_cast<T>(p));
    for (int i = 0; i < n; ++i) t[static_cast<std::size_t>(i) * n + i] += static_cast<T>(1.0 + 1.0 / p);
    // X <- X·T   (all matrices are polynomials in A: they commute and are symmetric)
    Fns<T>::gemm('N', 'N', n, n, n, T(1), x, n, t, n, T(0), tmp, n);
    std::copy(tmp, tmp + nn, x);
    // M <- T^p·M
    std::copy(t, t + nn, tp);
    for (int k = 1; k < p; ++k) {
      Fns<T>::gemm('N', 'N', n, n, n, T(1), tp, n, t, n, T(0), tmp, n);
      std::copy(tmp, tmp + nn, tp);
    }
    Fns<T>::gemm('N', 'N', n, n, n, T(1), tp, n, m, n, T(0), tmp, n);
    std::copy(tmp, tmp + nn, m);
    ++rep.iterations;
    rep.residual = residual();
    ASTERIA_CHECK(std::isfinite(rep.residual), kNumerical,
                  "[linalg::newton_inverse_root] the iteration diverged (non-finite residual) at iteration "
                      << rep.iterations);
  }
  rep.converged = rep.residual <= opts.tolerance;
  ASTERIA_CHECK(all_finite(nn, x), kNumerical, "[linalg::newton_inverse_root] the root is not finite");
  return rep;
}

template <typename T>
void matmul_tn(int n, const T* a, const T* b, T* c) {
  ASTERIA_CHECK(n >= 1, kInvalidArgument, "[linalg::matmul_tn] n must be >= 1, got " << n);
  // Row-major buffers seen column-major are transposed: with A' = aᵀ and B' = bᵀ (column-major views),
  // the column-major result C' = cᵀ = (aᵀ b)ᵀ = bᵀ a = B'·A'ᵀ.
  Fns<T>::gemm('N', 'T', n, n, n, T(1), b, n, a, n, T(0), c, n);
}

template <typename T>
void matmul_tn_into_a(int n, T* a, const T* b) {
  ASTERIA_CHECK(n >= 1, kInvalidArgument, "[linalg::matmul_tn_into_a] n must be >= 1, got " << n);
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  T* c = scratch<T>(0, nn);
  matmul_tn<T>(n, a, b, c);
  std::copy(c, c + nn, a);
}

std::size_t scratch_bytes() noexcept { return g_scratch_bytes.load(std::memory_order_relaxed); }

template <typename T>
void eigenbasis_refresh(int n, const T* l, const T* q, T* q_new, std::int64_t* perm, bool sort) {
  check_n(n, "eigenbasis_refresh");
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  ASTERIA_CHECK(all_finite(nn, l), kNumerical, "[linalg::eigenbasis_refresh] statistic contains NaN or Inf");
  ASTERIA_CHECK(all_finite(nn, q), kNumerical, "[linalg::eigenbasis_refresh] basis contains NaN or Inf");
  T* qc = scratch<T>(0, nn);  // column-major basis: column j = eigenvector j
  T* lq = scratch<T>(1, nn);  // column-major L·Q
  T* m = scratch<T>(2, nn);
  transpose(n, q, qc);
  // L is symmetric: its row-major buffer is also its column-major form (lower triangle read as
  // stored; callers pass symmetric statistics).
  Fns<T>::gemm('N', 'N', n, n, n, T(1), l, n, qc, n, T(0), lq, n);
  std::iota(perm, perm + n, std::int64_t{0});
  if (sort) {
    std::vector<double> e(static_cast<std::size_t>(n));
    for (int j = 0; j < n; ++j) {
      const T* qj = qc + static_cast<std::size_t>(j) * n;
      const T* lqj = lq + static_cast<std::size_t>(j) * n;
      T acc = 0;
      for (int i = 0; i < n; ++i) acc += qj[i] * lqj[i];
      e[j] = acc;
    }
    std::stable_sort(perm, perm + n, [&](std::int64_t a, std::int64_t b) { return e[a] > e[b]; });
  }
  // M = L·Q[:, π] = (L·Q)[:, π]; then Q_new = qr(M).Q
  for (int j = 0; j < n; ++j)
    std::copy(lq + static_cast<std::size_t>(perm[j]) * n, lq + static_cast<std::size_t>(perm[j] + 1) * n,
              m + static_cast<std::size_t>(j) * n);
  qr_q_inplace<T>(n, m, "eigenbasis_refresh");
  transpose(n, m, q_new);
  ASTERIA_CHECK(all_finite(nn, q_new), kNumerical, "[linalg::eigenbasis_refresh] the new basis is not finite");
}

#define ASTERIA_LINALG_INSTANTIATE(T)                                                              \
  template bool all_finite<T>(std::size_t, const T*) noexcept;                                     \
  template void eigh<T>(int, const T*, T*, T*, const EighOptions&);                               \
  template void inverse_root<T>(int, const T*, T*, double, double, bool);                         \
  template NewtonReport newton_inverse_root<T>(int, const T*, T*, int, double, const NewtonOptions&); \
  template void eigenbasis_refresh<T>(int, const T*, const T*, T*, std::int64_t*, bool);            \
  template void matmul_tn<T>(int, const T*, const T*, T*);                                          \
  template void matmul_tn_into_a<T>(int, T*, const T*);
ASTERIA_LINALG_INSTANTIATE(float)
ASTERIA_LINALG_INSTANTIATE(double)

}  // namespace asteria::linalg
