"""``asteria-bench optimizer``: per-step optimizer time on the weights of one GPT block.

For each width d (``--d-model``) the parameters are those of one pre-LN transformer block: the
fused QKV projection (3d×d), the attention output (d×d), the MLP (4d×d and d×4d), two LayerNorm
weights and biases (d). Each optimizer takes ``--steps`` steps on fixed random gradients;
ordinary steps and refresh steps (every precondition_frequency-th, plus the first call) are
timed separately (a refresh step is one that submitted refresh jobs; the refresh
runtime is synchronous here so its cost shows in that step) and compared with ``torch.optim.AdamW`` on the same parameters in the same run.

GEMM FLOPs of an ordinary SOAP step, counted as 2·m·n·k per (m×k)·(k×n) matmul, per 2-D block of
shape m×n (dims above max_preconditioner_dim are split into blocks first):
    factor updates   G·Gᵀ and Gᵀ·G            2·m²·n + 2·m·n²
    project in       Q_Lᵀ·G·Q_R               2·m²·n + 2·m·n²
    project out      Q_L·U·Q_Rᵀ               2·m²·n + 2·m·n²
    total            6·m·n·(m + n)
Shampoo's ordinary step: factor updates + X_L·G·X_R = 4·m·n·(m + n).
The machine's GEMM throughput is measured in the same run with torch.matmul on exactly the
products above (same shapes, same thread count), and the optimizer's achieved fraction printed.
"""

from __future__ import annotations

import statistics
import time

import torch

import asteria

_CLASSES = {
    "shampoo": ("Shampoo", 4),
    "soap": ("SOAP", 6),
    "kl-shampoo": ("KLShampoo", None),
    "kl-soap": ("KLSOAP", None),
}


def _block_params(d: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(d)
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,), (d,), (d,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]


def _blocks_2d(shape, max_dim=2048):
    m, n = shape
    out = []
    for i in range(0, m, max_dim):
        for j in range(0, n, max_dim):
            out.append((min(max_dim, m - i), min(max_dim, n - j)))
    return out


def _gemm_seconds(blocks, factor: int, repeats: int = 3) -> float:
    """Time torch.matmul on the same GEMMs an ordinary step performs (factor 6: SOAP, 4: Shampoo)."""
    mats = []
    for m, n in blocks:
        mats.append((torch.randn(m, n), torch.randn(m, m), torch.randn(n, n)))

    def work():
        for g, ql, qr in mats:
            g @ g.T
            g.T @ g
            ql.T @ g @ qr
            if factor == 6:
                ql @ g @ qr.T

    work()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _step_times(opt, params, grads, steps):
    """Times each step; a step that submitted refresh jobs is a refresh step. Ordinary steps are
    counted only after the first refresh (before it Shampoo runs its grafting direction alone)."""
    ordinary, refresh = [], []
    refreshed = False
    for s in range(steps):
        for p, g in zip(params, grads[s % len(grads)]):
            p.grad = g
        before = opt.runtime.counters()["jobs_submitted"] if hasattr(opt, "runtime") else 0
        t0 = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t0
        submitted = (opt.runtime.counters()["jobs_submitted"] if hasattr(opt, "runtime") else 0) > before
        if submitted:
            refresh.append(dt)
            refreshed = True
        elif refreshed or not hasattr(opt, "runtime"):
            ordinary.append(dt)
    return ordinary, refresh


def run(args) -> None:
    torch.set_num_threads(int(__import__("os").environ.get("ASTERIA_BENCH_THREADS", "1")))
    freq = 10
    print(f"asteria-bench optimizer: {torch.get_num_threads()} thread(s), precondition_frequency={freq}, "
          f"median seconds per step")
    for d in (int(x) for x in args.d_model.split(",")):
        params = _block_params(d)
        gen = torch.Generator().manual_seed(1)
        grads = [[torch.randn(p.shape, generator=gen) * 0.01 for p in params] for _ in range(3)]
        adam = torch.optim.AdamW(params, lr=1e-3)
        a_ord, _ = _step_times(adam, params, grads, min(args.steps, 10))
        t_adam = statistics.median(a_ord)
        blocks = [b for p in params if p.dim() == 2 for b in _blocks_2d(tuple(p.shape))]
        print(f"d_model={d}: AdamW {t_adam * 1e3:.2f} ms/step")
        for name in args.optimizers.split(","):
            cls_name, factor = _CLASSES[name]
            params = _block_params(d)
            opt = getattr(asteria, cls_name)(params, precondition_frequency=freq,
                                             runtime=asteria.RuntimeConfig(refresh="sync"))
            ordinary, refresh = _step_times(opt, params, grads, args.steps)
            t_ord = statistics.median(ordinary)
            t_ref = statistics.median(refresh) if refresh else float("nan")
            line = (f"  {name:10} ordinary {t_ord * 1e3:9.2f} ms ({t_ord / t_adam:6.1f}x AdamW)  "
                    f"refresh {t_ref * 1e3:9.2f} ms")
            if factor is not None:
                flops = sum(factor * m * n * (m + n) for m, n in blocks)
                t_gemm = _gemm_seconds(blocks, factor)
                line += (f"  GEMM {flops / 1e9:7.2f} GFLOP/step  machine {flops / t_gemm / 1e9:6.1f} GFLOP/s  "
                         f"optimizer {flops / t_ord / 1e9:6.1f} GFLOP/s = {t_gemm / t_ord:5.1%} of GEMM peak")
            print(line, flush=True)
            del opt
