"""asteria.train.rss: each run's own peak resident set, in a process several runs share."""

import mmap
import sys
import threading

import pytest

from asteria.train import rss

def _touched(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size)
    for off in range(0, size, mmap.PAGESIZE):
        m[off] = 1
    return m


linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")


@linux
def test_the_peak_is_the_runs_own_not_the_processes_earlier_one():
    # Fresh anonymous mappings, so that the pages are new to the process whatever its allocator already holds.
    big = _touched(64 * 2**20)  # 64 MiB resident, then unmapped: the process's peak so far
    big.close()
    mark = rss.reset_peak()
    assert mark.reset and mark.start_rss_bytes > 0
    small = _touched(8 * 2**20)  # this "run" touches 8 MiB
    got = rss.peak(mark)
    small.close()
    assert got["start_rss_bytes"] == mark.start_rss_bytes
    assert mark.start_rss_bytes + 4 * 2**20 <= got["peak_rss_bytes"] < mark.start_rss_bytes + 48 * 2**20
    assert "gpu_peak_allocated_bytes" not in got


def test_without_a_reset_the_peak_is_unknown_not_wrong(monkeypatch):
    real_open = open

    def no_clear_refs(path, *args, **kwargs):
        if str(path).endswith("clear_refs"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_clear_refs)
    mark = rss.reset_peak()
    assert not mark.reset and rss.peak(mark)["peak_rss_bytes"] is None


@pytest.mark.skipif(rss.allocator_stats() is None, reason="not glibc's allocator")
def test_allocator_stats_count_the_blocks_a_thread_keeps():
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    in_use = lambda s: sum(s[f"{k}_arena_bytes"] - s[f"{k}_arena_free_bytes"] for k in ("main", "thread"))  # noqa: E731
    before = rss.allocator_stats()
    kept = []
    t = threading.Thread(target=lambda: kept.extend(libc.malloc(4096) for _ in range(8192)))  # 32 MiB in a thread
    t.start()
    t.join()
    try:
        after = rss.allocator_stats()
        assert set(after) == set(before) and all(v >= 0 for v in after.values())
        assert after["main_arena_free_bytes"] <= after["main_arena_bytes"]
        assert after["thread_arena_free_bytes"] <= after["thread_arena_bytes"]
        assert in_use(after) >= in_use(before) + 30 * (1 << 20)
    finally:
        for p in kept:
            libc.free(p)
