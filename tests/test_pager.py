"""asteria._core.Pager from Python: round trips through pinned leases, integrity, files, errors."""

import os
import stat

import numpy as np
import pytest
import torch

from asteria import _core
from helpers import io_uring_expected


def backend_or_skip(backend: str) -> str:
    """``backend``, skipping the test for "io_uring" only where the platform is declared to lack it."""
    expected, why = io_uring_expected()
    if backend == "io_uring" and not expected:
        pytest.skip(why)
    return backend


@pytest.fixture()
def pool():
    return _core.PinnedPool(budget_bytes=64 << 20)


def swap_fd_path(pager) -> str:
    """/proc/self/fd/N of the pager's swap file: the way to reach a file whose name was removed."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target in (pager.swap_path, pager.swap_path + " (deleted)"):
            return f"/proc/self/fd/{fd}"
    raise AssertionError("the pager holds no descriptor on its swap file")


@pytest.mark.parametrize("backend", ["io_uring", "threads"])
def test_roundtrip_through_leases_is_bit_identical(tmp_path, pool, backend):
    with _core.Pager(directory=str(tmp_path), backend=backend_or_skip(backend)) as pager:
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
        assert stats["backend"] == backend


def test_auto_picks_io_uring_where_the_platform_has_it(tmp_path):
    expected, why = io_uring_expected()
    with _core.Pager(directory=str(tmp_path)) as pager:
        s = pager.stats()
        if expected:
            assert s["backend"] == "io_uring", (
                f"io_uring could not be set up: {s['fallback_reason']} (set ASTERIA_NO_IO_URING=1 only where the "
                "platform lacks it)")
        else:
            assert s["backend"] == "threads" and s["fallback_reason"], "a fallback must say why"


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


@pytest.mark.parametrize("keep", [False, True])
def test_corruption_raises_oserror_naming_extent(tmp_path, pool, keep):
    with _core.Pager(directory=str(tmp_path), keep_swap_name=keep) as pager:
        lease = pool.acquire(4096)
        np.frombuffer(lease, dtype=np.uint8)[:] = 1
        e = pager.allocate(4096)
        pager.wait(pager.write(e, lease))
        with open(pager.swap_path if keep else swap_fd_path(pager), "r+b") as f:
            f.seek(10)
            f.write(b"\xff")
        with pytest.raises(OSError, match=f"extent {e} failed its CRC32C check") as info:
            pager.wait(pager.read(e, pool.acquire(4096)))
        assert (pager.swap_path if keep else f"the unlinked swap file in '{tmp_path}'") in str(info.value)


def test_swap_file_has_no_name_once_open(tmp_path, pool):
    """By default nothing of the swap file is visible on disk: a killed process can leave nothing behind."""
    pager = _core.Pager(directory=str(tmp_path))
    assert os.path.dirname(pager.directory) == str(tmp_path)
    assert os.listdir(tmp_path) == [] and not os.path.exists(pager.swap_path)
    assert not pager.stats()["swap_name_kept"]
    st = os.stat(swap_fd_path(pager))
    assert st.st_nlink == 0 and stat.S_IMODE(st.st_mode) == 0o600 and stat.S_ISREG(st.st_mode)
    src, dst = pool.acquire(8192), pool.acquire(8192)
    np.frombuffer(src, dtype=np.uint8)[:] = 9
    e = pager.allocate(8192)
    pager.wait(pager.write(e, src))
    pager.wait(pager.read(e, dst))
    assert bytes(memoryview(dst)) == bytes(memoryview(src))
    pager.close()
    assert os.listdir(tmp_path) == []


def test_kept_name_is_private_and_removed_on_close(tmp_path):
    pager = _core.Pager(directory=str(tmp_path), keep_swap_name=True)
    d, f = pager.directory, pager.swap_path
    assert pager.stats()["swap_name_kept"]
    assert os.path.dirname(d) == str(tmp_path)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(f).st_mode) == 0o600
    pager.close()
    pager.close()
    assert not os.path.exists(d)
    with pytest.raises(ValueError, match="closed"):
        pager.allocate(10)


def test_kept_name_removed_from_outside_keeps_working(tmp_path, pool):
    """Deleting the swap file and its directory under a running pager breaks neither I/O nor close()."""
    pager = _core.Pager(directory=str(tmp_path), keep_swap_name=True)
    v1, v2, out = pool.acquire(3 * 4096), pool.acquire(3 * 4096), pool.acquire(3 * 4096)
    np.frombuffer(v1, dtype=np.uint8)[:] = 1
    np.frombuffer(v2, dtype=np.uint8)[:] = 2
    e = pager.allocate(v1.nbytes)
    pager.wait(pager.write(e, v1))
    os.unlink(pager.swap_path)
    os.rmdir(pager.directory)
    pager.wait(pager.read(e, out))
    assert bytes(memoryview(out)) == bytes(memoryview(v1))
    f = pager.allocate(4096)
    pager.wait(pager.write(e, v2))
    pager.wait(pager.write(f, v1, nbytes=4096))
    pager.wait(pager.read(e, out))
    assert bytes(memoryview(out)) == bytes(memoryview(v2))
    pager.close()
    assert os.listdir(tmp_path) == []


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


@pytest.mark.parametrize("backend", ["io_uring", "threads"])
@pytest.mark.parametrize(
    "kind,op,match",
    [
        ("eio", "write", "Input/output error"),
        ("enospc", "write", "No space left on device: needed 8192 bytes"),
        ("short", "write", "short write"),
        ("eio", "read", "Input/output error"),
        ("short", "read", "short read"),
    ],
)
def test_injected_faults_are_clear_errors_and_lose_nothing(tmp_path, pool, backend, kind, op, match):
    """The test hook: every injected fault is an OSError naming the extent; no data is lost."""
    with _core.Pager(directory=str(tmp_path), backend=backend_or_skip(backend)) as pager:
        v1, v2 = pool.acquire(8192), pool.acquire(8192)
        np.frombuffer(v1, dtype=np.uint8)[:] = 1
        np.frombuffer(v2, dtype=np.uint8)[:] = 2
        e = pager.allocate(8192)
        pager.wait(pager.write(e, v1))
        pager.set_test_fault(kind, op=op)
        with pytest.raises(OSError, match=match) as info:
            if op == "write":
                pager.wait(pager.write(e, v2))
            else:
                pager.wait(pager.read(e, pool.acquire(8192)))
        assert f"extent {e}" in str(info.value)
        out = pool.acquire(8192)
        pager.wait(pager.read(e, out))  # the previous contents, intact
        assert np.all(np.frombuffer(out, dtype=np.uint8) == 1)
        assert np.all(np.frombuffer(v2, dtype=np.uint8) == 2)  # the caller's buffer, untouched
        assert pager.stats()["faults_injected"] == 1


def test_partial_transfer_is_completed(tmp_path, pool):
    with _core.Pager(directory=str(tmp_path)) as pager:
        src = pool.acquire(4 * 4096)
        np.frombuffer(src, dtype=np.uint8)[:] = np.arange(4 * 4096) % 251
        e = pager.allocate(src.nbytes)
        pager.set_test_fault("partial", count=2)
        pager.wait(pager.write(e, src))
        out = pool.acquire(src.nbytes)
        pager.wait(pager.read(e, out))
        assert bytes(memoryview(out)) == bytes(memoryview(src))
        assert pager.stats()["io_errors"] == 0


def test_fault_at_the_nth_request(tmp_path, pool):
    with _core.Pager(directory=str(tmp_path)) as pager:
        buf = pool.acquire(4096)
        e = pager.allocate(4096)
        pager.set_test_fault("eio", op="write", skip=2)
        pager.wait(pager.write(e, buf))
        pager.wait(pager.write(e, buf))
        with pytest.raises(OSError):
            pager.wait(pager.write(e, buf))
        pager.wait(pager.write(e, buf))
        with pytest.raises(ValueError, match="kind"):
            pager.set_test_fault("sometimes")


def test_registered_buffers(tmp_path, pool):
    with _core.Pager(directory=str(tmp_path), backend=backend_or_skip("io_uring")) as pager:
        ring = pool.acquire(2 * 8192)
        ok = pager.register_buffers([ring])
        s = pager.stats()
        assert ok, s["registration_error"]
        assert s["registered_buffers"] == 1 and s["registered_bytes"] == ring.capacity
        view = np.frombuffer(ring, dtype=np.uint8)
        view[:] = 3
        e = pager.allocate(2 * 8192)
        pager.wait(pager.write(e, ring))
        view[:] = 0
        pager.wait(pager.read(e, ring))
        assert np.all(view == 3)
        assert pager.stats()["fixed_ops"] == 2
        assert pager.stats()["read_busy_s"] > 0 and pager.stats()["write_busy_s"] > 0
    with _core.Pager(directory=str(tmp_path), backend="threads") as pager:
        assert not pager.register_buffers([pool.acquire(4096)])
        assert "io_uring" in pager.stats()["registration_error"]
