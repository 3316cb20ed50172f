"""Per-step telemetry of the refresh runtime: step time, stall time, jobs submitted and installed.

`StepTimeline` is filled by `RefreshPipeline` (``begin_step``/``end_step`` around every optimizer
``step()``) and read through ``opt.runtime.stats()``. Everything is plain Python numbers so the stats are
JSON-serialisable.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from typing import Any

__all__ = ["StepTimeline", "summarize"]


def summarize(values: list[float]) -> dict[str, float]:
    """Returns count, mean, p50, p90, p99 and max of ``values`` (nearest-rank percentiles; zeros when empty)."""
    if not values:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])

    return {
        "count": len(ordered),
        "mean": float(sum(ordered) / len(ordered)),
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": float(ordered[-1]),
    }


@dataclasses.dataclass
class _Current:
    start: float
    stall_s: float = 0.0
    submitted: int = 0
    installed: int = 0
    submit_s: float = 0.0
    install_s: float = 0.0


class StepTimeline:
    """Records one entry per optimizer step.

    Per step: ``step_s`` (wall time inside ``step()``), ``stall_s`` (time the training thread waited for a
    refresh result that was due), ``submit_s`` (time spent snapshotting and submitting refresh jobs),
    ``install_s`` (time spent installing results, stalls excluded), ``jobs_submitted`` and
    ``jobs_installed``. Per installed batch: its
    staleness (install step minus the step the synchronous algorithm would have used it, so 0..S) and
    whether it stalled.
    """

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.stall_s: list[float] = []
        self.jobs_submitted: list[int] = []
        self.jobs_installed: list[int] = []
        self.submit_s: list[float] = []
        self.install_s: list[float] = []
        self.staleness: list[int] = []
        self._cur: _Current | None = None
        self._outside = _Current(0.0)  # work recorded outside a step (direct pipeline use, checkpoints)

    def begin_step(self) -> None:
        self._cur = _Current(time.perf_counter())

    def end_step(self) -> None:
        cur = self._cur
        if cur is None:
            return
        self.step_s.append(time.perf_counter() - cur.start)
        self.stall_s.append(cur.stall_s)
        self.jobs_submitted.append(cur.submitted)
        self.jobs_installed.append(cur.installed)
        self.submit_s.append(cur.submit_s)
        self.install_s.append(cur.install_s)
        self._cur = None

    def _target(self) -> _Current:
        return self._cur if self._cur is not None else self._outside

    def add_stall(self, seconds: float) -> None:
        self._target().stall_s += seconds

    def add_submitted(self, jobs: int) -> None:
        self._target().submitted += jobs

    def add_submit_time(self, seconds: float) -> None:
        self._target().submit_s += seconds

    def add_install_time(self, seconds: float) -> None:
        self._target().install_s += seconds

    def add_installed(self, jobs: int, staleness: int) -> None:
        self._target().installed += jobs
        self.staleness.append(int(staleness))

    def as_dict(self) -> dict[str, Any]:
        """The timeline (lists, one entry per step) and summaries (percentiles of step and stall time)."""
        return {
            "timeline": {
                "step_s": list(self.step_s),
                "stall_s": list(self.stall_s),
                "jobs_submitted": list(self.jobs_submitted),
                "jobs_installed": list(self.jobs_installed),
                "submit_s": list(self.submit_s),
                "install_s": list(self.install_s),
            },
            "installed_staleness": list(self.staleness),
            "staleness_histogram": dict(sorted(Counter(self.staleness).items())),
            "summary": {
                "steps": len(self.step_s),
                "step_s": summarize(self.step_s),
                "stall_s": summarize(self.stall_s),
                "submit_s": summarize(self.submit_s),
                "install_s": summarize(self.install_s),
                "stalled_steps": sum(1 for s in self.stall_s if s > 0.0),
                "max_staleness": max(self.staleness) if self.staleness else 0,
            },
        }
