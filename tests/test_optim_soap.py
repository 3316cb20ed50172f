"""Tests of asteria.SOAP: float64 oracle (docs/algorithms.md §3), reduction to Adam, invariances, install bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asteria.optim import SOAP
from asteria.optim import tensor_ops as ops
from asteria.runtime import RuntimeConfig
from helpers import check_bf16_state_run
from oracles import SOAPOracle, gradient_sequence, project_back, random_orthogonal

F64 = torch.float64
SYNC = RuntimeConfig(refresh="sync")  # the oracles here are the synchronous algorithm (async: test_runtime_pipeline.py)


def make(params0, groups_kw, **kw):
    params = [torch.nn.Parameter(torch.tensor(p, dtype=F64)) for p in params0]
    groups = [dict(params=[params[i] for i in idx], **g) for idx, g in groups_kw]
    return SOAP(groups, state_dtype=F64, **{"runtime": SYNC, **kw}), params


def blocks(opt, p):
    return opt.state[p]["blocks"]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_oracle(wd):
    shapes = [(6, 6), (4, 4, 4), (6, 4), (7,), ()]
    rng = np.random.default_rng(0)
    params0 = [rng.standard_normal(s) for s in shapes]
    steps = 10
    grads = [gradient_sequence(s, steps + 1, seed=20 + i) if s else [rng.standard_normal(()) for _ in range(steps + 1)]
             for i, s in enumerate(shapes)]
    common = dict(betas=(0.9, 0.8), shampoo_beta=0.5, eps=1e-3, precondition_frequency=2)
    groups = [([0, 1, 2], dict(lr=0.01, weight_decay=wd)), ([3, 4], dict(lr=0.02, weight_decay=0.0))]
    opt, params = make(params0, groups, **common)
    lrs, wds = [0.01, 0.01, 0.01, 0.02, 0.02], [wd, wd, wd, 0.0, 0.0]
    oracles = [SOAPOracle(s, lr=lr, weight_decay=w, **common) for s, lr, w in zip(shapes, lrs, wds)]
    W = [p.copy() for p in params0]
    for t in range(steps + 1):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g[t], dtype=F64)
        opt.step()
        W = [o.step(w, g[t]) for o, w, g in zip(oracles, W, grads)]
        if t == 0:
            # rank-deficient first factors (non-square): the null-space basis is arbitrary; inject ours
            blk = blocks(opt, params[2])[0]
            oracles[2].Q = [blk["basis_0"].numpy().copy(), blk["basis_1"].numpy().copy()]
            for i, p in enumerate(params):
                np.testing.assert_array_equal(p.detach().numpy(), params0[i])  # first call: no update
        for i, p in enumerate(params):
            np.testing.assert_allclose(p.detach().numpy(), W[i], rtol=1e-7, atol=1e-9, err_msg=f"param {i} call {t}")
    # the refreshes really reordered the basis at least once (so the v permutation is exercised)
    assert any((perm != np.arange(len(perm))).any() for o in oracles[:3] for perm in o.perms_seen)
    # key state: bases up to column sign, factors, and the moments in original coordinates
    for i in (0, 1, 2):
        blk = blocks(opt, params[i])[0]
        for k, Qo in enumerate(oracles[i].Q):
            Q = blk[f"basis_{k}"].numpy()
            np.testing.assert_allclose(np.abs(Q.T @ Qo), np.eye(Q.shape[0]), atol=1e-7)
            np.testing.assert_allclose(blk[f"factor_{k}"].numpy(), oracles[i].L[k], rtol=1e-12, atol=1e-14)
        Qs = [blk[f"basis_{k}"].numpy() for k in range(len(shapes[i]))]
        np.testing.assert_allclose(project_back(blk["exp_avg"].numpy(), Qs), project_back(oracles[i].m, oracles[i].Q), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(np.sort(blk["exp_avg_sq"].numpy().ravel()), np.sort(oracles[i].v.ravel()), rtol=1e-7, atol=1e-12)


def test_one_dimensional_reduces_to_adam():
    # 1-D parameters: Adam in the identity basis, first call skipped. With eps = 0 the step-size bias
    # correction (B) is exactly Adam's.
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(9, dtype=F64))
    p = torch.nn.Parameter(p_ref.detach().clone())
    ref = torch.optim.Adam([p_ref], lr=0.01, betas=(0.9, 0.99), eps=0.0)
    opt = SOAP([p], lr=0.01, betas=(0.9, 0.99), eps=0.0, weight_decay=0.0, state_dtype=F64)
    p.grad = torch.randn(9, dtype=F64)
    opt.step()  # initialisation call only
    assert torch.equal(p, p_ref)
    for _ in range(10):
        g = torch.randn(9, dtype=F64)
        p.grad, p_ref.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(p, p_ref, rtol=1e-12, atol=1e-14)


def test_post_update_weight_decay_convention():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=F64))
    opt = SOAP([p], lr=0.1, betas=(0.5, 0.5), eps=1e-8, weight_decay=0.2, state_dtype=F64)
    p.grad = torch.randn(5, dtype=F64)
    opt.step()
    g = torch.randn(5, dtype=F64)
    w = p.detach().clone()
    p.grad = g
    opt.step()
    m, v = 0.5 * g, 0.5 * g * g
    eta = 0.1 * (1 - 0.5) ** 0.5 / (1 - 0.5)
    w1 = w - eta * m / (v.sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), w1 - 0.1 * 0.2 * w1, rtol=1e-14, atol=1e-15)


def test_install_bookkeeping_rotation_and_permutation():
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(5, 5, dtype=F64))
    opt = SOAP([p], lr=0.01, shampoo_beta=0.3, precondition_frequency=3, state_dtype=F64, runtime=SYNC)
    grads = gradient_sequence((5, 5), 20, seed=5)
    saw_permutation = False
    for t, g in enumerate(grads):
        refresh = t >= 1 and t % 3 == 0  # call t is step t (call 0 only initialises)
        if t >= 1:
            blk = blocks(opt, p)[0]
            Q_old = [blk["basis_0"].clone(), blk["basis_1"].clone()]
            expected_m_orig, expected_v = _predict_next_moments(opt, p, g)
        p.grad = torch.tensor(g, dtype=F64)
        opt.step()
        if not refresh:
            continue
        blk = blocks(opt, p)[0]
        Q_new = [blk["basis_0"], blk["basis_1"]]
        assert int(blk["basis_version"]) == t
        L = [blk["factor_0"], blk["factor_1"]]
        perms = [torch.argsort(-torch.diagonal(Q.T @ Lk @ Q), stable=True) for Q, Lk in zip(Q_old, L)]
        saw_permutation |= any(bool((pp != torch.arange(5)).any()) for pp in perms)
        for Q, Lk, pp, Qn in zip(Q_old, L, perms, Q_new):  # Q_new = qr(L Q_old[:, π]).Q
            torch.testing.assert_close(Qn, torch.linalg.qr(Lk @ Q[:, pp]).Q, rtol=1e-10, atol=1e-12)
        # project_out(m) is unchanged by the basis change (m rotated exactly)
        m_orig_now = Q_new[0] @ blk["exp_avg"] @ Q_new[1].T
        torch.testing.assert_close(m_orig_now, expected_m_orig, rtol=1e-10, atol=1e-12)
        # v is permuted with the basis, never rotated
        torch.testing.assert_close(blk["exp_avg_sq"], expected_v[perms[0]][:, perms[1]], rtol=1e-13, atol=0)
    assert saw_permutation


def _predict_next_moments(opt, p, g_next):
    """m in original coordinates and v (installed coordinates) after the next call's moment update."""
    if g_next is None:
        return None, None
    blk = blocks(opt, p)[0]
    b1, b2 = opt.param_groups[0]["betas"]
    Q = [blk["basis_0"], blk["basis_1"]]
    gt = Q[0].T @ torch.tensor(g_next, dtype=F64) @ Q[1]
    m = b1 * blk["exp_avg"] + (1 - b1) * gt
    v = b2 * blk["exp_avg_sq"] + (1 - b2) * gt * gt
    return Q[0] @ m @ Q[1].T, v


