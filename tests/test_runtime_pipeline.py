"""Tests of the asynchronous refresh runtime (invariants 1, 2, 6, 7 of docs/design.md; docs/algorithms.md §6).

Bit-identity with the synchronous runtime at S = 0, agreement with delay-S float64 oracles, the skip rule,
real concurrency, determinism under slowed and randomly delayed workers, eager installs, failures,
hooks, a shared `Runtime`, checkpoints with refreshes in flight, and a clean shutdown.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import asteria
from asteria import _core
from asteria.optim import KLSOAP, SOAP, KLShampoo, Shampoo
from asteria.optim.shampoo import is_refresh_step
from asteria.runtime import RefreshFailureWarning, RefreshPipeline, Runtime, RuntimeConfig, accepted_refresh_step
from asteria.runtime.tiers import StepFailedError
from helpers import assert_same_bits, default_signal_dispositions, stop
from oracles import KLOracle, ShampooOracle, SOAPOracle, gradient_sequence

F64 = torch.float64
NAMES = ["Shampoo", "SOAP", "KLShampoo", "KLSOAP"]
OFFSET = {"Shampoo": 0, "SOAP": 1, "KLShampoo": 1, "KLSOAP": 1}
F = 3  # precondition_frequency of the oracle tests


def build(name, params, runtime, f=F, **kw):
    if name == "Shampoo":
        return Shampoo(params, lr=0.02, epsilon=1e-6, precondition_frequency=f, start_preconditioning_step=f,
                       merge_dims=False, betas=(0.9, 0.99), grafting_epsilon=1e-3, runtime=runtime, **kw)
    if name == "SOAP":
        return SOAP(params, lr=0.01, betas=(0.9, 0.8), shampoo_beta=0.5, eps=1e-3, precondition_frequency=f,
                    runtime=runtime, **kw)
    cls = KLSOAP if name == "KLSOAP" else KLShampoo
    return cls(params, lr=0.01, betas=(0.9, 0.7), eps=1e-3, precondition_frequency=f, runtime=runtime, **kw)


def oracle(name, shape, staleness, f=F, phase=0):
    if name == "Shampoo":
        return ShampooOracle(shape, lr=0.02, epsilon=1e-6, precondition_frequency=f, start_preconditioning_step=f,
                             betas=(0.9, 0.99), grafting_epsilon=1e-3, staleness=staleness, phase=phase)
    if name == "SOAP":
        return SOAPOracle(shape, lr=0.01, betas=(0.9, 0.8), shampoo_beta=0.5, eps=1e-3, precondition_frequency=f,
                          staleness=staleness, phase=phase)
    return KLOracle(shape, klsoap=name == "KLSOAP", lr=0.01, betas=(0.9, 0.7), eps=1e-3, precondition_frequency=f,
                    staleness=staleness, phase=phase)


def shapes_for(name):
    return [(6, 6), (5, 3), (7,)] if name == "Shampoo" else [(6, 6), (3, 4, 5), (7,)]


def run(name, runtime, steps=14, seed=0, dtype=F64, f=F, checkpoint_at=None, prepare=None, probe=None, **kw):
    """Trains a few parameters on a fixed gradient sequence; returns (optimizer, params, per-step versions).

    ``prepare(opt)`` is called once the optimizer is built, ``probe(opt, seconds)`` right after each ``step()``
    with the time it took (before the version is read from ``opt.state``)."""
    shapes = shapes_for(name)
    rng = np.random.default_rng(seed)
    params = [torch.nn.Parameter(torch.tensor(rng.standard_normal(s), dtype=dtype)) for s in shapes]
    grads = [gradient_sequence(s, steps, seed=seed + 10 + i) for i, s in enumerate(shapes)]
    opt = build(name, params, runtime, f=f, state_dtype=dtype, **kw)
    if prepare is not None:
        prepare(opt)
    versions = []
    key = "root_version" if name == "Shampoo" else "basis_version"
    for t in range(steps):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g[t], dtype=dtype)
        start = time.perf_counter()
        opt.step()
        if probe is not None:
            probe(opt, time.perf_counter() - start)
        versions.append(int(opt.state[params[0]]["blocks"][0][key]))
    return opt, params, versions


def assert_same(params_a, params_b):
    for a, b in zip(params_a, params_b):
        assert torch.equal(a.detach(), b.detach())


# ----------------------------------------------------------------------------------------------------------
# the skip rule
# ----------------------------------------------------------------------------------------------------------
def _simulated_accepts(is_refresh, gap, steps):
    taken, pending_until = [], -1
    for t in range(1, steps + 1):
        if is_refresh(t) and t >= pending_until:
            taken.append(t)
            pending_until = t + gap
    return taken


@pytest.mark.parametrize("f,start", [(1, 1), (2, 2), (3, 3), (4, 6), (10, 10), (3, 7)])
@pytest.mark.parametrize("gap", [0, 1, 2, 3, 4, 6, 11])
def test_skip_rule_is_a_function_of_the_step_numbers(f, start, gap):
    is_refresh = lambda t: is_refresh_step(t, f, start)  # noqa: E731
    want = _simulated_accepts(is_refresh, gap, 120)
    got = [t for t in range(1, 121) if accepted_refresh_step(t, is_refresh, start, f, gap)]
    assert got == want
    never = lambda t: is_refresh_step(t, f, math.inf)  # noqa: E731
    assert not any(accepted_refresh_step(t, never, math.inf, f, gap) for t in range(1, 50))


# ----------------------------------------------------------------------------------------------------------
# invariant 1 (docs/design.md): S = 0 is the synchronous algorithm bit for bit; S = k equals the delay-k oracle
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_staleness_zero_async_is_bit_identical_to_sync(name):
    ref_opt, ref, _ = run(name, RuntimeConfig(refresh="sync"), dtype=torch.float32)
    for install in ("deterministic", "eager"):
        opt, got, _ = run(name, RuntimeConfig(refresh="async", staleness=0, install=install), dtype=torch.float32)
        assert_same(ref, got)
        for p_ref, p in zip(ref, got):
            for blk_ref, blk in zip(ref_opt.state[p_ref]["blocks"], opt.state[p]["blocks"]):
                for k in blk_ref:
                    assert torch.equal(blk_ref[k], blk[k]), k
        assert opt.runtime.stats()["jobs_submitted"] == ref_opt.runtime.stats()["jobs_submitted"]
        opt.close()
    ref_opt.close()


def _oracle_cases():
    # k = 1, 3, 5, and k = 4 (> f = 3 for every optimizer, so refresh steps are skipped)
    return [(n, k) for n in NAMES for k in (1, 3, 4, 5)]


@pytest.mark.parametrize("phases", ["aligned", "staggered"])
@pytest.mark.parametrize("name,k", _oracle_cases())
def test_deterministic_staleness_matches_the_delay_oracle(name, k, phases):
    steps = 16
    shapes = shapes_for(name)
    rng = np.random.default_rng(0)
    W = [rng.standard_normal(s) for s in shapes]
    grads = [gradient_sequence(s, steps, seed=10 + i) for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(torch.tensor(w, dtype=F64)) for w in W]
    opt = build(name, params, RuntimeConfig(staleness=k, refresh_phases=phases), state_dtype=F64)
    got = opt.refresh_phases()  # one block per parameter here
    phase = [got[f"param_groups[0]['params'][{i}]"][0] for i in range(len(shapes))]
    # by weight (the squares of the dims) over f = 3 phases: SOAP and KL 72, 50 and the unrefreshed vector;
    # Shampoo 72, 34 and 49 (it preconditions vectors too)
    want = [0, 1, 2] if name == "Shampoo" else [0, 1, None]
    assert phase == (want if phases == "staggered" else [w if w is None else 0 for w in want])
    oracles = [oracle(name, s, k, phase=ph or 0) for s, ph in zip(shapes, phase)]
    o = OFFSET[name]
    for t in range(steps):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g[t], dtype=F64)
        opt.step()
        W = [orc.step(w, g[t]) for orc, w, g in zip(oracles, W, grads)]
        for i, p in enumerate(params):
            np.testing.assert_allclose(p.detach().numpy(), W[i], rtol=1e-7, atol=1e-9, err_msg=f"param {i} call {t}")
    # the install schedule itself: snapshot s installed at s + o + k, skipped steps never submitted
    installs = oracles[0].installs
    assert installs and all(at == s + o + k for s, at in installs)
    if o + k > F:
        snapshots = [s for s, _ in installs]
        assert any(b - a > F for a, b in zip(snapshots, snapshots[1:]))  # some refresh steps were skipped
    stats = opt.runtime.stats()
    assert max(stats["installed_staleness"]) == k and stats["summary"]["max_staleness"] == k
    assert set(stats["installed_staleness"]) <= {0, k}  # 0: the synchronous first SOAP/KL basis
    opt.close()


# ----------------------------------------------------------------------------------------------------------
# invariant 2 (docs/design.md): concurrency, the bound, determinism whatever the timing
# ----------------------------------------------------------------------------------------------------------
def test_training_steps_keep_completing_while_a_slow_refresh_runs():
    sched = _core.RefreshScheduler(workers=1, test_delay_s=0.3)  # a refresh (2 factors) takes >= 0.6 s
    rt = Runtime(RuntimeConfig(staleness=5000), scheduler=sched)  # no deadline inside the loop
    p = torch.nn.Parameter(torch.randn(16, 16))
    opt = SOAP([p], precondition_frequency=2, runtime=rt)
    p.grad = torch.randn(16, 16)
    opt.step()  # first call: the synchronous initial basis (also delayed)
    steps_during = 0
    busy0 = sum(sched.stats()["worker_busy_s"])
    for _ in range(2000):
        p.grad = torch.randn(16, 16)
        opt.step()
        if sched.stats()["running"]:
            steps_during += 1
        time.sleep(0.002)
        if sum(sched.stats()["worker_busy_s"]) - busy0 >= 0.6:
            break
    stats = opt.runtime.stats()
    busy = sum(stats["scheduler"]["worker_busy_s"]) - busy0
    # worker busy time overlapped the steps: the 0.6 s refresh ran while >= 20 steps completed
    assert busy >= 0.6 and steps_during >= 20, (busy, steps_during)
    assert stats["stalls"] == 1  # only the synchronous initial basis waited
    assert max(stats["timeline"]["step_s"][1:]) < 0.3  # no step waited for the 0.6 s refresh
    rt.close()


@pytest.mark.parametrize("name", ["Shampoo", "SOAP", "KLSOAP"])
def test_slowed_and_jittered_workers_stay_deterministic(name):
    def delayed(seed):
        return Runtime(RuntimeConfig(staleness=2, workers=2),
                       scheduler=_core.RefreshScheduler(workers=2, test_delay_s=0.002, test_jitter_s=0.03,
                                                        test_seed=seed))

    ref_opt, ref, ref_versions = run(name, RuntimeConfig(staleness=2), f=2)
    opt_a, a, versions_a = run(name, delayed(1), f=2)
    opt_b, b, versions_b = run(name, delayed(2), f=2)
    assert_same(ref, a)
    assert_same(ref, b)
    assert ref_versions == versions_a == versions_b
    for opt in (opt_a, opt_b):
        stats = opt.runtime.stats()
        assert max(stats["installed_staleness"]) <= 2  # the bound is never exceeded
        assert stats["stalls"] >= 1 and stats["wait_s"] > 0  # late results were waited for and counted
        assert sum(stats["timeline"]["stall_s"]) > 0
        assert stats["summary"]["stalled_steps"] >= 1
        opt.runtime.runtime.close()
    ref_opt.close()


@pytest.mark.parametrize("name", ["Shampoo", "SOAP"])
def test_eager_installs_early_never_late_and_in_version_order(name):
    S = 4
    sched = _core.RefreshScheduler(workers=1, test_jitter_s=0.01, test_seed=3)
    rt = Runtime(RuntimeConfig(staleness=S, install="eager", refresh_phases="aligned"), scheduler=sched)
    shapes = shapes_for(name)
    params = [torch.nn.Parameter(torch.randn(s, dtype=F64)) for s in shapes]
    opt = build(name, params, rt, f=2, state_dtype=F64)
    key = "root_version" if name == "Shampoo" else "basis_version"
    history = []
    for t in range(24):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=F64)
        opt.step()
        time.sleep(0.02)  # slow steps: a result is ready long before its deadline
        history.append([int(b[key]) for p in params for b in opt.state[p]["blocks"] if key in b])
    stats = opt.runtime.stats()
    staleness = stats["installed_staleness"]
    assert max(staleness) <= S
    assert min(s for s in staleness[1 if name != "Shampoo" else 0:]) < S  # installed before the deadline
    for col in zip(*history):  # versions only increase per block
        assert all(a <= b for a, b in zip(col, col[1:]))
    # the snapshot steps taken are those of the deterministic rule (skips never depend on timing)
    o = OFFSET[name]
    start = 2
    taken = {0} | {t for t in range(1, 25) if accepted_refresh_step(t, lambda x: x % 2 == 0, start, 2, o + S)}
    eager_versions = {v for h in history for v in h}
    assert eager_versions <= taken
    det, _, det_versions = run(name, RuntimeConfig(staleness=S, refresh_phases="aligned"), f=2, steps=24)
    assert set(det_versions) <= eager_versions
    det.close()
    rt.close()


# ----------------------------------------------------------------------------------------------------------
# invariant 6 (docs/design.md): a failed background refresh keeps the previous preconditioner
# ----------------------------------------------------------------------------------------------------------
class NaNOnCalls:
    """Wraps a scheduler and feeds NaN to the eigenbasis-refresh submissions numbered in ``calls``."""

    def __init__(self, calls):
        self.inner = _core.RefreshScheduler(workers=1)
        self.calls, self.n = set(calls), 0

    def submit_eigenbasis_refresh(self, block_id, version, deadline, a, q, **kw):
        self.n += 1
        if self.n in self.calls:
            a = np.full_like(a, np.nan)
        return self.inner.submit_eigenbasis_refresh(block_id, version, deadline, a, q, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_background_failure_keeps_the_basis_warns_and_is_reported():
    p = torch.nn.Parameter(torch.randn(5, 5, dtype=F64))
    rt = Runtime(RuntimeConfig(staleness=2), scheduler=NaNOnCalls({3, 4}))  # the second refresh (step 4) fails
    opt = SOAP([("layer.weight", p)], precondition_frequency=2, state_dtype=F64, runtime=rt)
    # o + S = 3 > f = 2: snapshots at steps 2 and 6 (4 is skipped), installed at boundaries 5 and 9
    for _ in range(8):  # the first call, then steps 1..7
        p.grad = torch.randn(5, 5, dtype=F64)
        opt.step()
    blk = opt.state[p]["blocks"][0]
    basis = blk["basis_0"].clone()
    assert int(blk["basis_version"]) == 2
    p.grad = torch.randn(5, 5, dtype=F64)
    with pytest.warns(RefreshFailureWarning, match="previous preconditioner is kept"):
        opt.step()  # step 8 ends at boundary 9: the failed snapshot of step 6 is due
    assert torch.equal(blk["basis_0"], basis) and int(blk["basis_version"]) == 2
    assert int(blk["refresh_failures"]) == 1
    stats = opt.runtime.stats()
    assert stats["jobs_failed"] == 2 and stats["failures"] and "failed" in stats["failures"][0]
    rt.close()


# ----------------------------------------------------------------------------------------------------------
# hooks, shared runtime, checkpoints
# ----------------------------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 12)
        self.b = torch.nn.Linear(12, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("name", NAMES)
def test_hooks_do_not_change_the_numbers(name):
    def train(hooks):
        torch.manual_seed(0)
        model = Tiny()
        opt = build(name, model.parameters(), RuntimeConfig(staleness=2, hooks=hooks), f=2)
        calls = [0]
        if hooks:
            inner = opt.runtime.on_grad_ready

            def counting():
                calls[0] += 1
                inner()

            opt.runtime.on_grad_ready = counting
        gen = torch.Generator().manual_seed(1)
        for _ in range(12):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        opt.close()
        return list(model.parameters()), calls[0]

    with_hooks, calls = train(True)
    without, _ = train(False)
    assert calls == 12 * 4  # one hook call per parameter and backward
    assert_same(with_hooks, without)


def test_hooks_collect_once_per_backward():
    """The first hook of a backward collects finished jobs; the other hooks of that backward do not poll again."""
    torch.manual_seed(0)
    model = Tiny()
    opt = build("SOAP", model.parameters(), RuntimeConfig(staleness=3), f=2)
    rt = opt.runtime._runtime
    polls = []
    inner = rt.collect

    def counting(*, blocking=True):
        polls.append(blocking)
        return inner(blocking=blocking)

    rt.collect = counting
    gen = torch.Generator().manual_seed(1)
    backwards_with_pending = 0
    try:
        for _ in range(8):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
            opt.zero_grad()
            pending = opt.runtime.pending() > 0
            before = polls.count(False)
            torch.nn.functional.mse_loss(model(x), y).backward()
            assert polls.count(False) - before == (1 if pending else 0)  # 4 hooks, one poll
            backwards_with_pending += pending
            opt.step()
    finally:
        opt.close()
    assert backwards_with_pending >= 3


def test_shared_runtime_is_one_pool_and_changes_nothing():
    rt = asteria.Runtime(RuntimeConfig(staleness=3, workers=2))
    opt_a, a, _ = run("SOAP", rt)
    opt_b, b, _ = run("Shampoo", rt)
    assert opt_a.runtime.runtime is opt_b.runtime.runtime and opt_a.runtime.scheduler is opt_b.runtime.scheduler
    ref_a, ra, _ = run("SOAP", RuntimeConfig(staleness=3))
    ref_b, rb, _ = run("Shampoo", RuntimeConfig(staleness=3))
    assert_same(a, ra)
    assert_same(b, rb)
    stats = rt.stats()
    assert len(stats["pipelines"]) == 2 and stats["scheduler"]["submitted"] > 0
    opt_a.close()  # a shared runtime stays open for the other optimizer
    assert not rt.closed
    rt.close()
    for o in (ref_a, ref_b):
        o.close()


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_with_refreshes_in_flight_resumes_bit_identically(name):
    cfg = RuntimeConfig(staleness=3)
    steps, cut = 18, 11
    ref_opt, ref, _ = run(name, cfg, steps=steps)
    # the same run, stopped at `cut` with a refresh in flight, saved, and resumed in a fresh optimizer
    shapes = shapes_for(name)
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s) for s in shapes]
    grads = [gradient_sequence(s, steps, seed=10 + i) for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(torch.tensor(w, dtype=F64)) for w in init]
    opt = build(name, params, cfg, state_dtype=F64)
    for t in range(cut):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g[t], dtype=F64)
        opt.step()
    assert opt.runtime.pending() >= 1
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buf)
    opt.close()
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    params2 = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = build(name, params2, cfg, state_dtype=F64)
    opt2.load_state_dict(saved["opt"])
    assert opt2.runtime.pending() >= 1
    for t in range(cut, steps):
        for p, g in zip(params2, grads):
            p.grad = torch.tensor(g[t], dtype=F64)
        opt2.step()
    assert_same(ref, params2)
    opt2.close()
    ref_opt.close()


def test_stats_timeline_and_summary():
    opt, _, _ = run("KLSOAP", RuntimeConfig(staleness=2), steps=10)
    stats = opt.runtime.stats()
    tl = stats["timeline"]
    assert len(tl["step_s"]) == len(tl["stall_s"]) == len(tl["jobs_submitted"]) == len(tl["jobs_installed"]) == 10
    assert sum(tl["jobs_submitted"]) == stats["jobs_submitted"]
    assert sum(tl["jobs_installed"]) == stats["jobs_ok"] + stats["jobs_failed"]
    # the runtime's own time: on the steps that submit or install, and on no other
    assert len(tl["submit_s"]) == len(tl["install_s"]) == 10
    assert all((s > 0) == (n > 0) for s, n in zip(tl["submit_s"], tl["jobs_submitted"]))
    assert all((s > 0) == (n > 0) for s, n in zip(tl["install_s"], tl["jobs_installed"]))
    assert all(s < step for s, step in zip(tl["install_s"], tl["step_s"]))
    for key in ("mean", "p50", "p90", "p99", "max"):
        assert stats["summary"]["step_s"][key] >= 0
    assert stats["summary"]["step_s"]["max"] >= stats["summary"]["step_s"]["p50"]
    assert stats["refresh"] == "async" and stats["staleness"] == 2 and stats["install"] == "deterministic"
    opt.close()


# ----------------------------------------------------------------------------------------------------------
# lifecycle: no thread left behind, prompt exit when interrupted mid-refresh
# ----------------------------------------------------------------------------------------------------------
def _threads():
    return len(os.listdir("/proc/self/task"))


def _slow_after_first_step(p, cfg, delay_s):
    """A SOAP whose first (synchronous) basis comes from a fast pool and whose refreshes take ``delay_s``."""
    opt = SOAP([p], precondition_frequency=1, runtime=cfg)
    p.grad = torch.randn(p.shape)
    opt.step()
    opt.runtime.close()
    slow = _core.RefreshScheduler(workers=1, test_delay_s=delay_s)
    opt.runtime = RefreshPipeline(Runtime(cfg, scheduler=slow), offset=1)
    return opt, slow


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
@pytest.mark.parametrize("how", ["close", "del", "exception"])
def test_close_del_or_exception_mid_refresh_leave_no_thread_and_do_not_hang(how):
    base = _threads()
    p = torch.nn.Parameter(torch.randn(6, 6))
    opt, slow = _slow_after_first_step(p, RuntimeConfig(staleness=50), 60.0)
    t0 = time.perf_counter()
    try:
        with opt if how == "exception" else contextlib.nullcontext():
            p.grad = torch.randn(6, 6)
            opt.step()  # submits a refresh that would run for 60 s
            while slow.stats()["running"] == 0:
                time.sleep(0.005)
            assert _threads() > base
            if how == "exception":
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    if how == "close":
        opt.close()
    del opt, slow
    gc.collect()
    assert time.perf_counter() - t0 < 10.0
    assert _threads() <= base


@pytest.mark.signals
def test_sigint_mid_refresh_exits_promptly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import time, torch
        from asteria import SOAP, Runtime, RuntimeConfig, _core
        from asteria.runtime import RefreshPipeline
        cfg = RuntimeConfig(staleness=10**6)
        p = torch.nn.Parameter(torch.randn(8, 8))
        opt = SOAP([p], precondition_frequency=4, runtime=cfg)
        p.grad = torch.randn(8, 8); opt.step()  # the synchronous first basis, from a fast pool
        slow = _core.RefreshScheduler(workers=1, test_delay_s=60.0)  # every refresh now takes 60 s
        opt.runtime = RefreshPipeline(Runtime(cfg, scheduler=slow), offset=1)
        step = 0
        while True:
            p.grad = torch.randn(8, 8); opt.step(); step += 1
            if step == 8:
                print("ready", flush=True)
            time.sleep(0.005)
    """))
    with default_signal_dispositions():  # a Ctrl-C must raise KeyboardInterrupt in the child
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with proc:
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.2)
        except BaseException:
            proc.kill()
            raise
        _, err, elapsed = stop(proc, signal.SIGINT)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert elapsed < 10  # the 60 s refresh in flight was interrupted, not waited for


