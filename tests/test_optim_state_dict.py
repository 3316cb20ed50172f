"""Checkpoints: param-keyed state, bit-identical resume (also in a new process), device moves, refusals."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from asteria import StepFailedError
from asteria.optim import KLSOAP, SOAP, KLShampoo, Shampoo

OPTS = {
    "Shampoo": lambda ps: Shampoo(ps, lr=0.01, precondition_frequency=2, start_preconditioning_step=2, merge_dims=False),
    "SOAP": lambda ps: SOAP(ps, lr=0.01, precondition_frequency=2),
    "KLShampoo": lambda ps: KLShampoo(ps, lr=0.01, precondition_frequency=2),
    "KLSOAP": lambda ps: KLSOAP(ps, lr=0.01, precondition_frequency=2),
}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(6, 5), (6, 5), (4,), (3, 2, 4)]]


def grads_for(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def run(opt, params, start, stop):
    for t in range(start, stop):
        for p, g in zip(params, grads_for(t, params)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTS))
def test_resume_is_bit_identical(name):
    pa = make_params()
    oa = OPTS[name](pa)
    run(oa, pa, 0, 7)

    pb = make_params()
    ob = OPTS[name](pb)
    run(ob, pb, 0, 3)
    sd = copy.deepcopy(ob.state_dict())
    saved_params = [p.detach().clone() for p in pb]

    pc = [torch.nn.Parameter(s.clone()) for s in saved_params]
    oc = OPTS[name](pc)
    oc.load_state_dict(sd)
    run(oc, pc, 3, 7)
    for a, c in zip(pa, pc):
        assert torch.equal(a, c)


@pytest.mark.parametrize("where", ["write_params", "accept_rows"])
@pytest.mark.parametrize("name", sorted(OPTS))
def test_a_step_interrupted_midway_refuses_until_a_checkpoint_is_loaded(name, where, monkeypatch):
    """An exception (here a KeyboardInterrupt) after some blocks' parameters or state (Shampoo stores every
    block's statistics before it updates any parameter) were updated leaves them inconsistent: step() and
    state_dict() refuse; loading the last checkpoint resumes bit-identically."""
    ref = make_params()
    run(OPTS[name](ref), ref, 0, 6)

    params = make_params()
    opt = OPTS[name](params)
    run(opt, params, 0, 3)
    saved = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    calls = {"n": 0}
    original = getattr(type(opt), where)

    def interrupted(self, *args):
        calls["n"] += 1
        original(self, *args)
        if calls["n"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(type(opt), where, interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(opt, params, 3, 4)
    with pytest.raises(StepFailedError, match="interrupted after it had updated some parameters or state.*KeyboardInterrupt"):
        run(opt, params, 3, 4)
    with pytest.raises(StepFailedError, match="Reload the last checkpoint"):
        opt.state_dict()
    ran = []
    with pytest.raises(StepFailedError):  # refused before the closure runs: no forward/backward is wasted
        opt.step(lambda: ran.append(1))
    assert ran == []
    for p, s in zip(params, saved[1]):
        p.data.copy_(s)
    opt.load_state_dict(saved[0])
    run(opt, params, 3, 6)
    for a, b in zip(ref, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(OPTS))
def test_a_step_failing_before_any_update_can_be_repeated(name, monkeypatch):
    ref = make_params()
    run(OPTS[name](ref), ref, 0, 5)
    params = make_params()
    opt = OPTS[name](params)
    run(opt, params, 0, 3)

    def failing(*args, **kwargs):
        raise RuntimeError("injected before any update")

    with monkeypatch.context() as m:
        m.setattr(type(opt), "stacked_grads", staticmethod(failing))
        with pytest.raises(RuntimeError, match="injected"):
            run(opt, params, 3, 4)
    run(opt, params, 3, 5)  # the same step again, then the next
    for a, b in zip(ref, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(OPTS))
def test_state_dict_is_param_keyed_and_has_header(name):
    params = make_params()
    opt = OPTS[name](params)
    run(opt, params, 0, 3)
    sd = opt.state_dict()
    assert sd["asteria"]["optimizer"] == name
    assert set(sd["state"]) == {0, 1, 2, 3}
    assert isinstance(sd["state"][0]["blocks"], list) and "step" in sd["state"][0]


def test_resume_in_a_new_process(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, {tests!r})
        from test_optim_state_dict import OPTS, make_params, run
        mode, name, path = sys.argv[1], sys.argv[2], sys.argv[3]
        if mode == "save":
            params = make_params(); opt = OPTS[name](params); run(opt, params, 0, 4)
            torch.save({{"params": [p.detach() for p in params], "opt": opt.state_dict()}}, path)
        else:
            ck = torch.load(path, weights_only=False)
            params = [torch.nn.Parameter(p.clone()) for p in ck["params"]]
            opt = OPTS[name](params); opt.load_state_dict(ck["opt"]); run(opt, params, 4, 8)
            torch.save([p.detach() for p in params], path + ".out")
        """
    ).format(tests=os.path.dirname(__file__))
    script_path = tmp_path / "resume.py"
    script_path.write_text(script)
    for name in ("Shampoo", "SOAP"):
        ck = str(tmp_path / f"{name}.pt")
        for mode in ("save", "load"):
            subprocess.run([sys.executable, str(script_path), mode, name, ck], check=True, env=dict(os.environ))
        params = make_params()
        opt = OPTS[name](params)
        run(opt, params, 0, 8)
        resumed = torch.load(ck + ".out")
        for a, b in zip(params, resumed):
            assert torch.equal(a.detach(), b), name


