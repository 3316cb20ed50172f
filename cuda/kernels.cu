// Device kernels of the refresh engine and their host launchers (see kernels.cuh). This file is
// the only one nvcc compiles: it holds kernels and launches, nothing that formats or throws.
#include "kernels.cuh"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace asteria::cuda::kernels {
namespace {

// ----- kernels -------------------------------------------------------------------------------
// Elementwise kernels run on a 2-D grid: x covers the elements of one matrix, y the batch; both
// loop so any size fits the grid limits.

template <typename T>
__global__ void check_finite_kernel(const T* __restrict__ x, std::size_t per, int batch, int* __restrict__ flags,
                                    int bit) {
  for (int b = blockIdx.y; b < batch; b += gridDim.y) {
    const T* xb = x + static_cast<std::size_t>(b) * per;
    int bad = 0;
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < per;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
      bad |= !isfinite(xb[i]);
    if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(flags + b, bit);
  }
}

// z = A + ridge·I, or the identity for a matrix whose input is not finite.
template <typename T>
__global__ void prepare_kernel(const T* __restrict__ a, T* __restrict__ z, int n, int batch,
                               const int* __restrict__ flags, T ridge, bool add_ridge) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  for (int b = blockIdx.y; b < batch; b += gridDim.y) {
    const bool bad = (flags[b] & kBadInput) != 0;
    const T* ab = a + static_cast<std::size_t>(b) * nn;
    T* zb = z + static_cast<std::size_t>(b) * nn;
    for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < nn;
         k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
      const bool diag = k % (static_cast<std::size_t>(n) + 1) == 0;
      T v = bad ? T(diag ? 1 : 0) : ab[k];
      if (diag && add_ridge && !bad) v += ridge;
      zb[k] = v;
    }
  }
}

// One matrix: z = double(a) + ridge·I (the ridge in double).
__global__ void widen_kernel(const float* __restrict__ a, double* __restrict__ z, int n, double ridge,
                             bool add_ridge) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < nn;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    double v = static_cast<double>(a[k]);
    if (add_ridge && k % (static_cast<std::size_t>(n) + 1) == 0) v += ridge;
    z[k] = v;
  }
}

__global__ void narrow_kernel(const double* __restrict__ src, float* __restrict__ dst, std::size_t count) {
  for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < count;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dst[k] = static_cast<float>(src[k]);
}

// dst[r*n + c] = src[col(c)*n + r] with col(c) = c, or n-1-c when `reverse`: the row-major view of
// a column-major matrix (optionally with its columns reversed). 32x32 tiles through shared memory
// so reads and writes are both coalesced.
template <typename T>
__global__ void transpose_kernel(const T* __restrict__ src, T* __restrict__ dst, int n, int batch, bool reverse) {
  __shared__ T tile[32][33];
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
  for (int b = blockIdx.z; b < batch; b += gridDim.z) {
    const T* s = src + static_cast<std::size_t>(b) * nn;
    T* d = dst + static_cast<std::size_t>(b) * nn;
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
      const int c = c0 + k, r = r0 + threadIdx.x;
      if (c < n && r < n) {
        const int col = reverse ? n - 1 - c : c;
        tile[k][threadIdx.x] = s[static_cast<std::size_t>(col) * n + r];
      }
    }
    __syncthreads();
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
      const int r = r0 + k, c = c0 + threadIdx.x;
      if (c < n && r < n) d[static_cast<std::size_t>(r) * n + c] = tile[threadIdx.x][k];
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void eigvals_kernel(const T* __restrict__ w, T* __restrict__ w_out, int n, int batch, bool reverse) {
  const std::size_t total = static_cast<std::size_t>(n) * batch;
  for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::size_t b = k / n;
    const int j = static_cast<int>(k % n);
    w_out[k] = w[b * n + (reverse ? n - 1 - j : j)];
  }
}

__global__ void fold_info_kernel(int* __restrict__ flags, const int* __restrict__ info, int per, int batch) {
  for (int b = blockIdx.x * blockDim.x + threadIdx.x; b < batch; b += gridDim.x * blockDim.x) {
    int bad = 0;
    for (int k = 0; k < per; ++k) bad |= info[b * per + k] != 0;
    if (bad) flags[b] |= kSolverInfo;
  }
}

// In place: w_j <- λ_j^(-1/root) with λ_j = (w_j − λ_min) + eps when λ_min < eps (else w_j),
// evaluated exactly as linalg::inverse_root does: λ_min, the lift and the power in double, in that
// order (eps − λ_min in T would lose eps when |λ_min| ≫ eps). One block per matrix.
template <typename T>
__global__ void root_factors_kernel(T* __restrict__ w, int n, int batch, double eps, double neg_inv_root) {
  __shared__ T red[256];
  for (int b = blockIdx.x; b < batch; b += gridDim.x) {
    T* wb = w + static_cast<std::size_t>(b) * n;
    T m = wb[0];
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = wb[j] < m ? wb[j] : m;
    red[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) red[threadIdx.x] = red[threadIdx.x + s] < red[threadIdx.x] ? red[threadIdx.x + s] : red[threadIdx.x];
      __syncthreads();
    }
    const double lmin = static_cast<double>(red[0]);
    const bool lift = lmin < eps;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const double lambda = lift ? (static_cast<double>(wb[j]) - lmin) + eps : static_cast<double>(wb[j]);
      wb[j] = static_cast<T>(pow(lambda, neg_inv_root));
    }
    __syncthreads();
  }
}