def test_counters_match_stats_without_the_timeline():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = SOAP([p], precondition_frequency=2, runtime=RuntimeConfig(refresh="sync"))
    for _ in range(5):
        p.grad = torch.randn(8, 8)
        opt.step()
    counters, stats = opt.runtime.counters(), opt.runtime.stats()
    assert counters["jobs_submitted"] > 0 and counters["batches_installed"] > 0
    assert all(stats[k] == v for k, v in counters.items())
    assert "timeline" not in counters and "summary" not in counters
    opt.close()


def test_cancelled_jobs_leave_nothing_behind():
    """A cancelled job's result (cancelled while queued, or finished while running) is dropped when it comes
    back instead of staying in the runtime's table."""
    from asteria import _core
    from asteria.runtime.workers import Runtime

    rt = Runtime(RuntimeConfig(), scheduler=_core.RefreshScheduler(workers=1))
    try:
        running = rt.scheduler.submit_sleep(0, 1, 2, 0.2)
        queued = rt.scheduler.submit_sleep(0, 1, 3, 0.2)
        time.sleep(0.05)
        rt.cancel(running)
        rt.cancel(queued)
        deadline = time.time() + 5
        while rt._forgotten and time.time() < deadline:
            rt.collect()
            time.sleep(0.02)
        assert rt._forgotten == {} and rt._done == {}
    finally:
        rt.close()


