"""Moving refresh results into optimizer state without synchronising the training stream.

Results of host jobs are numpy arrays (owned by the worker), results of device jobs CUDA tensors already
checked on the device by the engine. Installing them on a CUDA device goes through page-locked memory and a
non-blocking copy ordered on the current stream: a copy from pageable memory would make the host wait for
every kernel queued before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["all_finite", "as_tensor", "stack_results", "to_device"]


def all_finite(x: Any) -> bool:
    """Whether a result array is finite. Device results (CUDA tensors) were checked by the engine, which
    fails the job instead, so they are not read back here (that would synchronise the device)."""
    if isinstance(x, torch.Tensor):
        return True if x.is_cuda else bool(torch.isfinite(x).all())
    return bool(np.isfinite(x).all())


def as_tensor(x: Any) -> torch.Tensor:
    """A result array as a tensor (numpy arrays are viewed, not copied)."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x.to(device)``; a CPU tensor bound for a CUDA device goes through pinned memory, non-blocking."""
    if device.type == "cuda" and not x.is_cuda:
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def stack_results(items: Sequence[Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Stacks per-row results (numpy arrays, CPU or device tensors) into one ``(B, ...)`` tensor on ``device``.

    Host items travel together in one pinned non-blocking copy; device items stay where they are.
    """
    ts = [as_tensor(x) for x in items]
    if device.type == "cuda":
        host = [k for k, t in enumerate(ts) if not t.is_cuda]
        if host:
            moved = to_device(torch.stack([ts[k] for k in host]), device)
            for j, k in enumerate(host):
                ts[k] = moved[j]
        return torch.stack([t.to(device) for t in ts]).to(dtype=dtype)
    return torch.stack([t.cpu() for t in ts]).to(device=device, dtype=dtype)
