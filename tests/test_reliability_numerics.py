"""Hostile numbers and parameter-set oddities, for every optimizer with synchronous and asynchronous refresh.

The policy under test is documented in `asteria.optim.base.BlockOptimizer` (and each optimizer's docstring):
a block's step is rejected (state and parameter unchanged, counted in ``nonfinite_steps``) when its gradient
is not finite *or* when what the step would store is not finite (a finite 1e30 gradient overflows ``G·Gᵀ``
in fp32); a refresh result that is not installable is never installed (the previous preconditioner is kept,
the failure counted, the 4th failure in a row raises); odd parameter sets get a clear error or just work.

Asynchronous runs use a fixed staleness of 5 (``DEFAULT_STALENESS``, where ``"auto"`` starts) with
``install="deterministic"``. Small shapes and
``precondition_frequency=2`` keep the whole file at about 25 s on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import asteria
from asteria import _core
from asteria.runtime.config import DEFAULT_STALENESS
from asteria.optim import RefreshFailureError
from asteria.optim.kl import eigenvalue_ema
from asteria.optim.tensor_ops import finite_blocks

OPTIMIZERS = ("Shampoo", "SOAP", "KLShampoo", "KLSOAP")
REFRESH = ("sync", "async")
# C++ refresh failures (ill-conditioned factors) warn in async mode; the tests that may meet one check the
# failure policy themselves instead
ALLOW_REFRESH_WARNINGS = pytest.mark.filterwarnings("ignore::asteria.runtime.pipeline.RefreshFailureWarning")


def runtime_config(refresh: str, **kw) -> asteria.RuntimeConfig:
    if refresh == "sync":
        return asteria.RuntimeConfig(refresh="sync", **kw)
    return asteria.RuntimeConfig(install="deterministic", staleness=DEFAULT_STALENESS, **kw)


def make(name: str, params, refresh: str = "sync", *, runtime=None, **kw):
    """The optimizer ``name`` with small-problem settings (refresh every 2 steps)."""
    options: dict = dict(precondition_frequency=2)
    if name == "Shampoo":
        options.update(lr=0.05, start_preconditioning_step=2, merge_dims=False)
    elif name == "SOAP":
        options.update(lr=0.05)
    else:
        options.update(lr=0.02)
    options.update(kw)
    return getattr(asteria, name)(params, runtime=runtime if runtime is not None else runtime_config(refresh), **options)


def snapshot_step(refresh: str) -> int:
    """A step whose statistics are snapshotted for a refresh (f = 2; async S = 5 skips the steps in between)."""
    return 4 if refresh == "sync" else 8


def first_step_call(name: str) -> int:
    """The ``step()`` call that is optimizer step 1: SOAP and KL spend their first call on initialisation."""
    return 1 if name == "Shampoo" else 2


def install_step(opt, s: int) -> int:
    """The optimizer step during which the refresh snapshotted at step s is installed (``s + o + S`` is the
    boundary before the step that first uses it; SOAP/KL install at the end of step ``s + S``)."""
    return s + opt.runtime.staleness


class Problem:
    """Least squares with a matrix (2-D blocks), a bias (1-D: AdamW fallback / Shampoo 1-D factor) and a 3-D tensor."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(16, 6, generator=g)
        self.B = torch.randn(16, 5, generator=g)
        self.T0 = torch.randn(3, 4, 2, generator=g)
        self.W = torch.nn.Parameter(torch.zeros(6, 5, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
        self.T = torch.nn.Parameter(torch.zeros(3, 4, 2, dtype=dtype))

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.W, self.b, self.T]

    def loss(self) -> torch.Tensor:
        W, b, T = (p.float() for p in self.params)
        return ((self.A @ W + b - self.B) ** 2).mean() + ((T - self.T0) ** 2).mean()

    def backward(self) -> float:
        for p in self.params:
            p.grad = None
        loss = self.loss()
        loss.backward()
        return float(loss.detach())


def state_of(opt, p) -> list[dict[str, torch.Tensor]]:
    """Copies of every block's state tensors of parameter ``p``."""
    return [{k: v.clone() for k, v in blk.items()} for blk in opt.state[p].get("blocks", [])]  # [] before step 1


def precond_keys(block: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in block if k.startswith(("root_", "basis_")) and not k.endswith("_version")]


STATS_EXEMPT = ("nonfinite_steps", "refresh_failures", "root_", "basis_")  # may change at an install


class RefreshWatch:
    """Checks after every step: all state and parameters finite; per block, either a refresh was installed
    (version up, failure counter reset) or the preconditioner is bit-identical to the previous step's."""

    def __init__(self, opt, params) -> None:
        self.opt, self.params = opt, list(params)
        self.prev = self._take()
        self.installs = self.failures = 0

    def _take(self):
        return [state_of(self.opt, p) for p in self.params]

    def check(self) -> None:
        cur = self._take()
        for p, old_blocks, new_blocks in zip(self.params, self.prev, cur):
            assert torch.isfinite(p.detach().float()).all()
            for old, new in zip(old_blocks, new_blocks):
                for k, v in new.items():
                    assert not v.is_floating_point() or torch.isfinite(v).all(), k
                vkey = "root_version" if "root_version" in new else "basis_version" if "basis_version" in new else None
                if vkey is None:
                    continue
                if int(new[vkey]) != int(old[vkey]):
                    assert int(new[vkey]) > int(old[vkey])
                    assert int(new["refresh_failures"]) == 0
                    self.installs += 1
                else:
                    for k in precond_keys(new):
                        assert torch.equal(new[k], old[k]), f"{k} changed without an install"
                    f_old, f_new = int(old["refresh_failures"]), int(new["refresh_failures"])
                    assert f_new in (f_old, f_old + 1)
                    self.failures += f_new - f_old
        self.prev = cur


# ------------------------------------------------------------------------------------------------------
# non-finite and overflowing gradients
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nonfinite_gradient_skips_the_block_step(name, refresh, bad):
    prob = Problem()
    s = snapshot_step(refresh)  # a refresh snapshot: it must hold the previous statistics
    quiet = s + 1 if refresh == "sync" else s + 2  # a step with no install: the whole block state must be as before
    with make(name, prob.params, refresh) as opt:
        install = install_step(opt, s)
        for t in range(2 - first_step_call(name), max(install, quiet) + 1):  # t: the optimizer's step (0: init)
            prob.backward()
            if t in (s, quiet):
                prob.W.grad[1, 2] = bad
                before = state_of(opt, prob.W)[0]
                w_before = prob.W.detach().clone()
                others = [p.detach().clone() for p in (prob.b, prob.T)]
            opt.step()
            if t in (s, quiet):
                assert torch.equal(prob.W.detach(), w_before)
                assert all(not torch.equal(p.detach(), o) for p, o in zip((prob.b, prob.T), others))
                after = state_of(opt, prob.W)[0]
                assert int(after["nonfinite_steps"]) == int(before["nonfinite_steps"]) + 1
            if t == quiet:  # statistics, moments, grafting, eigenvalue estimates, preconditioner
                for k, v in before.items():
                    if k != "nonfinite_steps":
                        assert torch.equal(after[k], v), k
            if t == install:  # the refresh snapshotted at step s had finite statistics: it was installed
                version = opt.state[prob.W]["blocks"][0]["root_version" if name == "Shampoo" else "basis_version"]
                assert int(version) == s
        stats = opt.runtime.stats()
        assert stats["jobs_failed"] == 0 and stats["nonfinite_steps"] == 2
        assert all(torch.isfinite(p).all() for p in prob.params)


def _run_with_hostile_steps(name, refresh, value, hostile, steps=30):
    """Trains the problem, replacing every gradient by ``value`` at the ``hostile`` steps (1-based)."""
    prob = Problem()
    losses = []
    with make(name, prob.params, refresh) as opt:
        for t in range(1, steps + 1):
            prob.backward()
            if t in hostile:
                for p in prob.params:
                    p.grad.fill_(value)
            opt.step()
            losses.append(float(prob.loss().detach()))
        states = [state_of(opt, p) for p in prob.params]
        stats = opt.runtime.stats()
    return [p.detach().clone() for p in prob.params], states, stats, losses


@pytest.mark.parametrize("magnitude", [1e30, 1e38])
@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_overflowing_gradient_is_rejected_like_a_nonfinite_one(name, refresh, magnitude):
    # call 1 (SOAP/KL only initialise there) and the calls of the refresh snapshots of steps 4 (sync) and 8 (async)
    hostile = (1, 3 + first_step_call(name), 7 + first_step_call(name))
    params, states, stats, losses = _run_with_hostile_steps(name, refresh, magnitude, hostile)
    ref_params, ref_states, ref_stats, _ = _run_with_hostile_steps(name, refresh, float("nan"), hostile)
    # bit for bit what a NaN gradient at the same steps does: nothing of the overflow entered the state
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    for blocks, ref_blocks in zip(states, ref_states):
        for blk, ref in zip(blocks, ref_blocks):
            for k in ref:
                assert torch.equal(blk[k], ref[k]), k
                assert not blk[k].is_floating_point() or torch.isfinite(blk[k]).all(), k
    assert stats["nonfinite_steps"] == ref_stats["nonfinite_steps"] >= 2 * len(params)
    assert stats["jobs_failed"] == 0 and stats["batches_installed"] >= 2
    # and training goes on: the loss keeps decreasing after the last hostile step
    assert losses[-1] < 0.7 * losses[max(hostile) - 1]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_overflow_rejected_when_statistics_fold_in_backward(name):
    """fold_statistics='backward': the statistics the hooks computed from a 1e30-scaled loss are rejected too."""

    def run(scale: float):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        x, y = torch.randn(32, 6), torch.randn(32, 3)
        rt = asteria.RuntimeConfig(refresh="async", staleness=1, fold_statistics="backward")
        with make(name, list(model.parameters()), runtime=rt) as opt:
            for t in range(1, 13):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                (loss * scale if t in (5, 6) else loss).backward()
                if t in (5, 6) and scale == 1e30:
                    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # finite, but G·Gᵀ is not
                opt.step()
            nonfinite = opt.runtime.stats()["nonfinite_steps"]
        return [p.detach().clone() for p in model.parameters()], nonfinite

    huge, n_huge = run(1e30)
    nan, n_nan = run(float("nan"))
    assert n_huge == n_nan > 0
    assert all(torch.equal(a, b) for a, b in zip(huge, nan))


@pytest.mark.parametrize("dtype,lr", [(torch.float32, 1e33), (torch.float16, 1e4)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nonfinite_parameter_update_is_not_written(name, dtype, lr):
    """A parameter at its dtype's maximum whose update overflows it stays as it is; the step's statistics stay."""
    top = torch.finfo(dtype).max
    W = torch.nn.Parameter(torch.full((6, 5), top, dtype=dtype))
    with make(name, [W], lr=lr, weight_decay=0.0) as opt:  # any step of lr·0.01 upwards overflows the dtype
        for t in range(2 - first_step_call(name), 4):
            W.grad = -torch.ones(6, 5, dtype=dtype) * (1.0 + t)
            before = state_of(opt, W)
            opt.step()
            if t >= 1:
                after = state_of(opt, W)[0]
                assert torch.equal(W.detach(), torch.full((6, 5), top, dtype=dtype))
                assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
                assert int(after["nonfinite_steps"]) == t
            if t >= 2:
                assert not torch.equal(after["factor_0"], before[0]["factor_0"])  # folded: the state evolves


def test_finite_blocks():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[1.0, 2.0], [inf, 1.0], [-inf, 1.0], [nan, 1.0], [3e38, -3e38], [3e38, 3e38]])
    y = torch.ones(6, 2)
    # the last block is finite but sums beyond fp32: the documented conservative margin rejects it too
    assert finite_blocks(None, x).tolist() == [True, False, False, False, True, False]
    assert finite_blocks(torch.tensor([False] + [True] * 5), x, y).tolist() == [False, False, False, False, True, False]
    assert finite_blocks(None, torch.zeros(3, 0, 2)).tolist() == [True] * 3  # zero-size blocks
    assert finite_blocks(None, torch.tensor([1.0, inf])).tolist() == [True, False]  # 0-D blocks, stacked


def test_eigenvalue_ema_marks_an_overflowed_term():
    """The reference's nan_to_num would turn an Inf term into D^{-1/2} = 0; NaN lets the step be rejected."""
    s = torch.full((2, 3), 3.0)
    delta = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("inf"), 3.0]])
    out = eigenvalue_ema(s, delta, 0.9, 10.0)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1, 1]) and torch.isfinite(out[1, [0, 2]]).all()
    assert torch.equal(out[0], eigenvalue_ema(s[:1], delta[:1], 0.9, 10.0)[0])