# ----------------------------------------------------------------------------------------------------------
# installs of one step on two threads (RuntimeConfig.parallel_install)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_parallel_installs_change_nothing(name):
    """With the helper thread, the parameters, the install schedule and every state tensor are the same bits as
    with every install on the training thread. SOAP, KL-Shampoo and KL-SOAP install at the end of a step for the
    next one: those installs run on the helper while the next gradients are computed (``overlapped_installs``).
    Shampoo's are used in the step that installs them: a round of several batches is split between the two
    threads (``parallel_installs``)."""
    cpu = max(os.sched_getaffinity(0))

    def train(parallel):
        # aligned phases: Shampoo's round of several batches at one step is what gets split between the threads
        cfg = RuntimeConfig(staleness=2, worker_cpus=[cpu], parallel_install=parallel, refresh_phases="aligned")
        opt, params, versions = run(name, cfg, steps=14)
        state = opt.state_dict()["state"]
        stats = opt.runtime.stats()
        opt.close()
        return params, versions, state, (stats["parallel_installs"], stats["overlapped_installs"])

    a, va, sa, helped = train(True)
    b, vb, sb, none = train(False)
    assert helped == ((helped[0], 0) if name == "Shampoo" else (0, helped[1])) and max(helped) > 0
    assert none == (0, 0)
    assert va == vb
    assert_same(a, b)
    assert_same_bits(sa, sb)


