"""Runtime configuration shared by every asteria optimizer.

`RuntimeConfig` is a keyword-only dataclass validated in ``__post_init__`` (docs/style.md pattern 6). It
decides how the expensive, infrequent refresh work (eigendecompositions, inverse roots, eigenbasis
refreshes) reaches the C++ `RefreshScheduler` and when its results are installed, and where the optimizer
state lives (the memory budgets of `asteria.runtime.tiers`). Every value is checked here, so a
configuration never silently means something else. The default is the asynchronous runtime with deterministic installs and
the staleness chosen from measurement (``staleness="auto"``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["RuntimeConfig", "DEFAULT_RUNTIME_CONFIG", "DEFAULT_STALENESS", "AUTO_STALENESS_MARGIN", "AUTO_STALENESS_ROUNDS"]

_REFRESH_MODES = ("sync", "async")
_INSTALL_MODES = ("deterministic", "eager")
_REFRESH_DEVICES = ("auto", "host", "gpu")
_FOLD_MODES = ("step", "backward")
_PHASES = ("aligned", "staggered")


DEFAULT_STALENESS = 5
"""The bound S ``staleness="auto"`` starts with, while it measures the first refresh rounds (the paper's default;
its sweep saw the wall-clock gain saturate from S = 3 with final losses within 0.02 across S in {1, 2, 3, 5, 10})."""

DEFAULT_STALENESS_STAGGERED = 2
"""The bound S ``staleness="auto"`` starts with under staggered phases (``refresh_phases="staggered"``, the default):
a step then snapshots about 1/f of a round, whose refreshes take about 1/f of a round's time, and the snapshots in
flight, ``(o + S + 1)/f`` of a round, stay a small part of the state while S is measured."""

AUTO_STALENESS_ROUNDS = 2
"""Refresh rounds ``staleness="auto"`` measures before it chooses S."""

AUTO_STALENESS_MARGIN = 1.5
"""``staleness="auto"`` leaves the slowest measured round this factor of its latency before its deadline."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class RuntimeConfig:
    """How refresh work is scheduled and installed.

    Attributes:
        refresh: ``"async"`` (the default) snapshots the statistics at a refresh step, runs the refresh on
            the scheduler's worker threads while training goes on with the installed preconditioner, and
            installs the result at a step boundary following the staleness rule. ``"sync"`` submits the
            refresh and waits for it at once: exactly the reference algorithm.
        staleness: The bound S: a result computed from the statistics of step s is installed at step
            ``s + o + S`` (o = 0 for Shampoo, 1 for SOAP and KL). An int >= 0, ``"auto"``, or None for the
            default: ``"auto"`` with ``refresh="async"``, 0 with ``refresh="sync"`` (where any other value is
            refused). ``staleness=0`` with ``refresh="async"`` is bit-identical to ``"sync"``. When ``o + S``
            exceeds ``precondition_frequency``, a block's refresh steps that fall while its previous refresh is
            pending are skipped (a rule of s, o, S and f only, never of timing). ``"auto"``: the smallest S whose
            deadlines the measured refresh latency meets with a margin. The first ``AUTO_STALENESS_ROUNDS`` (2)
            refresh rounds run with ``DEFAULT_STALENESS`` (5; ``DEFAULT_STALENESS_STAGGERED``, 2, with staggered
            ``refresh_phases``, the default, whose rules for choosing are in `asteria.runtime.staleness`) and are timed (submission to completion of each
            round's slowest job, against the median time between steps); at the first refresh step after
            them with no refresh in flight, S becomes ``max(1, ceil(AUTO_STALENESS_MARGIN · latency /
            step period))`` (margin 1.5) and stays fixed: ``opt.runtime.stats()["staleness"]`` and
            ``["staleness_auto"]`` report it, ``state_dict()`` records it (a resumed run keeps it, and installs
            at the same steps), and ``opt.runtime.recalibrate_staleness()`` measures again. The choice
            depends on the machine's speed, so two fresh runs may differ in S; pass an int for runs that must
            be reproducible across machines. In distributed runs every rank takes the largest S any rank
            chose.
        refresh_phases: When each block's refreshes happen within the ``precondition_frequency`` f steps.
            ``"aligned"``: every block refreshes at the same steps (multiples of f; Shampoo's from
            ``start_preconditioning_step``), as the reference algorithms do, so one step snapshots and one step
            installs the whole model's refresh round. ``"staggered"``: each block of a parameter group has a
            phase φ in ``[0, f)``, chosen so that every phase holds about 1/f of the group's refresh work (the
            blocks in parameter order, weighted by the squares of their dims), and refreshes at the aligned
            steps shifted by φ. Each step then snapshots and installs about 1/f of a round, so the snapshot
            buffers hold about ``(o + S + 1) / f`` of a round instead of all of it, and the refresh work reaches
            the workers evenly. Each block keeps the aligned rule's period and staleness; blocks with φ > 0
            take their first refresh φ steps later. None (the default): ``"staggered"`` with ``refresh="async"``
            and S != 0, ``"aligned"`` otherwise (``refresh="sync"`` and ``staleness=0`` stay the reference
            algorithm bit for bit; ``"staggered"`` is refused with ``refresh="sync"``). The phases are a pure
            function of the parameter shapes and f: every run, resume and rank has the same ones.
        install: ``"deterministic"`` installs exactly at ``s + o + S`` (waiting for a late result, which
            is counted as a stall), so a run is reproducible whatever the thread timing; ``"eager"``
            installs a result at the first step boundary after it is ready, and never later than
            ``s + o + S`` (faster to react, not reproducible).
        workers: Host refresh threads; None picks the cores training does not use
            (``cores - torch.get_num_threads()``, at least 1, at most 8; with ``worker_cpus``, one per
            listed CPU, at most 8). BLAS runs single-threaded inside each job. An int >= 1 or None.
        worker_cpus: CPU numbers the refresh workers are pinned to (each worker may run on any of them),
            e.g. ``[1]`` when the training thread is pinned to CPU 0 (``os.sched_setaffinity``), so that
            the two never share or trade cores. None (the default): the workers inherit the affinity of
            the thread that starts them and the operating system places them. A CPU this process may not
            use is refused when the workers start.
        parallel_install: Run installs on a helper thread on the workers' CPUs (``worker_cpus``, else a CPU
            training leaves free), which are idle at that point. SOAP, KL-Shampoo and KL-SOAP install at the end
            of a step for the next one: those installs run on the helper while the training loop computes the
            next forward and backward passes, and the next ``step()`` (or reading ``optimizer.state``,
            ``state_dict()``, ...) waits for them; not with ``fold_statistics="backward"``, whose hooks read the
            state. Shampoo uses its new roots in the step that installs them: when several of its batches are due
            at one step, they are split between the training thread and the helper (batches sharing a block stay
            on one thread, in order). Used only in single-process runs, for optimizer state in CPU memory without
            budgets, and only when such a CPU exists. Each batch computes exactly what it would on the training
            thread, so the numbers are the same bits. Default True; False installs every batch on the training
            thread inside ``step()``.
        hooks: Register a ``post_accumulate_grad`` hook per parameter; the first of each backward collects
            finished refresh jobs, and with memory tiers the hooks start reading the first NVMe-tier buckets
            of the coming step while backward still runs (work that cannot change the numbers). Default True.
        device_budget: Bytes of optimizer state kept in the memory the optimizer computes in: the GPU's
            memory for parameters on a GPU (including the work buffers that host and NVMe state is
            streamed through), ordinary process memory for parameters on the CPU. An int >= 0 or a string
            such as ``"2GiB"``, ``"512MiB"`` or ``"1.5GB"`` (stored as an int); None: no limit (everything
            stays there, the default).
        host_budget: Bytes of page-locked host memory (asteria's pinned pool) for optimizer state that does
            not fit the device budget, including the staging buffers of the NVMe tier. Same forms; None:
            no pinned tier.
        nvme_path: An existing, writable directory, ideally on an NVMe drive: state that fits neither
            budget goes to a private swap file in a fresh subdirectory (mode 0700, removed on close).
            None: no NVMe tier (a state larger than the budgets is then an error naming the numbers).
            See `asteria.runtime.tiers`.
        max_chunk_bytes: With memory tiers, the most bytes of one *chunk*: the unit of placement and NVMe
            staging, at most ``K`` same-shape blocks of one bucket whose state is stacked and updated by the same
            batched products. Every bucket is split into the fewest chunks of near-equal size within this bound
            (a chunk holds at least one block, whatever the bound). Same forms as the budgets, at least 1.
            None (the default): automatic, ``min(host_budget // 6, device_budget // 4)`` over the budgets that
            are set (a ring of three staging buffers then takes at most half of ``host_budget``), no splitting
            when neither is set, and one block per chunk when the budgets cannot hold the state at that
            bound. It changes where bytes are and how many blocks one product batches, never the numbers.
            Only valid with a budget or ``nvme_path`` (without them the buckets are never split).
        process_group: ``torch.distributed`` group of a multi-process run. ``"auto"`` (the default): the
            default group when ``torch.distributed`` is initialised with more than one process, else a
            single-process run; None: never distributed; a ``ProcessGroup``: that group (used as it is,
            with its own timeout and a flat exchange). In a distributed run each block's refresh is
            computed by one owner rank (chosen by cost) and the results are exchanged in batched
            collectives at the install step, so every rank installs the same result at the same step;
            installs are always deterministic there (``install="eager"`` is treated as
            ``"deterministic"``, which meets its bound). See `asteria.runtime.distributed`.
        shard_state: Distributed runs only: each rank keeps the per-step state of the blocks it owns,
            updates those blocks, and the updated parameters are all-gathered every step (ZeRO-1 style),
            so per-rank optimizer memory is about ``total / world_size``. Default False.
        dist_timeout: Seconds a collective of the optimizer may wait for the other ranks before a clear
            error is raised (a rank died or stopped taking part). It must exceed the longest refresh
            round (the owner computes before it joins, e.g. the first bases at step 1). A number > 0;
            default 600.
        local_world_size: Ranks per node for the node-aware exchange (results cross between nodes once,
            leader to leader, and are broadcast inside each node). None: ``LOCAL_WORLD_SIZE`` from the
            environment (set by ``torchrun``), else every rank on one node. Ranks ``[k·n, (k+1)·n)``
            form node k. An int >= 1 or None.
        refresh_device: Where refresh jobs of statistics on a CUDA device run. ``"auto"`` (the default): on
            the host workers (LAPACK), as the reference system does, except blocks of dimension at least
            ``gpu_refresh_min_dim``, which run on the GPU (cuSOLVER on a low-priority stream) when asteria
            was built with its CUDA backend. ``"host"``: always the host workers. ``"gpu"``: always the GPU
            (an error without the CUDA backend or with state on the CPU). Statistics on the CPU always use
            the host workers. Routing is a function of the block size only, never of timing, so runs and
            resumes are reproducible.
        gpu_refresh_min_dim: The block dimension from which ``refresh_device="auto"`` routes a refresh to
            the GPU. An int >= 1; default 2048.
        fold_statistics: ``"step"`` (the default) folds each gradient into the statistics inside
            ``step()``, after the user's all-reduce, clipping, un-scaling or accumulation. ``"backward"``
            folds it in the parameter's post-accumulate-grad hook while backward still runs (on the training
            thread, between backward's kernels: the work leaves ``step()`` but is not done in parallel with
            backward); it is for plain single-process loops that call
            ``step()`` after every ``backward()`` and do not modify gradients in between. ``step()`` refuses
            it in a multi-process run, when a gradient changed between backward and ``step()`` (its tensor or
            version counter differs, as after clipping, GradScaler un-scaling or an all-reduce), and when
            backward ran twice before ``step()``.
    """

    refresh: str = "async"
    staleness: int | str | None = None
    install: str = "deterministic"
    workers: int | None = None
    worker_cpus: tuple[int, ...] | None = None
    parallel_install: bool = True
    hooks: bool = True
    device_budget: int | str | None = None
    host_budget: int | str | None = None
    nvme_path: str | os.PathLike[str] | None = None
    max_chunk_bytes: int | str | None = None
    process_group: Any = "auto"
    shard_state: bool = False
    dist_timeout: float = 600.0
    local_world_size: int | None = None
    refresh_device: str = "auto"
    gpu_refresh_min_dim: int = 2048
    fold_statistics: str = "step"
    refresh_phases: str | None = None

    def __post_init__(self) -> None:
        if self.refresh_device not in _REFRESH_DEVICES:
            raise ValueError(
                f"RuntimeConfig.refresh_device must be one of {_REFRESH_DEVICES}, got {self.refresh_device!r}"
            )
        if isinstance(self.gpu_refresh_min_dim, bool) or not isinstance(self.gpu_refresh_min_dim, int) or self.gpu_refresh_min_dim < 1:
            raise ValueError(f"RuntimeConfig.gpu_refresh_min_dim must be an int >= 1, got {self.gpu_refresh_min_dim!r}")
        if self.fold_statistics not in _FOLD_MODES:
            raise ValueError(
                f"RuntimeConfig.fold_statistics must be one of {_FOLD_MODES}, got {self.fold_statistics!r}"
            )
        if self.refresh not in _REFRESH_MODES:
            raise ValueError(f"RuntimeConfig.refresh must be one of {_REFRESH_MODES}, got {self.refresh!r}")
        if self.staleness is not None and self.staleness != "auto" and (
            isinstance(self.staleness, bool) or not isinstance(self.staleness, int) or self.staleness < 0
        ):
            raise ValueError(f"RuntimeConfig.staleness must be None, 'auto' or an int >= 0, got {self.staleness!r}")
        if self.install not in _INSTALL_MODES:
            raise ValueError(f"RuntimeConfig.install must be one of {_INSTALL_MODES}, got {self.install!r}")
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise ValueError(f"RuntimeConfig.workers must be None or an int >= 1, got {self.workers!r}")
        if self.worker_cpus is not None:
            cpus = self.worker_cpus
            if isinstance(cpus, (str, bytes)) or not hasattr(cpus, "__iter__"):
                raise ValueError(f"RuntimeConfig.worker_cpus must be None or a sequence of CPU numbers, got {cpus!r}")
            cpus = tuple(cpus)
            if not cpus or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in cpus):
                raise ValueError(
                    f"RuntimeConfig.worker_cpus must be a non-empty sequence of CPU numbers (ints >= 0), got {self.worker_cpus!r}"
                )
            if len(set(cpus)) != len(cpus):
                raise ValueError(f"RuntimeConfig.worker_cpus lists a CPU twice: {self.worker_cpus!r}")
            object.__setattr__(self, "worker_cpus", cpus)
        if not isinstance(self.parallel_install, bool):
            raise ValueError(f"RuntimeConfig.parallel_install must be a bool, got {self.parallel_install!r}")
        if not isinstance(self.hooks, bool):
            raise ValueError(f"RuntimeConfig.hooks must be a bool, got {self.hooks!r}")
        for name in ("device_budget", "host_budget"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_bytes(value, f"RuntimeConfig.{name}"))
        if self.nvme_path is not None:
            object.__setattr__(self, "nvme_path", _check_nvme_path(self.nvme_path))
        if self.max_chunk_bytes is not None:
            chunk = parse_bytes(self.max_chunk_bytes, "RuntimeConfig.max_chunk_bytes")
            if chunk < 1:
                raise ValueError(
                    f"RuntimeConfig.max_chunk_bytes must be None (automatic) or at least 1 byte, got {self.max_chunk_bytes!r}"
                )
            if not self.tiered:
                raise ValueError(
                    f"RuntimeConfig.max_chunk_bytes={self.max_chunk_bytes!r} applies to tiered state only: set "
                    "device_budget, host_budget or nvme_path as well, or leave max_chunk_bytes None (without tiers "
                    "every bucket stays whole)"
                )
            object.__setattr__(self, "max_chunk_bytes", chunk)
        if self.refresh == "sync":
            if self.staleness not in (None, 0):
                raise ValueError(
                    f"RuntimeConfig(refresh='sync', staleness={self.staleness}): the synchronous runtime has "
                    "staleness 0; use refresh='async' for a bound S > 0"
                )
            if self.install != "deterministic":
                raise ValueError(
                    f"RuntimeConfig(refresh='sync', install={self.install!r}): 'eager' applies to "
                    "refresh='async' only"
                )
            object.__setattr__(self, "staleness", 0)
        elif self.staleness is None:
            object.__setattr__(self, "staleness", "auto")
        if self.refresh_phases is not None and self.refresh_phases not in _PHASES:
            raise ValueError(f"RuntimeConfig.refresh_phases must be None, 'aligned' or 'staggered', got {self.refresh_phases!r}")
        if self.refresh == "sync" and self.refresh_phases == "staggered":
            raise ValueError(
                "RuntimeConfig(refresh='sync', refresh_phases='staggered'): the synchronous runtime is the reference "
                "algorithm, whose refreshes are aligned; use refresh='async' for staggered phases"
            )
        if self.refresh_phases is None:
            object.__setattr__(self, "refresh_phases", "aligned" if self.staleness == 0 else "staggered")

        if not (self.process_group is None or self.process_group == "auto" or _is_process_group(self.process_group)):
            raise ValueError(
                "RuntimeConfig.process_group must be 'auto', None or a torch.distributed.ProcessGroup, got "
                f"{self.process_group!r}"
            )
        if not isinstance(self.shard_state, bool):
            raise ValueError(f"RuntimeConfig.shard_state must be a bool, got {self.shard_state!r}")
        if (
            isinstance(self.dist_timeout, bool)
            or not isinstance(self.dist_timeout, (int, float))
            or not 0 < self.dist_timeout < float("inf")
        ):
            raise ValueError(f"RuntimeConfig.dist_timeout must be a number of seconds > 0, got {self.dist_timeout!r}")
        if self.local_world_size is not None and (
            isinstance(self.local_world_size, bool) or not isinstance(self.local_world_size, int) or self.local_world_size < 1
        ):
            raise ValueError(f"RuntimeConfig.local_world_size must be None or an int >= 1, got {self.local_world_size!r}")

    @property
    def staggered(self) -> bool:
        """Whether blocks refresh at staggered phases (``refresh_phases="staggered"``)."""
        return self.refresh_phases == "staggered"

    @property
    def auto_staleness(self) -> bool:
        """Whether S is chosen from measurement (``staleness="auto"``)."""
        return self.staleness == "auto"

    @property
    def tiered(self) -> bool:
        """True when a memory budget or an NVMe path is set (the state is managed by `asteria.runtime.tiers`)."""
        return self.device_budget is not None or self.host_budget is not None or self.nvme_path is not None

    def resolved_workers(self) -> int:
        """Returns the number of scheduler worker threads to start (see ``workers``)."""
        if self.workers is not None:
            return self.workers
        if self.worker_cpus is not None:
            return min(8, len(self.worker_cpus))
        return max(1, min(8, free_cores()))


