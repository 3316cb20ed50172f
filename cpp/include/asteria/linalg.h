#pragma once
// asteria::linalg — the dense matrix functions behind every preconditioner refresh, as thin
// wrappers over LAPACK/BLAS (fp32 and fp64).
//
// Conventions: matrices are n×n, row-major and contiguous (as numpy/torch hand them over);
// "eigenvectors" are returned in the COLUMNS of a row-major matrix, like torch.linalg.eigh.
// Outputs go to caller-provided buffers; scratch space is a per-thread workspace that only grows
// (scratch_bytes() counts it). An output may be the input's own buffer where a function says so: the
// refresh jobs then write their results over their private snapshot instead of allocating new ones.
// Thread safety: every function may be called concurrently from several threads. Failures
// (non-finite input, solver failure that the fp64 retry does not fix) throw asteria::Error with
// category kNumerical; bad sizes throw kInvalidArgument.
//
// Provider table: all LAPACK/BLAS calls go through one table of function pointers. The default
// provider is the OpenBLAS the core is linked with (PyPI scipy-openblas32, "scipy_" symbols).
// load_provider() switches to another runtime library with the standard Fortran symbols, such as
// MKL's single dynamic library libmkl_rt (PyPI `mkl`).

#include <cstdint>
#include <string>

namespace asteria::linalg {

// ----- provider ------------------------------------------------------------------------------
struct ProviderInfo {
  std::string name;     // "openblas" or "mkl"
  std::string library;  // path or soname of the library in use
  int threads = 1;      // BLAS/LAPACK threads per call
};

// The provider in use.
ProviderInfo provider();
// Switches every later call to the provider `name` ("openblas" or "mkl"). For "mkl", `library` is
// the path of libmkl_rt (empty: the dynamic loader's search path). Throws kUnavailable with the
// fix when the library cannot be loaded or lacks a routine. Not safe to call while other threads
// run linalg functions.
void load_provider(const std::string& name, const std::string& library = "");
// Threads each BLAS/LAPACK call may use (1 by default so refresh workers do not oversubscribe
// cores). Range 1..256.
void set_num_threads(int threads);

// TEST HOOK, off by default (0): the next `count` fp32 symmetric eigendecompositions (eigh,
// inverse_root, from any thread) report a failed LAPACK syevd (info = n + 1) after running, so the
// fp64 retry can be tested without an input that breaks fp32 syevd. fp64 decompositions, the retry
// included, are never affected. count >= 0; 0 disarms it. Never set it in production code.
void set_test_fp32_eigh_failures(int count);
// fp32 decompositions the hook above has failed since the process started.
long long test_fp32_eigh_failures_injected() noexcept;

// ----- matrix functions ----------------------------------------------------------------------
struct EighOptions {
  // Added to the diagonal before the decomposition (it shifts eigenvalues, never eigenvectors).
  double ridge = 0.0;
  // Order of eigenvalues (and eigenvector columns): ascending like LAPACK/torch, or descending.
  bool descending = false;
  // fp32 only: retry in fp64 when the fp32 solver fails.
  bool fp64_retry = true;
};

// Symmetric eigendecomposition of `a` (only the lower triangle in row-major terms is read, like
// torch.linalg.eigh). Writes n eigenvalues to `w` and the eigenvectors to the columns of `v`.
// `v` may be `a` (a is read only before v is written).
template <typename T>
void eigh(int n, const T* a, T* w, T* v, const EighOptions& opts = {});

// X = (A + eps·I)^(-1/root) through eigh, with Distributed Shampoo's stabilisation: after adding
// eps, if the smallest eigenvalue λ_min < eps, every eigenvalue is shifted by eps − λ_min.
// root > 0, eps >= 0. `x` may be `a`.
template <typename T>
void inverse_root(int n, const T* a, T* x, double root, double eps, bool fp64_retry = true);

struct NewtonOptions {
  int max_iterations = 100;  // iteration cap (1..10000); hitting it is reported, not an error
  double tolerance = 1e-6;   // stop when ||M − I||_inf (max row sum) <= tolerance
};
struct NewtonReport {
  int iterations = 0;
  double residual = 0.0;  // ||M − I||_inf at exit
  bool converged = false;
};
// Coupled Newton iteration for X = (A + eps·I)^(-1/p), p a positive integer (Distributed
// Shampoo's CoupledNewtonConfig). `x` may be `a`.
template <typename T>
NewtonReport newton_inverse_root(int n, const T* a, T* x, int p, double eps, const NewtonOptions& opts = {});

// SOAP/KL eigenbasis refresh from the statistic `l` and the installed basis `q` (eigenvectors in
// columns). With sort (SOAP): Rayleigh quotients e_j = q_jᵀ L q_j, π = stable argsort of e,
// descending; the columns of q are permuted by π, then one power step and a QR give
// q_new = qr(L·q[:, π]).Q. Without sort (KL): q_new = qr(L·q).Q and π is the identity.
// `perm[j]` is the old column that new column j came from. `q_new` may be `l` or `q` (both are read
// only before q_new is written).
template <typename T>
void eigenbasis_refresh(int n, const T* l, const T* q, T* q_new, std::int64_t* perm, bool sort);

// c = aᵀ·b for row-major (n, n) matrices (one BLAS gemm). The SOAP/KL install rotates the first moment
// into a refreshed basis with R = Q_oldᵀ·Q_new; the refresh job computes R off the training thread.
template <typename T>
void matmul_tn(int n, const T* a, const T* b, T* c);

// a <- aᵀ·b (through the calling thread's scratch space): the rotation written over the old basis.
template <typename T>
void matmul_tn_into_a(int n, T* a, const T* b);

// Bytes of scratch space all threads hold now (each thread's grows to its largest call and is freed
// when the thread exits): the refresh workers' working memory, reported by the runtime.
std::size_t scratch_bytes() noexcept;

// True when all n·m values are finite.
template <typename T>
bool all_finite(std::size_t count, const T* x) noexcept;

}  // namespace asteria::linalg
