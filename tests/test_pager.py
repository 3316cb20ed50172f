"""asteria._core.Pager from Python: round trips through pinned leases, integrity, files, errors."""

import os
import stat

import numpy as np
import pytest
import torch

from asteria import _core


@pytest.fixture()
def pool():
    return _core.PinnedPool(budget_bytes=64 << 20)


@pytest.mark.parametrize("backend", ["auto", "threads"])
def test_roundtrip_through_leases_is_bit_identical(tmp_path, pool, backend):
    with _core.Pager(directory=str(tmp_path), backend=backend) as pager:
        src = pool.acquire(3 * 4096 + 100)
        t = torch.frombuffer(src, dtype=torch.uint8)
        t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
        extent = pager.allocate(src.nbytes)
        pager.wait(pager.write(extent, src))
        dst = pool.acquire(src.nbytes)
        pager.wait(pager.read(extent, dst))
        assert bytes(memoryview(dst)) == bytes(memoryview(src))
        stats = pager.stats()
        assert stats["bytes_written"] == src.nbytes and stats["bytes_read"] == src.nbytes
        assert stats["backend"] in ("io_uring", "threads")


def test_backend_choice_is_reported(tmp_path):
    with _core.Pager(directory=str(tmp_path)) as pager:
        s = pager.stats()
        assert s["backend"] == "io_uring" or s["fallback_reason"], "a fallback must say why"


def test_lease_stays_alive_while_in_flight(tmp_path, pool):
    with _core.Pager(directory=str(tmp_path)) as pager:
        lease = pool.acquire(1 << 20)
        np.frombuffer(lease, dtype=np.uint8)[:] = 7
        e = pager.allocate(lease.nbytes)
        ticket = pager.write(e, lease)
        del lease  # the pager holds it until wait()
        pager.wait(ticket)
        out = pool.acquire(1 << 20)
        pager.wait(pager.read(e, out))
        assert np.all(np.frombuffer(out, dtype=np.uint8) == 7)


def test_corruption_raises_oserror_naming_extent(tmp_path, pool):
    with _core.Pager(directory=str(tmp_path)) as pager:
        lease = pool.acquire(4096)
        np.frombuffer(lease, dtype=np.uint8)[:] = 1
        e = pager.allocate(4096)
        pager.wait(pager.write(e, lease))
        with open(pager.swap_path, "r+b") as f:
            f.seek(10)
            f.write(b"\xff")
        with pytest.raises(OSError, match=f"extent {e} failed its CRC32C check"):
            pager.wait(pager.read(e, pool.acquire(4096)))


def test_private_directory_modes_and_removal(tmp_path):
    pager = _core.Pager(directory=str(tmp_path))
    d, f = pager.directory, pager.swap_path
    assert os.path.dirname(d) == str(tmp_path)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(f).st_mode) == 0o600
    pager.close()
    pager.close()
    assert not os.path.exists(d)
    with pytest.raises(ValueError, match="closed"):
        pager.allocate(10)


def test_unwritable_directory_is_a_clear_oserror(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores the mode bits
        target = "/proc/asteria-no-such-dir"
    else:
        target = str(ro)
    with pytest.raises(OSError, match="choose a writable nvme_path"):
        _core.Pager(directory=target)


def test_bad_arguments(tmp_path, pool):
    with pytest.raises(ValueError, match="backend"):
        _core.Pager(directory=str(tmp_path), backend="aio")
    with _core.Pager(directory=str(tmp_path)) as pager:
        e = pager.allocate(100)
        with pytest.raises(ValueError, match="no valid data"):
            pager.read(e, pool.acquire(4096))
        with pytest.raises(ValueError, match="exceeds"):
            pager.write(e, pool.acquire(100), nbytes=200)


def test_crc32c_check_value():
    assert _core.crc32c(b"123456789") == 0xE3069283
