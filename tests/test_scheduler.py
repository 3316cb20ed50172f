"""asteria._core.RefreshScheduler from Python: results, failures, cancellation, overlap, GIL."""

import re
import threading
import time

import numpy as np
import pytest
import torch

from asteria import _core


def spd(n, seed=0):
    g = np.random.default_rng(seed).standard_normal((n, n))
    return g @ g.T + np.eye(n)


def test_submit_wait_roundtrip_and_snapshot_semantics():
    with _core.RefreshScheduler(workers=1) as s:
        a = spd(16)
        expected = np.linalg.eigvalsh(a)
        jid = s.submit_eigh(7, 3, 4, a)
        a[:] = 0.0  # the job owns a copy taken at submit
        r = s.wait(jid)
        assert r.ok and r.status == "ok" and r.message == ""
        assert (r.block_id, r.version, r.deadline) == (7, 3, 4)
        np.testing.assert_allclose(r.outputs["eigenvalues"], expected, rtol=1e-12)
        assert r.latency_s >= r.run_s >= 0


def test_outputs_are_zero_copy_and_usable_from_torch():
    with _core.RefreshScheduler() as s:
        r = s.wait(s.submit_inverse_root(0, 0, 0, spd(8).astype(np.float32), root=4, epsilon=1e-6))
        x = r.outputs["root"]
        t = torch.from_numpy(x)
        assert t.dtype == torch.float32 and t.shape == (8, 8)
        del r, x
        assert torch.isfinite(t).all()  # the array keeps the storage alive


@pytest.mark.parametrize("kind", ["eigh", "inverse_root", "eigenbasis_refresh"])
def test_reused_inputs_hold_the_results_with_the_same_values(kind):
    """reuse_inputs=True: the n×n results are written over the job's inputs (a shadow snapshot's leases in the
    pipeline), so a refresh needs no memory of its own; the values are those of results in fresh buffers."""
    a, q = spd(24, 1), np.linalg.qr(spd(24, 2))[0].copy()

    def run(s, reuse):
        if kind == "eigh":
            return s.wait(s.submit_eigh(0, 0, 0, a, descending=True, reuse_inputs=reuse))
        if kind == "inverse_root":
            return s.wait(s.submit_inverse_root(0, 0, 0, a, root=4, epsilon=1e-6, reuse_inputs=reuse))
        return s.wait(s.submit_eigenbasis_refresh(0, 0, 0, a, q, reuse_inputs=reuse))

    with _core.RefreshScheduler() as s:
        fresh, reused = run(s, False), run(s, True)
    assert fresh.ok and reused.ok
    assert fresh.reused_bytes == 0
    matrices = {"eigh": ["eigenvectors"], "inverse_root": ["root"], "eigenbasis_refresh": ["basis", "rotation"]}[kind]
    assert reused.reused_bytes == sum(reused.outputs[k].nbytes for k in matrices) == len(matrices) * a.nbytes
    for k, v in fresh.outputs.items():
        np.testing.assert_array_equal(reused.outputs[k], v, err_msg=k)


def test_worker_scratch_is_counted():
    before = _core.linalg.scratch_bytes()
    with _core.RefreshScheduler() as s:
        assert s.wait(s.submit_eigh(0, 0, 0, spd(96))).ok
        held = _core.linalg.scratch_bytes()
    assert held >= before + 96 * 96 * 8  # the worker's copy of the matrix, at least
    assert _core.linalg.scratch_bytes() == before  # freed with the worker thread


def test_failed_job_reports_instead_of_raising():
    with _core.RefreshScheduler() as s:
        bad = spd(4)
        bad[0, 0] = np.nan
        r = s.wait(s.submit_eigenbasis_refresh(11, 5, 6, bad, np.eye(4)))
        assert not r.ok and r.status == "failed"
        assert "block 11" in r.message and "NaN or Inf" in r.message
        assert s.stats()["failed"] == 1


def test_invalid_submissions_raise_value_error():
    with _core.RefreshScheduler() as s:
        with pytest.raises(ValueError):
            s.submit_eigh(0, 0, 0, np.zeros((2, 3)))
        with pytest.raises(ValueError, match="method"):
            s.submit_inverse_root(0, 0, 0, spd(3), root=2, epsilon=0.0, method="magic")
        with pytest.raises(ValueError, match="integer root"):
            s.submit_inverse_root(0, 0, 0, spd(3), root=2.5, epsilon=0.0, method="newton")
        with pytest.raises(ValueError, match="unknown job id"):
            s.wait(12345)
    with pytest.raises(ValueError, match="workers"):
        _core.RefreshScheduler(workers=0)


def test_cancel_and_poll():
    with _core.RefreshScheduler(workers=1) as s:
        gate = s.submit_sleep(0, 0, 0, 0.2)
        victim = s.submit_sleep(1, 0, 1, 5.0)
        assert s.cancel(victim)
        assert s.wait(gate).ok
        seen = {}
        deadline = time.time() + 5
        while victim not in seen and time.time() < deadline:
            seen.update({r.job_id: r for r in s.poll()})
        assert seen[victim].status == "cancelled"
        assert s.poll() == []


def test_close_with_queued_jobs_returns_promptly():
    s = _core.RefreshScheduler(workers=1)
    for i in range(50):
        s.submit_sleep(i, 0, i, 0.05)
    start = time.perf_counter()
    s.close()
    assert time.perf_counter() - start < 1.0
    with pytest.raises(RuntimeError, match="shut down"):
        s.submit_sleep(0, 0, 0, 0.0)