# ------------------------------------------------------------------------------------------------------
# degenerate statistics: all-zero, rank-1, denormal gradients
# ------------------------------------------------------------------------------------------------------
def _train_normally(prob, opt, watch, steps):
    start = float(prob.loss().detach())
    for _ in range(steps):
        prob.backward()
        opt.step()
        watch.check()
    return start, float(prob.loss().detach())


@ALLOW_REFRESH_WARNINGS
@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_gradients_for_many_steps(name, refresh):
    # KL: a fast EMA drives the eigenvalue estimate D down to its clamp (D^{-1/2} at its bound)
    kw = dict(shampoo_beta=0.5) if name.startswith("KL") else {}
    prob = Problem()
    with make(name, prob.params, refresh, **kw) as opt:
        watch = RefreshWatch(opt, prob.params)
        for _ in range(60):
            for p in prob.params:
                p.grad = torch.zeros_like(p)
            opt.step()
            watch.check()
        assert all(torch.count_nonzero(p) == 0 for p in prob.params)  # a zero gradient moves nothing
        if name.startswith("KL"):
            assert torch.equal(opt.state[prob.W]["blocks"][0]["eigen_sqrt_inv_0"], torch.full((6,), 10.0))
        assert watch.installs > 0
        start, end = _train_normally(prob, opt, watch, 30)
        assert end < 0.7 * start
        assert opt.runtime.stats()["nonfinite_steps"] == 0




