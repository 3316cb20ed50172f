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

from asteria import _core

__all__ = ["all_finite", "as_tensor", "output_finite", "outputs_checked", "stack_results", "to_device"]


def all_finite(x: Any) -> bool:
    """Whether a result array is finite. Device results (CUDA tensors) were checked by the engine, which
    fails the job instead, so they are not read back here (that would synchronise the device)."""
    if isinstance(x, torch.Tensor):
        return True if x.is_cuda else bool(torch.isfinite(x).all())
    return bool(np.isfinite(x).all())


def outputs_checked(result: Any) -> bool:
    """Whether a job result's outputs were already checked for NaN/Inf where they were computed.

    True for a `_core.JobResult`: the C++ scheduler's workers fail a job whose outputs are not finite. Any
    other result (one restored from a checkpoint, received from another rank, or wrapped by a caller) is
    checked at install.
    """
    return isinstance(result, _core.JobResult)


def output_finite(result: Any, x: Any) -> bool:
    """Whether the output ``x`` of the job result ``result`` may be installed as far as NaN/Inf go: read only
    when `outputs_checked` is False (`all_finite`)."""
    return outputs_checked(result) or all_finite(x)


def as_tensor(x: Any) -> torch.Tensor:
    """A result array as a tensor (numpy arrays are viewed, not copied)."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x.to(device)``; a CPU tensor bound for a CUDA device goes through pinned memory, non-blocking."""
    if device.type == "cuda" and not x.is_cuda:
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def stack_results(items: Sequence[Any], device: torch.device, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Stacks per-row results (numpy arrays, CPU or device tensors) into one ``(B, ...)`` tensor on ``device``.

    Host items travel together in one pinned non-blocking copy; device items stay where they are. ``out``: a CPU
    tensor of the stacked shape and ``dtype`` to write into (returned) when ``device`` is the CPU and every item
    has that dtype; otherwise a new tensor is returned.
    """
    ts = [as_tensor(x) for x in items]
    if out is not None and device.type == "cpu" and out.dtype == dtype and all(t.dtype == dtype for t in ts):
        for k, t in enumerate(ts):
            out[k].copy_(t)
        return out
    if device.type == "cuda":
        host = [k for k, t in enumerate(ts) if not t.is_cuda]
        if host:
            moved = to_device(torch.stack([ts[k] for k in host]), device)
            for j, k in enumerate(host):
                ts[k] = moved[j]
        return torch.stack([t.to(device) for t in ts]).to(dtype=dtype)
    return torch.stack([t.cpu() for t in ts]).to(device=device, dtype=dtype)
