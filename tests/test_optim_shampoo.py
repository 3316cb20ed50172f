"""Tests of asteria.Shampoo: float64 oracle (docs/algorithms.md §2), reductions, invariances, failure policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asteria.optim import RefreshFailureError, Shampoo
from asteria.optim.shampoo import BF16_RIDGE, bf16_root_input
from asteria.runtime import RefreshPipeline, RuntimeConfig
from helpers import check_bf16_state_run, regression_run
from oracles import ShampooOracle, gradient_sequence, random_orthogonal

F64 = torch.float64
SYNC = RuntimeConfig(refresh="sync")  # the oracles here are the synchronous algorithm (async: test_runtime_pipeline.py)


def run_library(params0, grads, groups_kw, opt_kw):
    """Runs Shampoo on float64 copies of params0 with the given gradient sequences; returns the trajectory."""
    params = [torch.nn.Parameter(torch.tensor(p, dtype=F64)) for p in params0]
    groups = [dict(params=[params[i] for i in idx], **kw) for idx, kw in groups_kw]
    opt = Shampoo(groups, state_dtype=F64, **{"runtime": SYNC, **opt_kw})
    traj = []
    for t in range(len(grads[0])):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g[t], dtype=F64)
        opt.step()
        traj.append([p.detach().numpy().copy() for p in params])
    return opt, params, traj


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("grafting", ["adam", "none", "rmsprop"])
def test_matches_oracle_unmerged_shapes(wd, grafting):
    shapes = [(6, 6), (5, 3), (7,), (3, 4, 2)]
    rng = np.random.default_rng(1)
    params0 = [rng.standard_normal(s) for s in shapes]
    grads = [gradient_sequence(s, 9, seed=10 + i) for i, s in enumerate(shapes)]
    kw = dict(epsilon=1e-6, precondition_frequency=2, start_preconditioning_step=2, merge_dims=False,
              grafting=grafting, betas=(0.9, 0.99), grafting_epsilon=1e-3)
    groups = [([0, 1], dict(lr=0.01, weight_decay=wd)), ([2, 3], dict(lr=0.02, weight_decay=0.0))]
    opt, _, traj = run_library(params0, grads, groups, kw)
    oracles = [
        ShampooOracle(s, lr=lr, betas=(0.9, 0.99), epsilon=1e-6, weight_decay=w, precondition_frequency=2,
                      start_preconditioning_step=2, grafting=grafting, grafting_epsilon=1e-3)
        for s, lr, w in zip(shapes, [0.01, 0.01, 0.02, 0.02], [wd, wd, 0.0, 0.0])
    ]
    W = [p.copy() for p in params0]
    for t in range(9):
        W = [o.step(w, g[t]) for o, w, g in zip(oracles, W, grads)]
        for i in range(len(shapes)):
            np.testing.assert_allclose(traj[t][i], W[i], rtol=1e-7, atol=1e-9, err_msg=f"param {i} step {t + 1}")
    # key state: factors and roots
    p0 = opt.param_groups[0]["params"][0]
    blk = opt.state[p0]["blocks"][0]
    np.testing.assert_allclose(blk["factor_0"].numpy(), oracles[0].L[0], rtol=1e-12)
    np.testing.assert_allclose(blk["root_1"].numpy(), oracles[0].X[1], rtol=1e-8, atol=1e-10)


def test_matches_oracle_merged_and_blocked():
    # (4, 5) merges into one 1-D block of 20 (DS default); (10, 3) with max dim 4 and no merge splits rows.
    rng = np.random.default_rng(2)
    p_merge, p_block = rng.standard_normal((4, 5)), rng.standard_normal((10, 3))
    g_merge = gradient_sequence((4, 5), 6, seed=3)
    g_block = gradient_sequence((10, 3), 6, seed=4)
    kw = dict(lr=0.01, epsilon=1e-6, precondition_frequency=2, start_preconditioning_step=2)
    opt1, _, traj1 = run_library([p_merge], [g_merge], [([0], {})], kw)
    assert opt1.state[opt1.param_groups[0]["params"][0]]["blocks"][0]["factor_0"].shape == (20, 20)
    o = ShampooOracle((20,), lr=0.01, epsilon=1e-6, precondition_frequency=2, start_preconditioning_step=2)
    W = p_merge.reshape(20)
    for t in range(6):
        W = o.step(W, g_merge[t].reshape(20))
        np.testing.assert_allclose(traj1[t][0].reshape(20), W, rtol=1e-7, atol=1e-9)

    opt2, _, traj2 = run_library([p_block], [g_block], [([0], {})], dict(kw, max_preconditioner_dim=4, merge_dims=False))
    assert [b["factor_0"].shape[0] for b in opt2.state[opt2.param_groups[0]["params"][0]]["blocks"]] == [4, 4, 2]
    bounds = [(0, 4), (4, 8), (8, 10)]
    oracles = [ShampooOracle((b - a, 3), lr=0.01, epsilon=1e-6, precondition_frequency=2, start_preconditioning_step=2) for a, b in bounds]
    Ws = [p_block[a:b].copy() for a, b in bounds]
    for t in range(6):
        Ws = [o.step(w, g_block[t][a:b]) for o, w, (a, b) in zip(oracles, Ws, bounds)]
        np.testing.assert_allclose(traj2[t][0], np.concatenate(Ws), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "grafting,torch_cls,kw",
    [
        ("adam", torch.optim.Adam, dict(betas=(0.9, 0.999))),
        ("adam", torch.optim.AdamW, dict(betas=(0.9, 0.999), weight_decay=0.1)),
        ("adagrad", torch.optim.Adagrad, dict()),
        ("rmsprop", torch.optim.RMSprop, dict()),
    ],
)
def test_reduces_to_torch_optimizer_without_preconditioning(grafting, torch_cls, kw):
    torch.manual_seed(0)
    shapes = [(5, 4), (6,)]
    p_ref = [torch.nn.Parameter(torch.randn(s, dtype=F64)) for s in shapes]
    p_ours = [torch.nn.Parameter(p.detach().clone()) for p in p_ref]
    if torch_cls is torch.optim.Adagrad:
        ref = torch_cls(p_ref, lr=0.05, eps=1e-10)
        ours = Shampoo(p_ours, lr=0.05, betas=(0.0, 0.999), grafting="adagrad", grafting_epsilon=1e-10,
                       start_preconditioning_step=math.inf, state_dtype=F64)
    elif torch_cls is torch.optim.RMSprop:
        ref = torch_cls(p_ref, lr=0.01, alpha=0.99, eps=1e-8)
        ours = Shampoo(p_ours, lr=0.01, betas=(0.0, 0.999), grafting="rmsprop", grafting_beta2=0.99,
                       start_preconditioning_step=math.inf, state_dtype=F64)
    else:
        wd = kw.get("weight_decay", 0.0)
        ref = torch_cls(p_ref, lr=0.01, betas=kw["betas"], eps=1e-8, weight_decay=wd)
        ours = Shampoo(p_ours, lr=0.01, betas=(0.9, 0.999), grafting="adam", weight_decay=wd,
                       start_preconditioning_step=math.inf, state_dtype=F64)
    for _ in range(12):
        for a, b in zip(p_ref, p_ours):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        for a, b in zip(p_ref, p_ours):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_one_dimensional_full_matrix_adagrad():
    # docs/algorithms.md §7.2, item 2: beta1 = 0, beta2 = 1, f = s = 1, no grafting, exponent 1/2.
    torch.manual_seed(1)
    d, eps = 5, 1e-3
    p = torch.nn.Parameter(torch.randn(d, dtype=F64))
    w = p.detach().clone()
    opt = Shampoo([p], lr=0.1, betas=(0.0, 1.0), epsilon=eps, precondition_frequency=1, start_preconditioning_step=1, runtime=SYNC,
                  grafting="none", state_dtype=F64)
    acc = torch.zeros(d, d, dtype=F64)
    for _ in range(6):
        g = torch.randn(d, dtype=F64)
        p.grad = g.clone()
        opt.step()
        acc += torch.outer(g, g)
        evals, evecs = torch.linalg.eigh(acc + eps * torch.eye(d, dtype=F64))
        w = w - 0.1 * (evecs * evals.rsqrt()) @ evecs.T @ g
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)


def test_orthogonal_equivariance():
    m, n, steps = 6, 5, 8
    U, V = random_orthogonal(m, 1), random_orthogonal(n, 2)
    rng = np.random.default_rng(3)
    W0 = rng.standard_normal((m, n))
    grads = gradient_sequence((m, n), steps, seed=4)
    kw = dict(lr=0.02, epsilon=1e-6, weight_decay=0.01, precondition_frequency=2, start_preconditioning_step=2,
              merge_dims=False, grafting="sgd")
    _, _, traj = run_library([W0], [grads], [([0], {})], kw)
    _, _, traj_rot = run_library([U @ W0 @ V.T], [[U @ g @ V.T for g in grads]], [([0], {})], kw)
    for t in range(steps):
        np.testing.assert_allclose(traj_rot[t][0], U @ traj[t][0] @ V.T, rtol=1e-8, atol=1e-10)


class FailingScheduler:
    """Wraps the real scheduler and feeds NaN to the jobs whose call number is in ``fail_calls``."""

    def __init__(self, fail_calls):
        from asteria import _core

        self.inner = _core.RefreshScheduler(workers=1, queue_capacity=64, blas_threads=1)
        self.fail_calls = set(fail_calls)
        self.calls = 0

    def submit_inverse_root(self, block_id, version, deadline, a, **kw):
        self.calls += 1
        if self.calls in self.fail_calls:
            a = np.full_like(a, np.nan)
        return self.inner.submit_inverse_root(block_id, version, deadline, a, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_failed_refresh_keeps_previous_root_and_raises_on_fourth():
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=F64))
    opt = Shampoo([("layer.weight", p)], lr=0.01, epsilon=1e-6, precondition_frequency=1, start_preconditioning_step=1,
                  merge_dims=False, state_dtype=F64)
    sched = FailingScheduler(fail_calls={3, 4, 5, 6, 7, 8, 9, 10})  # two factors per refresh: steps 2.. fail
    opt.runtime = RefreshPipeline(SYNC, offset=0, scheduler=sched)
    torch.manual_seed(0)
    p.grad = torch.randn(4, 3, dtype=F64)
    opt.step()
    blk = opt.state[p]["blocks"][0]
    root_after_first = blk["root_0"].clone()
    assert not torch.allclose(root_after_first, torch.eye(4, dtype=F64))
    for k in range(3):  # three failures in a row are tolerated
        p.grad = torch.randn(4, 3, dtype=F64)
        opt.step()
        assert torch.equal(blk["root_0"], root_after_first)
        assert int(blk["refresh_failures"]) == k + 1
        assert int(blk["root_version"]) == 1
    assert opt.runtime.stats()["jobs_failed"] == 6
    p.grad = torch.randn(4, 3, dtype=F64)
    with pytest.raises(RefreshFailureError, match=r"layer\.weight.*4 times"):
        opt.step()


def test_failure_counter_resets_after_success():
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=F64))
    opt = Shampoo([p], epsilon=1e-6, precondition_frequency=1, start_preconditioning_step=1, merge_dims=False, state_dtype=F64)
    opt.runtime = RefreshPipeline(SYNC, offset=0, scheduler=FailingScheduler(fail_calls={1, 5, 9, 13}))  # steps 1, 3, 5, 7 fail
    for _ in range(8):
        p.grad = torch.randn(4, 3, dtype=F64)
        opt.step()
        assert int(opt.state[p]["blocks"][0]["refresh_failures"]) == (1 if _ % 2 == 0 else 0)


def test_nonfinite_gradient_is_skipped_and_counted():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(4, 4))
    opt = Shampoo([a, b], lr=0.1, precondition_frequency=1, start_preconditioning_step=1, merge_dims=False)
    for _ in range(2):
        a.grad, b.grad = torch.randn(4, 4), torch.randn(4, 4)
        opt.step()
    before_a = a.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[a]["blocks"][0].items()}
    g = torch.randn(4, 4)
    g[1, 2] = float("nan")
    a.grad, b.grad = g, torch.randn(4, 4)
    b_before = b.detach().clone()
    opt.step()
    assert torch.equal(a.detach(), before_a)
    assert not torch.equal(b.detach(), b_before)
    after = opt.state[a]["blocks"][0]
    for key in ("factor_0", "factor_1", "filtered_grad", "graft_sq"):
        assert torch.equal(after[key], state_before[key]), key
    assert int(after["nonfinite_steps"]) == 1
    assert opt.runtime.stats()["nonfinite_steps"] == 1
    for _ in range(2):
        a.grad, b.grad = torch.randn(4, 4), torch.randn(4, 4)
        opt.step()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_exponent_override_zero_leaves_dim_unpreconditioned():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Shampoo([p], merge_dims=False, inverse_exponent_override={2: {1: 0.0}}, precondition_frequency=1,
                  start_preconditioning_step=1)
    p.grad = torch.randn(4, 3)
    opt.step()
    blk = opt.state[p]["blocks"][0]
    assert "factor_0" in blk and "factor_1" not in blk and "root_1" not in blk


def test_low_precision_params_keep_fp32_state():
    p = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.bfloat16))
    opt = Shampoo([p], lr=0.01, precondition_frequency=2, start_preconditioning_step=2, merge_dims=False)
    for _ in range(4):
        p.grad = torch.randn(8, 6, dtype=torch.bfloat16)
        opt.step()
    blk = opt.state[p]["blocks"][0]
    assert p.dtype == torch.bfloat16 and blk["factor_0"].dtype == torch.float32
    assert torch.isfinite(p.float()).all()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(precondition_frequency=2.5), "precondition_frequency"),
        (dict(precondition_frequency=10, start_preconditioning_step=5), "start_preconditioning_step"),
        (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
        (dict(grafting="lion"), "grafting"),
        (dict(grafting_beta2=0.0), "grafting_beta2"),
        (dict(grafting_epsilon=-1.0), "grafting_epsilon"),
        (dict(inverse_exponent_override={2: -0.5}), "inverse_exponent_override"),
        (dict(root_method="svd"), "root_method"),
        (dict(num_tolerated_failures=-1), "num_tolerated_failures"),
        (dict(state_dtype=torch.float16), "state_dtype"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        Shampoo([torch.nn.Parameter(torch.randn(3, 3))], **kw)


def test_refuses_complex_and_sparse():
    with pytest.raises(TypeError, match="complex"):
        Shampoo([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Shampoo(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def _shampoo(**extra):
    extra = {"merge_dims": False, **extra}
    return lambda ps, **kw: Shampoo(ps, lr=3e-2, precondition_frequency=2, start_preconditioning_step=2, **extra, **kw)


@pytest.mark.parametrize("runtime", [SYNC, RuntimeConfig(staleness=1)], ids=["sync", "async"])
def test_bf16_state_trains_close_to_fp32_state_in_half_the_bytes(runtime):
    # epsilon above the bf16 ridge's scale here, so that both runs damp the roots alike
    check_bf16_state_run(_shampoo(epsilon=1e-4), runtime)


def test_bf16_factors_train_with_the_default_epsilon_thanks_to_the_ridge(monkeypatch):
    """With ``epsilon=1e-12`` the inverse roots of bf16 factors amplify their rounding noise; the ridge of
    `bf16_root_input` is what makes them train (without it, the same run makes no progress)."""
    run = regression_run(_shampoo(merge_dims=True), 24, torch.bfloat16, SYNC)  # (full-matrix factors of 240 and 126)
    assert run["losses"][-1] < 0.2 * run["losses"][0], run["losses"]
    monkeypatch.setattr("asteria.optim.shampoo.BF16_RIDGE", 0.0)
    stuck = regression_run(_shampoo(merge_dims=True), 24, torch.bfloat16, SYNC)
    assert stuck["losses"][-1] > 0.5 * stuck["losses"][0], stuck["losses"]


def test_bf16_root_input_adds_the_trace_ridge_to_the_bias_corrected_factor():
    A = torch.randn(3, 5, 7)
    A = A @ A.transpose(1, 2)
    out = bf16_root_input(A, 0.5)
    for k in range(3):
        want = A[k].double() / 0.5 + BF16_RIDGE * float(torch.trace(A[k].double())) / 0.5 * torch.eye(5, dtype=F64)
        torch.testing.assert_close(out[k].double(), want, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float32 and out.data_ptr() != A.data_ptr()
