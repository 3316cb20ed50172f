"""The refresh pipeline: submits refresh jobs to the worker pool and installs their results between steps.

A refresh is a *batch* of jobs (one per Kronecker factor of each block of a bucket) that the optimizer
snapshots at step ``s`` (the job ``version``) and that is installed at the step boundary ``deadline = s + o + S``
(docs/algorithms.md §6.1). The optimizer hands the pipeline the jobs and an
*installer*: a callable taking the completed `JobResult`s in job order. The pipeline decides only **when**
that installer runs:

* ``install="deterministic"``: exactly at the deadline, waiting for a late batch (counted as a stall), so a
  run is bit-reproducible whatever the thread timing. With ``staleness=0`` this is the synchronous
  algorithm (``refresh="sync"`` is exactly this with S = 0).
* ``install="eager"``: at the first install point after every job of the batch is done, and never later
  than the deadline.

Snapshots of CPU statistics taken for a batch installed at a later step (S > 0) are *deferred copies*
(`asteria.runtime.shadow`; a batch the same step waits for is copied at once): the pipeline hands the worker
the statistics and pinned leases to copy them into, and the worker makes the copies before it starts the jobs
(all pending ones, through the runtime's copy queue), off the training thread. `settle` makes the ones not
made yet on the training thread, and is called before anything writes the statistics again: at the start of
every step, before installs, before checkpoints export or import pending batches, and at close. A snapshot
therefore always holds the values of its step, whichever thread copied it.

Installs are started only at the optimizer's install points inside ``step()`` (between the statistics of one
step and the direction that uses them). With ``RuntimeConfig.parallel_install`` they may run on a helper thread:
Shampoo's batches of one step are split between the training thread and the helper, and SOAP's and KL's, which
are used from the next step, run on the helper while the next forward and backward are computed; everything
that reads or replaces the state waits for them first (`finish_installs`). At most one refresh per block is in
flight: the optimizer skips refresh steps with `accepted_refresh_step`, a rule of s, o, S and f only (with
``staleness="auto"``, of the epochs of `asteria.runtime.staleness.StalenessSchedule`).

In a distributed run (`asteria.runtime.distributed` sets ``distributed`` and ``exchange``) installs are
deterministic, ``submit`` hands the scheduler only the jobs this rank owns, and at the install step one
exchange round gives every rank every result of the due batches, so all ranks install the same bytes.

For checkpoints, `export_pending` waits for the in-flight batches and returns their results with the
optimizer's *tag* (a picklable description of what the batch refreshes); `import_pending` re-creates them
so a resumed run installs the same results at the same steps.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from asteria.runtime.config import DEFAULT_RUNTIME_CONFIG, RuntimeConfig
from asteria.runtime.gpu import route_for
from asteria.runtime.shadow import Snapshot, snapshot_on_device, snapshot_to_host
from asteria.runtime.staleness import StalenessSchedule
from asteria.runtime.telemetry import StepTimeline
from asteria.runtime.workers import INSTALL_THREAD_NAME, Runtime

__all__ = [
    "JOB_KINDS",
    "RefreshFailureWarning",
    "RefreshJob",
    "RefreshPipeline",
    "StoredResult",
    "accepted_refresh_step",
]

JOB_KINDS = ("eigh", "inverse_root", "eigenbasis_refresh")


class RefreshFailureWarning(RuntimeWarning):
    """A background refresh failed; the previous preconditioner is kept (and the failure counted)."""


def accepted_refresh_step(t: int, is_refresh: Callable[[int], bool], first: int | float, frequency: int, gap: int) -> bool:
    """Whether refresh step ``t`` of a block is taken under the at-most-one-in-flight rule.

    A refresh taken at step s is pending until its install at ``s + gap`` (``gap = o + S``); a refresh step
    s' with ``s' < s + gap`` is skipped. Starting from the first refresh step, the taken steps are therefore
    a pure function of the step numbers (never of timing), identical on every run and every rank.

    Args:
        t: The step (1-based, the optimizer's step counter after increment).
        is_refresh: The optimizer's refresh-step predicate.
        first: The first refresh step (``math.inf``: never).
        frequency: Refresh interval f (refresh steps after ``first`` are multiples of f).
        gap: ``o + S``.

    Returns:
        True when step t refreshes.
    """
    if not is_refresh(t):
        return False
    if gap <= 1 or first == math.inf:
        return True
    a0 = int(first)
    if t <= a0:
        return t == a0
    # after `first`, refresh steps are the multiples of f; each taken one is followed by the first
    # multiple of f at least `gap` later, so from the second taken step on the stride is f*ceil(gap/f)
    a1 = -(-max(a0 + gap, a0 + 1) // frequency) * frequency
    stride = frequency * -(-gap // frequency)
    return t >= a1 and (t - a1) % stride == 0


@dataclasses.dataclass(frozen=True)
class RefreshJob:
    """One matrix job for the scheduler.

    Attributes:
        kind: ``"eigh"``, ``"inverse_root"`` or ``"eigenbasis_refresh"``.
        block_id: Optimizer-wide id of the block (with ``factor``, names the job in errors).
        factor: Which Kronecker factor (tensor dim) of the block.
        version: Snapshot step s.
        deadline: Step boundary at which the result is installed (s + o + S).
        a: The (n, n) float32/float64 snapshot (`RefreshPipeline.snapshot`): a numpy view of a pinned lease
            (host route; the scheduler reads it in place) or any C-contiguous array (copied at submit), or a
            CUDA tensor (device route). On the host route the job writes its n×n result (eigenvectors, root,
            basis) over it, so a lease view must not be read after the job is submitted.
        q: The installed basis for ``"eigenbasis_refresh"``, else None (same kind as ``a``); the host route writes
            the rotation over it.
        options: Keyword options for the scheduler call (ridge, descending, root, epsilon, sort, ...).
        ready: The CUDA event of the snapshot's device-to-host copy, waited for by the worker (host route of
            CUDA statistics), else None.
        copy: The deferred copy filling ``a``/``q`` (`Snapshot.copy`, host route of CPU statistics), made by the
            worker before the job unless made already, else None.
    """

    kind: str
    block_id: int
    factor: int
    version: int
    deadline: int
    a: np.ndarray
    q: np.ndarray | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    ready: Any = None
    copy: Any = None


def _to_cpu_tensor(v: Any) -> torch.Tensor:
    """A result array (numpy, or a CUDA tensor of the device route) as an owned CPU tensor."""
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu").clone()
    return torch.from_numpy(np.array(v))


@dataclasses.dataclass
class StoredResult:
    """A job result restored from a checkpoint (the fields of ``_core.JobResult`` the installers read)."""

    ok: bool
    status: str
    message: str
    outputs: dict[str, np.ndarray]
    version: int
    deadline: int
    block_id: int = 0
    latency_s: float = 0.0


@dataclasses.dataclass
class _Pending:
    seq: int
    job_ids: list[int]
    install: Callable[[Sequence[Any]], None]
    version: int
    deadline: int
    tag: Any = None
    results: list[Any] | None = None  # set when restored from a checkpoint
    plan: Any = None  # distributed: the exchange's plan of the batch (job ids are None for jobs owned elsewhere)


def _run_installs(work: Sequence[tuple[_Pending, list[Any]]], started: set[int]) -> None:
    """Installs the batches in order, recording each one (``id``) in ``started`` just before it is installed."""
    for pending, results in work:
        started.add(id(pending))
        pending.install(results)


def _overlap_safe(pending: _Pending, results: Sequence[Any]) -> bool:
    """Whether a due batch may be installed on the helper thread while training goes on (`install_due`)."""
    check = getattr(pending.install, "overlap_safe", None)
    return bool(check is not None and check(results))


def _install_cost(results: Sequence[Any]) -> int:
    """A batch's install work: n³ summed over its results (n: the size of each result's matrix), at least 1."""
    total = 0
    for res in results:
        outputs = getattr(res, "outputs", None) or {}
        for value in outputs.values():
            shape = getattr(value, "shape", ())
            if len(shape) == 2:
                total += int(shape[0]) ** 3
                break
    return max(total, 1)


def _split_installs(work: list[tuple[_Pending, list[Any]]]) -> tuple[list[Any], list[Any]] | None:
    """Two groups of batches for `RefreshPipeline._install`, or None when they may not be split.

    Not split unless every installer declares ``parallel_safe``, some installer's work ``parallel_pays`` (copies
    alone are faster on one thread), and every tag names its blocks. Batches sharing a block are joined into one
    unit (kept together, in order); units go, largest first, to the lighter group.
    """
    if not all(getattr(p.install, "parallel_safe", False) for p, _ in work):
        return None
    if not any(getattr(p.install, "parallel_pays", True) for p, _ in work):
        return None
    keys: list[set[Any]] = []
    for pending, _ in work:
        tag = pending.tag
        blocks = tag.get("blocks") if isinstance(tag, dict) else None
        if not blocks:
            return None
        keys.append({tuple(k) if isinstance(k, list) else k for k in blocks})
    units: list[list[int]] = []
    for i in range(len(work)):
        joined = [u for u in units if any(keys[i] & keys[j] for j in u)]
        merged = [j for u in joined for j in u] + [i]
        units = [u for u in units if u not in joined] + [merged]
    if len(units) < 2:
        return None
    cost = [_install_cost(results) for _, results in work]
    units.sort(key=lambda u: -sum(cost[i] for i in u))
    groups: tuple[list[int], list[int]] = ([], [])
    loads = [0, 0]
    for unit in units:
        g = 0 if loads[0] <= loads[1] else 1
        groups[g].extend(unit)
        loads[g] += sum(cost[i] for i in unit)
    return [work[i] for i in sorted(groups[0])], [work[i] for i in sorted(groups[1])]


class RefreshPipeline:
    """Submits refresh jobs to a worker pool and installs results at step boundaries.

    Args:
        config: A `RuntimeConfig` (the pipeline starts its own `Runtime`, closed with the pipeline) or a
            shared `Runtime` (left open by `close`). None: ``RuntimeConfig()``.
        offset: The optimizer's install offset o (0 for Shampoo, 1 for SOAP and KL).
        scheduler: An existing scheduler for a pipeline's own `Runtime` (tests use this to inject failures
            or delays); it is closed with the pipeline.
    """

    def __init__(self, config: RuntimeConfig | Runtime | None = None, *, offset: int = 0, scheduler: Any = None) -> None:
        if isinstance(config, Runtime):
            if scheduler is not None:
                raise ValueError("[RefreshPipeline] pass scheduler= to the shared Runtime, not to the pipeline")
            self._runtime = config
            self._owns_runtime = False
        else:
            cfg = DEFAULT_RUNTIME_CONFIG if config is None else config
            if not isinstance(cfg, RuntimeConfig):
                raise TypeError(
                    f"runtime must be an asteria.RuntimeConfig or an asteria.Runtime, got {type(cfg).__name__}"
                )
            self._runtime = Runtime(cfg, scheduler=scheduler)
            self._owns_runtime = True
        if offset not in (0, 1):
            raise ValueError(f"offset must be 0 or 1, got {offset!r}")
        self.config = self._runtime.config
        self.offset = offset
        self._runtime.attach(self)
        self._pending: list[_Pending] = []
        self._seq = 0
        self._hook_collects = True  # see on_grad_ready
        # Distributed runs (set by asteria.runtime.distributed): installs are deterministic, and with an
        # exchange each job is submitted by its owner only and the results are exchanged at the install step.
        self.distributed = False
        self.exchange: Any = None
        # Makes the ranks agree on an S chosen from measurement (the largest); set by asteria.runtime.distributed.
        self.agree_max: Callable[[int], int] = lambda value: value
        self.schedule = StalenessSchedule(self.config.staleness, offset, self.config.staggered)
        self._last_begin: float | None = None
        self._closed = False
        self._stats_sources: dict[str, Callable[[], Any]] = {}
        self._unsettled: list[Snapshot] = []  # deferred snapshot copies not known to be made (see `settle`)
        # installs running on the helper thread while the training loop computes the next step (`install_due`
        # with ``overlap``): (future, the batches in order, the ids of those started)
        self._overlap: tuple[Any, list[tuple[_Pending, list[Any]]], set[int]] | None = None
        self.timeline = StepTimeline()
        self._failures: list[str] = []
        self._counters = {
            "jobs_submitted": 0,
            "jobs_ok": 0,
            "jobs_failed": 0,
            "batches_installed": 0,
            "parallel_installs": 0,
            "overlapped_installs": 0,
            "snapshot_copies_deferred": 0,
            "snapshot_copies_inline": 0,
            "stalls": 0,
            "wait_s": 0.0,
            "job_latency_s": 0.0,
        }

    # -- scheduling rule -------------------------------------------------------------------------
    @property
    def staleness(self) -> int:
        """The bound S new snapshots get (with ``staleness="auto"``: the one chosen so far, see `schedule`)."""
        return self.schedule.current

    @property
    def is_async(self) -> bool:
        return self.config.refresh == "async"

    def deadline(self, version: int) -> int:
        """Returns the step boundary at which a snapshot of step ``version`` is installed."""
        return version + self.offset + self.schedule.staleness_at(version)

    @property
    def staggered(self) -> bool:
        """Whether blocks refresh at staggered phases (``RuntimeConfig.refresh_phases``)."""
        return self.config.staggered

    def accepts(self, t: int, is_refresh: Callable[[int], bool], first: int | float, frequency: int,
                phase: int | None = None, block: Any = None) -> bool:
        """Whether refresh step ``t`` is taken (`accepted_refresh_step` with ``gap = o + S``, applied to ``t − phase``
        for the block ``block`` (its stable key) of staggered phase ``phase``; with ``staleness="auto"``, S is chosen once the measured rounds are
        in, see `asteria.runtime.staleness.StalenessSchedule.accepts`)."""
        return self.schedule.accepts(t, is_refresh, first, frequency, lambda: not self._pending, self.agree_max, phase, block)

    def recalibrate_staleness(self) -> None:
        """With ``RuntimeConfig(staleness="auto")``: times the next refresh rounds and chooses S again from them (the
        current S applies until then). Raises RuntimeError for a fixed S."""
        self.schedule.recalibrate()

    # -- scheduler handle ------------------------------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        """The `Runtime` (worker pool) this pipeline submits to."""
        return self._runtime

    @property
    def scheduler(self) -> Any:
        """The `_core.RefreshScheduler`, started on first use."""
        if self._closed:
            raise RuntimeError("[RefreshPipeline] the pipeline was closed")
        return self._runtime.scheduler

    # -- per-step telemetry ----------------------------------------------------------------------
    def begin_step(self) -> None:
        """Marks the start of an optimizer step (telemetry; the memory tiers note it for their failure policy) and
        makes the deferred snapshot copies not made yet (`settle`): the step is about to write the statistics."""
        self.settle()
        now = time.perf_counter()
        if self._last_begin is not None:
            self.schedule.on_period(now - self._last_begin)
        self._last_begin = now
        self.timeline.begin_step()
        if self._runtime.tiers_active:
            self._runtime.tiers.begin_step()

    def end_step(self) -> None:
        """Marks the end of an optimizer step (telemetry; the memory tiers start their last write-back)."""
        self._hook_collects = True  # the next backward's first hook collects finished jobs
        self.timeline.end_step()
        if self._runtime.tiers_active:
            self._runtime.tiers.end_step()

    def on_grad_ready(self) -> None:
        """Called from the post-accumulate-grad hooks: the first call of each backward collects finished jobs
        without blocking (once is enough: nothing is installed before ``step()``, and the later hooks of the same
        backward would find little new, at a few microseconds each on the training thread).

        This cannot change the numbers: results are only *installed* inside ``step()``, at the points the
        install rule fixes (in eager mode, a result collected here is installed at the next install point,
        as it would be had it been collected there).
        """
        if self._hook_collects and self._pending and not self._closed:
            self._hook_collects = False
            self._runtime.collect(blocking=False)

    # -- submit / install ------------------------------------------------------------------------------
    def submit(self, jobs: Sequence[RefreshJob], install: Callable[[Sequence[Any]], None], *, tag: Any = None) -> None:
        """Submits a batch of jobs whose results are installed together by ``install``.

        Args:
            jobs: The jobs; all must share one version and one deadline.
            install: Called at the install point with the completed `JobResult`s, in the order of ``jobs``.
                It must cope with failed results (``ok`` False) by keeping the previous state.
            tag: A picklable description of the batch, returned by `export_pending` for checkpoints.

        Raises:
            ValueError: If the jobs disagree on the deadline or name an unknown kind.
        """
        if not jobs:
            return
        start = time.perf_counter()
        try:
            self._submit(jobs, install, tag)
        finally:
            self.timeline.add_submit_time(time.perf_counter() - start)

    def _submit(self, jobs: Sequence[RefreshJob], install: Callable[[Sequence[Any]], None], tag: Any) -> None:
        deadlines = {job.deadline for job in jobs}
        if len(deadlines) != 1:
            raise ValueError(f"[RefreshPipeline.submit] one batch must share one deadline, got {sorted(deadlines)}")
        for job in jobs:
            if job.kind not in JOB_KINDS:
                raise ValueError(f"[RefreshPipeline.submit] unknown job kind {job.kind!r}; expected one of {JOB_KINDS}")
        sched = self.scheduler
        plan = self.exchange.plan(jobs) if self.exchange is not None else None
        owned = plan.owned_by(self.exchange.rank) if plan is not None else [True] * len(jobs)
        ids = [self._submit_one(sched, job) if mine else None for job, mine in zip(jobs, owned)]
        submitted = sum(owned)
        self._counters["jobs_submitted"] += submitted
        self.timeline.add_submitted(submitted)
        self._seq += 1
        self._pending.append(_Pending(self._seq, ids, install, int(jobs[0].version), deadlines.pop(), tag, plan=plan))
        self.schedule.on_submitted(int(jobs[0].version))

    def _submit_one(self, sched: Any, job: RefreshJob) -> Any:  # noqa: ARG002 - the runtime routes the job
        return self._runtime.submit_job(job)

    # -- shadow snapshots --------------------------------------------------------------------------------
    def route(self, n: int, device: torch.device, method: str = "eigh") -> str:
        """Where a refresh of an (n, n) statistic on ``device`` runs: ``"host"`` or ``"device"`` (a pure
        function of the configuration, the device and n; see `asteria.runtime.gpu.route_for`)."""
        return route_for(self.config.refresh_device, self.config.gpu_refresh_min_dim, n, device, method)

    def snapshot(self, *tensors: torch.Tensor, route: str = "host", later: bool = True) -> Snapshot:
        """Freezes stacked ``(B, n, n)`` statistics (and bases) for refresh jobs.

        Host route: pinned leases of the runtime's shadow pool (a non-blocking device-to-host copy on a side
        stream for CUDA tensors). Device route: a device clone. The returned `Snapshot` has, per tensor, the
        per-matrix views to put in `RefreshJob.a`/``q``, and the copy's event for `RefreshJob.ready`.

        Args:
            tensors: The stacked statistics (and bases) to freeze.
            route: ``"host"`` or ``"device"`` (`route`).
            later: Whether the batch is installed at a later step than the one taking the snapshot (a refresh with
                staleness S > 0), so that the training thread goes on meanwhile. Only then is the copy of CPU
                statistics left to the refresh worker (a deferred copy); a batch the same step waits for (the
                first bases, S = 0) is copied at once: the training thread would only wait for the worker's copy.
        """
        self.finish_installs()  # the tensors may be the ones an install is writing
        start = time.perf_counter()
        try:
            return self._snapshot(tensors, route, later and self.staleness > 0)
        finally:
            self.timeline.add_submit_time(time.perf_counter() - start)

    def _snapshot(self, tensors: Sequence[torch.Tensor], route: str, later: bool) -> Snapshot:
        if route == "device":
            return snapshot_on_device(tensors)
        on_cuda = bool(tensors) and tensors[0].is_cuda
        stream = self._runtime.copy_stream(tensors[0].device) if on_cuda else None
        # CPU statistics: the copy is made by the refresh worker (or by `settle`); not with memory tiers, which
        # may move a bucket's storage between steps
        defer = later and not on_cuda and not self._runtime.tiers_active and not self._closed
        snap = snapshot_to_host(tensors, self._runtime.shadow_pool, stream, defer=defer)
        if snap.copy is not None:
            self._runtime.copy_queue.push(snap.copy)
            self._unsettled.append(snap)
        elif not on_cuda:
            self._counters["snapshot_copies_inline"] += 1  # copied here, on the training thread
        return snap

    def settle(self) -> None:
        """Makes the deferred snapshot copies not made yet (on this thread; waits for one a worker is making).

        Called before anything may write statistics a deferred snapshot reads: at the start of every step, before
        installs, before checkpoints export or import the pending batches, and at close. Afterwards no worker
        reads the optimizer's tensors, and the snapshots no longer keep them alive.
        """
        if not self._unsettled:
            return
        inline = sum(bool(snap.copy.run()) for snap in self._unsettled)  # waits for one a worker is making
        self._counters["snapshot_copies_inline"] += inline
        self._counters["snapshot_copies_deferred"] += len(self._unsettled) - inline
        self._runtime.release_copies()  # frees the queue's leases (making other pipelines' copies early is harmless)
        self._unsettled = []

    def _ready(self, p: _Pending) -> bool:
        return p.results is not None or all(j is None or self._runtime.is_done(j) for j in p.job_ids)

    def install_due(self, step: int, *, overlap: bool = False) -> int:
        """Installs the batches the install rule says are due at the step boundary ``step``.

        Deterministic: every batch whose deadline is ``<= step`` (waiting for late ones: a stall). Eager:
        those, plus every batch already complete. Batches are installed in (deadline, submission) order.

        Args:
            step: The step about to use the results.
            overlap: The caller reads nothing the installs write until its next step (SOAP, KL-Shampoo and KL-SOAP
                install at the end of a step for the next one). The installs may then run on the helper thread
                (``RuntimeConfig.parallel_install``) while the training loop computes the next forward and backward
                passes; `finish_installs` waits for them, and everything here that reads or replaces the state
                calls it first. Only for batches whose installers are ``overlap_safe``: thread-safe, with every
                job successful and checked where it ran, so installing them cannot warn or raise a refresh
                failure.

        Returns:
            The number of batches installed (or being installed on the helper thread).
        """
        self.finish_installs()
        if not self._pending:
            return 0
        eager = self.config.install == "eager" and not self.distributed
        if eager or any(p.deadline <= step for p in self._pending):
            self._runtime.collect()
        due = [p for p in self._pending if p.deadline <= step or (eager and self._ready(p))]
        if not due:
            return 0
        start, waited = time.perf_counter(), self._counters["wait_s"]
        try:
            return self._install(due, step, overlap)
        finally:  # the training thread's install time, without the wait for late results (the stalls)
            self.timeline.add_install_time(time.perf_counter() - start - (self._counters["wait_s"] - waited))

    def _install(self, due: list[_Pending], step: int, overlap: bool = False) -> int:
        self.settle()  # installs write the state that deferred snapshots may still read
        due.sort(key=lambda p: (p.deadline, p.seq))
        gathered = self._gather_round(due, step)
        work = list(zip(due, gathered))
        # not in distributed runs: the other ranks on this machine may be using the CPUs a helper would take
        helper = self._runtime.install_helper() if (overlap or len(work) > 1) and not self.distributed else None
        if overlap and helper is not None and all(_overlap_safe(p, results) for p, results in work):
            for pending, results in work:  # accounted now: they are this step's installs
                self._account(pending, results, step)
            started: set[int] = set()
            self._overlap = (helper.submit(_run_installs, work, started), work, started)
            self._counters["overlapped_installs"] += len(work)
            return len(due)
        groups = _split_installs(work) if helper is not None and len(work) > 1 else None
        if groups is None:
            for pending, results in work:  # one by one: an installer that raises leaves the later ones pending
                self._account(pending, results, step)
                pending.install(results)
            return len(due)
        self._install_parallel(helper, work, *groups, step=step)
        return len(due)

    @property
    def installs_running(self) -> bool:
        """Whether installs started by `install_due` with ``overlap`` may still be running on the helper thread."""
        return self._overlap is not None

    def finish_installs(self) -> None:
        """Waits for the installs running on the helper thread (see `install_due`); no-op when there are none.

        The wait counts as install time of the current step. An installer that raised is raised here; the batches
        it did not start are pending again (they are due: the next install point installs them).
        """
        if self._overlap is None or threading.current_thread().name.startswith(INSTALL_THREAD_NAME):
            return  # (an installer never waits for itself)
        future, work, started = self._overlap
        start = time.perf_counter()
        error = future.exception()  # interrupted (KeyboardInterrupt): still running, waited for by the next call
        self._overlap = None
        self.timeline.add_install_time(time.perf_counter() - start)
        if error is not None:
            unstarted = [p for p, _ in work if id(p) not in started]
            self._pending = sorted(self._pending + unstarted, key=lambda p: p.seq)
            self._counters["batches_installed"] -= len(unstarted)
            self._counters["overlapped_installs"] -= len(unstarted)
            raise error

    def _account(self, pending: _Pending, results: list[Any], step: int) -> None:
        """Removes a due batch from the pending ones and records its results (counters, timeline, failures)."""
        self._pending.remove(pending)
        failed = []
        for res in results:
            self._counters["jobs_ok" if res.ok else "jobs_failed"] += 1
            self._counters["job_latency_s"] += float(res.latency_s)
            if not res.ok:
                failed.append(res.message)
        self._counters["batches_installed"] += 1
        self.timeline.add_installed(len(results), step - pending.version - self.offset)
        self.schedule.on_installed(pending.version, [float(r.latency_s) for r in results if r is not None])
        if failed:
            self._failures.extend(failed)
            del self._failures[:-50]
            if self.is_async:
                warnings.warn(
                    f"asteria: {len(failed)} background refresh job(s) of step {pending.version} failed; the "
                    f"previous preconditioner is kept for those blocks (first error: {failed[0]})",
                    RefreshFailureWarning,
                    stacklevel=5,
                )

    def _install_parallel(self, helper: Any, work: list[Any], mine: list[Any], theirs: list[Any], *, step: int) -> None:
        """Installs two groups of the due batches ``work`` at once (``RuntimeConfig.parallel_install``): ``theirs`` on
        the helper thread (`Runtime.install_helper`), ``mine`` on this one. Groups come from `_split_installs`:
        batches that share a block are in one group, each group in (deadline, submission) order, so every block
        sees its installs in order and computes what it would on one thread.

        Both groups finish before anything is raised. As on one thread, an installer that raises stops its group:
        the batches it did not start stay pending, and only the started ones are accounted (in ``work`` order).
        This thread's error is raised first, with the helper's as its ``__context__``.
        """
        started: set[int] = set()
        future = helper.submit(_run_installs, theirs, started)
        mine_error: BaseException | None = None
        try:
            _run_installs(mine, started)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, once the helper is done too
            mine_error = exc
        their_error = future.exception()  # waits: no install runs once this returns
        for pending, results in work:
            if id(pending) in started:
                self._account(pending, results, step)
        self._counters["parallel_installs"] += sum(id(p) in started for p, _ in theirs)
        if mine_error is not None:
            if their_error is not None and mine_error.__context__ is None:
                mine_error.__context__ = their_error
            raise mine_error
        if their_error is not None:
            raise their_error

    def _gather_round(self, due: list[_Pending], step: int) -> list[list[Any]]:
        """The results of the due batches; in a distributed run, one exchange round completes them on every rank."""
        gathered = [self._gather(p) for p in due]
        if self.exchange is not None:
            idx = [i for i, p in enumerate(due) if p.plan is not None]
            if idx:
                done = self.exchange.complete(
                    step, [(due[i].plan, gathered[i]) for i in idx], [(due[i].version, due[i].deadline) for i in idx]
                )
                for i, results in zip(idx, done):
                    gathered[i] = results
        return gathered

    def _gather(self, pending: _Pending) -> list[Any]:
        if pending.results is not None:
            return list(pending.results)
        late = not all(j is None or self._runtime.is_done(j) for j in pending.job_ids)
        start = time.perf_counter()
        results = [self._runtime.take(jid) if jid is not None else None for jid in pending.job_ids]
        waited = time.perf_counter() - start
        self._counters["wait_s"] += waited
        if late:
            self._counters["stalls"] += 1
            self.timeline.add_stall(waited)
        return results

    def pending(self) -> int:
        """Returns the number of batches submitted and not installed yet."""
        return len(self._pending)

    # -- checkpoints ------------------------------------------------------------------------------------
    def export_pending(self) -> list[dict[str, Any]]:
        """Waits for every in-flight batch and returns them (tag, version, deadline, results) for a checkpoint.

        The batches stay pending: they are still installed at their deadlines. Result arrays become CPU
        tensors so the list can go through ``torch.save``.
        """
        self.finish_installs()
        self.settle()
        out = []
        for p in self._pending:
            if p.results is None:
                self._runtime.collect()
                p.results = self._gather(p)
            entry = {
                "tag": p.tag,
                "version": p.version,
                "deadline": p.deadline,
                "results": [
                    {
                        "ok": bool(r.ok),
                        "status": str(r.status),
                        "message": str(r.message),
                        "outputs": {k: _to_cpu_tensor(v) for k, v in r.outputs.items()},
                        "version": int(r.version),
                        "deadline": int(r.deadline),
                    }
                    if r is not None
                    else None  # distributed: computed by another rank, exchanged at the install step
                    for r in p.results
                ],
            }
            if p.plan is not None:
                entry["plan"] = p.plan.to_dict()
            out.append(entry)
        return out

    def import_pending(self, entries: Sequence[dict[str, Any]], make_installer: Callable[[Any], Callable[[Sequence[Any]], None]]) -> None:
        """Replaces the pending batches by those of a checkpoint (see `export_pending`).

        Args:
            entries: The list `export_pending` returned (possibly loaded from disk).
            make_installer: Builds the installer of a batch from its tag.
        """
        self.discard_pending()
        for e in entries:
            plan = None
            if any(r is None for r in e["results"]):
                if self.exchange is None or "plan" not in e:
                    raise ValueError(
                        "this checkpoint holds the refresh results of one rank of a distributed run only; load it on "
                        "the same rank of a run with the same world size, or gather it with asteria.gather_state_dict"
                    )
                plan = type(self.exchange).plan_from_dict(e["plan"])
            results = [
                StoredResult(
                    ok=bool(r["ok"]),
                    status=str(r["status"]),
                    message=str(r["message"]),
                    outputs={k: v.detach().cpu().numpy().copy() for k, v in r["outputs"].items()},
                    version=int(r["version"]),
                    deadline=int(r["deadline"]),
                )
                if r is not None
                else None
                for r in e["results"]
            ]
            self._seq += 1
            self._pending.append(
                _Pending(self._seq, [], make_installer(e["tag"]), int(e["version"]), int(e["deadline"]), e["tag"], results, plan)
            )

    def discard_pending(self) -> None:
        """Cancels and forgets every pending batch (their results are never installed)."""
        self.finish_installs()  # (installs running on the helper thread are finished, not cancelled)
        self.settle()  # no worker may read the sources once the snapshots are dropped
        for p in self._pending:
            if p.results is None and not self._runtime.closed:
                for jid in p.job_ids:
                    if jid is not None:
                        self._runtime.cancel(jid)
        self._pending = []

    # -- reporting -----------------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, Any]:
        """Bytes of the optimizer's state per tier and per lifecycle class (see `asteria.runtime.tiers.memory_report`)."""
        fn = self._stats_sources.get("memory")
        if fn is None:
            raise RuntimeError("[RefreshPipeline] no optimizer registered a memory report")
        return fn()

    def refresh_buffer_bytes(self) -> dict[str, int]:
        """Bytes the refresh runtime holds for this pipeline's pending batches: ``shadow`` (the shadow pool's leases
        in use, for the whole runtime: the snapshots, and the results the jobs wrote over them, until installed)
        and ``result`` (results waiting for their install step outside the pool: permutations, eigenvalues, and
        results restored from a checkpoint)."""
        result = 0
        for p in self._pending:
            items = p.results if p.results is not None else [self._runtime.result_of(j) for j in p.job_ids if j is not None]
            for r in items:
                if r is not None:  # outputs written over the job's snapshot are in the pool, counted as shadow
                    result += sum(int(getattr(v, "nbytes", 0)) for v in r.outputs.values()) - int(getattr(r, "reused_bytes", 0))
        pool = getattr(self._runtime, "_pool", None)
        shadow = int(pool.stats()["in_use"]) if pool is not None and self._pending else 0
        return {"shadow": shadow, "result": result}

    def add_stats_source(self, name: str, fn: Callable[[], Any]) -> None:
        """Adds a named value computed by ``fn`` to `stats` (e.g. the optimizer's non-finite step count)."""
        self._stats_sources[name] = fn

    def counters(self) -> dict[str, Any]:
        """The top-level counters of `stats` only (``jobs_submitted``, ``batches_installed``, ``wait_s``, ...,
        ``pending_batches``): cheap enough to read after every step, unlike `stats`, which also copies the
        whole per-step timeline and computes its percentiles."""
        out: dict[str, Any] = dict(self._counters)
        out["pending_batches"] = len(self._pending)
        return out

    def stats(self) -> dict[str, Any]:
        """Returns counters, the per-step timeline with summaries, staleness and the scheduler's stats.

        Top level: ``jobs_submitted``, ``jobs_ok``, ``jobs_failed``, ``batches_installed``, ``parallel_installs``
        (batches installed by the helper thread next to the training thread's, see
        ``RuntimeConfig.parallel_install``), ``overlapped_installs`` (batches installed by the helper thread while
        training computed the next step), ``stalls`` (installs
        that had to wait), ``wait_s`` (total time the training thread waited for refresh results),
        ``job_latency_s``, ``failures`` (last messages), ``refresh``/``staleness``/``install``/``offset``,
        ``pending_batches``. ``timeline`` has one entry per step (``step_s``, ``stall_s``, ``submit_s``: time
        spent snapshotting and submitting, ``install_s``: time spent installing without the stalls,
        ``jobs_submitted``, ``jobs_installed``), ``installed_staleness`` one per installed batch (install step
        minus the step the synchronous algorithm uses it), ``summary`` the percentiles, ``scheduler`` the worker
        pool's stats (``worker_busy_s`` per worker, ...).
        """
        out: dict[str, Any] = self.counters()
        out["refresh"] = self.config.refresh
        out["staleness"] = self.staleness
        out["staleness_auto"] = self.schedule.report()
        out["install"] = self.config.install
        out["offset"] = self.offset
        out["failures"] = list(self._failures)
        for name, fn in self._stats_sources.items():
            out[name] = fn()
        out.update(self.timeline.as_dict())
        if not self._closed:
            sched = self._runtime.scheduler_stats()
            if sched:
                out["scheduler"] = sched
        return out

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Cancels pending jobs and stops the workers (unless the `Runtime` is shared)."""
        if self._closed:
            return
        try:
            self.discard_pending()
        finally:
            self._closed = True
            if self._owns_runtime:
                self._runtime.close()

    def __enter__(self) -> RefreshPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: worker threads should not outlive the optimizer
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
