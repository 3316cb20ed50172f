"""asteria._core.PinnedPool: zero-copy torch views, lease lifetime, budgets and statistics."""

import gc

import numpy as np
import pytest
import torch

from asteria import _core


def test_torch_views_lease_without_copy():
    pool = _core.PinnedPool(budget_bytes=1 << 20)
    lease = pool.acquire(4096)
    t = torch.frombuffer(lease, dtype=torch.float32)
    assert t.data_ptr() == lease.address
    assert lease.address % 4096 == 0
    t.fill_(3.0)
    assert np.frombuffer(lease, dtype=np.float32)[0] == 3.0
    assert pool.stats()["in_use"] == 4096


def test_tensor_keeps_lease_alive():
    pool = _core.PinnedPool(budget_bytes=1 << 20)
    lease = pool.acquire(8192)
    t = torch.frombuffer(lease, dtype=torch.float64)
    t.fill_(1.5)
    del lease
    gc.collect()
    assert pool.stats()["leases"] == 1, "the lease must stay alive while a tensor views it"
    # A new lease must not reuse the memory the tensor still views.
    other = pool.acquire(8192)
    torch.frombuffer(other, dtype=torch.float64).fill_(-1.0)
    assert torch.all(t == 1.5)
    del t
    gc.collect()
    assert pool.stats()["leases"] == 1  # only `other`


def test_lease_outlives_pool_object():
    pool = _core.PinnedPool(budget_bytes=1 << 20)
    t = torch.frombuffer(pool.acquire(4096), dtype=torch.uint8)
    del pool
    gc.collect()
    t.fill_(7)
    assert int(t.sum()) == 7 * 4096


def test_budget_is_enforced_with_numbers():
    pool = _core.PinnedPool(budget_bytes=3 * 4096)
    keep = pool.acquire(2 * 4096)
    with pytest.raises(MemoryError, match="budget exhausted.*raise host_budget"):
        pool.acquire(2 * 4096)
    assert pool.stats()["in_use"] == 2 * 4096  # nothing lost
    assert keep.nbytes == 8192


def test_unlocked_fallback_warns():
    pool = _core.PinnedPool(budget_bytes=1 << 20, max_locked_bytes=0)
    lease = pool.acquire(4096)
    stats = pool.stats()
    assert not lease.locked and not stats["all_locked"]
    assert "ulimit -l" in stats["warning"]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        _core.PinnedPool(budget_bytes=0)
    pool = _core.PinnedPool(budget_bytes=4096)
    with pytest.raises(ValueError):
        pool.acquire(0)