def test_orthogonal_equivariance():
    m, n, steps = 6, 5, 9
    U, V = random_orthogonal(m, 1), random_orthogonal(n, 2)
    rng = np.random.default_rng(3)
    W0 = rng.standard_normal((m, n))
    grads = gradient_sequence((m, n), steps, seed=4)
    kw = dict(lr=0.01, weight_decay=0.05, precondition_frequency=2, shampoo_beta=0.6)

    def run(W, gs):
        opt, (p,) = make([W], [([0], {})], **kw)
        out = []
        for g in gs:
            p.grad = torch.tensor(g, dtype=F64)
            opt.step()
            out.append(p.detach().numpy().copy())
        return out

    # the first left factor of a 6x5 gradient has a one-dimensional null space: its basis is still unique
    # up to sign, which the trajectory does not see
    a = run(W0, grads)
    b = run(U @ W0 @ V.T, [U @ g @ V.T for g in grads])
    for t in range(steps):
        np.testing.assert_allclose(b[t], U @ a[t] @ V.T, rtol=1e-6, atol=1e-8)


def test_sign_flip_of_installed_basis_does_not_change_trajectory():
    torch.manual_seed(0)
    grads = gradient_sequence((5, 5), 12, seed=9)
    W0 = np.random.default_rng(1).standard_normal((5, 5))

    def run(flip):
        opt, (p,) = make([W0], [([0], {})], lr=0.01, precondition_frequency=2, shampoo_beta=0.5)
        out = []
        for t, g in enumerate(grads):
            p.grad = torch.tensor(g, dtype=F64)
            opt.step()
            if flip and t == 4:
                blk = blocks(opt, p)[0]
                signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=F64)
                blk["basis_0"].mul_(signs)  # flip columns of Q_L
                blk["exp_avg"].mul_(signs.view(-1, 1))  # m rotated consistently (row i follows column i)
            out.append(p.detach().numpy().copy())
        return out

    for a, b in zip(run(False), run(True)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


def test_every_weight_gets_a_non_identity_basis_and_large_dims_are_blocked():
    p = torch.nn.Parameter(torch.randn(10, 3))
    conv = torch.nn.Parameter(torch.randn(4, 3, 2, 2))
    opt = SOAP([p, conv], max_preconditioner_dim=4)
    for _ in range(2):
        p.grad, conv.grad = torch.randn(10, 3), torch.randn(4, 3, 2, 2)
        opt.step()
    assert [tuple(b["exp_avg"].shape) for b in opt.state[p]["blocks"]] == [(4, 3), (4, 3), (2, 3)]
    assert [tuple(b["exp_avg"].shape) for b in opt.state[conv]["blocks"]] == [(4, 3, 4)]
    for blk in opt.state[p]["blocks"] + opt.state[conv]["blocks"]:
        for k in range(blk["exp_avg"].dim()):
            Q = blk[f"basis_{k}"]
            if Q.shape[0] > 1:
                assert not torch.allclose(Q.abs(), torch.eye(Q.shape[0])), "basis left at identity"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(shampoo_beta=1.0), "shampoo_beta"),
        (dict(max_preconditioner_dim=0.5), "max_preconditioner_dim"),
        (dict(correct_bias=1), "correct_bias"),
        (dict(eigh_ridge=-1.0), "eigh_ridge"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SOAP([torch.nn.Parameter(torch.randn(3, 3))], **kw)


def test_nonfinite_gradient_is_skipped():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([p], precondition_frequency=2)
    for _ in range(3):  # calls 0..2; the non-finite call is step 3 (not a refresh step)
        p.grad = torch.randn(4, 4)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[p]["blocks"][0].items()}
    w = p.detach().clone()
    p.grad = torch.full((4, 4), float("inf"))
    opt.step()
    assert torch.equal(p.detach(), w)
    after = opt.state[p]["blocks"][0]
    for key in ("exp_avg", "exp_avg_sq", "factor_0", "factor_1", "basis_0"):
        assert torch.equal(after[key], before[key]), key
    assert int(after["nonfinite_steps"]) == 1


