"""Pinned host pools that cannot page-lock their memory (asteria/runtime/pinned.py): the user is told, once per
pool, and the bytes are counted in memory_report()."""

from __future__ import annotations

import contextlib
import resource
import warnings

import pytest
import torch

import asteria
from asteria import _core
from asteria.runtime.pinned import PinnedMemoryWarning, acquire, pool_report


@contextlib.contextmanager
def memlock_limit(nbytes):
    """RLIMIT_MEMLOCK's soft limit at ``nbytes`` while the block runs (pools read it when they are created)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))


def test_an_unlockable_pool_warns_once_with_the_fix():
    pool = _core.PinnedPool(budget_bytes=1 << 20, max_locked_bytes=0)
    with pytest.warns(PinnedMemoryWarning, match=r"could not be page-locked.*ulimit -l.*memory for tests") as record:
        leases = [acquire(pool, 4096, "tests") for _ in range(3)]
    assert len(record) == 1 and not any(lease.locked for lease in leases)
    report = pool_report(pool)
    assert report["unlocked_bytes"] == report["reserved_bytes"] == 3 * 4096 and report["locked_bytes"] == 0
    assert "ulimit" in report["warning"]


def test_a_lockable_pool_is_silent():
    pool = _core.PinnedPool(budget_bytes=1 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PinnedMemoryWarning)
        lease = acquire(pool, 8192, "tests")
    if not lease.locked:
        pytest.skip(f"this process may not lock memory at all: {pool.stats()['warning']}")
    assert pool_report(pool)["unlocked_bytes"] == 0


def _run(tmp_path, memlock=None, steps=6):
    """SOAP on one weight with its state in the host tier (the device budget holds none of it) and S = 1 (deferred
    snapshots); RLIMIT_MEMLOCK at ``memlock`` while the optimizer is built and trained."""
    tmp_path.mkdir()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32))
    cfg = asteria.RuntimeConfig(staleness=1, device_budget="4KiB", host_budget="1MiB", nvme_path=str(tmp_path))
    with memlock_limit(memlock) if memlock is not None else contextlib.nullcontext():
        opt = asteria.SOAP([p], precondition_frequency=2, runtime=cfg)
        for _ in range(steps):
            p.grad = torch.randn_like(p)
            opt.step()
    report = opt.runtime.memory_report()
    opt.close()
    return p.detach(), report


def test_the_optimizer_reports_unpinned_snapshots_and_state(tmp_path):
    """With RLIMIT_MEMLOCK at 0, the runtime's shadow pool and the host tier's pool give pageable memory: each warns
    once, memory_report()["pinned"] counts the bytes, and training goes on with the same numbers."""
    with pytest.warns(PinnedMemoryWarning) as record:
        unpinned, report = _run(tmp_path / "a", memlock=0)
    purposes = sorted(str(w.message).rsplit("memory for ", 1)[1].split(";")[0] for w in record)
    assert purposes == ["shadow snapshots", "the host tier and the NVMe staging buffers"]
    assert report["tiers"]["host"] > 0
    pinned = report["pinned"]
    assert pinned["shadow"]["unlocked_bytes"] > 0 and pinned["state"]["unlocked_bytes"] > 0
    assert pinned["shadow"]["locked_bytes"] == pinned["state"]["locked_bytes"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PinnedMemoryWarning)  # (a machine that may lock nothing at all)
        pinned_run, _ = _run(tmp_path / "b")
    assert torch.equal(unpinned, pinned_run)  # pageable memory changes nothing but speed
