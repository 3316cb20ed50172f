"""The refresh pipeline: submits refresh jobs to the C++ scheduler and installs their results.

A refresh is a *batch* of jobs (one per Kronecker factor of each block of a bucket) that the optimizer
snapshots at step ``s`` (the job ``version``) and that must be installed at the step boundary
``deadline = s + o + S`` (ALGORITHMS.md, "Staleness and install rule"). The optimizer hands the pipeline
the jobs and an *installer*: a callable taking the completed `JobResult`s in job order. The pipeline
decides only **when** that installer runs. The synchronous pipeline implemented here waits for every job
of a batch at its deadline (which, with S = 0, is the step that submitted it for Shampoo and the next
step boundary for SOAP and KL); an asynchronous pipeline changes only that decision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from asteria.runtime.config import DEFAULT_RUNTIME_CONFIG, RuntimeConfig

__all__ = ["RefreshJob", "RefreshPipeline", "JOB_KINDS"]

JOB_KINDS = ("eigh", "inverse_root", "eigenbasis_refresh")


@dataclasses.dataclass(frozen=True)
class RefreshJob:
    """One matrix job for the scheduler.

    Attributes:
        kind: ``"eigh"``, ``"inverse_root"`` or ``"eigenbasis_refresh"``.
        block_id: Optimizer-wide id of the block (with ``factor``, names the job in errors).
        factor: Which Kronecker factor (tensor dim) of the block.
        version: Snapshot step s.
        deadline: Step boundary at which the result is installed (s + o + S).
        a: The (n, n) C-contiguous float32/float64 matrix (a snapshot owned by the job).
        q: The installed basis for ``"eigenbasis_refresh"``, else None.
        options: Keyword options for the scheduler call (ridge, descending, root, epsilon, sort, ...).
    """

    kind: str
    block_id: int
    factor: int
    version: int
    deadline: int
    a: np.ndarray
    q: np.ndarray | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Pending:
    jobs: list[RefreshJob]
    job_ids: list[int]
    install: Callable[[Sequence[Any]], None]
    deadline: int


class RefreshPipeline:
    """Submits refresh jobs to `asteria._core.RefreshScheduler` and installs results at step boundaries.

    The pipeline owns the scheduler (started lazily on the first submit) and is a context manager with an
    explicit `close()`.

    Args:
        config: The runtime configuration (only ``refresh="sync"`` is implemented).
        offset: The optimizer's install offset o (0 for Shampoo, 1 for SOAP and KL).
        scheduler: An existing scheduler to use instead of starting one (it is not closed by `close()`).
    """

    def __init__(self, config: RuntimeConfig | None = None, *, offset: int = 0, scheduler: Any = None) -> None:
        self.config = DEFAULT_RUNTIME_CONFIG if config is None else config
        if not isinstance(self.config, RuntimeConfig):
            raise TypeError(f"runtime must be an asteria.RuntimeConfig, got {type(self.config).__name__}")
        if offset not in (0, 1):
            raise ValueError(f"offset must be 0 or 1, got {offset!r}")
        self.offset = offset
        self._scheduler = scheduler
        self._owns_scheduler = scheduler is None
        self._pending: list[_Pending] = []
        self._closed = False
        self._stats_sources: dict[str, Callable[[], Any]] = {}
        self._counters = {
            "jobs_submitted": 0,
            "jobs_ok": 0,
            "jobs_failed": 0,
            "batches_installed": 0,
            "wait_s": 0.0,
            "job_latency_s": 0.0,
        }

    # -- scheduling rule -------------------------------------------------------------------------
    def deadline(self, version: int) -> int:
        """Returns the step boundary at which a snapshot of step ``version`` is installed."""
        return version + self.offset + self.config.staleness

    # -- scheduler handle ------------------------------------------------------------------------
    @property
    def scheduler(self) -> Any:
        """The `_core.RefreshScheduler`, started on first use."""
        if self._closed:
            raise RuntimeError("[RefreshPipeline] the pipeline was closed")
        if self._scheduler is None:
            from asteria import _core  # imported lazily: constructing an optimizer needs no worker threads

            self._scheduler = _core.RefreshScheduler(
                workers=self.config.resolved_workers(), queue_capacity=4096, blas_threads=1
            )
        return self._scheduler

    def submit(self, jobs: Sequence[RefreshJob], install: Callable[[Sequence[Any]], None]) -> None:
        """Submits a batch of jobs whose results are installed together by ``install``.

        Args:
            jobs: The jobs; all must share one deadline.
            install: Called at the deadline with the completed `JobResult`s, in the order of ``jobs``.
                It must cope with failed results (``ok`` False) by keeping the previous state.

        Raises:
            ValueError: If the jobs disagree on the deadline or name an unknown kind.
        """
        if not jobs:
            return
        deadlines = {job.deadline for job in jobs}
        if len(deadlines) != 1:
            raise ValueError(f"[RefreshPipeline.submit] one batch must share one deadline, got {sorted(deadlines)}")
        sched = self.scheduler
        ids = [self._submit_one(sched, job) for job in jobs]
        self._counters["jobs_submitted"] += len(ids)
        self._pending.append(_Pending(list(jobs), ids, install, deadlines.pop()))

    @staticmethod
    def _submit_one(sched: Any, job: RefreshJob) -> int:
        if job.kind == "eigh":
            return sched.submit_eigh(job.block_id, job.version, job.deadline, job.a, **job.options)
        if job.kind == "inverse_root":
            return sched.submit_inverse_root(job.block_id, job.version, job.deadline, job.a, **job.options)
        if job.kind == "eigenbasis_refresh":
            return sched.submit_eigenbasis_refresh(job.block_id, job.version, job.deadline, job.a, job.q, **job.options)
        raise ValueError(f"[RefreshPipeline.submit] unknown job kind {job.kind!r}; expected one of {JOB_KINDS}")

    def install_due(self, step: int) -> int:
        """Installs every pending batch whose deadline is at or before the step boundary ``step``.

        In the synchronous pipeline this blocks until the batch's jobs are done (the time is counted as
        ``wait_s``).

        Args:
            step: The step about to use the results.

        Returns:
            The number of batches installed.
        """
        due = [p for p in self._pending if p.deadline <= step]
        if not due:
            return 0
        self._pending = [p for p in self._pending if p.deadline > step]
        for pending in due:
            start = time.perf_counter()
            results = [self._scheduler.wait(jid) for jid in pending.job_ids]
            self._counters["wait_s"] += time.perf_counter() - start
            for res in results:
                self._counters["jobs_ok" if res.ok else "jobs_failed"] += 1
                self._counters["job_latency_s"] += float(res.latency_s)
            pending.install(results)
            self._counters["batches_installed"] += 1
        return len(due)

    def pending(self) -> int:
        """Returns the number of batches submitted and not installed yet."""
        return len(self._pending)

    def add_stats_source(self, name: str, fn: Callable[[], Any]) -> None:
        """Adds a named value computed by ``fn`` to `stats` (e.g. the optimizer's non-finite step count)."""
        self._stats_sources[name] = fn

    def stats(self) -> dict[str, Any]:
        """Returns refresh counts, failures and time spent waiting (plus the scheduler's own stats)."""
        out: dict[str, Any] = dict(self._counters)
        out["refresh"] = self.config.refresh
        out["staleness"] = self.config.staleness
        out["pending_batches"] = len(self._pending)
        for name, fn in self._stats_sources.items():
            out[name] = fn()
        if self._scheduler is not None and not self._closed:
            out["scheduler"] = dict(self._scheduler.stats())
        return out

    def close(self) -> None:
        """Cancels pending jobs and stops the scheduler (if this pipeline started it)."""
        if self._closed:
            return
        if self._scheduler is not None:
            for pending in self._pending:
                for jid in pending.job_ids:
                    self._scheduler.cancel(jid)
            if self._owns_scheduler:
                self._scheduler.close()
        self._pending = []
        self._closed = True

    def __enter__(self) -> RefreshPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: worker threads should not outlive the optimizer
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