def free_cores() -> int:
    """CPUs this thread may run on that torch's training threads leave free (may be 0 or negative)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        import torch  # noqa: PLC0415

        training = torch.get_num_threads()
    except Exception:  # noqa: BLE001 - torch missing or broken: assume one training thread
        training = 1
    return cores - training


def _is_process_group(value: Any) -> bool:
    """Whether ``value`` is a ``torch.distributed.ProcessGroup`` (False when torch.distributed is missing)."""
    try:
        import torch.distributed as dist  # noqa: PLC0415

        return dist.is_available() and isinstance(value, dist.ProcessGroup)
    except Exception:  # noqa: BLE001 - torch missing or built without distributed support
        return False


_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(value: Any, name: str = "value") -> int:
    """Returns the byte count of ``value``: an int >= 0, or a string such as "2GiB", "512 MiB", "1.5GB", "4096".

    Units are B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024), any case.

    Raises:
        ValueError: Naming ``name``, the value and the accepted forms.
    """
    import re  # noqa: PLC0415

    forms = "an int >= 0 or a string such as '2GiB', '512MiB' or '1.5GB'"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {forms}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be {forms}, got {value!r}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m is not None and m.group(2).lower() in _BYTE_UNITS:
            return int(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])
    raise ValueError(f"{name} must be {forms}, got {value!r}")


def _check_nvme_path(path: Any) -> str:
    """Validates ``nvme_path``: an existing directory the process can write into (its text form is returned)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"RuntimeConfig.nvme_path must be None or a directory path, got {path!r}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise ValueError(f"RuntimeConfig.nvme_path must be a non-empty directory path, got {path!r}")
    if not os.path.exists(text):
        raise ValueError(f"RuntimeConfig.nvme_path {text!r} does not exist; create the directory first (on the NVMe drive)")
    if not os.path.isdir(text):
        raise ValueError(f"RuntimeConfig.nvme_path {text!r} is not a directory")
    if not os.access(text, os.W_OK | os.X_OK):
        raise PermissionError(
            f"RuntimeConfig.nvme_path {text!r} is not writable by this process (read-only file system or "
            "permissions); choose a writable directory"
        )
    return text


DEFAULT_RUNTIME_CONFIG = RuntimeConfig()
