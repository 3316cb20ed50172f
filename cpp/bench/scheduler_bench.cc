// Throughput of the RefreshScheduler on a batch of 32 inverse roots of n=512 (fp32) with 1 and
// 2 workers; prints the speed-up.
#include <cstdio>
#include <random>
#include <vector>

#include "asteria/scheduler.h"
#include "bench_util.h"

namespace {

asteria::HostTensor spd(int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  auto t = asteria::HostTensor::empty(asteria::DType::kFloat32, {n, n});
  std::vector<float> g(static_cast<std::size_t>(n) * 8);
  for (auto& x : g) x = nd(rng);
  float* a = t.ptr<float>();
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      float s = 0;
      for (int k = 0; k < 8; ++k) s += g[i * 8 + k] * g[j * 8 + k];
      a[i * n + j] = s + (i == j ? 1.0f : 0.0f);
    }
  return t;
}

double batch_seconds(int workers, const std::vector<asteria::HostTensor>& mats) {
  asteria::SchedulerOptions o;
  o.workers = workers;
  asteria::RefreshScheduler s(o);
  return asteria_bench::median_seconds(
      [&] {
        std::vector<asteria::JobId> ids;
        for (std::size_t i = 0; i < mats.size(); ++i) {
          asteria::JobSpec spec;
          spec.kind = asteria::JobKind::kInverseRoot;
          spec.block_id = i;
          spec.root = 4;
          spec.epsilon = 1e-6;
          spec.inputs.push_back(mats[i]);
          ids.push_back(s.submit(std::move(spec)));
        }
        for (auto id : ids) s.wait(id);
      },
      3);
}

}  // namespace

int main(int argc, char** argv) {
  const bool q = asteria_bench::quick(argc, argv);
  const int n = q ? 128 : 512;
  std::vector<asteria::HostTensor> mats;
  for (int i = 0; i < 32; ++i) mats.push_back(spd(n, static_cast<unsigned>(i)));
  const double one = batch_seconds(1, mats);
  const double two = batch_seconds(2, mats);
  std::printf("scheduler_bench: 32 inverse roots n=%d fp32: 1 worker %.3f s, 2 workers %.3f s, speed-up %.2fx\n", n,
              one, two, one / two);
  return 0;
}