@ALLOW_REFRESH_WARNINGS
@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize(
    "name",
    OPTIMIZERS,
)
def test_rank_one_statistics(name, refresh):
    g = torch.Generator().manual_seed(3)
    W = torch.nn.Parameter(torch.zeros(6, 5))
    x, y = torch.randn(5, generator=g), torch.randn(6, generator=g)
    u, v = torch.arange(1.0, 7.0), torch.ones(5)
    with make(name, [W], refresh) as opt:
        watch = RefreshWatch(opt, [W])
        for t in range(6):  # one fixed outer product: both factors exactly rank 1 (up to three refreshes)
            W.grad = torch.outer(u, v) * (1.0 + 0.1 * t)
            opt.step()
            watch.check()
        losses = []
        for _ in range(30):  # one sample of a linear model: every gradient (W x − y) xᵀ is rank 1
            W.grad = None
            loss = ((W @ x - y) ** 2).sum()
            loss.backward()
            losses.append(float(loss.detach()))
            opt.step()
            watch.check()
        assert watch.installs > 0
        assert losses[-1] < 0.5 * losses[0]


@ALLOW_REFRESH_WARNINGS
@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_denormal_gradients(name, refresh):
    prob = Problem()
    with make(name, prob.params, refresh) as opt:
        watch = RefreshWatch(opt, prob.params)
        for t in range(10):
            for p in prob.params:
                p.grad = torch.full_like(p, 1e-40 * (1 + t))  # fp32 denormals; G·Gᵀ underflows to 0
            opt.step()
            watch.check()
        assert watch.installs > 0
        start, end = _train_normally(prob, opt, watch, 30)
        assert end < 0.7 * start
        assert opt.runtime.stats()["nonfinite_steps"] == 0


