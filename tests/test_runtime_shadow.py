"""Shadow snapshots in pinned leases (runtime/shadow.py) and their zero-copy hand-off to the scheduler."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import torch

import asteria
from asteria import _core
from asteria.runtime.shadow import ALIGN_BYTES, matrix_stride, snapshot_to_host


@pytest.fixture
def pool():
    return _core.PinnedPool(budget_bytes=64 << 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 5, 16, 33])
def test_snapshot_copies_every_matrix_aligned(pool, dtype, n):
    x = torch.randn(3, n, n, dtype=dtype)
    snap = snapshot_to_host([x, 2 * x], pool)
    assert snap.ready is None and snap.route == "host"
    assert snap.nbytes == 2 * 3 * matrix_stride(n, x.element_size())
    for t, views in zip((x, 2 * x), snap.matrices):
        for k, v in enumerate(views):
            assert v.ctypes.data % ALIGN_BYTES == 0 and v.flags.c_contiguous
            np.testing.assert_array_equal(v, t[k].numpy())
    assert pool.stats()["leases"] == 2


@pytest.mark.parametrize("defer", [False, True])
def test_bf16_statistics_are_snapshotted_upcast_at_once(pool, defer):
    """bf16 state: the snapshot holds float32 matrices equal to the stored values (refreshes never run in bf16), copied
    during the call even when deferral is asked for (a deferred copy is a memcpy and cannot convert)."""
    x = torch.randn(3, 9, 9).to(torch.bfloat16)
    snap = snapshot_to_host([x, 2 * x], pool, defer=defer)
    assert snap.copy is None and snap.sources == ()
    assert snap.nbytes == 2 * 3 * matrix_stride(9, 4)
    for t, views in zip((x, 2 * x), snap.matrices):
        for k, v in enumerate(views):
            assert v.dtype == np.float32 and v.ctypes.data % ALIGN_BYTES == 0
            np.testing.assert_array_equal(v, t[k].float().numpy())
    before = x[0].float().numpy().copy()
    x.mul_(3)  # the snapshot is a copy
    np.testing.assert_array_equal(snap.matrices[0][0], before)


def test_snapshot_is_frozen_while_training_updates_the_statistics(pool):
    x = torch.eye(8, dtype=torch.float64).expand(1, 8, 8).clone() * 3.0
    snap = snapshot_to_host([x], pool)
    x.mul_(100.0)  # the next steps keep updating the live statistics
    with _core.RefreshScheduler(workers=1, test_delay_s=0.05) as sched:
        jid = sched.submit_eigh(0, 1, 2, snap.matrices[0][0])
        res = sched.wait(jid)
    np.testing.assert_allclose(res.outputs["eigenvalues"], np.full(8, 3.0))


def test_scheduler_reads_the_lease_in_place_and_keeps_it_alive(pool):
    x = torch.diag(torch.arange(1.0, 9.0)).expand(2, 8, 8).clone()
    snap = snapshot_to_host([x], pool)
    view = snap.matrices[0][1]
    with _core.RefreshScheduler(workers=1, test_delay_s=0.2) as sched:
        jid = sched.submit_eigh(0, 1, 2, view)
        view[0, 0] = 100.0  # written after submit: visible to the job only if it was not copied
        del snap, view
        gc.collect()
        assert pool.stats()["leases"] == 1  # the job holds the lease
        res = sched.wait(jid)
    assert res.ok and float(res.outputs["eigenvalues"].max()) == pytest.approx(100.0)
    deadline = time.time() + 5
    while pool.stats()["leases"] and time.time() < deadline:
        time.sleep(0.01)
    assert pool.stats()["leases"] == 0


def test_unaligned_lease_views_are_copied(pool):
    lease = pool.acquire(4096)
    raw = np.frombuffer(lease, dtype=np.uint8)
    a = raw[4 : 4 + 16 * 4].view(np.float32).reshape(4, 4)
    a[:] = np.eye(4, dtype=np.float32)
    with _core.RefreshScheduler(workers=1, test_delay_s=0.2) as sched:
        jid = sched.submit_eigh(0, 1, 2, a)
        a[0, 0] = 50.0  # not visible: an unaligned view is snapshotted by copy
        res = sched.wait(jid)
    np.testing.assert_allclose(res.outputs["eigenvalues"], np.ones(4))


def test_snapshot_budget_error_names_the_numbers():
    small = _core.PinnedPool(budget_bytes=8192)
    with pytest.raises(MemoryError, match="budget"):
        snapshot_to_host([torch.zeros(4, 64, 64)], small)


def test_snapshot_rejects_non_square(pool):
    with pytest.raises(ValueError, match=r"\(B, n, n\)"):
        snapshot_to_host([torch.zeros(2, 3, 4)], pool)


def test_optimizer_snapshots_live_in_the_shadow_pool():
    model = torch.nn.Linear(32, 16)
    opt = asteria.SOAP(model.parameters(), precondition_frequency=2, runtime=asteria.RuntimeConfig(staleness=3))
    pool = opt.runtime.runtime.shadow_pool
    try:
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(8, 32)).sum().backward()
            opt.step()
        assert pool.stats()["peak_in_use"] > 0  # the snapshots went through the pool
        assert "shadow_pool" in opt.runtime.runtime.scheduler_stats()
    finally:
        opt.close()
    gc.collect()
    deadline = time.time() + 5
    while pool.stats()["leases"] and time.time() < deadline:  # every snapshot is returned once its job is gone
        time.sleep(0.01)
    assert pool.stats()["leases"] == 0


# -- deferred copies: made by the worker, or by the training thread before it writes the statistics again ----------


def test_deferred_snapshot_is_filled_by_the_worker_before_its_job(pool):
    x = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64)).expand(2, 8, 8).clone()
    snap = snapshot_to_host([x], pool, defer=True)
    assert snap.copy is not None and not snap.copy.done and snap.copy.nbytes == 2 * 8 * 8 * 8
    assert snap.sources[0].data_ptr() == x.data_ptr()  # the live statistics, kept alive, not copied yet
    with _core.RefreshScheduler(workers=1) as sched:
        jid = sched.submit_eigh(0, 1, 2, snap.matrices[0][1], copy=snap.copy)
        res = sched.wait(jid)
    assert res.ok and snap.copy.done
    np.testing.assert_allclose(res.outputs["eigenvalues"], np.arange(1.0, 9.0))
    assert snap.copy.run() is False  # made by the worker: the training thread has nothing left to do
    x.mul_(100.0)  # writes after the copy are not seen by the snapshot
    np.testing.assert_array_equal(snap.matrices[0][0], np.diag(np.arange(1.0, 9.0)))


def test_deferred_snapshot_made_by_the_caller_when_the_worker_is_late(pool):
    x = torch.eye(8, dtype=torch.float32).expand(1, 8, 8).clone() * 3.0
    snap = snapshot_to_host([x], pool, defer=True)
    with _core.RefreshScheduler(workers=1, test_delay_s=0.3) as sched:
        jid = sched.submit_eigh(0, 1, 2, snap.matrices[0][0], copy=snap.copy)
        assert snap.copy.run() is True  # the worker has not started: this thread copies
        x.mul_(100.0)  # the next step writes the statistics: the job still sees the snapshot
        res = sched.wait(jid)
    np.testing.assert_allclose(res.outputs["eigenvalues"], np.full(8, 3.0))


def test_deferred_snapshot_of_non_contiguous_statistics_is_private(pool):
    base = torch.randn(8, 8, 2)
    x = base[..., 0].unsqueeze(0)  # (1, 8, 8), not contiguous: copied at once into a private tensor
    snap = snapshot_to_host([x], pool, defer=True)
    base.zero_()
    snap.copy.run()
    assert snap.matrices[0][0].any()


def test_a_worker_makes_every_queued_copy_before_its_job(pool):
    """The copies of snapshots taken after the job's own (queued meanwhile) leave with the first job a worker starts."""
    xs = [torch.full((1, 4, 4), float(i + 1)) for i in range(3)]
    snaps = [snapshot_to_host([x], pool, defer=True) for x in xs]
    queue = _core.CopyQueue()
    for snap in snaps:
        queue.push(snap.copy)
    with _core.RefreshScheduler(workers=1) as sched:
        res = sched.wait(sched.submit_eigh(0, 1, 2, snaps[0].matrices[0][0], copy=snaps[0].copy, copies=queue))
    assert res.ok and len(queue) == 0
    for i, snap in enumerate(snaps):
        assert snap.copy.run() is False  # made by the worker
        np.testing.assert_array_equal(snap.matrices[0][0], np.full((4, 4), float(i + 1), np.float32))