// bm[:, j] = z[:, j] * f[j] (column-major).
template <typename T>
__global__ void scale_columns_kernel(const T* __restrict__ z, const T* __restrict__ f, T* __restrict__ bm, int n,
                                     int batch) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  for (int b = blockIdx.y; b < batch; b += gridDim.y)
    for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < nn;
         k += static_cast<std::size_t>(gridDim.x) * blockDim.x)
      bm[b * nn + k] = z[b * nn + k] * f[static_cast<std::size_t>(b) * n + k / n];
}

// e_j = Σ_i qc[j*n + i] · lq[j*n + i] (one warp per column, a fixed reduction order).
template <typename T>
__global__ void rayleigh_kernel(const T* __restrict__ qc, const T* __restrict__ lq, T* __restrict__ e, int n,
                                int batch) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  for (int b = blockIdx.y; b < batch; b += gridDim.y) {
    if (j >= n) continue;
    const T* qj = qc + b * nn + static_cast<std::size_t>(j) * n;
    const T* lj = lq + b * nn + static_cast<std::size_t>(j) * n;
    T acc = 0;
    for (int i = lane; i < n; i += 32) acc += qj[i] * lj[i];
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) e[static_cast<std::size_t>(b) * n + j] = acc;
  }
}

// perm[rank(j)] = j with rank(j) = #{k : e_k > e_j} + #{k < j : e_k == e_j}: the stable
// descending argsort, O(n²) and sync-free. NaN ranks as −∞, so the result is always a
// permutation (a NaN quotient also makes the output non-finite, which fails the matrix).
template <typename T>
__global__ void rank_kernel(const T* __restrict__ e, std::int64_t* __restrict__ perm, int n, int batch) {
  __shared__ T tile[256];
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  for (int b = blockIdx.y; b < batch; b += gridDim.y) {
    const T* eb = e + static_cast<std::size_t>(b) * n;
    T ej = j < n ? eb[j] : T(0);
    if (isnan(ej)) ej = -INFINITY;
    int rank = 0;
    for (int k0 = 0; k0 < n; k0 += blockDim.x) {
      __syncthreads();
      if (k0 + threadIdx.x < n) {
        T v = eb[k0 + threadIdx.x];
        tile[threadIdx.x] = isnan(v) ? T(-INFINITY) : v;
      }
      __syncthreads();
      const int kend = min(static_cast<int>(blockDim.x), n - k0);
      if (j < n)
        for (int t = 0; t < kend; ++t) {
          const T ek = tile[t];
          rank += (ek > ej) || (ek == ej && k0 + t < j);
        }
    }
    if (j < n) perm[static_cast<std::size_t>(b) * n + rank] = j;
  }
}

__global__ void iota_kernel(std::int64_t* __restrict__ perm, int n, int batch) {
  const std::size_t total = static_cast<std::size_t>(n) * batch;
  for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    perm[k] = static_cast<std::int64_t>(k % n);
}

// m[:, j] = lq[:, perm[j]] (column-major).
template <typename T>
__global__ void gather_columns_kernel(const T* __restrict__ lq, const std::int64_t* __restrict__ perm,
                                      T* __restrict__ m, int n, int batch) {
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  for (int b = blockIdx.y; b < batch; b += gridDim.y)
    for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < nn;
         k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
      const std::size_t j = k / n, i = k % n;
      const std::int64_t src = perm[static_cast<std::size_t>(b) * n + j];
      m[b * nn + k] = lq[b * nn + static_cast<std::size_t>(src) * n + i];
    }
}


// ----- launch shapes -------------------------------------------------------------------------
struct Shape {
  dim3 grid, block;
};
Shape elementwise(std::size_t per, int batch) {
  std::size_t blocks = (per + 255) / 256;
  if (blocks > 4096) blocks = 4096;
  if (blocks < 1) blocks = 1;
  return {dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(batch < 65535 ? batch : 65535)), dim3(256)};
}
unsigned blocks1d(std::size_t total) {
  std::size_t blocks = (total + 255) / 256;
  if (blocks > 4096) blocks = 4096;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}
unsigned clamp_batch(int batch) { return static_cast<unsigned>(batch < 65535 ? batch : 65535); }

}  // namespace

// ----- launchers -----------------------------------------------------------------------------
template <typename T>
cudaError_t check_finite(const T* x, std::size_t per, int batch, int* flags, int bit, cudaStream_t stream) {
  const Shape s = elementwise(per, batch);
  check_finite_kernel<T><<<s.grid, s.block, 0, stream>>>(x, per, batch, flags, bit);
  return cudaGetLastError();
}

