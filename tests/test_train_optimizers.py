"""Tests of asteria.train.optimizers: construction, state bytes, runtime probing."""

import pytest
import torch

from asteria.train.model import GPT, ModelConfig, param_groups
from asteria.train.optimizers import (
    OPTIMIZER_NAMES,
    OptimizerUnavailable,
    RuntimeProbe,
    build_optimizer,
    flatten_stats,
    optimizer_state_bytes,
)


def _model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, context=8))


def _one_step(model, opt):
    x = torch.randint(0, 256, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_adamw_and_its_state_bytes():
    model = _model()
    opt = build_optimizer("adamw", param_groups(model, 0.1), lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert optimizer_state_bytes(opt) == 0
    _one_step(model, opt)
    n = model.num_parameters()
    n_tensors = len(list(model.parameters()))
    # exp_avg + exp_avg_sq in fp32, plus one fp32 scalar step per parameter tensor
    assert optimizer_state_bytes(opt) == 2 * 4 * n + 4 * n_tensors


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer("lion", [], lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="unknown refresh mode"):
        build_optimizer("adamw", [], lr=1e-3, weight_decay=0.0, refresh="later")


def test_missing_library_is_reported_not_crashed(monkeypatch):
    import asteria.train.optimizers as mod

    def broken():
        raise OptimizerUnavailable("the asteria library could not be imported (test)")

    monkeypatch.setattr(mod, "_import_asteria", broken)
    with pytest.raises(OptimizerUnavailable, match="could not be imported"):
        build_optimizer("soap", param_groups(_model(), 0.0), lr=1e-3, weight_decay=0.0)


class _FakeRuntime:
    def __init__(self):
        self.counters = {"jobs_submitted": 0, "batches_installed": 0, "wait_s": 0.0,
                         "refresh": "sync", "scheduler": {"busy_s": 0.0, "jobs_submitted": 0}}

    def stats(self):
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counters.items()}


class _FakeOpt:
    def __init__(self):
        self.runtime = _FakeRuntime()


def test_runtime_probe_detects_refresh_install_and_stall():
    opt = _FakeOpt()
    probe = RuntimeProbe(opt)
    assert probe.available
    assert probe.after_step() == (False, False, 0.0)
    opt.runtime.counters["jobs_submitted"] = 3
    opt.runtime.counters["scheduler"]["busy_s"] = 5.0  # worker time is not a stall
    events = probe.after_step()
    assert events.refresh and not events.install and events.stall == 0.0
    opt.runtime.counters["batches_installed"] = 1
    opt.runtime.counters["wait_s"] = 0.25
    events = probe.after_step()
    assert not events.refresh and events.install and events.stall == pytest.approx(0.25)
    assert probe.last["refresh"] == "sync"


def test_runtime_probe_without_runtime():
    probe = RuntimeProbe(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert not probe.available
    assert probe.after_step() == (False, False, 0.0)
    assert probe.tier_bytes() == {}


def test_flatten_stats():
    flat = flatten_stats({"a": 1, "b": {"c": 2.5, "d": "text", "e": True}, "f": float("nan")})
    assert flat == {"a": 1.0, "b.c": 2.5, "b.e": 1.0}


@pytest.mark.parametrize("name", [n for n in OPTIMIZER_NAMES if n != "adamw"])
def test_second_order_optimizers_build_and_step(name):
    model = _model()
    opt = build_optimizer(name, param_groups(model, 0.01), lr=1e-3, weight_decay=0.01,
                          precondition_frequency=2)
    probe = RuntimeProbe(opt)
    refreshed = False
    for _ in range(4):
        _one_step(model, opt)
        refreshed |= probe.after_step().refresh
    assert optimizer_state_bytes(opt) > 0
    assert refreshed, "no refresh seen in opt.runtime.stats() counters"
    close = getattr(opt.runtime, "close", None)
    if callable(close):
        close()


def test_async_refresh_is_built():
    model = _model()
    opt = build_optimizer("soap", param_groups(model, 0.01), lr=1e-3, weight_decay=0.01, refresh="async",
                          precondition_frequency=2)
    assert opt.runtime.config.refresh == "async"
    _one_step(model, opt)
    first_basis = opt.runtime.stats()["jobs_submitted"]
    for _ in range(2):
        _one_step(model, opt)
    stats = opt.runtime.stats()
    opt.runtime.close()
    assert first_basis > 0 and stats["jobs_submitted"] > first_basis  # a refresh after the first basis
    assert stats["pending_batches"] > 0  # still in flight: installed S steps later
