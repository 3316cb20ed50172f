"""Tier-2 cross-checks against the real reference implementations (docs/algorithms.md §7.3).

The references are never part of this repository. Point the environment variables at exported copies:

* ``ASTERIA_REF_DS``: a directory containing the ``distributed_shampoo`` package (facebookresearch/optimizers
  @ f6066066);
* ``ASTERIA_REF_VYAS``: a directory containing ``soap.py`` (nikhilvyas/SOAP @ a1e5535);
* ``ASTERIA_REF_KLM``: a directory containing ``kl_opt.py`` (yorkerlin/KL-Methods ``optim/kl_opt.py`` @ a02e622).

Each test is skipped when its variable is unset.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys

import pytest
import torch

from asteria.optim import KLSOAP, SOAP, KLShampoo, Shampoo

pytestmark = pytest.mark.reference


def _import_from(env: str, module: str):
    path = os.environ.get(env)
    if not path:
        pytest.skip(f"{env} is not set")
    if path not in sys.path:
        sys.path.insert(0, path)
    with contextlib.redirect_stdout(io.StringIO()):
        return importlib.import_module(module)


def _grads(shape, steps, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]


def _compare(ours, ref, shapes, steps, dtype, rtol, atol, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    p_ours = [torch.nn.Parameter(x.clone()) for x in init]
    p_ref = [torch.nn.Parameter(x.clone()) for x in init]
    o, r = ours(p_ours), ref(p_ref)
    grads = [_grads(s, steps, seed + i, dtype) for i, s in enumerate(shapes)]
    worst = 0.0
    for t in range(steps):
        for a, b, gs in zip(p_ours, p_ref, grads):
            a.grad, b.grad = gs[t].clone(), gs[t].clone()
        o.step()
        with contextlib.redirect_stdout(io.StringIO()):
            r.step()
        for i, (a, b) in enumerate(zip(p_ours, p_ref)):
            err = ((a.detach() - b.detach()).abs() / (atol + rtol * b.detach().abs())).max().item()
            worst = max(worst, err)
            torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol, msg=f"param {i} step {t + 1}")
    return worst


@pytest.mark.parametrize("max_dim,shapes", [(64, [(6, 5), (7,)]), (8, [(6, 5), (10, 3), (3, 4, 2)])])
@pytest.mark.parametrize("grafting", ["adam", "none"])
def test_shampoo_matches_distributed_shampoo(max_dim, shapes, grafting):
    ds = _import_from("ASTERIA_REF_DS", "distributed_shampoo")
    # DS keeps lr in an fp32 tensor: use an lr exact in fp32. epsilon 1e-3 keeps the round-off of the
    # rank-deficient early factors from being amplified by eps^(-1/p) (docs/algorithms.md §7.3).
    kw = dict(lr=2**-7, betas=(0.9, 0.999), epsilon=1e-3, weight_decay=0.01, precondition_frequency=2,
              start_preconditioning_step=2, max_preconditioner_dim=max_dim)
    graft = ds.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8) if grafting == "adam" else None

    def ours(ps):
        return Shampoo(ps, grafting=grafting, grafting_epsilon=1e-8, state_dtype=torch.float64, **kw)

    def ref(ps):
        return ds.DistributedShampoo(
            ps, weight_decay_type=ds.WeightDecayType.DECOUPLED, grafting_config=graft,
            preconditioner_config=ds.RootInvShampooPreconditionerConfig(
                factor_matrix_dtype=torch.float64, inv_factor_matrix_dtype=torch.float64),
            **kw)

    # DS computes its bias corrections as `beta ** step_tensor`, i.e. in the default dtype: make it fp64
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        worst = _compare(ours, ref, shapes, 10, torch.float64, rtol=1e-9, atol=1e-11)
    finally:
        torch.set_default_dtype(old)
    print(f"DS worst error / tolerance: {worst:.3g}")


@pytest.mark.parametrize("wd", [0.0, 0.125])
def test_soap_matches_vyas(wd):
    vyas = _import_from("ASTERIA_REF_VYAS", "soap")
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, precondition_frequency=2)

    def ours(ps):
        return SOAP(ps, eigh_ridge=1e-30, **kw)

    def ref(ps):
        return vyas.SOAP(ps, merge_dims=False, normalize_grads=False, **kw)

    worst = _compare(ours, ref, [(8, 8), (6, 6), (5,)], 8, torch.float32, rtol=1e-5, atol=1e-5)
    print(f"VYAS worst error / tolerance: {worst:.3g}")


@pytest.mark.parametrize("klsoap", [False, True])
@pytest.mark.parametrize("clamping", [True, False])
def test_kl_matches_klm(klsoap, clamping):
    klm = _import_from("ASTERIA_REF_KLM", "kl_opt")
    kw = dict(lr=0.01, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01, precondition_frequency=3, init_factor=0.1,
              using_clamping=clamping)
    cls = KLSOAP if klsoap else KLShampoo

    def ours(ps):
        return cls(ps, eigh_ridge=1e-30, **kw)

    def ref(ps):
        with contextlib.redirect_stdout(io.StringIO()):
            return klm.KLOpt(ps, using_klsoap=klsoap, cast_dtype=torch.float32, using_damping=False, **kw)

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True  # the reference wraps helpers in torch.compile; run them eagerly
    try:
        worst = _compare(ours, ref, [(6, 6), (3, 4, 5)], 15, torch.float32, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.config.disable = old
    print(f"KLM worst error / tolerance: {worst:.3g}")