def _slowed(opt, seconds, fail=False):
    """Makes every install of ``opt`` take ``seconds`` longer (and raise when ``fail``); returns the log of the
    threads that ran them."""
    original, ran = opt._install_batch, []

    def install(tag, results):
        time.sleep(seconds)
        ran.append(threading.current_thread().name)
        if fail:
            raise RuntimeError("install broke")
        original(tag, results)

    opt._install_batch = install
    return ran


def _soap_run(parallel, steps=9, seconds=0.0):
    """SOAP (o = 1) with S = 1, installs slowed by ``seconds``: (optimizer, params, versions, per step how long
    step() took and whether installs were still running when it returned, the threads that installed)."""
    cfg = RuntimeConfig(staleness=1, worker_cpus=[max(os.sched_getaffinity(0))], parallel_install=parallel,
                        refresh_phases="aligned")
    log, ran = [], []
    opt, params, versions = run(
        "SOAP", cfg, steps=steps, f=F, prepare=lambda opt: ran.append(_slowed(opt, seconds)),
        probe=lambda opt, took: log.append((took, opt.runtime.installs_running)),
    )
    return opt, params, versions, log, ran[0]


def test_installs_for_the_next_step_overlap_the_next_gradients_and_reads_wait_for_them():
    """SOAP's installs at the end of a step run on the helper thread: step() returns before they finish, and
    reading ``opt.state`` (or ``state_dict()``) waits for them, so what it shows and what training computes are
    the same bits as with every install on the training thread."""
    opt, params, versions, log, ran = _soap_run(True, seconds=0.25)
    ref, ref_params, ref_versions, ref_log, ref_ran = _soap_run(False)
    installing = [t for t, (_, running) in enumerate(log) if running]
    assert installing == [t for t, v in enumerate(ref_versions) if t == 0 or v != ref_versions[t - 1]]
    assert len(installing) >= 3 and all(log[t][0] < 0.25 for t in installing)  # returned before the install ended
    assert ran and all(n.startswith("asteria-install") for n in ran)
    assert ref_ran and all(n == "MainThread" for n in ref_ran) and not any(r for _, r in ref_log)
    assert versions == ref_versions  # read from opt.state right after step(): the slowed installs were waited for
    assert_same(params, ref_params)
    assert_same_bits(ref.state_dict()["state"], opt.state_dict()["state"])
    assert opt.runtime.stats()["overlapped_installs"] > 0 and ref.runtime.stats()["overlapped_installs"] == 0
    opt.close()
    ref.close()