template <typename T>
cudaError_t prepare(const T* a, T* z, int n, int batch, const int* flags, T ridge, bool add_ridge,
                    cudaStream_t stream) {
  const Shape s = elementwise(static_cast<std::size_t>(n) * n, batch);
  prepare_kernel<T><<<s.grid, s.block, 0, stream>>>(a, z, n, batch, flags, ridge, add_ridge);
  return cudaGetLastError();
}

cudaError_t widen(const float* a, double* z, int n, double ridge, bool add_ridge, cudaStream_t stream) {
  widen_kernel<<<blocks1d(static_cast<std::size_t>(n) * n), 256, 0, stream>>>(a, z, n, ridge, add_ridge);
  return cudaGetLastError();
}

cudaError_t narrow(const double* src, float* dst, std::size_t count, cudaStream_t stream) {
  narrow_kernel<<<blocks1d(count), 256, 0, stream>>>(src, dst, count);
  return cudaGetLastError();
}

template <typename T>
cudaError_t transpose(const T* src, T* dst, int n, int batch, bool reverse, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>((n + 31) / 32);
  transpose_kernel<T><<<dim3(tiles, tiles, clamp_batch(batch)), dim3(32, 8), 0, stream>>>(src, dst, n, batch, reverse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t eigvals(const T* w, T* w_out, int n, int batch, bool reverse, cudaStream_t stream) {
  eigvals_kernel<T><<<blocks1d(static_cast<std::size_t>(n) * batch), 256, 0, stream>>>(w, w_out, n, batch, reverse);
  return cudaGetLastError();
}

cudaError_t fold_info(int* flags, const int* info, int per, int batch, cudaStream_t stream) {
  fold_info_kernel<<<blocks1d(static_cast<std::size_t>(batch)), 256, 0, stream>>>(flags, info, per, batch);
  return cudaGetLastError();
}

template <typename T>
cudaError_t root_factors(T* w, int n, int batch, double eps, double neg_inv_root, cudaStream_t stream) {
  root_factors_kernel<T><<<clamp_batch(batch), 256, 0, stream>>>(w, n, batch, eps, neg_inv_root);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scale_columns(const T* z, const T* f, T* bm, int n, int batch, cudaStream_t stream) {
  const Shape s = elementwise(static_cast<std::size_t>(n) * n, batch);
  scale_columns_kernel<T><<<s.grid, s.block, 0, stream>>>(z, f, bm, n, batch);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rayleigh(const T* qc, const T* lq, T* e, int n, int batch, cudaStream_t stream) {
  const unsigned cols = static_cast<unsigned>((n + 7) / 8);  // 8 warps (columns) per block
  rayleigh_kernel<T><<<dim3(cols, clamp_batch(batch)), 256, 0, stream>>>(qc, lq, e, n, batch);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rank_descending(const T* e, std::int64_t* perm, int n, int batch, cudaStream_t stream) {
  rank_kernel<T><<<dim3(static_cast<unsigned>((n + 255) / 256), clamp_batch(batch)), 256, 0, stream>>>(e, perm, n,
                                                                                                       batch);
  return cudaGetLastError();
}

cudaError_t iota(std::int64_t* perm, int n, int batch, cudaStream_t stream) {
  iota_kernel<<<blocks1d(static_cast<std::size_t>(n) * batch), 256, 0, stream>>>(perm, n, batch);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gather_columns(const T* lq, const std::int64_t* perm, T* m, int n, int batch, cudaStream_t stream) {
  const Shape s = elementwise(static_cast<std::size_t>(n) * n, batch);
  gather_columns_kernel<T><<<s.grid, s.block, 0, stream>>>(lq, perm, m, n, batch);
  return cudaGetLastError();
}

#define ASTERIA_KERNELS_INSTANTIATE(T)                                                                    \
  template cudaError_t check_finite<T>(const T*, std::size_t, int, int*, int, cudaStream_t);               \
  template cudaError_t prepare<T>(const T*, T*, int, int, const int*, T, bool, cudaStream_t);              \
  template cudaError_t transpose<T>(const T*, T*, int, int, bool, cudaStream_t);                           \
  template cudaError_t eigvals<T>(const T*, T*, int, int, bool, cudaStream_t);                             \
  template cudaError_t root_factors<T>(T*, int, int, double, double, cudaStream_t);                        \
  template cudaError_t scale_columns<T>(const T*, const T*, T*, int, int, cudaStream_t);                   \
  template cudaError_t rayleigh<T>(const T*, const T*, T*, int, int, cudaStream_t);                        \
  template cudaError_t rank_descending<T>(const T*, std::int64_t*, int, int, cudaStream_t);                \
  template cudaError_t gather_columns<T>(const T*, const std::int64_t*, T*, int, int, cudaStream_t);
ASTERIA_KERNELS_INSTANTIATE(float)
ASTERIA_KERNELS_INSTANTIATE(double)

}  // namespace asteria::cuda::kernels