def test_deferred_copy_needs_a_lease_destination():
    with pytest.raises(ValueError, match="lease"):
        _core.DeferredCopy([(np.zeros((4, 4), np.float32), 0, 64)])


def _train(opt, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 32, generator=gen)).square().mean().backward()
        opt.step()


def _klsoap_run(cfg, scheduler=None, *, between_steps=None, steps=9, state_dtype=torch.float32):
    """KLSOAP on a small MLP; ``between_steps(opt)`` runs after every step. Returns (parameters, stats)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
    rt = asteria.Runtime(cfg, scheduler=scheduler)
    opt = asteria.KLSOAP(model.parameters(), lr=1e-2, precondition_frequency=3, state_dtype=state_dtype, runtime=rt)
    gen = torch.Generator().manual_seed(0)
    try:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(8, 32, generator=gen)).square().mean().backward()
            opt.step()
            if between_steps is not None:
                between_steps(opt)
        stats = opt.runtime.stats()
    finally:
        opt.close()
        rt.close()
    return [p.detach().clone() for p in model.parameters()], stats


def _wait_until_the_workers_are_idle(opt, timeout=60.0):
    """Returns once every job submitted so far has completed (a job's snapshot copy is made before it starts)."""
    sched = opt.runtime.scheduler
    deadline = time.monotonic() + timeout
    while (s := sched.stats())["completed"] < s["submitted"]:
        assert time.monotonic() < deadline, f"the refresh workers did not finish in {timeout} s: {s}"
        time.sleep(0.002)


# KLSOAP in 9 calls with f = 3 (steps t = 1..8 after the first call): the first call snapshots each factor of the two
# weights (4 snapshots, one job each: every bucket holds one block); the refreshes of t = 3 and t = 6 snapshot each
# factor with its basis (8 snapshots, one job each). Biases use the AdamW fallback.
FIRST_BASES, REFRESHES = 4, 8


def test_batches_the_step_waits_for_are_copied_at_once_and_equal_the_synchronous_algorithm():
    """Staleness 0 (sync, and async with S = 0): the step installs what it snapshotted, so nothing is left to the
    worker (deferral would only make the training thread wait for the worker's copy), and the bits are the same."""
    results = {}
    for mode in ("sync", "async"):
        params, stats = _klsoap_run(asteria.RuntimeConfig(refresh=mode, staleness=0))
        assert stats["jobs_submitted"] == FIRST_BASES + REFRESHES
        assert stats["snapshot_copies_deferred"] == 0
        assert stats["snapshot_copies_inline"] == FIRST_BASES + REFRESHES
        results[mode] = params
    for a, b in zip(results["sync"], results["async"]):
        assert torch.equal(a, b)


def test_async_refreshes_copy_their_snapshots_off_the_training_thread():
    """S > 0: a worker that is free makes the copy of each refresh snapshot before its job (the test waits for the
    workers between steps, so they are); the training thread copies only the first bases, which the first step waits
    for. Whoever copies, the numbers are the same: the run matches one whose every copy is made by the training thread
    (memory tiers turn deferral off)."""
    params, stats = _klsoap_run(asteria.RuntimeConfig(staleness=2), between_steps=_wait_until_the_workers_are_idle)
    assert stats["jobs_submitted"] == FIRST_BASES + REFRESHES
    assert stats["snapshot_copies_inline"] == FIRST_BASES
    assert stats["snapshot_copies_deferred"] == REFRESHES
    ref, ref_stats = _klsoap_run(asteria.RuntimeConfig(staleness=2, host_budget="64MiB"))
    assert ref_stats["snapshot_copies_deferred"] == 0 and ref_stats["snapshot_copies_inline"] == FIRST_BASES + REFRESHES
    for a, b in zip(ref, params):
        assert torch.equal(a, b)


def test_async_bf16_refreshes_copy_upcast_snapshots_on_the_training_thread():
    """bf16 state with S > 0: every snapshot is copied (upcast) by the training thread, none is left to the workers;
    the installs stay deterministic: the run repeats bit for bit whatever the workers' timing."""
    params, stats = _klsoap_run(asteria.RuntimeConfig(staleness=2), state_dtype=torch.bfloat16)
    assert stats["jobs_submitted"] == FIRST_BASES + REFRESHES and stats["jobs_failed"] == 0
    assert stats["snapshot_copies_deferred"] == 0
    assert stats["snapshot_copies_inline"] == FIRST_BASES + REFRESHES
    again, _ = _klsoap_run(asteria.RuntimeConfig(staleness=2), state_dtype=torch.bfloat16,
                           between_steps=_wait_until_the_workers_are_idle)
    for a, b in zip(params, again):
        assert torch.equal(a, b)


def test_tiered_state_is_snapshotted_at_once(tmp_path):
    model = torch.nn.Linear(32, 16)
    cfg = asteria.RuntimeConfig(staleness=2, host_budget="1MiB", nvme_path=str(tmp_path))
    opt = asteria.SOAP(model.parameters(), precondition_frequency=2, runtime=cfg)
    try:
        _train(opt, model, 6)
        stats = opt.runtime.stats()
    finally:
        opt.close()
    assert stats["jobs_submitted"] > 0
    assert stats["snapshot_copies_deferred"] == 0 and stats["snapshot_copies_inline"] > 0  # copied at once
