"""Shadow snapshots: the statistics a refresh job reads, frozen at its snapshot step.

A refresh runs while training keeps updating the statistics, so each job reads a private copy made at
the snapshot step (docs/design.md §6.2). Where that copy lives depends on where the job runs:

* **host route** (LAPACK on the scheduler's worker threads): one lease of the runtime's `PinnedPool`
  per stacked ``(B, n, n)`` tensor, each matrix starting on a 64-byte boundary. The scheduler reads the
  lease in place (no second copy: a numpy view of a lease is passed zero-copy and keeps the lease alive
  until the job is done). For CPU tensors the copy is *deferred* (``defer=True``): the snapshot names the
  copies in a `_core.DeferredCopy` made once, by the refresh worker right before the first job reading the
  leases (off the training thread), or by the training thread before it next writes the statistics
  (`RefreshPipeline.settle`), whichever comes first; until then the snapshot keeps the source tensors alive.
  For a CUDA tensor the copy is a non-blocking device-to-host DMA: a device-side
  clone on the training stream (microseconds), then the transfer on a side stream ordered with CUDA
  events, and the worker waits for the copy's event before it starts, so the training stream never
  waits for the transfer. With CUDA present the pool's mappings are registered (``cudaHostRegister``),
  which is what makes the transfer a true asynchronous DMA.
* **device route** (cuSOLVER on the runtime's low-priority stream): a device clone on the training stream;
  the engine's stream waits for it with an event (no host synchronisation).

bfloat16 statistics (``state_dtype=torch.bfloat16``) are snapshotted as float32 (refreshes never run in bfloat16):
the upcast is the snapshot's copy itself, made at once on the training thread (a deferred copy is a memcpy and
cannot convert), straight into the lease for CPU tensors, and as a float32 device-side clone for CUDA tensors
(both routes), so no float32 copy of the statistics outlives the snapshot call on the host.

`Snapshot` holds the per-matrix views and what must stay alive until the jobs finish (the CUDA event), or until
the deferred copy is made (the sources).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from asteria.runtime.pinned import acquire as acquire_pinned

__all__ = ["ALIGN_BYTES", "Snapshot", "matrix_stride", "snapshot_to_host", "snapshot_on_device"]

ALIGN_BYTES = 64
"""Every matrix of a host snapshot starts on a 64-byte boundary (LAPACK reads it in place)."""


@dataclasses.dataclass
class Snapshot:
    """Per tensor, the per-matrix snapshot views (numpy arrays on the host route, CUDA tensors on the device
    route), and the CUDA event the host job must wait for (None when the copy is already complete), or the
    deferred copy filling the views (``copy``, a `_core.DeferredCopy`) with the tensors it reads (``sources``)."""

    matrices: list[list[Any]]
    ready: Any = None
    route: str = "host"
    nbytes: int = 0
    copy: Any = None
    sources: tuple[torch.Tensor, ...] = ()


def matrix_stride(n: int, itemsize: int) -> int:
    """Bytes between consecutive (n, n) matrices of a host snapshot (rounded up to `ALIGN_BYTES`)."""
    raw = n * n * itemsize
    return -(-raw // ALIGN_BYTES) * ALIGN_BYTES


def _host_views(lease: Any, B: int, n: int, dtype: torch.dtype, itemsize: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The lease as bytes, and its B (n, n) matrices as numpy views (each at a multiple of `matrix_stride`)."""
    stride = matrix_stride(n, itemsize)
    raw = np.frombuffer(lease, dtype=np.uint8, count=B * stride)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    views = [raw[k * stride : k * stride + n * n * itemsize].view(np_dtype).reshape(n, n) for k in range(B)]
    return raw, views


