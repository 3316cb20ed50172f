"""`asteria.Runtime`: one refresh worker pool shared by any number of optimizers.

The `Runtime` owns the C++ `RefreshScheduler` (started lazily, so building an optimizer starts no thread)
and the table of completed jobs. The scheduler's ``poll()`` returns *every* completed job, so with several
optimizers on one pool the results are collected here, under one lock, and handed to the pipeline that
submitted them; ``wait`` goes through the same lock so a job can never be collected twice or waited on
after another caller collected it.

It also owns what the jobs' inputs live in: the pinned pool of *shadow snapshots* (`shadow_pool`, leases
the scheduler reads in place), a side CUDA stream per device for their device-to-host copies, and, in CUDA
builds, one cuSOLVER engine per device for the refreshes routed to the GPU (`asteria.runtime.gpu`). Job
handles are ints for host jobs and ``("device", index, id)`` tuples for device jobs.

Lifecycle: ``close()`` (also ``with``, ``del`` and interpreter exit through `atexit`) cancels queued jobs
and joins the workers; a job already running finishes first (a refresh is bounded; the scheduler's test
delay is interrupted), so shutting down never hangs on queued work.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import Any

from asteria.runtime.config import DEFAULT_RUNTIME_CONFIG, RuntimeConfig, free_cores

INSTALL_THREAD_NAME = "asteria-install"
"""Name prefix of the install helper thread (`Runtime.install_helper`)."""

__all__ = ["Runtime"]

_LIVE: weakref.WeakSet[Runtime] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - runs at interpreter exit
    for rt in list(_LIVE):
        try:
            rt.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class Runtime:
    """A refresh worker pool (and its configuration) that several optimizers can share.

    Pass it as ``runtime=`` to every optimizer that should use the same workers::

        rt = asteria.Runtime(asteria.RuntimeConfig(staleness=3))
        opt_a = asteria.SOAP(model_a.parameters(), runtime=rt)
        opt_b = asteria.Shampoo(model_b.parameters(), runtime=rt)
        ...
        rt.stats()  # scheduler stats plus each optimizer's timeline
        rt.close()

    Args:
        config: The runtime configuration (default: `RuntimeConfig()`, async with staleness "auto").
        scheduler: An existing ``asteria._core.RefreshScheduler`` (or an object with its interface) to use
            instead of starting one; it is closed by `close` as well.

    Thread safety: `collect`, `wait` and `cancel` may be called from the training thread and from autograd
    hooks; a non-blocking `collect` simply skips when another thread holds the table.
    """

    def __init__(self, config: RuntimeConfig | None = None, *, scheduler: Any = None) -> None:
        self.config = DEFAULT_RUNTIME_CONFIG if config is None else config
        if not isinstance(self.config, RuntimeConfig):
            raise TypeError(f"Runtime needs an asteria.RuntimeConfig, got {type(self.config).__name__}")
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._done: dict[int, Any] = {}
        self._pipelines: weakref.WeakSet[Any] = weakref.WeakSet()
        self._closed = False
        self._pool: Any = None
        self._copy_queue: Any = None
        self._tiers: Any = None
        self._copy_streams: dict[int, Any] = {}
        self._engines: dict[int, Any] = {}
        # CUDA events host jobs wait for (snapshot copies), alive until the job is taken or cancelled
        self._events: dict[Any, Any] = {}
        # cancelled jobs whose result has not come back yet (dropped by `collect`), with the CUDA event the
        # worker may still be waiting on
        self._forgotten: dict[Any, Any] = {}
        self._install_helper: Any = None  # the thread running part of a step's installs (`install_helper`)
        self._install_helper_checked = False
        _LIVE.add(self)

    # -- scheduler ---------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def scheduler(self) -> Any:
        """The `_core.RefreshScheduler`, started on first use."""
        if self._closed:
            raise RuntimeError("[Runtime] the runtime was closed")
        if self._scheduler is None:
            from asteria import _core  # imported lazily: constructing an optimizer needs no worker threads

            self._scheduler = _core.RefreshScheduler(
                workers=self.config.resolved_workers(), queue_capacity=1 << 16, blas_threads=1,
                cpus=list(self.config.worker_cpus or ()),
            )
        return self._scheduler

    def install_helper(self) -> Any:
        """The one-thread executor that runs part of a step's installs (``RuntimeConfig.parallel_install``), or None.

        None when the option is off or no CPU is free for it: without ``worker_cpus``, a helper needs this
        thread's CPU set to be larger than torch's thread count. The thread is pinned to ``worker_cpus`` when
        given (the refresh workers are idle while their results are installed) and computes without autograd.
        """
        if self._closed or not self.config.parallel_install:
            return None
        if not self._install_helper_checked:
            self._install_helper_checked = True
            cpus = self.config.worker_cpus
            if cpus is None and free_cores() < 1:
                return None
            from concurrent.futures import ThreadPoolExecutor

            self._install_helper = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=INSTALL_THREAD_NAME, initializer=_init_install_thread, initargs=(cpus,)
            )
        return self._install_helper

    @property
    def shadow_pool(self) -> Any:
        """The ``_core.PinnedPool`` holding shadow snapshots (created on first use).

        Its budget is half of the machine's physical memory (``host_budget`` is the state tier's; snapshots are
        transient and reported as class ``shadow``); in a CUDA build with a visible device its mappings are
        registered with CUDA so snapshot copies are asynchronous DMA.
        """
        if self._pool is None:
            from asteria import _core
            from asteria.runtime.gpu import cuda_backend_available

            self._pool = _core.PinnedPool(budget_bytes=_shadow_budget(), cuda_register=cuda_backend_available())
        return self._pool

    def pinned_report(self) -> dict[str, Any]:
        """`asteria.runtime.pinned.pool_report` of the shadow pool (zeros before it exists; does not create it)."""
        from asteria.runtime.pinned import pool_report

        return pool_report(self._pool)

    @property
    def copy_queue(self) -> Any:
        """The ``_core.CopyQueue`` of deferred snapshot copies (`asteria.runtime.shadow`): a worker makes all of them
        before its next job, so one step's snapshots are copied off the training thread together."""
        if self._copy_queue is None:
            from asteria import _core

            self._copy_queue = _core.CopyQueue()
        return self._copy_queue

    def release_copies(self) -> None:
        """Empties the copy queue, making the copies not made yet (a worker may still reach them); nothing to do
        before the queue exists or after `close`."""
        if self._copy_queue is not None:
            self._copy_queue.drain()

    def copy_stream(self, device: Any) -> Any:
        """The side CUDA stream carrying snapshot copies off ``device`` (created on first use)."""
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._copy_streams:
            self._copy_streams[index] = torch.cuda.Stream(device=index)
        return self._copy_streams[index]

    def device_refresh(self, device: Any) -> Any:
        """The `DeviceRefresh` (cuSOLVER engine on a low-priority stream) of a CUDA ``device``."""
        import torch

        from asteria.runtime.gpu import DeviceRefresh

        if self._closed:
            raise RuntimeError("[Runtime] the runtime was closed")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._engines:
            self._engines[index] = DeviceRefresh(torch.device("cuda", index))
        return self._engines[index]

    def submit_job(self, job: Any) -> Any:
        """Submits one `RefreshJob`: to a device engine when its matrices are CUDA tensors, else to the host
        scheduler (waiting, on the worker, for the snapshot's copy event when it has one). Returns the handle."""
        import torch

        if isinstance(job.a, torch.Tensor) and job.a.is_cuda:
            eng = self.device_refresh(job.a.device)
            return ("device", eng.device.index, eng.submit(job))
        sched = self.scheduler
        # the job's matrices are its private snapshot (or copied at submit): its results are written over them
        opts = dict(job.options, reuse_inputs=True)
        if job.ready is not None:
            opts["wait_event"] = int(job.ready.cuda_event)
        if job.copy is not None:
            opts["copy"] = job.copy
            opts["copies"] = self.copy_queue
        if job.kind == "eigh":
            jid = sched.submit_eigh(job.block_id, job.version, job.deadline, job.a, **opts)
        elif job.kind == "inverse_root":
            jid = sched.submit_inverse_root(job.block_id, job.version, job.deadline, job.a, **opts)
        else:
            jid = sched.submit_eigenbasis_refresh(job.block_id, job.version, job.deadline, job.a, job.q, **opts)
        if job.ready is not None:
            self._events[jid] = job.ready  # the worker synchronises on it: it must outlive the job
        return jid

    @property
    def tiers(self) -> Any:
        """The `asteria.runtime.tiers.TierManager` of the optimizer state (created on first use), or None when
        the configuration sets no budget and no nvme_path."""
        if self._tiers is None and self.config.tiered and not self._closed:
            from asteria.runtime.tiers import TierManager  # noqa: PLC0415

            self._tiers = TierManager(self.config)
        return self._tiers

    @property
    def tiers_active(self) -> bool:
        """True once a `TierManager` exists."""
        return self._tiers is not None

    def attach(self, pipeline: Any) -> None:
        """Registers a pipeline (for `stats` and `close`)."""
        self._pipelines.add(pipeline)

    def collect(self, *, blocking: bool = True) -> int:
        """Moves completed jobs from the scheduler into the table (never waits for a job).

        Args:
            blocking: If False, return at once when another thread holds the table (hooks use this).

        Returns:
            The number of results collected.
        """
        if (self._scheduler is None and not self._engines) or self._closed:
            return 0
        if not self._lock.acquire(blocking=blocking):
            return 0
        try:
            n = 0
            if self._scheduler is not None:
                for res in self._scheduler.poll():
                    n += self._keep(int(res.job_id), res)
            for index, eng in self._engines.items():
                for res in eng.poll():
                    n += self._keep(("device", index, res.job_id), res)
            return n
        finally:
            self._lock.release()

    def _keep(self, job_id: Any, res: Any) -> int:
        """Files a completed job's result; the result of a cancelled job is dropped (lock held)."""
        if job_id in self._forgotten:
            del self._forgotten[job_id]
            return 0
        self._done[job_id] = res
        return 1

    def result_of(self, job_id: Any) -> Any:
        """The completed result of ``job_id`` if it is waiting in the table (after `collect`), else None."""
        return self._done.get(job_id)

    def is_done(self, job_id: Any) -> bool:
        """True when job ``job_id`` has completed and is waiting in the table (call `collect` first)."""
        return job_id in self._done

    def take(self, job_id: Any) -> Any:
        """Returns job ``job_id``'s result, blocking until it completes (the GIL is released meanwhile)."""
        with self._lock:
            res = self._done.pop(job_id, None)
            if res is None:
                if isinstance(job_id, tuple):
                    res = self._engines[job_id[1]].wait(job_id[2])
                else:
                    res = self.scheduler.wait(job_id)
            self._events.pop(job_id, None)
            return res

    def cancel(self, job_id: Any) -> None:
        """Cancels a job that has not started and forgets its result (device jobs run to completion)."""
        with self._lock:
            event = self._events.pop(job_id, None)
            if self._done.pop(job_id, None) is not None or self._closed:
                return  # already collected: nothing more will come back
            if not isinstance(job_id, tuple) and self._scheduler is not None:
                self._scheduler.cancel(job_id)
            # its result (cancelled, or finished if it was running) still comes back once: drop it then, and keep
            # the event alive until the worker can no longer be waiting on it
            self._forgotten[job_id] = event

    # -- reporting and lifecycle --------------------------------------------------------------------
    def scheduler_stats(self) -> dict[str, Any]:
        """The scheduler's own stats (queue depth, per-worker busy seconds, run times); {} before start."""
        if (self._scheduler is None and not self._engines) or self._closed:
            return {}
        out = dict(self._scheduler.stats()) if self._scheduler is not None else {}
        if self._engines:
            out["devices"] = {index: eng.stats() for index, eng in self._engines.items()}
        if self._pool is not None:
            out["shadow_pool"] = dict(self._pool.stats())
        return out

    def stats(self) -> dict[str, Any]:
        """Scheduler stats plus, per attached optimizer pipeline, its `RefreshPipeline.stats`."""
        out: dict[str, Any] = {"workers": self.config.resolved_workers(), "scheduler": self.scheduler_stats()}
        out["pipelines"] = [p.stats() for p in list(self._pipelines)]
        return out

    def close(self) -> None:
        """Cancels queued jobs and stops the workers (idempotent). Pipelines using it cannot refresh after."""
        if self._closed:
            return
        self._closed = True
        sched, self._scheduler = self._scheduler, None
        engines, self._engines = self._engines, {}
        helper, self._install_helper = self._install_helper, None
        self._done.clear()
        try:
            if helper is not None:
                helper.shutdown(wait=True)  # finishes the installs it runs (pipelines wait for them anyway)
            if sched is not None:
                sched.close()  # joins the workers: no job waits on an event after this
        finally:
            for eng in engines.values():
                eng.close()
            self._events.clear()
            self._forgotten.clear()
            self._copy_queue = None  # its copies are made by the pipelines' own settle (they hold the sources)
            tiers, self._tiers = self._tiers, None
            if tiers is not None:  # removes the NVMe swap directory
                tiers.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: worker threads should not outlive their owner
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _init_install_thread(cpus: tuple[int, ...] | None) -> None:
    """Start of the install helper thread: on the workers' CPUs, without autograd (like ``step()``)."""
    import torch

    if cpus:
        try:
            os.sched_setaffinity(0, set(cpus))  # this thread only (Linux)
        except (AttributeError, OSError):
            pass  # the workers were pinned already, so the set is valid; stay where the OS puts it
    torch.set_grad_enabled(False)


def _shadow_budget() -> int:
    """Bytes the shadow-snapshot pool may map: half of physical memory.

    ``host_budget`` is the budget of the optimizer *state's* pinned tier (`asteria.runtime.tiers`); snapshots
    are transient refresh buffers reported separately (class ``shadow`` of ``opt.runtime.memory_report()``).
    """
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        phys = 8 << 30
    return max(64 << 20, int(phys) // 2)
