"""Leases of asteria's pinned host pools, and the warning when a pool cannot page-lock its memory.

A `_core.PinnedPool` that may not lock more memory (``RLIMIT_MEMLOCK`` too small, ``mlock`` refused) hands out
ordinary pageable memory instead of failing: training goes on, but device copies from it are no longer
asynchronous DMA and the NVMe tier's ``O_DIRECT`` transfers may fault pages in. asteria's own pools are acquired
through `acquire`, which tells the user once per pool with a `PinnedMemoryWarning` naming the fix; the bytes
concerned are counted in ``opt.runtime.memory_report()["pinned"]`` (`pool_report`).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

__all__ = ["PinnedMemoryWarning", "acquire", "pool_report"]


class PinnedMemoryWarning(RuntimeWarning):
    """A pinned host pool of asteria could not page-lock its memory and uses pageable memory instead.

    Nothing is lost and the numbers do not change; copies between that memory and a GPU are slower (not
    asynchronous DMA), and NVMe transfers may have to fault pages in. The message names the limit and the fix
    (raise ``ulimit -l``, ``LimitMEMLOCK=`` in systemd, or ``--ulimit memlock=-1`` for a container).
    """


_warned: weakref.WeakSet[Any] = weakref.WeakSet()


def acquire(pool: Any, nbytes: int, purpose: str) -> Any:
    """A lease of ``nbytes`` from ``pool``; warns once per pool when the memory it gives is not page-locked.

    Args:
        pool: A `_core.PinnedPool` created with ``lock=True``.
        nbytes: Bytes wanted.
        purpose: What the memory holds, for the message (e.g. ``"shadow snapshots"``).

    Returns:
        The `_core.Lease`.

    Raises:
        MemoryError: The pool's budget cannot hold the lease (the pool's own message).
    """
    lease = pool.acquire(nbytes)
    if not lease.locked and pool not in _warned:
        _warned.add(pool)
        reason = pool.stats()["warning"] or "asteria: pinned host memory could not be page-locked"
        warnings.warn(f"{reason} (memory for {purpose}; counted in memory_report()['pinned'])", PinnedMemoryWarning,
                      stacklevel=3)
    return lease


def pool_report(pool: Any | None) -> dict[str, Any]:
    """What a pool holds and how much of it is page-locked.

    Returns:
        ``{"reserved_bytes", "locked_bytes", "unlocked_bytes", "lock_failures", "warning"}``, all 0 (and ``""``) for
        a pool not created yet (None): ``unlocked_bytes`` is mapped memory that should be pinned but is pageable.
    """
    if pool is None:
        return {"reserved_bytes": 0, "locked_bytes": 0, "unlocked_bytes": 0, "lock_failures": 0, "warning": ""}
    s = pool.stats()
    return {
        "reserved_bytes": int(s["reserved"]),
        "locked_bytes": int(s["locked"]),
        "unlocked_bytes": max(int(s["reserved"]) - int(s["locked"]), 0),
        "lock_failures": int(s["lock_failures"]),
        "warning": s["warning"],
    }
