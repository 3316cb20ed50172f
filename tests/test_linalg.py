"""asteria._core.linalg against torch.linalg in fp64 (tight tolerances) and on bad inputs."""

import numpy as np
import pytest
import torch

import asteria
from asteria import _core

RNG = np.random.default_rng(1234)


def spd(n, rank=None, shift=0.0, cond=None):
    rank = n if rank is None else rank
    if cond is not None:
        q, _ = np.linalg.qr(RNG.standard_normal((n, n)))
        w = np.logspace(0, -np.log10(cond), n)
        return (q * w) @ q.T
    g = RNG.standard_normal((n, rank))
    return g @ g.T + shift * np.eye(n)


def rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def torch_inverse_root(a, root, eps):
    w, v = torch.linalg.eigh(torch.from_numpy(a) + eps * torch.eye(a.shape[0], dtype=torch.float64))
    lmin = w.min()
    if lmin < eps:
        w = w + (eps - lmin)
    return (v * w.pow(-1.0 / root)) @ v.T


@pytest.mark.parametrize("n", [1, 5, 32, 97])
def test_eigh_matches_torch_fp64(n):
    a = spd(n, shift=0.5)
    w, v = _core.linalg.eigh(a)
    wt, vt = torch.linalg.eigh(torch.from_numpy(a))
    assert rel(w, wt.numpy()) < 1e-10
    # Eigenvectors agree up to sign on a non-degenerate spectrum.
    signs = np.sign((v * vt.numpy()).sum(0))
    assert rel(v * signs, vt.numpy()) < 1e-10


def test_eigh_descending_and_ridge():
    a = spd(12, shift=0.1)
    w, v = _core.linalg.eigh(a, descending=True, ridge=0.25)
    wt = torch.linalg.eigvalsh(torch.from_numpy(a)).numpy()[::-1] + 0.25
    assert rel(w, wt) < 1e-10
    assert np.all(np.diff(w) <= 0)
    np.testing.assert_allclose(v @ np.diag(w - 0.25) @ v.T, a, atol=1e-10 * np.abs(a).max())


@pytest.mark.parametrize(
    "kind", ["spd", "rank_deficient", "ill_conditioned"],
)
@pytest.mark.parametrize("root", [2.0, 4.0, 6.0])
def test_inverse_root_matches_torch_fp64(kind, root):
    n = 24
    if kind == "spd":
        a, eps = spd(n, shift=1.0), 1e-12
    elif kind == "rank_deficient":
        a, eps = spd(n, rank=3), 1e-6
    else:
        a, eps = spd(n, cond=1e8), 1e-12
    x = _core.linalg.inverse_root(a, root=root, epsilon=eps)
    xt = torch_inverse_root(a, root, eps).numpy()
    tol = 1e-10 if kind == "spd" else 1e-6  # conditioning amplifies round-off
    assert rel(x, xt) < tol


def test_inverse_root_of_fp32_factor_with_a_rounding_negative_eigenvalue_is_finite():
    # PSD up to a rounding-sized dip: |λ_min| ≫ eps, so eps must survive the lift λ − λ_min + eps.
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a = (Q @ np.diag([-1e-3, 0.5, 1.0, 2.0, 3.0]) @ Q.T).astype(np.float32)
    a = np.ascontiguousarray(np.triu(a) + np.triu(a, 1).T)
    x = _core.linalg.inverse_root(a, root=4.0, epsilon=1e-12)
    assert np.isfinite(x).all() and np.abs(x).max() > 100  # eps^(-1/4) = 1e3 along the lifted direction


def test_newton_agrees_with_eigh():
    a = spd(20, shift=1.0)
    x, info = _core.linalg.newton_inverse_root(a, p=4, epsilon=1e-12, tolerance=1e-12, max_iterations=200)
    assert info["converged"] and info["iterations"] > 1
    assert rel(x, torch_inverse_root(a, 4, 1e-12).numpy()) < 1e-8


def test_newton_reports_cap_instead_of_failing():
    a = spd(10, shift=1.0)
    x, info = _core.linalg.newton_inverse_root(a, p=2, epsilon=0.0, max_iterations=1)
    assert not info["converged"] and info["iterations"] == 1
    assert np.isfinite(x).all()


@pytest.mark.parametrize("sort", [True, False])
def test_eigenbasis_refresh_matches_torch(sort):
    n = 16
    l = spd(n, shift=0.1)
    q0, _ = np.linalg.qr(RNG.standard_normal((n, n)))
    qn, perm = _core.linalg.eigenbasis_refresh(l, q0, sort=sort)
    lt, qt = torch.from_numpy(l), torch.from_numpy(q0)
    if sort:
        e = torch.diag(qt.T @ lt @ qt)
        pi = torch.argsort(e, descending=True, stable=True)
    else:
        pi = torch.arange(n)
    expected = torch.linalg.qr(lt @ qt[:, pi]).Q
    np.testing.assert_array_equal(perm, pi.numpy())
    assert rel(qn, expected.numpy()) < 1e-10