def test_install_uses_the_rotation_computed_by_the_refresh_job(monkeypatch):
    """Refresh installs take R = Q_oldᵀ·Q_new from the job (off the training thread), and it is the R they would
    compute themselves."""
    import asteria.optim.soap as soap_mod

    seen = []
    original = soap_mod.install_soap_bases
    installed = {}  # the bases after the previous step, by shape (the install writes the new ones in place)

    def spy(bases, new_bases, perms, m, v, ok, rotations=None):
        if rotations is not None:
            for qn, r in zip(new_bases, rotations):
                q = installed[tuple(qn.shape)]
                seen.append(float((r - torch.matmul(q.transpose(1, 2), qn)).abs().max()))
        return original(bases, new_bases, perms, m, v, ok, rotations)

    monkeypatch.setattr(soap_mod, "install_soap_bases", spy)
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 10)
    opt = SOAP(model.parameters(), precondition_frequency=2, runtime=RuntimeConfig(staleness=1))
    try:
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(16, 12)).pow(2).sum().backward()
            opt.step()
            opt.runtime.finish_installs()
            for bucket in opt._buckets:
                for key, t in bucket.state.items():
                    if key.startswith("basis_") and key != "basis_version":
                        installed[tuple(t.shape)] = t.clone()
    finally:
        opt.close()
    assert seen, "no refresh install received the job's rotation"
    assert max(seen) < 1e-5


@pytest.mark.parametrize("runtime", [SYNC, RuntimeConfig(staleness=1)], ids=["sync", "async"])
def test_bf16_state_trains_close_to_fp32_state_in_half_the_bytes(runtime):
    check_bf16_state_run(lambda ps, **kw: SOAP(ps, lr=3e-2, precondition_frequency=2, **kw), runtime)