def test_refuses_other_optimizer_type():
    params = make_params()
    soap = OPTS["SOAP"](params)
    run(soap, params, 0, 2)
    with pytest.raises(ValueError, match="saved by SOAP, not KLSOAP"):
        OPTS["KLSOAP"](make_params()).load_state_dict(soap.state_dict())
    adam = torch.optim.Adam(params)
    with pytest.raises(ValueError, match="no 'asteria' header"):
        OPTS["SOAP"](make_params()).load_state_dict(adam.state_dict())


def test_refuses_other_shapes_and_other_configuration():
    params = make_params()
    opt = OPTS["Shampoo"](params)
    run(opt, params, 0, 2)
    sd = opt.state_dict()
    other = [torch.nn.Parameter(torch.randn(5, 6)), *make_params()[1:]]
    with pytest.raises(ValueError, match=r"shape \(5, 6\) but the checkpoint has \(6, 5\)"):
        OPTS["Shampoo"](other).load_state_dict(sd)
    with pytest.raises(ValueError, match="param groups"):
        OPTS["Shampoo"]([{"params": params[:2]}, {"params": params[2:]}]).load_state_dict(sd)
    # a block whose state does not fit is refused, and the optimizer is left as it was
    bad = copy.deepcopy(sd)
    bad["state"][0]["blocks"][0]["factor_0"] = torch.zeros(3, 3)
    tparams = make_params()
    target = OPTS["Shampoo"](tparams)
    run(target, tparams, 0, 1)
    before = target.state[tparams[0]]["blocks"][0]["factor_0"].clone()
    with pytest.raises(ValueError, match=r"checkpoint state 'factor_0' .* has shape \(3, 3\), expected \(6, 6\)"):
        target.load_state_dict(bad)
    assert torch.equal(target.state[tparams[0]]["blocks"][0]["factor_0"], before)
    run(target, tparams, 1, 2)
    del bad["state"][0]["blocks"][0]["root_1"]
    with pytest.raises(ValueError, match="missing \\['root_1'\\]"):
        target.load_state_dict(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(OPTS))
def test_load_onto_another_device(name):
    params = make_params()
    opt = OPTS[name](params)
    run(opt, params, 0, 3)
    sd = opt.state_dict()
    pg = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    og = OPTS[name](pg)
    og.load_state_dict(sd)
    assert og.state[pg[0]]["blocks"][0]["exp_avg" if name != "Shampoo" else "factor_0"].is_cuda
    run(opt, params, 3, 6)
    for t in range(3, 6):
        for p, g in zip(pg, grads_for(t, params)):
            p.grad = g.cuda()
        og.step()
    for a, b in zip(params, pg):
        torch.testing.assert_close(b.cpu(), a.detach(), rtol=1e-4, atol=1e-5)


