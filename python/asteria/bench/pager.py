"""``asteria-bench pager``: the pager's bandwidth against fio on the same file system, side by side.

For each backend (io_uring with registered buffers, and the portable thread pool), pattern (sequential,
random), operation (write, read), extent size (1-16 MiB) and queue depth (1, 8, 32), asteria's `Pager`
moves the same number of bytes as an fio job with the matching engine:

* io_uring backend ↔ fio ``--ioengine=io_uring --iodepth=D --fixedbufs --registerfiles``;
* thread backend with D threads ↔ fio ``--ioengine=psync --numjobs=D`` (each job its own disjoint region);

both with O_DIRECT, block size = extent size, on files in the same directory. The two run alternately
(``--repeats`` rounds) and the medians are compared: ratio = asteria GB/s / fio GB/s. asteria also computes a
CRC32C of every extent (on write and on read) and writes out of place; fio does neither. Without fio on the
PATH (Debian: ``apt-get install fio``) only asteria's numbers are printed.

Both write into the same state of the file (``--layout``):

* ``rewrite`` (default; what the NVMe tier does at every step): blocks that were written before. fio overwrites
  a file laid out once; the pager's timed write sweep follows two untimed ones, so that its out-of-place writes
  land in the space of older copies, as they do in training;
* ``fresh``: a new file each run. The pager reserves its space with ``fallocate`` as it allocates extents; fio's
  file is removed before each run, and fio reserves it the same way (``fallocate=native``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

import numpy as np

from asteria import _core

_MIB = 1 << 20


def _asteria_run(directory: str, backend: str, op: str, pattern: str, size: int, depth: int, total: int, seed: int,
                 layout: str = "rewrite") -> dict[str, Any]:
    """GB/s of writing (then, for op='read', reading back) ``total`` bytes in extents of ``size`` at queue depth ``depth``.

    With ``layout="rewrite"`` a timed write sweep follows two untimed ones (the steady state of out-of-place writes).
    """
    pool = _core.PinnedPool(budget_bytes=depth * size + _MIB, lock=True, cache_released=False)
    bufs = [pool.acquire(size) for _ in range(depth)]
    rng = np.random.default_rng(seed)
    for b in bufs:
        np.frombuffer(b, dtype=np.uint8)[:] = rng.integers(0, 256, size, dtype=np.uint8)
    kw: dict[str, Any] = {"directory": directory, "queue_depth": max(depth, 1) + 1}
    if backend == "threads":
        kw.update(backend="threads", io_threads=min(depth, 64))
    else:
        kw.update(backend="io_uring")
    with _core.Pager(**kw) as pager:
        fixed = bool(pager.register_buffers(bufs)) if backend == "io_uring" else False
        n = max(1, total // size)
        extents = [pager.allocate(size) for _ in range(n)]
        order = list(range(n))
        if pattern == "rand":
            random.Random(seed).shuffle(order)

        def sweep(write: bool) -> float:
            inflight: list[tuple[int, int]] = []  # (ticket, buffer)
            free = list(range(depth))
            t0 = time.perf_counter()
            for i in order:
                if not free:
                    t, b = inflight.pop(0)
                    pager.wait(t)
                    free.append(b)
                b = free.pop()
                t = pager.write(extents[i], bufs[b], size) if write else pager.read(extents[i], bufs[b])
                inflight.append((t, b))
            for t, b in inflight:
                pager.wait(t)
            return time.perf_counter() - t0

        if op == "write" and layout == "rewrite":
            sweep(True)
            sweep(True)
        seconds = sweep(True)
        if op == "read":
            seconds = sweep(False)
        s = pager.stats()
    return {"gbps": n * size / seconds / 1e9, "backend": s["backend"], "direct_io": s["direct_io"], "fixed": fixed}


def _fio_path(directory: str) -> str:
    return os.path.join(directory, "fio-bench.dat")


def _fio_layout(fio: str, directory: str, total: int) -> None:
    """Writes fio's file once, untimed, so that the ``rewrite`` layout's fio runs overwrite written blocks."""
    subprocess.run([fio, "--name=layout", f"--filename={_fio_path(directory)}", "--bs=1m", "--rw=write", "--direct=1",
                    f"--size={total}", "--output-format=json"], capture_output=True, text=True, check=True)


def _fio_run(fio: str, directory: str, backend: str, op: str, pattern: str, size: int, depth: int, total: int,
             layout: str = "rewrite") -> float:
    rw = {("seq", "write"): "write", ("seq", "read"): "read", ("rand", "write"): "randwrite", ("rand", "read"): "randread"}[(pattern, op)]
    path = _fio_path(directory)
    if layout == "fresh" and os.path.exists(path):
        os.unlink(path)
    args = [fio, "--name=asteria-compare", f"--filename={path}", f"--bs={size}", f"--rw={rw}", "--direct=1",
            "--output-format=json", "--group_reporting", "--thread"]
    if backend == "io_uring":
        args += ["--ioengine=io_uring", f"--iodepth={depth}", f"--size={total}", "--fixedbufs", "--registerfiles"]
    else:
        per_job = max(size, total // depth // size * size)
        args += ["--ioengine=psync", f"--numjobs={depth}", f"--size={per_job}", f"--offset_increment={per_job}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    return job["write" if op == "write" else "read"]["bw_bytes"] / 1e9


def run(args: Any) -> None:
    sizes = [int(float(s) * _MIB) for s in args.sizes.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    backends = args.backends.split(",")
    patterns = args.patterns.split(",")
    fio = None if args.no_fio else shutil.which("fio")
    directory = args.dir or os.environ.get("ASTERIA_BENCH_DIR") or tempfile.gettempdir()
    work = tempfile.mkdtemp(prefix="asteria-bench-pager-", dir=directory)
    layout = args.layout
    print(f"asteria-bench pager: directory {directory}, at least {args.total_mib} MiB per run, median of "
          f"{args.repeats} alternating rounds; asteria includes CRC32C on every extent and out-of-place writes; "
          f"layout {layout} ({'writes overwrite blocks written before' if layout == 'rewrite' else 'a new file each run'})")
    if fio is None:
        print("  fio not found (Debian: apt-get install fio): printing asteria's numbers only" if not args.no_fio
              else "  --no-fio: printing asteria's numbers only")
    print(f"{'backend':9} {'pattern':7} {'op':5} {'size':>7} {'QD':>3} {'asteria GB/s':>13} {'fio GB/s':>9} {'ratio':>6}")
    ratios = []
    try:
        if fio is not None and layout == "rewrite":
            _fio_layout(fio, work, max(max(args.total_mib * _MIB, 2 * size * depth) for size in sizes for depth in depths))
        for backend in backends:
            for pattern in patterns:
                for op in ("write", "read"):
                    for size in sizes:
                        for depth in depths:
                            total = max(args.total_mib * _MIB, 2 * size * depth)
                            ours, theirs = [], []
                            info: dict[str, Any] = {}
                            for r in range(args.repeats):
                                info = _asteria_run(work, backend, op, pattern, size, depth, total, seed=r, layout=layout)
                                ours.append(info["gbps"])
                                if fio is not None:
                                    theirs.append(_fio_run(fio, work, backend, op, pattern, size, depth, total, layout))
                            a = statistics.median(ours)
                            f = statistics.median(theirs) if theirs else None
                            ratio = a / f if f else None
                            if ratio is not None:
                                ratios.append(ratio)
                            label = info.get("backend", backend) + ("+fixed" if info.get("fixed") else "")
                            print(f"{label:9} {pattern:7} {op:5} {size / _MIB:5.0f}Mi {depth:3d} {a:13.3f} "
                                  f"{'-' if f is None else f'{f:9.3f}':>9} {'-' if ratio is None else f'{ratio:6.2f}':>6}",
                                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if ratios:
        print(f"median ratio asteria/fio over {len(ratios)} configurations: {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