# ------------------------------------------------------------------------------------------------------
# refresh results that must not be installed
# ------------------------------------------------------------------------------------------------------
class _Result:
    """A scheduler result with replaced outputs (the attributes the pipeline and the installers read)."""

    def __init__(self, res, outputs) -> None:
        for name in ("job_id", "block_id", "version", "deadline", "ok", "status", "message", "queued_s", "run_s", "latency_s"):
            setattr(self, name, getattr(res, name))
        self.outputs = outputs


class CorruptingScheduler:
    """The real scheduler, whose successful results of the listed snapshot versions come back corrupted."""

    def __init__(self, versions, kind: str) -> None:
        self.inner = _core.RefreshScheduler(workers=1, queue_capacity=256, blas_threads=1)
        self.versions = versions
        self.kind = kind
        self.corrupted = 0

    def _wrap(self, res):
        if not res.ok or res.version not in self.versions:
            return res
        outputs = {k: np.array(v) for k, v in res.outputs.items()}
        if self.kind == "result":  # the root, the new basis or the initial eigenvectors
            key = next(k for k in ("root", "basis", "eigenvectors") if k in outputs)
            outputs[key][0, 0] = np.nan
        elif self.kind == "rotation":
            outputs["rotation"][-1, -1] = np.inf
        elif self.kind == "permutation":
            outputs["permutation"][:] = 0
        self.corrupted += 1
        return _Result(res, outputs)

    def poll(self):
        return [self._wrap(r) for r in self.inner.poll()]

    def wait(self, job_id):
        return self._wrap(self.inner.wait(job_id))

    def __getattr__(self, name):
        return getattr(self.inner, name)


