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
def test_allocator_stats_see_a_threads_arena_and_the_free_bytes_it_keeps():
    before = rss.allocator_stats()
    kept = []

    def work():  # many mid-sized blocks from a new thread's arena, half of them freed again
        blocks = [bytearray(4096) for _ in range(2048)]
        kept.extend(blocks[::2])
        del blocks

    t = threading.Thread(target=work)
    t.start()
    t.join()
    after = rss.allocator_stats()
    assert set(after) == set(before) and all(v >= 0 for v in after.values())
    assert after["arenas"] >= 1 and after["main_arena_bytes"] > 0
    assert after["main_arena_free_bytes"] <= after["main_arena_bytes"]
    assert after["thread_arena_free_bytes"] <= after["thread_arena_bytes"]
    total = lambda s: s["main_arena_bytes"] + s["thread_arena_bytes"]  # noqa: E731
    assert total(after) >= total(before) + 1024 * 4096  # the kept half is in some arena
