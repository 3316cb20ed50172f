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


@pytest.mark.parametrize("name", [n for n in OPTIMIZER_NAMES if n not in ("adamw", "muon")])
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


def test_muon_optimizes_the_hidden_matrices_and_adamw_the_rest():
    """The usual split: torch.optim.Muon owns the block matrices, AdamW the embeddings, norms and biases; one
    schedule drives both through param_groups; state_dict round-trips."""
    from asteria.train.optimizers import MuonWithAdamW

    model = _model()
    opt = build_optimizer("muon", param_groups(model, 0.1), lr=1e-3, weight_decay=0.1, hidden=model.hidden_matrices())
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.muon, torch.optim.Muon)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in model.hidden_matrices()} and not muon_ids & adamw_ids
    assert muon_ids | adamw_ids == {id(p) for p in model.parameters()}
    assert id(model.tok_emb.weight) in adamw_ids and id(model.pos_emb.weight) in adamw_ids
    assert all(g["adjust_lr_fn"] == "match_rms_adamw" for g in opt.muon.param_groups)
    for g in opt.param_groups:
        g["lr"] = 5e-4
    assert {g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups} == {5e-4}
    before = [p.detach().clone() for p in model.parameters()]
    _one_step(model, opt)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.ndim == 2)
    assert all("momentum_buffer" in opt.state[p] for p in model.hidden_matrices())
    state = opt.state_dict()
    other = build_optimizer("muon", param_groups(model, 0.1), lr=1e-3, weight_decay=0.1, hidden=model.hidden_matrices())
    other.load_state_dict(state)
    p = model.hidden_matrices()[0]
    assert torch.equal(other.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    with pytest.raises(ValueError, match="hidden="):
        build_optimizer("muon", param_groups(model, 0.1), lr=1e-3, weight_decay=0.1)


def test_muon_newton_schulz_in_fp32_is_torchs_iteration():
    """newton_schulz_fp32 runs torch.optim.Muon's iteration: on inputs exactly representable in bf16 with a bf16
    result it agrees with torch's bf16 iteration to bf16 precision, and the "fp32" Muon step equals the "bf16"
    one up to that precision; a 2-D gradient comes out (nearly) orthogonalised."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    from asteria.train.optimizers import newton_schulz_fp32

    g = torch.randn(24, 12).bfloat16().float()
    coeffs = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    ours = newton_schulz_fp32(g, coeffs, 5, EPS)
    torchs = _zeropower_via_newtonschulz(g, coeffs, 5, EPS).float()
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    torch.testing.assert_close(ours, torchs, rtol=0.05, atol=0.03)
    s = torch.linalg.svdvals(ours)
    assert 0.5 < float(s.min()) and float(s.max()) < 1.5  # US'Vᵀ with S' near 1, as torch's


def test_fast_bf16_matmul_follows_the_hardware():
    from asteria.train.optimizers import fast_bf16_matmul

    assert fast_bf16_matmul("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