# KL-Shampoo's refresh jobs return no rotation (it rotates no moment), so only SOAP and KL-SOAP can get a bad one
CORRUPTIONS = (
    [(n, "result") for n in OPTIMIZERS]
    + [(n, "rotation") for n in ("SOAP", "KLSOAP")]
    + [("SOAP", "permutation")]
)


@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize("name,kind", CORRUPTIONS)
def test_uninstallable_refresh_result_keeps_previous_preconditioner(name, kind, refresh):
    s = snapshot_step(refresh)
    sched = CorruptingScheduler({s}, kind)
    runtime = asteria.Runtime(runtime_config(refresh), scheduler=sched)
    prob = Problem()
    try:
        with make(name, [prob.W], runtime=runtime) as opt:
            watch = RefreshWatch(opt, [prob.W])
            key = "root_version" if name == "Shampoo" else "basis_version"
            failed_at = None
            for t in range(2 - first_step_call(name), s + 12):  # t: the optimizer's step (0: init)
                before = state_of(opt, prob.W)
                prob.backward()
                opt.step()
                watch.check()
                blk = opt.state[prob.W]["blocks"][0]
                if int(blk["refresh_failures"]) == 1 and failed_at is None:  # the install step of the bad result
                    assert int(blk[key]) == int(before[0][key]) < s
                    for k in precond_keys(before[0]):
                        assert torch.equal(blk[k], before[0][k]), k
                    failed_at = t
            assert sched.corrupted > 0 and watch.failures == 1
            assert failed_at == install_step(opt, s)
            assert opt.runtime.stats()["refresh_failures"] == 1 and opt.runtime.stats()["jobs_failed"] == 0
            assert int(blk[key]) > s and int(blk["refresh_failures"]) == 0  # the next refresh installed
    finally:
        runtime.close()


