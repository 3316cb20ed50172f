#pragma once
// Device kernels of the refresh engine behind plain host launchers (internal to cuda/).
//
// Only cuda/kernels.cu is compiled by nvcc, and it keeps to kernels and launches: every host-side
// piece that formats messages or uses the C++ library lives in g++-compiled .cc files, so no
// standard-library template is instantiated by the CUDA front end inside the shared module.
// Every launcher enqueues on `stream`, never blocks, and returns the launch status.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace asteria::cuda::kernels {

// Per-matrix status bits written by the check kernels.
constexpr int kBadInput = 1;    // the input contains NaN or Inf
constexpr int kSolverInfo = 2;  // a solver reported info != 0
constexpr int kBadOutput = 4;   // the result contains NaN or Inf
constexpr int kBadEigen = 8;    // inverse root: the eigendecomposition it is formed from has NaN or Inf
// Not a failure: the matrix failed in fp32 and was redone in fp64 (the bits above are the fp64 ones).
constexpr int kRetried = 16;

// flags[b] |= bit when matrix b of x (batch × per values) has a non-finite value.
template <typename T>
cudaError_t check_finite(const T* x, std::size_t per, int batch, int* flags, int bit, cudaStream_t stream);
// z = A + ridge·I per matrix (ridge added only when add_ridge), or the identity for a matrix whose
// flags have kBadInput, so solvers only see finite data.
template <typename T>
cudaError_t prepare(const T* a, T* z, int n, int batch, const int* flags, T ridge, bool add_ridge,
                    cudaStream_t stream);
// One matrix: z = double(a) + ridge·I (ridge added in double, only when add_ridge): the input of
// the fp64 redo of a failed fp32 matrix, as linalg's fp64 retry builds it.
cudaError_t widen(const float* a, double* z, int n, double ridge, bool add_ridge, cudaStream_t stream);
// dst[i] = float(src[i]) (round to nearest), i < count.
cudaError_t narrow(const double* src, float* dst, std::size_t count, cudaStream_t stream);
// dst[r*n + c] = src[col(c)*n + r], col(c) = c or n-1-c when reverse: the row-major form of a
// column-major matrix, optionally with its columns reversed.
template <typename T>
cudaError_t transpose(const T* src, T* dst, int n, int batch, bool reverse, cudaStream_t stream);
// w_out[b][j] = w[b][j] or w[b][n-1-j] when reverse.
template <typename T>
cudaError_t eigvals(const T* w, T* w_out, int n, int batch, bool reverse, cudaStream_t stream);
// flags[b] |= kSolverInfo when any of info[b*per .. b*per+per) is non-zero.
cudaError_t fold_info(int* flags, const int* info, int per, int batch, cudaStream_t stream);
// In place: w_j <- λ_j^(neg_inv_root) with λ_j = (w_j − min(w)) + eps when min(w) < eps, else w_j;
// the minimum, the lift and the power in double, like linalg::inverse_root.
template <typename T>
cudaError_t root_factors(T* w, int n, int batch, double eps, double neg_inv_root, cudaStream_t stream);
// bm[:, j] = z[:, j] · f[j] (column-major).
template <typename T>
cudaError_t scale_columns(const T* z, const T* f, T* bm, int n, int batch, cudaStream_t stream);
// e_j = <qc[:, j], lq[:, j]> (column-major), reduced in a fixed order.
template <typename T>
cudaError_t rayleigh(const T* qc, const T* lq, T* e, int n, int batch, cudaStream_t stream);
// perm = the stable descending argsort of e (NaN ranks as −∞, so perm is always a permutation).
template <typename T>
cudaError_t rank_descending(const T* e, std::int64_t* perm, int n, int batch, cudaStream_t stream);
// perm[b][j] = j.
cudaError_t iota(std::int64_t* perm, int n, int batch, cudaStream_t stream);
// m[:, j] = lq[:, perm[j]] (column-major).
template <typename T>
cudaError_t gather_columns(const T* lq, const std::int64_t* perm, T* m, int n, int batch, cudaStream_t stream);

}  // namespace asteria::cuda::kernels
