"""``asteria-bench transfer``: host<->device bandwidth of the runtime's copies next to torch's pinned copies.

For each size the same bytes move (1) through asteria's path: device->host into a lease of the runtime's
pinned pool (registered with ``cudaHostRegister``) as a shadow snapshot (device clone, then the copy on a
side stream ordered by events), and host->device from such a lease with a non-blocking copy; and (2)
through torch: ``copy_(non_blocking=True)`` to and from ``torch.empty(..., pin_memory=True)`` (torch's
caching host allocator, ``cudaHostAlloc``). Runs alternate; the median of ``--repeats`` is reported with
the ratio asteria/torch. Needs a CUDA device.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def _time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def run(args: Any) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("asteria-bench transfer needs a CUDA device")
    from asteria import _core
    from asteria.runtime.gpu import cuda_backend_available
    from asteria.runtime.shadow import snapshot_to_host

    registered = cuda_backend_available()
    pool = _core.PinnedPool(budget_bytes=8 << 30, cuda_register=registered)
    stream = torch.cuda.Stream()
    dev = torch.device("cuda", 0)
    print(f"asteria-bench transfer on {torch.cuda.get_device_name(0)}; pool registered with CUDA: {registered}")
    print(f"{'MiB':>6} {'D2H asteria':>12} {'D2H torch':>10} {'ratio':>6} {'H2D asteria':>12} {'H2D torch':>10} {'ratio':>6}")
    table = {}
    for mib in [int(x) for x in args.sizes.split(",")]:
        n = int((mib * (1 << 20) / 4) ** 0.5)
        x = torch.randn(1, n, n, device=dev)
        nbytes = x.numel() * 4
        pinned = torch.empty(x.shape, pin_memory=True)

        def asteria_d2h():
            snap = snapshot_to_host([x], pool, stream)
            snap.ready.synchronize()

        def torch_d2h():
            pinned.copy_(x, non_blocking=True)

        snap = snapshot_to_host([x], pool, stream)
        snap.ready.synchronize()
        host_lease = torch.from_numpy(snap.matrices[0][0])  # a view of a registered lease
        y = torch.empty(n, n, device=dev)

        def asteria_h2d():
            y.copy_(host_lease, non_blocking=True)

        def torch_h2d():
            y.copy_(pinned[0], non_blocking=True)

        for fn in (asteria_d2h, torch_d2h, asteria_h2d, torch_h2d):
            fn()  # warm-up: registration, allocator caches
        a_d2h, t_d2h, a_h2d, t_h2d = [], [], [], []
        for _ in range(args.repeats):  # alternate the two paths
            a_d2h.append(_time(asteria_d2h, 1))
            t_d2h.append(_time(torch_d2h, 1))
            a_h2d.append(_time(asteria_h2d, 1))
            t_h2d.append(_time(torch_h2d, 1))
        row = {k: nbytes / statistics.median(v) / 1e9 for k, v in
               (("d2h_asteria", a_d2h), ("d2h_torch", t_d2h), ("h2d_asteria", a_h2d), ("h2d_torch", t_h2d))}
        table[mib] = row
        print(f"{mib:6d} {row['d2h_asteria']:10.1f}GB/s {row['d2h_torch']:8.1f}GB/s {row['d2h_asteria'] / row['d2h_torch']:6.2f} "
              f"{row['h2d_asteria']:10.1f}GB/s {row['h2d_torch']:8.1f}GB/s {row['h2d_asteria'] / row['h2d_torch']:6.2f}")
        del snap, host_lease
    return table