def test_a_failed_overlapped_install_fails_the_optimizer_until_a_checkpoint_is_loaded():
    """An installer that raises on the helper thread is raised by the next call that waits for it (here
    ``step()``); the optimizer then refuses to step or save, like after any step interrupted half-way, and
    loading a checkpoint makes it usable again."""
    opt, params, _, _, _ = _soap_run(True, steps=2)
    saved = opt.state_dict()
    _slowed(opt, 0.0, fail=True)
    grads = [torch.ones_like(p) for p in params]
    with pytest.raises(RuntimeError, match="install broke"):
        for _ in range(12):  # the next install point (o + S = 2 steps after a refresh step) raises one step later
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert opt.runtime.stats()["overlapped_installs"] >= 1
    with pytest.raises(StepFailedError, match="installing refresh results failed"):
        opt.step()
    with pytest.raises(StepFailedError):
        opt.state_dict()
    opt.load_state_dict(saved)
    del opt._install_batch  # the optimizer's own installer again
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    opt.close()


def _pending(seq, blocks, install=None, safe=True):
    from asteria.runtime.pipeline import _Pending

    def noop(results):
        pass

    fn = install or noop
    fn.parallel_safe = safe
    return _Pending(seq=seq, job_ids=[], install=fn, version=0, deadline=0, tag={"blocks": blocks})


