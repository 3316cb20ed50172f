#pragma once
// Small timing helpers shared by the microbenchmarks: warm up, then the median of repeats.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <vector>

namespace asteria_bench {

inline bool quick(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--quick") == 0) return true;
  return false;
}

// Median wall time in seconds of `repeats` runs of f after `warmup` runs.
inline double median_seconds(const std::function<void()>& f, int repeats, int warmup = 1) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    auto a = std::chrono::steady_clock::now();
    f();
    auto b = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double>(b - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace asteria_bench
