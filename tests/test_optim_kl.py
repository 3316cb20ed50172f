"""Tests of asteria.KLShampoo and asteria.KLSOAP: float64 oracle (docs/algorithms.md §4), invariances, install."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asteria.optim import KLSOAP, KLShampoo
from asteria.runtime import RuntimeConfig
from helpers import check_bf16_state_run
from oracles import KLOracle, gradient_sequence, random_orthogonal

F64 = torch.float64
SYNC = RuntimeConfig(refresh="sync")  # the oracles here are the synchronous algorithm (async: test_runtime_pipeline.py)
CLASSES = {False: KLShampoo, True: KLSOAP}


def make(cls, params0, groups_kw, **kw):
    params = [torch.nn.Parameter(torch.tensor(p, dtype=F64)) for p in params0]
    groups = [dict(params=[params[i] for i in idx], **g) for idx, g in groups_kw]
    return cls(groups, state_dtype=F64, **{"runtime": SYNC, **kw}), params


@pytest.mark.parametrize("klsoap", [False, True])
@pytest.mark.parametrize("clamping,wd", [(True, 0.0), (False, 0.1)])
def test_matches_oracle(klsoap, clamping, wd):
    shapes = [(5, 5), (3, 4, 5), (6, 4), (7,)]
    rng = np.random.default_rng(0)
    params0 = [rng.standard_normal(s) for s in shapes]
    steps = 10
    grads = [gradient_sequence(s, steps + 1, seed=30 + i) for i, s in enumerate(shapes)]
    common = dict(betas=(0.9, 0.7), eps=1e-3, precondition_frequency=3, using_clamping=clamping, init_factor=0.1)
    groups = [([0, 1, 2], dict(lr=0.01, weight_decay=wd)), ([3], dict(lr=0.003, weight_decay=0.0))]
    opt, params = make(CLASSES[klsoap], params0, groups, **common)
    lrs, wds = [0.01, 0.01, 0.01, 0.003], [wd, wd, wd, 0.0]
    oracles = [KLOracle(s, klsoap=klsoap, lr=lr, weight_decay=w, **common) for s, lr, w in zip(shapes, lrs, wds)]
    W = [p.copy() for p in params0]
    for t in range(steps + 1):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g[t], dtype=F64)
        opt.step()
        W = [o.step(w, g[t]) for o, w, g in zip(oracles, W, grads)]
        if t == 0:  # rank-deficient first factor of the non-square block: inject our basis
            blk = opt.state[params[2]]["blocks"][0]
            oracles[2].Q = [blk["basis_0"].numpy().copy(), blk["basis_1"].numpy().copy()]
        for i, p in enumerate(params):
            np.testing.assert_allclose(p.detach().numpy(), W[i], rtol=1e-7, atol=1e-9, err_msg=f"param {i} call {t}")
    for i in (0, 1, 2):
        blk = opt.state[params[i]]["blocks"][0]
        for k in range(len(shapes[i])):
            np.testing.assert_allclose(blk[f"factor_{k}"].numpy(), oracles[i].S[k], rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(blk[f"eigen_sqrt_inv_{k}"].numpy(), oracles[i].s[k], rtol=1e-8)
            Q = blk[f"basis_{k}"].numpy()
            np.testing.assert_allclose(np.abs(Q.T @ oracles[i].Q[k]), np.eye(Q.shape[0]), atol=1e-7)


@pytest.mark.parametrize("klsoap", [False, True])
def test_matches_oracle_with_active_clamp(klsoap):
    # tiny gradients drive D below 1/10², so the clamp s <= max(10, min(d, 4000)) = 10 binds
    shape = (5, 5)
    W0 = np.random.default_rng(1).standard_normal(shape)
    grads = [1e-3 * g for g in gradient_sequence(shape, 12, seed=7)]
    kw = dict(lr=1e-3, betas=(0.9, 0.5), precondition_frequency=3)
    opt, (p,) = make(CLASSES[klsoap], [W0], [([0], {})], **kw)
    oracle = KLOracle(shape, klsoap=klsoap, **kw)
    W = W0.copy()
    for g in grads:
        p.grad = torch.tensor(g, dtype=F64)
        opt.step()
        W = oracle.step(W, g)
        np.testing.assert_allclose(p.detach().numpy(), W, rtol=1e-7, atol=1e-10)
    s0 = opt.state[p]["blocks"][0]["eigen_sqrt_inv_0"]
    assert torch.isclose(s0.max(), torch.tensor(10.0, dtype=F64))


@pytest.mark.parametrize("klsoap", [False, True])
def test_orthogonal_equivariance(klsoap):
    m, n, steps = 5, 5, 9
    U, V = random_orthogonal(m, 1), random_orthogonal(n, 2)
    rng = np.random.default_rng(3)
    W0 = rng.standard_normal((m, n))
    grads = gradient_sequence((m, n), steps, seed=4)
    kw = dict(lr=0.01, weight_decay=0.05, precondition_frequency=2, betas=(0.9, 0.6))

    def run(W, gs):
        opt, (p,) = make(CLASSES[klsoap], [W], [([0], {})], **kw)
        out = []
        for g in gs:
            p.grad = torch.tensor(g, dtype=F64)
            opt.step()
            out.append(p.detach().numpy().copy())
        return out

    a = run(W0, grads)
    b = run(U @ W0 @ V.T, [U @ g @ V.T for g in grads])
    for t in range(steps):
        np.testing.assert_allclose(b[t], U @ a[t] @ V.T, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("klsoap", [False, True])
def test_install_keeps_eigenvalue_estimates_and_momentum(klsoap):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6, dtype=F64))
    opt = CLASSES[klsoap]([p], lr=0.01, precondition_frequency=2, state_dtype=F64, runtime=SYNC)
    grads = gradient_sequence((4, 6), 7, seed=2)
    for t, g in enumerate(grads):
        p.grad = torch.tensor(g, dtype=F64)
        if t >= 1 and t % 2 == 0:
            blk = opt.state[p]["blocks"][0]
            Q_old = [blk["basis_0"].clone(), blk["basis_1"].clone()]
        opt.step()
        if t >= 1 and t % 2 == 0:
            blk = opt.state[p]["blocks"][0]
            assert int(blk["basis_version"]) == t
            for k in range(2):  # QR refresh without sort from the installed basis
                torch.testing.assert_close(blk[f"basis_{k}"], torch.linalg.qr(blk[f"factor_{k}"] @ Q_old[k]).Q)
    # D carries over: recompute the last step's statistics by hand is covered by the oracle; here check
    # that an install alone does not touch s
    blk = opt.state[p]["blocks"][0]
    s_before = [blk["eigen_sqrt_inv_0"].clone(), blk["eigen_sqrt_inv_1"].clone()]
    from asteria.optim.kl import install_kl_bases

    new_q = [torch.linalg.qr(torch.randn(d, d, dtype=F64)).Q.unsqueeze(0) for d in (4, 6)]
    ident = [torch.arange(d).unsqueeze(0) for d in (4, 6)]
    m = blk["exp_avg"].unsqueeze(0)
    q_old = [blk["basis_0"].unsqueeze(0), blk["basis_1"].unsqueeze(0)]
    q, s, m_new, _ = install_kl_bases(q_old, new_q, ident, [x.unsqueeze(0) for x in s_before], torch.tensor([True]), m_in_basis=m)
    for a, b in zip(s, s_before):
        assert torch.equal(a[0], b)
    # the first moment (in the basis) is rotated so that its original-space value is unchanged
    torch.testing.assert_close(q[0][0] @ m_new[0] @ q[1][0].T, q_old[0][0] @ m[0] @ q_old[1][0].T)


def test_first_real_step_is_about_ten_lr_m():
    # D starts at init_factor = 0.1, so the first KL-Shampoo update is ~ lr * m / 0.1 (docs/algorithms.md §4.2).
    p = torch.nn.Parameter(torch.zeros(3, 3, dtype=F64))
    opt = KLShampoo([p], lr=1.0, betas=(0.0, 0.98), eps=0.0, weight_decay=0.0, state_dtype=F64)
    p.grad = torch.eye(3, dtype=F64) + 0.1 * torch.ones(3, 3, dtype=F64)
    opt.step()
    g = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), -10.0 * g, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9,)), "betas"),
        (dict(init_factor=0.0), "init_factor"),
        (dict(max_clamp_value=0), "max_clamp_value"),
        (dict(using_clamping="yes"), "using_clamping"),
        (dict(precondition_frequency=-3), "precondition_frequency"),
        (dict(shampoo_beta=-0.1), "shampoo_beta"),
    ],
)
@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP])
def test_validation(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.randn(3, 3))], **kw)


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP])
def test_one_dimensional_and_scalar_params_use_adamw(cls):
    b = torch.nn.Parameter(torch.randn(5))
    s = torch.nn.Parameter(torch.tensor(0.5))
    opt = cls([b, s], lr=0.01)
    for _ in range(3):
        b.grad, s.grad = torch.randn(5), torch.tensor(0.3)
        opt.step()
    assert set(opt.state[b]["blocks"][0]) == {"exp_avg", "exp_avg_sq", "nonfinite_steps"}
    assert opt.state[b]["step"] == 2 and opt.state[s]["step"] == 2


@pytest.mark.parametrize("klsoap", [False, True])
def test_an_install_over_a_newer_version_writes_nothing(klsoap):
    """Invariant 2 (versions only increase per block) is checked before anything is written, also where
    KL-Shampoo writes the new bases straight into its state."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = CLASSES[klsoap]([p], lr=0.01, precondition_frequency=2, runtime=SYNC)
    for g in gradient_sequence((4, 6), 5, seed=3):
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    blk = opt.state[p]["blocks"][0]
    before = {k: v.clone() for k, v in blk.items()}
    version = int(blk["basis_version"])
    assert version > 0

    class Result:  # a valid refresh result for the block, of a version already installed
        ok, status, message = True, "ok", ""

        def __init__(self, n):
            self.outputs = {"basis": np.linalg.qr(np.random.default_rng(n).normal(size=(n, n)))[0].astype(np.float32),
                            "permutation": np.arange(n)}

    tag = {"what": "basis", "version": version, "blocks": [list(k) for k in opt._member_index]}
    with pytest.raises(RuntimeError, match="over version"):
        opt._install_batch(tag, [Result(4), Result(6)])
    for k, v in blk.items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("runtime", [SYNC, RuntimeConfig(staleness=1)], ids=["sync", "async"])
@pytest.mark.parametrize("klsoap", [False, True])
def test_bf16_state_trains_close_to_fp32_state_in_half_the_bytes(klsoap, runtime):
    run = check_bf16_state_run(lambda ps, **kw: CLASSES[klsoap](ps, lr=3e-2, precondition_frequency=2, **kw), runtime)
    # the eigenvalue estimates are state too (and stochastically rounded EMAs): stored in bfloat16
    blocks = [b for st in run["state"]["state"].values() for b in st["blocks"]]
    assert any("eigen_sqrt_inv_0" in b for b in blocks)
    assert all(b[k].dtype == torch.bfloat16 for b in blocks for k in b if k.startswith("eigen_sqrt_inv_"))