def test_a_failed_overlapped_round_leaves_the_batches_it_did_not_start_pending():
    """As on one thread: the error is raised by the wait, the batches after the failed one are pending again (in
    submission order) and only the started ones count as installed."""
    pipe = RefreshPipeline(RuntimeConfig(worker_cpus=[max(os.sched_getaffinity(0))]), offset=1)
    ran = []

    def bad(results):
        raise RuntimeError("install failed")

    batches = [_pending(0, [(0, 0, 0)], lambda r: ran.append(0)), _pending(1, [(0, 1, 0)], bad),
               _pending(2, [(0, 2, 0)], lambda r: ran.append(2))]
    for p in batches:
        p.install.overlap_safe = lambda results: True
    pipe._pending.extend(batches)
    assert pipe.install_due(0, overlap=True) == 3 and pipe.installs_running and pipe.pending() == 0
    with pytest.raises(RuntimeError, match="install failed"):
        pipe.finish_installs()
    stats = pipe.stats()
    assert ran == [0] and [p.seq for p in pipe._pending] == [2] and not pipe.installs_running
    assert stats["batches_installed"] == 2 and stats["overlapped_installs"] == 2
    pipe.close()


def test_copy_only_installs_are_not_split():
    """A round whose installs only copy results (no installer says `parallel_pays`) stays on one thread."""
    from asteria.runtime.pipeline import _split_installs

    work = [(_pending(0, [(0, 0, 0)]), []), (_pending(1, [(0, 1, 0)]), [])]
    assert _split_installs(work) is not None
    for p, _ in work:
        p.install.parallel_pays = False
    assert _split_installs(work) is None
    work[0][0].install.parallel_pays = True  # one batch that computes is worth the helper
    assert _split_installs(work) is not None


