"""`asteria.Runtime`: one refresh worker pool shared by any number of optimizers.

The `Runtime` owns the C++ `RefreshScheduler` (started lazily, so building an optimizer starts no thread)
and the table of completed jobs. The scheduler's ``poll()`` returns *every* completed job, so with several
optimizers on one pool the results are collected here, under one lock, and handed to the pipeline that
submitted them; ``wait`` goes through the same lock so a job can never be collected twice or waited on
after another caller collected it.

Lifecycle: ``close()`` (also ``with``, ``del`` and interpreter exit through `atexit`) cancels queued jobs
and joins the workers; a job already running finishes first (a refresh is bounded; the scheduler's test
delay is interrupted), so shutting down never hangs on queued work.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Any

from asteria.runtime.config import DEFAULT_RUNTIME_CONFIG, RuntimeConfig

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
        config: The runtime configuration (default: `RuntimeConfig()`, async with staleness 5).
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
                workers=self.config.resolved_workers(), queue_capacity=1 << 16, blas_threads=1
            )
        return self._scheduler

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
        if self._scheduler is None or self._closed:
            return 0
        if not self._lock.acquire(blocking=blocking):
            return 0
        try:
            results = self._scheduler.poll()
            for res in results:
                self._done[int(res.job_id)] = res
            return len(results)
        finally:
            self._lock.release()

    def is_done(self, job_id: int) -> bool:
        """True when job ``job_id`` has completed and is waiting in the table (call `collect` first)."""
        return job_id in self._done

    def take(self, job_id: int) -> Any:
        """Returns job ``job_id``'s result, blocking until it completes (the GIL is released meanwhile)."""
        with self._lock:
            res = self._done.pop(job_id, None)
            if res is None:
                res = self.scheduler.wait(job_id)
            return res

    def cancel(self, job_id: int) -> None:
        """Cancels a job that has not started and forgets its result."""
        with self._lock:
            self._done.pop(job_id, None)
            if self._scheduler is not None and not self._closed:
                self._scheduler.cancel(job_id)

    # -- reporting and lifecycle --------------------------------------------------------------------
    def scheduler_stats(self) -> dict[str, Any]:
        """The scheduler's own stats (queue depth, per-worker busy seconds, run times); {} before start."""
        if self._scheduler is None or self._closed:
            return {}
        return dict(self._scheduler.stats())

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
        self._done.clear()
        if sched is not None:
            sched.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: worker threads should not outlive their owner
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