@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize("name", ["Shampoo", "SOAP"])
def test_a_failed_fp32_decomposition_is_retried_in_fp64_and_installed(name, refresh):
    """Every fp32 eigendecomposition fails (the linalg test hook; fp64 never does): the workers redo each one in
    fp64, so no refresh fails, every root/basis is installed on schedule, and training goes as in the fp32 run.

    Shampoo's inverse roots are unique, so its parameters agree with the fp32 run's to round-off. SOAP's first
    basis is an eigenbasis of a rank-deficient statistic (a 6x5 gradient's 6x6 Gram matrix), whose null-space
    basis is arbitrary and differs between fp32 and fp64: its parameters take another path, so its loss is
    compared instead."""
    def run(failures):
        prob = Problem()
        before = _core.linalg.test_fp32_eigh_failures_injected()
        _core.linalg.set_test_fp32_eigh_failures(failures)
        try:
            with make(name, [prob.W, prob.T], refresh) as opt:
                for _ in range(8):
                    prob.backward()
                    opt.step()
                stats = opt.runtime.stats()
                key = "root_version" if name == "Shampoo" else "basis_version"
                version = int(opt.state[prob.W]["blocks"][0][key])
        finally:
            _core.linalg.set_test_fp32_eigh_failures(0)
        injected = _core.linalg.test_fp32_eigh_failures_injected() - before
        return [p.detach().clone() for p in (prob.W, prob.T)], float(prob.loss().detach()), stats, version, injected

    retried, loss, stats, version, injected = run(10**6)
    plain, plain_loss, plain_stats, plain_version, none = run(0)
    assert none == 0 and injected > 0  # (Shampoo: every inverse root; SOAP: the first bases, its refreshes use QR)
    assert stats["refresh_failures"] == stats["jobs_failed"] == 0
    assert version == plain_version > 0 and stats["batches_installed"] == plain_stats["batches_installed"]
    assert loss == pytest.approx(plain_loss, rel=0.05) and loss < 0.9 * float(Problem().loss().detach())
    if name == "Shampoo":
        for a, b in zip(retried, plain):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fourth_uninstallable_result_in_a_row_raises(name):
    sched = CorruptingScheduler(set(range(2, 100)), "result")  # every refresh after the first basis
    runtime = asteria.Runtime(runtime_config("sync"), scheduler=sched)
    W = torch.nn.Parameter(torch.zeros(6, 5))
    try:
        with make(name, [("layer.weight", W)], runtime=runtime) as opt:
            for t in range(2 - first_step_call(name), 8):  # optimizer steps; refreshes at 2, 4, 6: tolerated
                W.grad = torch.randn(6, 5)
                opt.step()
            assert int(opt.state[W]["blocks"][0]["refresh_failures"]) == 3
            assert torch.isfinite(W).all()
            W.grad = torch.randn(6, 5)
            with pytest.raises(RefreshFailureError, match=r"layer\.weight.*failed 4 times in a row.*non-finite"):
                opt.step()
    finally:
        runtime.close()