def _stacked(raw: np.ndarray, B: int, n: int, dtype: torch.dtype, itemsize: int) -> torch.Tensor:
    """The lease's matrices as one strided ``(B, n, n)`` tensor (the destination of a stacked copy)."""
    flat = torch.from_numpy(raw).view(dtype)  # (B * stride / itemsize,)
    return flat.as_strided((B, n, n), (matrix_stride(n, itemsize) // itemsize, n, 1))


def snapshot_to_host(tensors: Sequence[torch.Tensor], pool: Any, copy_stream: Any = None, *, defer: bool = False) -> Snapshot:
    """Copies stacked ``(B, n, n)`` float32/float64 tensors into pinned leases (the host route); bfloat16 tensors
    are copied upcast to float32, never deferred.

    Args:
        tensors: The statistics (and bases) to freeze; CPU or CUDA tensors of one device.
        pool: The runtime's ``_core.PinnedPool``.
        copy_stream: For CUDA tensors, the side stream carrying the device-to-host copies.
        defer: CPU tensors only: do not copy now; return the copies as ``Snapshot.copy`` (a
            `_core.DeferredCopy`) for the refresh worker to make. The caller must not write the tensors until
            ``copy.run()`` has returned on some thread (`RefreshPipeline.settle`).

    Returns:
        A `Snapshot` whose ``ready`` is the copy's CUDA event (None for CPU tensors, copied at once or deferred).

    Raises:
        MemoryError: If the pool's budget cannot hold the snapshot (the message names the numbers).
    """
    out: list[list[np.ndarray]] = []
    ready = None
    total = 0
    on_cuda = bool(tensors) and tensors[0].is_cuda
    for x in tensors:
        if x.dtype not in _SNAPSHOT_DTYPES or x.dim() != 3 or x.shape[1] != x.shape[2]:
            raise ValueError(
                f"[snapshot] expected stacked (B, n, n) float32/float64/bfloat16 matrices, got {tuple(x.shape)} {x.dtype}"
            )
    # CUDA: device-side clones on the training stream first (fast), then the side stream waits for them and
    # carries the slow transfers; the training stream may overwrite the statistics right away
    defer = defer and not on_cuda and all(x.dtype != torch.bfloat16 for x in tensors)
    sources = [_device_copy(x) if on_cuda else x.detach() for x in tensors]
    if defer:  # one memcpy per matrix, from a contiguous source (a non-contiguous one is copied here, privately)
        sources = [x if x.is_contiguous() else x.contiguous() for x in sources]
    if on_cuda:
        copy_stream.wait_stream(torch.cuda.current_stream(tensors[0].device))
    pieces: list[tuple[np.ndarray, int, int]] = []
    for src in sources:
        B, n = int(src.shape[0]), int(src.shape[1])
        dtype = _snapshot_dtype(src.dtype)  # (a CPU bfloat16 source is upcast by the copy into the lease below)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = B * matrix_stride(n, itemsize)
        lease = acquire_pinned(pool, nbytes, "shadow snapshots")
        total += nbytes
        raw, views = _host_views(lease, B, n, dtype, itemsize)
        if defer:
            size = n * n * itemsize
            base = src.data_ptr()
            pieces.extend((views[k], base + k * size, size) for k in range(B))
        elif on_cuda:
            src.record_stream(copy_stream)
            with torch.cuda.stream(copy_stream):
                _stacked(raw, B, n, dtype, itemsize).copy_(src, non_blocking=True)
        else:
            _stacked(raw, B, n, dtype, itemsize).copy_(src)
        out.append(views)
    if on_cuda:
        ready = torch.cuda.Event()
        ready.record(copy_stream)
    if defer:
        from asteria import _core  # noqa: PLC0415 - the pure-Python paths of this module need no extension

        return Snapshot(out, None, "host", total, _core.DeferredCopy(pieces), tuple(sources))
    return Snapshot(out, ready, "host", total)


_SNAPSHOT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _snapshot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a snapshot holds statistics of ``dtype`` in: float32 for bfloat16, else their own."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _device_copy(x: torch.Tensor, memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """A private copy of ``x`` in its snapshot dtype (one kernel; bfloat16 is upcast)."""
    dtype = _snapshot_dtype(x.dtype)
    if dtype != x.dtype:
        return x.detach().to(dtype=dtype, memory_format=memory_format)
    return x.detach().clone(memory_format=memory_format)


def snapshot_on_device(tensors: Sequence[torch.Tensor]) -> Snapshot:
    """Clones stacked CUDA tensors on the training stream (the device route; bfloat16 ones upcast to float32);
    views per matrix."""
    out = []
    total = 0
    for x in tensors:
        snap = _device_copy(x, torch.contiguous_format)
        total += snap.numel() * snap.element_size()
        out.append([snap[k] for k in range(snap.shape[0])])
    return Snapshot(out, None, "device", total)