def test_fp32_paths_agree_with_fp64():
    a = spd(32, shift=1.0)
    x32 = _core.linalg.inverse_root(a.astype(np.float32), root=4, epsilon=1e-6)
    x64 = _core.linalg.inverse_root(a, root=4, epsilon=1e-6)
    assert x32.dtype == np.float32
    assert rel(x32.astype(np.float64), x64) < 1e-4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_asteria_error(bad):
    a = spd(6, shift=1.0)
    a[2, 3] = a[3, 2] = bad
    with pytest.raises(asteria.AsteriaError, match="NaN or Inf"):
        _core.linalg.eigh(a)
    with pytest.raises(asteria.AsteriaError, match="NaN or Inf"):
        _core.linalg.inverse_root(a, root=2, epsilon=1e-6)
    with pytest.raises(asteria.AsteriaError, match="NaN or Inf"):
        _core.linalg.eigenbasis_refresh(a, np.eye(6))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="square"):
        _core.linalg.eigh(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="float32 or float64"):
        _core.linalg.eigh(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="root must be positive"):
        _core.linalg.inverse_root(np.eye(2), root=0.0, epsilon=1e-6)


def test_non_contiguous_input_is_handled():
    a = spd(8, shift=1.0)
    big = np.zeros((16, 16))
    big[::2, ::2] = a
    w, _ = _core.linalg.eigh(big[::2, ::2])
    assert rel(w, np.linalg.eigvalsh(a)) < 1e-10


def test_gil_released_during_long_call():
    import threading
    import time

    a = spd(700, shift=1.0)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.01)
    before = len(ticks)
    start = time.perf_counter()
    _core.linalg.eigh(a)
    elapsed = time.perf_counter() - start
    during = len(ticks) - before
    stop.set()
    t.join()
    assert elapsed > 0.02, "the call was too fast to tell"
    assert during >= 5, f"Python thread made {during} ticks in {elapsed:.3f}s: the GIL was held"


@pytest.mark.parametrize("kind", ["rank_deficient", "ill_conditioned"])
def test_eigh_eigenvalues_on_hard_inputs(kind):
    a = spd(40, rank=4) if kind == "rank_deficient" else spd(40, cond=1e12)
    w, v = _core.linalg.eigh(a)
    wt = torch.linalg.eigvalsh(torch.from_numpy(a)).numpy()
    assert np.abs(w - wt).max() < 1e-10 * np.abs(wt).max()
    # Whatever basis the solver picks in a degenerate eigenspace, it is orthonormal and exact.
    np.testing.assert_allclose(v.T @ v, np.eye(40), atol=1e-12)
    np.testing.assert_allclose((v * w) @ v.T, a, atol=1e-10 * np.abs(a).max())


def test_eigenbasis_refresh_on_rank_deficient_statistic():
    l = spd(24, rank=2)
    q0, _ = np.linalg.qr(RNG.standard_normal((24, 24)))
    qn, perm = _core.linalg.eigenbasis_refresh(l, q0, sort=True)
    np.testing.assert_allclose(qn.T @ qn, np.eye(24), atol=1e-12)
    assert sorted(perm.tolist()) == list(range(24))


@pytest.fixture
def fp32_failures():
    """Arms the fp32-eigh failure test hook for one test (disarmed afterwards, whatever happens)."""
    yield _core.linalg.set_test_fp32_eigh_failures
    _core.linalg.set_test_fp32_eigh_failures(0)


def test_a_failed_fp32_eigh_is_retried_in_fp64(fp32_failures):
    """A fp32 decomposition that LAPACK reports as failed is redone in fp64 (the hook fails fp32 only)."""
    a = spd(12, shift=0.5).astype(np.float32)
    before = _core.linalg.test_fp32_eigh_failures_injected()
    fp32_failures(1)
    w, v = _core.linalg.eigh(a)
    assert _core.linalg.test_fp32_eigh_failures_injected() == before + 1
    w64, v64 = _core.linalg.eigh(a.astype(np.float64))  # the retry's result, rounded to fp32
    np.testing.assert_array_equal(w, w64.astype(np.float32))
    np.testing.assert_array_equal(v, v64.astype(np.float32))
    fp32_failures(1)
    with pytest.raises(asteria.AsteriaError, match="syevd info=13"):
        _core.linalg.eigh(a, fp64_retry=False)
