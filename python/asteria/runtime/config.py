"""Runtime configuration shared by every asteria optimizer.

`RuntimeConfig` is a keyword-only dataclass validated in ``__post_init__`` (STYLE.md pattern 6). It
decides how the expensive, infrequent refresh work (eigendecompositions, inverse roots, eigenbasis
refreshes) reaches the C++ `RefreshScheduler` and when its results are installed. Options whose
machinery is not implemented yet are accepted only at their default value and otherwise refused with
a `NotImplementedError` that says so, so a configuration never silently means something else.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["RuntimeConfig", "DEFAULT_RUNTIME_CONFIG"]

_REFRESH_MODES = ("sync", "async")
_INSTALL_MODES = ("deterministic", "eager")


@dataclasses.dataclass(kw_only=True, frozen=True)
class RuntimeConfig:
    """How refresh work is scheduled and installed.

    Attributes:
        refresh: ``"sync"`` submits the refresh jobs of a refresh step to the C++ scheduler and waits
            for them at that step, which is exactly the reference algorithm. ``"async"`` (installing
            results ``staleness`` steps later while training goes on) is not implemented yet.
        staleness: The bound S: a result computed from the statistics of step s is installed at step
            ``s + o + S`` (o = 0 for Shampoo, 1 for SOAP and KL). Must be an int >= 0; only 0 is
            implemented (and it is the only value meaningful with ``refresh="sync"``).
        install: ``"deterministic"`` (install exactly at ``s + o + S``) or ``"eager"`` (as soon as ready,
            never later). Only ``"deterministic"`` is implemented.
        workers: Number of host worker threads of the refresh scheduler; ``None`` picks one per free
            core (at most 8). Must be an int >= 1 or None.
        device_budget: Device-memory budget for optimizer state (bytes, or a string such as "2GiB").
            Not implemented yet: must be None.
        host_budget: Pinned host-memory budget. Not implemented yet: must be None.
        nvme_path: Directory for the NVMe tier. Not implemented yet: must be None.
        process_group: ``torch.distributed`` group for multi-process refresh. Only ``"auto"`` is
            accepted for now, and single-process behaviour is used.
    """

    refresh: str = "sync"
    staleness: int = 0
    install: str = "deterministic"
    workers: int | None = None
    device_budget: int | str | None = None
    host_budget: int | str | None = None
    nvme_path: str | os.PathLike[str] | None = None
    process_group: Any = "auto"

    def __post_init__(self) -> None:
        if self.refresh not in _REFRESH_MODES:
            raise ValueError(f"RuntimeConfig.refresh must be one of {_REFRESH_MODES}, got {self.refresh!r}")
        if isinstance(self.staleness, bool) or not isinstance(self.staleness, int) or self.staleness < 0:
            raise ValueError(f"RuntimeConfig.staleness must be an int >= 0, got {self.staleness!r}")
        if self.install not in _INSTALL_MODES:
            raise ValueError(f"RuntimeConfig.install must be one of {_INSTALL_MODES}, got {self.install!r}")
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise ValueError(f"RuntimeConfig.workers must be None or an int >= 1, got {self.workers!r}")
        for name in ("device_budget", "host_budget"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (int, str)) or isinstance(value, bool):
                raise ValueError(f"RuntimeConfig.{name} must be None, a byte count or a string like '2GiB', got {value!r}")

        # Options whose machinery does not exist yet: refuse rather than ignore.
        if self.refresh == "async":
            raise NotImplementedError(
                "RuntimeConfig(refresh='async') is not implemented yet; use refresh='sync' "
                "(the synchronous reference algorithm)"
            )
        if self.staleness != 0:
            raise NotImplementedError(
                f"RuntimeConfig(staleness={self.staleness}) needs refresh='async', which is not implemented "
                "yet; with refresh='sync' the staleness is 0"
            )
        if self.install != "deterministic":
            raise NotImplementedError(
                f"RuntimeConfig(install={self.install!r}) needs refresh='async', which is not implemented yet"
            )
        for name in ("device_budget", "host_budget", "nvme_path"):
            if getattr(self, name) is not None:
                raise NotImplementedError(
                    f"RuntimeConfig.{name} (tiered optimizer state) is not implemented yet; leave it None"
                )
        if not (isinstance(self.process_group, str) and self.process_group == "auto"):
            raise NotImplementedError(
                "RuntimeConfig.process_group is not implemented yet (distributed refresh); leave it 'auto'"
            )

    def resolved_workers(self) -> int:
        """Returns the number of scheduler worker threads to start."""
        if self.workers is not None:
            return self.workers
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, min(8, cores))


DEFAULT_RUNTIME_CONFIG = RuntimeConfig()
