// ms per eigh / inverse root / eigenbasis refresh for n in {256, 512, 1024, 2048}, fp32 and
// fp64, single-threaded BLAS, median of repeats. Comparisons against torch.linalg and
// scipy.linalg in the same run are in `asteria-bench linalg`.
#include <cstdio>
#include <random>
#include <vector>

#include "asteria/linalg.h"
#include "bench_util.h"

namespace {

template <typename T>
std::vector<T> spd(int n) {
  std::mt19937 rng(1);
  std::normal_distribution<double> nd;
  std::vector<double> g(static_cast<std::size_t>(n) * n);
  for (auto& x : g) x = nd(rng);
  std::vector<T> a(static_cast<std::size_t>(n) * n, T(0));
  // a = g gᵀ / n + I, formed with the library's own GEMM-free loop (setup only).
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += g[i * n + k] * g[j * n + k];
      a[i * n + j] = a[j * n + i] = static_cast<T>(s / n + (i == j));
    }
  return a;
}

template <typename T>
void run(int n, int repeats, const char* dtype) {
  auto a = spd<T>(n);
  std::vector<T> w(n), v(a.size()), x(a.size()), q(a.size());
  std::vector<std::int64_t> perm(n);
  asteria::linalg::eigh<T>(n, a.data(), w.data(), q.data());
  const double e = asteria_bench::median_seconds([&] { asteria::linalg::eigh<T>(n, a.data(), w.data(), v.data()); }, repeats);
  const double r =
      asteria_bench::median_seconds([&] { asteria::linalg::inverse_root<T>(n, a.data(), x.data(), 4.0, 1e-12); }, repeats);
  const double f = asteria_bench::median_seconds(
      [&] { asteria::linalg::eigenbasis_refresh<T>(n, a.data(), q.data(), v.data(), perm.data(), true); }, repeats);
  std::printf("  n=%-5d %s  eigh %9.2f ms  inverse_root %9.2f ms  refresh %9.2f ms\n", n, dtype, e * 1e3, r * 1e3,
              f * 1e3);
}

}  // namespace

int main(int argc, char** argv) {
  const bool q = asteria_bench::quick(argc, argv);
  asteria::linalg::set_num_threads(1);
  std::printf("linalg_bench (%s, 1 thread): median ms\n", asteria::linalg::provider().name.c_str());
  const std::vector<int> sizes = q ? std::vector<int>{256} : std::vector<int>{256, 512, 1024, 2048};
  for (int n : sizes) {
    const int reps = n >= 1024 ? 3 : 7;
    run<float>(n, reps, "fp32");
    run<double>(n, reps, "fp64");
  }
  return 0;
}