def test_wait_releases_the_gil():
    with _core.RefreshScheduler(workers=1) as s:
        jid = s.submit_sleep(0, 0, 0, 0.3)
        counter = [0]
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                counter[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        s.wait(jid)
        stop.set()
        t.join()
        assert counter[0] > 1000


def test_refresh_work_overlaps_python():
    """Worker busy time accrues while the caller does other work (no wait until the end)."""
    with _core.RefreshScheduler(workers=1) as s:
        ids = [s.submit_sleep(i, 0, i, 0.05) for i in range(4)]
        t0 = time.perf_counter()
        x = torch.randn(256, 256)
        while s.stats()["completed"] < 4 and time.perf_counter() - t0 < 5:
            x = x @ x.T / 256
        stats = s.stats()
        assert stats["completed"] == 4
        assert stats["worker_busy_s"][0] >= 0.19
        assert len(s.poll()) == 4
        assert ids


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eigenbasis_refresh_returns_the_install_rotation(dtype):
    """The job also returns R = Q_oldᵀ·Q_new, the matrix the SOAP/KL install rotates the first moment with."""
    rng = np.random.default_rng(3)
    g = rng.standard_normal((12, 12))
    a = (g @ g.T).astype(dtype)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    q = q.astype(dtype)
    with _core.RefreshScheduler(workers=1) as sched:
        res = sched.wait(sched.submit_eigenbasis_refresh(0, 1, 2, a, q))
    assert res.ok
    rot = res.outputs["rotation"]
    assert rot.dtype == dtype and rot.shape == (12, 12)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(rot, q.T.astype(np.float64) @ res.outputs["basis"].astype(np.float64), atol=tol)
    with _core.RefreshScheduler(workers=1) as sched:  # KL-Shampoo rotates no moment: it asks for no rotation
        res2 = sched.wait(sched.submit_eigenbasis_refresh(0, 1, 2, a, q, rotation=False))
    assert res2.ok and "rotation" not in res2.outputs
    np.testing.assert_array_equal(res2.outputs["basis"], res.outputs["basis"])


def test_kl_shampoo_refreshes_ask_for_no_rotation_and_kl_soap_ones_do():
    from asteria import KLSOAP, KLShampoo

    p = torch.nn.Parameter(torch.zeros(4, 3))
    assert KLShampoo([p])._refresh_options()["rotation"] is False
    assert KLSOAP([p])._refresh_options()["rotation"] is True


# ----------------------------------------------------------------------------------------- the fault-injection hook
@pytest.mark.parametrize(
    "kind,match",
    [
        ("solver", r"block 5, version 9\) failed: \[linalg::eigh\] symmetric eigendecomposition failed \(LAPACK syevd"),
        ("exception", r"block 5, version 9\) failed: a runtime_error thrown by the job body"),
        ("bad_alloc", r"block 5, version 9\) failed: out of memory on the worker \(std::bad_alloc\)"),
        ("nonfinite", r"block 5, version 9\) failed: \[scheduler\] the output 'eigenvalues' holds NaN or Inf"),
    ],
)
def test_injected_faults_fail_the_job_and_the_worker_goes_on(kind, match):
    """The test hook (keyword arguments): the chosen job completes as failed with a message naming block and
    version; earlier and later jobs are unaffected."""
    with _core.RefreshScheduler(workers=2, test_fault=kind, test_fault_job="eigh", test_fault_skip=1) as s:
        a = spd(8, 1)
        first = s.wait(s.submit_eigh(4, 8, 9, a))
        bad = s.wait(s.submit_eigh(5, 9, 10, a))
        root = s.wait(s.submit_inverse_root(6, 9, 10, a, root=2, epsilon=1e-9))  # another kind: not counted
        later = [s.wait(s.submit_eigh(7, 10 + i, 11 + i, a)) for i in range(4)]
        assert first.ok and root.ok and all(r.ok for r in later)
        assert not bad.ok and bad.status == "failed" and bad.outputs == {}
        assert re.search(match, bad.message), bad.message
        np.testing.assert_allclose(later[-1].outputs["eigenvalues"], first.outputs["eigenvalues"])
        st = s.stats()
        assert st["failed"] == 1 and st["faults_injected"] == 1 and st["completed"] == 7


def test_set_test_fault_rearms_and_validates():
    with _core.RefreshScheduler(workers=1) as s:
        a = spd(6, 2)
        s.set_test_fault("exception", count=2)
        results = [s.wait(s.submit_eigh(i, i, i + 1, a)) for i in range(3)]
        assert [r.ok for r in results] == [False, False, True]
        s.set_test_fault("nonfinite", job="inverse_root")
        assert s.wait(s.submit_eigh(0, 0, 1, a)).ok
        r = s.wait(s.submit_inverse_root(3, 4, 5, a, root=2, epsilon=0.0))
        assert not r.ok and "output 'root' holds NaN or Inf" in r.message
        s.set_test_fault("none")
        assert s.wait(s.submit_inverse_root(3, 5, 6, a, root=2, epsilon=0.0)).ok
        with pytest.raises(ValueError, match="test fault kind"):
            s.set_test_fault("sometimes")
        with pytest.raises(ValueError, match="test fault job"):
            s.set_test_fault("solver", job="qr")
        with pytest.raises(ValueError, match="count >= 1"):
            s.set_test_fault("solver", count=0)
    with pytest.raises(ValueError, match="test fault kind"):
        _core.RefreshScheduler(test_fault="boom")
