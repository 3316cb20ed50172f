"""``asteria-bench linalg``: asteria's LAPACK wrappers against torch.linalg and scipy.linalg.

For each provider, size and dtype it times (median of --repeats, 1 thread everywhere):
  eigh     asteria linalg.eigh      | torch.linalg.eigh           | scipy.linalg.eigh(driver="evd")
  root     asteria inverse_root     | torch eigh + V·diag·Vᵀ      | scipy eigh(evd) + V·diag·Vᵀ
  refresh  asteria eigenbasis_refresh (sort + power step + QR)
                                    | torch: diag(QᵀLQ), argsort, qr(L·Q)
                                    | scipy: the same with scipy.linalg.qr(mode="economic")
and prints throughput ratios (baseline time / asteria time: > 1 means asteria is faster).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import scipy.linalg as sla
import torch

import asteria
from asteria import _core
from asteria._loader import find_mkl_runtime


def _median(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _spd(n, dtype):
    g = np.random.default_rng(n).standard_normal((n, n))
    return (g @ g.T / n + np.eye(n)).astype(dtype)


def _torch_root(t):
    w, v = torch.linalg.eigh(t)
    return (v * w.pow(-0.25)) @ v.T


def _scipy_root(a):
    w, v = sla.eigh(a, driver="evd", check_finite=False)
    return (v * w ** -0.25) @ v.T


def _torch_refresh(lt, qt):
    e = torch.diag(qt.T @ lt @ qt)
    return torch.linalg.qr(lt @ qt[:, torch.argsort(e, descending=True)]).Q


def _scipy_refresh(a, q):
    e = np.einsum("ij,ij->j", q, a @ q)
    return sla.qr(a @ q[:, np.argsort(-e, kind="stable")], mode="economic", check_finite=False)[0]


def run(args) -> None:
    torch.set_num_threads(1)
    providers = args.providers.split(",") if args.providers != "auto" else (
        ["openblas"] + (["mkl"] if find_mkl_runtime() else []))
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    print("asteria-bench linalg: median ms, 1 thread; ratio = baseline time / asteria time")
    print(f"{'provider':9} {'n':>5} {'dtype':8} {'op':8} {'asteria':>9} {'torch':>9} {'scipy':>9} "
          f"{'vs torch':>9} {'vs scipy':>9}")
    for prov in providers:
        asteria.select_provider(prov)
        for n in sizes:
            reps = args.repeats if n < 1024 else max(3, args.repeats // 2)
            for dt in dtypes:
                a = _spd(n, np.dtype(dt))
                q = np.ascontiguousarray(np.linalg.eigh(a.astype(np.float64))[1][:, ::-1].astype(dt))
                lt, qt = torch.from_numpy(a), torch.from_numpy(q)
                rows = {
                    "eigh": (lambda: _core.linalg.eigh(a), lambda: torch.linalg.eigh(lt),
                             lambda: sla.eigh(a, driver="evd", check_finite=False)),
                    "root": (lambda: _core.linalg.inverse_root(a, root=4, epsilon=0.0),
                             lambda: _torch_root(lt), lambda: _scipy_root(a)),
                    "refresh": (lambda: _core.linalg.eigenbasis_refresh(a, q, sort=True),
                                lambda: _torch_refresh(lt, qt), lambda: _scipy_refresh(a, q)),
                }
                for op, (ours, tor, sci) in rows.items():
                    t_a, t_t, t_s = (_median(f, reps) for f in (ours, tor, sci))
                    print(f"{prov:9} {n:5d} {dt:8} {op:8} {t_a*1e3:9.2f} {t_t*1e3:9.2f} {t_s*1e3:9.2f} "
                          f"{t_t/t_a:9.2f} {t_s/t_a:9.2f}", flush=True)
    asteria.select_provider(None)
