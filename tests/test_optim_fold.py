"""RuntimeConfig(fold_statistics="backward"): statistics folded in the gradient hooks (optim/base.py)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import asteria
from asteria.runtime.workers import INSTALL_THREAD_NAME

OPTIMIZERS = [asteria.Shampoo, asteria.SOAP, asteria.KLShampoo, asteria.KLSOAP]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))


def _train(cls, fold: str, *, steps: int = 10, refresh: str = "async", staleness: int | None = 1, probe=None):
    model = _model()
    rt = asteria.RuntimeConfig(refresh=refresh, staleness=staleness if refresh == "async" else None, fold_statistics=fold,
                               worker_cpus=[max(os.sched_getaffinity(0))])  # (so an install helper exists)
    opt = cls(model.parameters(), lr=1e-2, precondition_frequency=3, runtime=rt)
    gen = torch.Generator().manual_seed(1)
    try:
        for _ in range(steps):
            x = torch.randn(32, 16, generator=gen)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if probe is not None:
                probe(opt)
            opt.step()
    finally:
        opt.close()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("refresh", ["sync", "async"])
def test_backward_fold_is_bit_identical_to_step_fold(cls, refresh):
    used = []
    ref = _train(cls, "step", refresh=refresh)
    got = _train(cls, "backward", refresh=refresh, probe=lambda opt: used.append(opt.runtime.stats()["backward_steps"]))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    # the first step runs in step() (it creates the state); every later one used what backward computed, for all
    # four buckets (two weights, two biases)
    assert used[0]["used"] == used[1]["used"] == 0  # (read after backward, before the step)
    assert used[-1] == {"used": 4 * (len(used) - 2), "recomputed": 0}


@pytest.mark.parametrize("cls", [asteria.SOAP, asteria.KLSOAP, asteria.Shampoo], ids=lambda c: c.__name__)
def test_the_step_work_runs_on_the_helper_thread_while_backward_goes_on(cls, monkeypatch):
    """The step work of a bucket whose gradients are final starts during backward on the install helper, not in the
    hook: here it waits for a signal the test gives only after backward() has returned, which it could not if it
    ran on the training thread; step() then waits for it and uses it."""
    release, threads = threading.Event(), []
    original = cls._precompute

    def gated(self, *args):
        threads.append(threading.current_thread().name)
        assert release.wait(timeout=30), "backward() did not return while the step work was held"
        return original(self, *args)

    model = _model()
    rt = asteria.RuntimeConfig(refresh="sync", fold_statistics="backward", worker_cpus=[max(os.sched_getaffinity(0))])
    opt = cls(model.parameters(), lr=1e-2, precondition_frequency=3, runtime=rt)
    try:
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()  # the first step creates the state
        monkeypatch.setattr(cls, "_precompute", gated)
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        release.set()  # backward returned with the work held on the helper
        opt.step()
        assert threads and all(name.startswith(INSTALL_THREAD_NAME) for name in threads)
        assert opt.runtime.stats()["backward_steps"]["used"] == 4
    finally:
        release.set()
        opt.close()


def _loop(cls, fold, loop, steps=8):
    model = _model()
    rt = asteria.RuntimeConfig(refresh="async", staleness=1, fold_statistics=fold,
                               worker_cpus=[max(os.sched_getaffinity(0))])
    opt = cls(model.parameters(), lr=1e-2, precondition_frequency=3, runtime=rt)
    gen = torch.Generator().manual_seed(1)
    try:
        for _ in range(steps):
            opt.zero_grad()
            after_step = loop(model, opt, gen)
            opt.step()
            if after_step is not None:
                after_step()
        stats = opt.runtime.stats()["backward_steps"]
    finally:
        opt.close()
    return [p.detach().clone() for p in model.parameters()], stats


def _clipped(model, opt, gen):
    model(torch.randn(32, 16, generator=gen)).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)


def _accumulated(model, opt, gen):
    for _ in range(3):
        (model(torch.randn(16, 16, generator=gen)).pow(2).mean() / 3).backward()


def _scaled(model, opt, gen):
    if not hasattr(opt, "scaler"):
        opt.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=10**6)
    opt.scaler.scale(model(torch.randn(32, 16, generator=gen)).pow(2).mean()).backward()
    opt.scaler.unscale_(opt)
    return opt.scaler.update  # (the loop calls opt.step() itself: no Inf here, so scaler.step would too)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loop", [_clipped, _accumulated, _scaled], ids=["clipping", "accumulation", "grad-scaler"])
def test_real_loops_give_the_numbers_of_the_step_fold(cls, loop):
    """Clipping and GradScaler un-scaling change the gradients after backward: step() sees it and computes the step
    itself (counted as recomputed); gradient accumulation computes again after every backward and uses the last
    backward's work. Either way the parameters are the step fold's, bit for bit."""
    ref, _ = _loop(cls, "step", loop)
    got, stats = _loop(cls, "backward", loop)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    if loop is _accumulated:
        assert stats["used"] == 4 * 7 and stats["recomputed"] == 0
    else:
        assert stats["used"] == 0 and stats["recomputed"] == 4 * 7


def test_backward_fold_needs_hooks():
    with pytest.raises(ValueError, match="hooks=True"):
        asteria.SOAP(_model().parameters(), runtime=asteria.RuntimeConfig(fold_statistics="backward", hooks=False))


def test_fold_mode_is_validated():
    with pytest.raises(ValueError, match="fold_statistics"):
        asteria.RuntimeConfig(fold_statistics="hook")
