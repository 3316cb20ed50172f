"""asteria.train.rss: each run's own peak resident set, in a process several runs share."""

import sys

import numpy as np
import pytest

from asteria.train import rss

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")


@linux
def test_the_peak_is_the_runs_own_not_the_processes_earlier_one():
    big = np.ones(64 * 2**20 // 8)  # 64 MiB touched, then freed: the process's peak so far
    del big
    mark = rss.reset_peak()
    assert mark.reset and mark.start_rss_bytes > 0
    small = np.ones(8 * 2**20 // 8)  # this "run" touches 8 MiB
    got = rss.peak(mark)
    del small
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