# ------------------------------------------------------------------------------------------------------
# parameter-set oddities
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_duplicate_parameters_are_refused(name):
    a, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))
    cls = getattr(asteria, name)
    with pytest.raises(ValueError, match=r"same tensor is passed twice in param group 0.*\[0\].*\[2\].*once"):
        cls([a, b, a])
    with pytest.raises(ValueError, match=r"'w'.*'w2'"):
        cls([("w", a), ("w2", a)])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] is already in param group 0.*one param group only"):
        cls([{"params": [a, b]}, {"params": [a], "lr": 1e-4}])
    opt = cls([a])
    with pytest.raises(ValueError, match=r"already in param group 0"):
        opt.add_param_group({"params": [b, a]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": (p for p in [b])})  # a generator is still accepted
    assert opt.param_groups[1]["params"] == [b]
    opt.close()


@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parameter_without_grad_is_skipped(name, refresh):
    g = torch.Generator().manual_seed(1)
    W1, W2 = torch.nn.Parameter(torch.randn(6, 5, generator=g)), torch.nn.Parameter(torch.randn(6, 5, generator=g))
    vkey = "root_version" if name == "Shampoo" else "basis_version"
    with make(name, [W1, W2], refresh) as opt:  # same shape: one bucket, rows at different steps
        for t in range(1, 21):
            W1.grad = torch.randn(6, 5, generator=g)
            W2.grad = torch.randn(6, 5, generator=g) if not 5 <= t <= 12 else None
            if t == 5:
                prev = state_of(opt, W2)[0]
                w2, counters = W2.detach().clone(), {k: v for k, v in opt.state[W2].items() if k != "blocks"}
            opt.step()
            if 5 <= t <= 12:
                assert torch.equal(W2.detach(), w2)
                assert {k: v for k, v in opt.state[W2].items() if k != "blocks"} == counters  # step counter too
                now = state_of(opt, W2)[0]
                # a refresh of W2 still pending may be installed meanwhile: it swaps the preconditioner and
                # re-expresses the moments in the new basis; statistics and counters never move
                installed = int(now[vkey]) != int(prev[vkey])
                for k, v in prev.items():
                    if k.startswith(("refresh_failures", "root_", "basis_")) or installed and k.startswith("exp_avg"):
                        continue
                    assert torch.equal(now[k], v), k
                prev = now
        assert opt.state[W1]["step"] - opt.state[W2]["step"] == 8
        assert all(torch.isfinite(p).all() for p in (W1, W2))
        assert opt.runtime.stats()["jobs_failed"] == 0


@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_requires_grad_toggled_off_and_on_keeps_state(name, refresh):
    torch.manual_seed(0)
    first, second = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)  # same-shape weights share a bucket
    model = torch.nn.Sequential(first, torch.nn.Tanh(), second)
    x, y = torch.randn(32, 6), torch.randn(32, 6)
    losses = []
    with make(name, list(model.parameters()), refresh) as opt:
        for t in range(1, 31):
            if t == 8:
                first.weight.requires_grad_(False)
                frozen, w = state_of(opt, first.weight)[0], first.weight.detach().clone()
                step = opt.state[first.weight]["step"]
            if t == 16:
                first.weight.requires_grad_(True)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if 8 <= t < 16:
                assert first.weight.grad is None and torch.equal(first.weight.detach(), w)
        blk = opt.state[first.weight]["blocks"][0]
        stat = "factor_0"
        assert not torch.equal(blk[stat], frozen[stat])  # it folds gradients again, into the kept statistics
        assert opt.state[first.weight]["step"] == step + 15
        assert not torch.equal(first.weight.detach(), w)
        assert int(blk["root_version" if name == "Shampoo" else "basis_version"]) > 16
        assert losses[-1] < 0.8 * losses[0]
        assert opt.runtime.stats()["jobs_failed"] == 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_integer_complex_and_sparse_are_refused_with_a_fix(name):
    cls = getattr(asteria, name)
    with pytest.raises(TypeError, match=r"only floating-point parameters.*torch.int64.*buffers"):
        cls([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"complex parameters.*two real parameters"):
        cls([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    emb, dense = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Parameter(torch.randn(4, 4))
    with cls([emb.weight, dense]) as opt:
        (emb(torch.tensor([1, 2])).sum() + dense.sum()).backward()
        before = dense.detach().clone()
        with pytest.raises(RuntimeError, match=r"sparse gradients are not supported.*SparseAdam"):
            opt.step()
        assert torch.equal(dense.detach(), before)  # refused before anything is stepped
        assert opt.state[dense]["step"] == 0


@pytest.mark.parametrize("refresh", REFRESH)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_closure_zero_size_scalar_and_low_precision_parameters(name, refresh):
    torch.manual_seed(0)
    shapes = [(0,), (0, 4), (3, 0, 2), ()]
    odd = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    half = [torch.nn.Parameter(torch.randn(6, 5, dtype=dt)) for dt in (torch.bfloat16, torch.float16)]
    W = torch.nn.Parameter(torch.zeros(6, 5))
    A, B = torch.randn(16, 6), torch.randn(16, 5)
    calls = []

    def closure():
        calls.append(1)
        for p in odd + half + [W]:
            p.grad = None
        loss = ((A @ W - B) ** 2).mean() + sum((p.float() ** 2).sum() for p in odd + half)
        loss.backward()
        return loss

    start = [p.detach().clone() for p in odd + half]
    with make(name, odd + half + [W], refresh) as opt:
        first = float(closure().detach())
        for t in range(12):
            loss = opt.step(closure)
            assert isinstance(loss, torch.Tensor) and len(calls) == t + 2
        assert float(closure().detach()) < 0.95 * first
        for p, p0, shape in zip(odd, start, shapes):
            assert p.shape == shape and torch.isfinite(p).all()
        assert not torch.equal(odd[3], start[3])  # the 0-D parameter moved
        for p, p0 in zip(half, start[4:]):
            assert p.dtype == p0.dtype and torch.isfinite(p.float()).all() and not torch.equal(p, p0)
            assert all(v.dtype in (torch.float32, torch.int64) for v in opt.state[p]["blocks"][0].values())
        assert opt.runtime.stats()["nonfinite_steps"] == 0