def test_split_keeps_batches_of_a_block_together_and_in_order():
    from asteria.runtime.pipeline import _split_installs

    work = [(_pending(0, [(0, 0, 0)]), []), (_pending(1, [(0, 1, 0)]), []), (_pending(2, [[0, 0, 0]]), []),
            (_pending(3, [(0, 2, 0)]), [])]
    groups = [[p.seq for p, _ in g] for g in _split_installs(work)]
    assert all(groups) and sorted(groups[0] + groups[1]) == [0, 1, 2, 3]
    assert all(g == sorted(g) for g in groups)
    assert any(0 in g and 2 in g for g in groups)  # both install block (0, 0, 0): one thread, in order
    # not split: an installer that is not thread-safe (tiered or CUDA state), or every batch on one block
    assert _split_installs([(_pending(0, [(0, 0, 0)], safe=False), []), (_pending(1, [(0, 1, 0)]), [])]) is None
    assert _split_installs([(_pending(0, [(0, 0, 0)]), []), (_pending(1, [(0, 0, 0)]), [])]) is None


def test_parallel_install_errors_surface_after_both_threads_finish_and_the_helper_is_joined():
    """As on one thread, an installer that raises stops its group: batches it did not start stay pending and only
    the started ones are accounted; the other group finishes first; this thread's error wins, the helper's is its
    context. The helper is pinned to the workers' CPUs and joined at close."""
    import threading

    cpu = max(os.sched_getaffinity(0))
    pipe = RefreshPipeline(RuntimeConfig(worker_cpus=[cpu]), offset=1)
    helper = pipe._runtime.install_helper()
    assert helper is not None
    done = []

    def slow(results):
        time.sleep(0.1)
        done.append(threading.current_thread().name)

    def bad(results):
        raise RuntimeError("install failed")

    def helper_bad(results):
        raise OSError("helper failed")

    def attempt(mine, theirs):
        """Runs two groups through _install_parallel; returns the error and the batches still pending."""
        batches = [b for group in (mine, theirs) for b in group]
        pipe._pending.extend(p for p, _ in batches)
        try:
            pipe._install_parallel(helper, batches, mine, theirs, step=1)
        except BaseException as exc:  # noqa: BLE001 - inspected by the caller
            return exc, [p.seq for p in pipe._pending]
        return None, [p.seq for p in pipe._pending]

    before = pipe.stats()["batches_installed"]
    err, left = attempt([(_pending(0, [(0, 0, 0)], bad), []), (_pending(1, [(0, 2, 0)]), [])],
                        [(_pending(2, [(0, 1, 0)], slow), [])])
    assert isinstance(err, RuntimeError) and "install failed" in str(err)
    assert len(done) == 1 and done[0].startswith("asteria-install")  # the helper's group finished first
    assert left == [1]  # not started after the failure: still pending, as on one thread
    assert pipe.stats()["batches_installed"] == before + 2
    pipe._pending.clear()
    err, left = attempt([(_pending(3, [(0, 0, 0)], slow), [])], [(_pending(4, [(0, 1, 0)], bad), [])])
    assert isinstance(err, RuntimeError) and len(done) == 2 and left == []  # an error on the helper surfaces too
    err, _ = attempt([(_pending(5, [(0, 0, 0)], bad), [])], [(_pending(6, [(0, 1, 0)], helper_bad), [])])
    assert isinstance(err, RuntimeError) and isinstance(err.__context__, OSError)  # both kept
    helper_tid = helper.submit(threading.get_native_id).result()
    assert os.sched_getaffinity(helper_tid) == {cpu}  # on the workers' CPUs
    pipe.close()
    assert not any(t.name.startswith("asteria-install") for t in threading.enumerate())
    assert RefreshPipeline(RuntimeConfig(parallel_install=False), offset=1)._runtime.install_helper() is None