BF16 = torch.bfloat16
BF16_OPTS = {
    "Shampoo": lambda ps, dt=BF16: Shampoo(ps, lr=0.01, precondition_frequency=2, start_preconditioning_step=2,
                                           merge_dims=False, state_dtype=dt),
    "SOAP": lambda ps, dt=BF16: SOAP(ps, lr=0.01, precondition_frequency=2, state_dtype=dt),
    "KLShampoo": lambda ps, dt=BF16: KLShampoo(ps, lr=0.01, precondition_frequency=2, state_dtype=dt),
    "KLSOAP": lambda ps, dt=BF16: KLSOAP(ps, lr=0.01, precondition_frequency=2, state_dtype=dt),
}


def _floating_state(sd):
    return [(i, j, k, t) for i, st in sorted(sd["state"].items()) for j, b in enumerate(st["blocks"])
            for k, t in sorted(b.items()) if t.is_floating_point()]


@pytest.mark.parametrize("name", sorted(BF16_OPTS))
def test_bf16_state_resumes_bit_identically_with_its_rounding_draws(name):
    """bf16 state (asynchronous refreshes, the default runtime): the checkpoint holds bf16 tensors and where the
    stochastic rounding's generator stands (through torch.save), so a resumed run repeats the uninterrupted one bit
    for bit; a resume that starts the generator afresh draws other roundings and ends elsewhere."""
    pa = make_params()
    run(BF16_OPTS[name](pa), pa, 0, 7)

    pb = make_params()
    ob = BF16_OPTS[name](pb)
    run(ob, pb, 0, 3)
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert sd["asteria"]["rounding"] and all(t.dtype == BF16 for *_, t in _floating_state(sd))
    saved_params = [p.detach().clone() for p in pb]

    pc = [torch.nn.Parameter(s.clone()) for s in saved_params]
    oc = BF16_OPTS[name](pc)
    oc.load_state_dict(copy.deepcopy(sd))
    run(oc, pc, 3, 7)
    for a, c in zip(pa, pc):
        assert torch.equal(a, c)

    fresh = copy.deepcopy(sd)
    del fresh["asteria"]["rounding"]
    pd = [torch.nn.Parameter(s.clone()) for s in saved_params]
    od = BF16_OPTS[name](pd)
    od.load_state_dict(fresh)
    run(od, pd, 3, 7)
    assert any(not torch.equal(a, d) for a, d in zip(pa, pd))


@pytest.mark.parametrize("name", ["SOAP", "Shampoo"])
def test_checkpoints_load_across_state_dtypes_cast_to_the_optimizers_own(name):
    """``state_dtype`` is the loading optimizer's: a float32 checkpoint loads into a bf16 optimizer rounded to nearest,
    a bf16 one into a float32 optimizer exactly, and both train on."""
    p32 = make_params()
    o32 = BF16_OPTS[name](p32, torch.float32)
    run(o32, p32, 0, 3)
    sd32 = copy.deepcopy(o32.state_dict())

    p16 = [torch.nn.Parameter(p.detach().clone()) for p in p32]
    o16 = BF16_OPTS[name](p16)
    o16.load_state_dict(sd32)
    assert all(g["state_dtype"] == BF16 for g in o16.param_groups)
    sd16 = o16.state_dict()
    pairs = list(zip(_floating_state(sd32), _floating_state(sd16)))
    assert pairs and all(b[3].dtype == BF16 and torch.equal(b[3], a[3].to(BF16)) for a, b in pairs)

    back = BF16_OPTS[name]([torch.nn.Parameter(p.detach().clone()) for p in p32], torch.float32)
    back.load_state_dict(copy.deepcopy(sd16))
    sd_back = back.state_dict()
    assert all(b[3].dtype == torch.float32 and torch.equal(b[3], a[3].float())
               for a, b in zip(_floating_state(sd16), _floating_state(sd_back)))
    run(o16, p16, 3, 5)
    assert all(torch.isfinite(p).all() for p in p16)
