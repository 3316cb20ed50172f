"""``asteria-bench scheduler``: a batch of inverse-root jobs with 1 and 2 worker threads."""

from __future__ import annotations

import statistics
import time

import numpy as np

from asteria import _core


def _batch_seconds(workers, mats, repeats=3):
    with _core.RefreshScheduler(workers=workers) as s:
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            ids = [s.submit_inverse_root(i, 0, 0, m, root=4, epsilon=1e-6) for i, m in enumerate(mats)]
            for j in ids:
                assert s.wait(j).ok
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])


def run(args) -> None:
    rng = np.random.default_rng(0)
    mats = []
    for _ in range(args.batch):
        g = rng.standard_normal((args.n, 16)).astype(np.float32)
        mats.append(g @ g.T + np.eye(args.n, dtype=np.float32))
    one = _batch_seconds(1, mats)
    two = _batch_seconds(2, mats)
    print(f"asteria-bench scheduler: {args.batch} inverse roots, n={args.n}, fp32")
    print(f"  1 worker  {one:.3f} s\n  2 workers {two:.3f} s\n  speed-up  {one / two:.2f}x")
