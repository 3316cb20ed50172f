"""RuntimeConfig(fold_statistics="backward"): statistics folded in the gradient hooks (optim/base.py)."""

from __future__ import annotations

import os

import pytest
import torch

import asteria

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
    folded, overlapped = [], []
    ref = _train(cls, "step", refresh=refresh, probe=lambda opt: overlapped.append(opt.runtime.counters()["overlapped_installs"]))
    got = _train(cls, "backward", refresh=refresh, probe=lambda opt: folded.append(
        (len(opt._folded), opt.runtime.counters()["overlapped_installs"])))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    # the first step folds in step() (it creates the state); every later step folded every block in the hooks
    assert folded[0][0] == 0 and min(n for n, _ in folded[1:]) > 0
    # hooks that read the state: no install may run on the helper thread during backward
    assert folded[-1][1] == 0 and (overlapped[-1] > 0) == (cls is not asteria.Shampoo)


def test_gradient_changed_after_backward_is_refused():
    model = _model()
    opt = asteria.SOAP(model.parameters(), runtime=asteria.RuntimeConfig(fold_statistics="backward"))
    try:
        for step in range(2):
            opt.zero_grad()
            model(torch.randn(4, 16)).sum().backward()
            if step == 1:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
                with pytest.raises(RuntimeError, match="changed between backward"):
                    opt.step()
            else:
                opt.step()
    finally:
        opt.close()


def test_two_backwards_before_step_are_refused():
    model = _model()
    opt = asteria.Shampoo(model.parameters(), runtime=asteria.RuntimeConfig(refresh="sync", fold_statistics="backward"))
    try:
        opt.zero_grad()
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        model(torch.randn(4, 16)).sum().backward()
        with pytest.raises(RuntimeError, match="backward\\(\\) ran twice"):
            model(torch.randn(4, 16)).sum().backward()
    finally:
        opt.close()


def test_backward_fold_needs_hooks():
    with pytest.raises(ValueError, match="hooks=True"):
        asteria.SOAP(_model().parameters(), runtime=asteria.RuntimeConfig(fold_statistics="backward", hooks=False))


def test_fold_mode_is_validated():
    with pytest.raises(ValueError, match="fold_statistics"):
        asteria.RuntimeConfig(fold_statistics="hook")
