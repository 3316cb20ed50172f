// Pager throughput (GB/s) for writing and reading back extents of 1 MiB through pinned leases,
// io_uring backend (with and without registered buffers) against the portable thread-pool backend in
// the same run. The swap directory is
// created under $ASTERIA_BENCH_DIR (default: $TMPDIR or /tmp), so point it at the drive to measure.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "asteria/host_memory.h"
#include "asteria/pager.h"
#include "bench_util.h"

namespace {

struct Result {
  double write_gbs, read_gbs;
  std::string backend;
  bool direct;
  bool fixed;
};

Result run(asteria::PagerBackend backend, int extents, std::size_t extent_bytes, asteria::PinnedPool& pool,
           bool register_buffers = false) {
  asteria::PagerOptions o;
  if (const char* d = std::getenv("ASTERIA_BENCH_DIR")) o.parent_dir = d;
  o.backend = backend;
  o.queue_depth = 64;
  asteria::Pager pager(o);
  std::vector<asteria::Lease> bufs;
  std::vector<asteria::ExtentId> ids;
  for (int i = 0; i < extents; ++i) {
    bufs.push_back(pool.acquire(extent_bytes));
    std::memset(bufs.back().data(), i & 0xFF, extent_bytes);
    ids.push_back(pager.allocate(extent_bytes));
  }
  bool fixed = false;
  if (register_buffers) {
    std::vector<std::pair<void*, std::size_t>> regs;
    for (auto& b : bufs) regs.emplace_back(b.data(), b.capacity());
    fixed = pager.register_buffers(regs);
  }
  const double total = static_cast<double>(extents) * static_cast<double>(extent_bytes);
  const double tw = asteria_bench::median_seconds(
      [&] {
        std::vector<asteria::TicketId> t;
        for (int i = 0; i < extents; ++i) t.push_back(pager.write(ids[i], bufs[i].data(), extent_bytes));
        for (auto x : t) pager.wait(x);
      },
      3);
  const double tr = asteria_bench::median_seconds(
      [&] {
        std::vector<asteria::TicketId> t;
        for (int i = 0; i < extents; ++i) t.push_back(pager.read(ids[i], bufs[i].data()));
        for (auto x : t) pager.wait(x);
      },
      3);
  auto s = pager.stats();
  return {total / tw / 1e9, total / tr / 1e9, s.backend, s.direct_io, fixed && s.fixed_ops > 0};
}

}  // namespace

int main(int argc, char** argv) {
  const int extents = asteria_bench::quick(argc, argv) ? 16 : 256;
  const std::size_t extent_bytes = 1 << 20;
  asteria::PinnedPoolOptions po;
  po.budget_bytes = static_cast<std::size_t>(extents) * extent_bytes * 2;
  asteria::PinnedPool pool(po);
  std::printf("pager_bench: %d extents of 1 MiB (write then read back, CRC32C included), median of 3\n", extents);
  Result t = run(asteria::PagerBackend::kThreads, extents, extent_bytes, pool);
  Result u = run(asteria::PagerBackend::kAuto, extents, extent_bytes, pool);
  Result f = run(asteria::PagerBackend::kAuto, extents, extent_bytes, pool, true);
  for (const Result& r : {t, u, f})
    std::printf("  %-9s O_DIRECT=%d fixed=%d  write %6.2f GB/s  read %6.2f GB/s\n", r.backend.c_str(),
                r.direct ? 1 : 0, r.fixed ? 1 : 0, r.write_gbs, r.read_gbs);
  std::printf("  ratio %s/threads: write %.2f  read %.2f\n", u.backend.c_str(), u.write_gbs / t.write_gbs,
              u.read_gbs / t.read_gbs);
  if (f.fixed)
    std::printf("  ratio registered/unregistered buffers: write %.2f  read %.2f\n", f.write_gbs / u.write_gbs,
                f.read_gbs / u.read_gbs);
  return 0;
}
