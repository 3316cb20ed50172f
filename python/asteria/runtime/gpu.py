"""The device route of the refresh pipeline: cuSOLVER jobs on a low-priority CUDA stream.

`DeviceRefresh` wraps ``asteria._core.CudaRefreshEngine`` (built with ``ASTERIA_ENABLE_CUDA=ON``): it
allocates each job's outputs on the device, submits the job ordered after the training stream's work with
an event (never a host synchronisation), and turns completed engine jobs into `DeviceResult`s carrying
those outputs. The engine checks the inputs and outputs for non-finite values and the solver's status on
the device, so a failed job arrives as ``ok=False`` with a message, like a failed host job. As on the host, a
failed fp32 decomposition (eigh, inverse root) is redone in fp64 first (the engine's ``fp64_retry``, on by
default), so it fails only when fp64 fails too.

Routing (`route_for`) is a pure function of the configuration, the device and the block size, never of
timing, so a run (and its resume) computes every refresh in the same place with the same numerics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["DeviceRefresh", "DeviceResult", "cuda_backend_available", "route_for"]


def cuda_backend_available() -> bool:
    """True when asteria was built with its CUDA backend and torch sees a CUDA device."""
    try:
        from asteria import _core

        return bool(getattr(_core, "cuda_built", lambda: False)()) and torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA install means: no device route
        return False


def route_for(refresh_device: str, min_dim: int, n: int, device: torch.device, method: str = "eigh") -> str:
    """Where a refresh of an (n, n) statistic living on ``device`` runs: ``"host"`` or ``"device"``.

    Args:
        refresh_device: `RuntimeConfig.refresh_device` (``"auto"``, ``"host"`` or ``"gpu"``).
        min_dim: `RuntimeConfig.gpu_refresh_min_dim`: with ``"auto"``, blocks at least this large go to the GPU.
        n: The matrix size.
        device: Where the statistic lives.
        method: The inverse-root method (the device route implements ``"eigh"`` only).

    Raises:
        RuntimeError: If ``refresh_device="gpu"`` but the statistics are not on a CUDA device or asteria was
            built without its CUDA backend.
    """
    if refresh_device == "host" or device.type != "cuda" or method != "eigh":
        if refresh_device == "gpu" and device.type != "cuda":
            raise RuntimeError(
                f"RuntimeConfig(refresh_device='gpu') needs the optimizer state on a CUDA device, got {device}; "
                "use refresh_device='auto' or 'host'"
            )
        return "host"
    if refresh_device == "gpu":
        if not cuda_backend_available():
            raise RuntimeError(
                "RuntimeConfig(refresh_device='gpu'): this asteria build has no CUDA backend; rebuild with "
                "pip install . -Ccmake.define.ASTERIA_ENABLE_CUDA=ON, or use refresh_device='auto'"
            )
        return "device"
    return "device" if n >= min_dim and cuda_backend_available() else "host"


@dataclasses.dataclass
class DeviceResult:
    """A completed device job with its outputs (CUDA tensors); the fields the installers read."""

    ok: bool
    status: str
    message: str
    outputs: dict[str, torch.Tensor]
    version: int
    deadline: int
    block_id: int
    latency_s: float
    job_id: Any = None


class DeviceRefresh:
    """One engine (stream, cuSOLVER and cuBLAS handles, workspace) per CUDA device."""

    def __init__(self, device: torch.device) -> None:
        from asteria import _core

        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.engine = _core.CudaRefreshEngine(index, low_priority=True)
        self._outputs: dict[int, dict[str, torch.Tensor]] = {}
        self._inputs: dict[int, tuple[Any, ...]] = {}

    def submit(self, job: Any) -> int:
        """Submits a `RefreshJob` whose matrices are CUDA tensors; returns the engine's job id."""
        a = job.a
        n = int(a.shape[-1])
        stream = torch.cuda.current_stream(self.device).cuda_stream
        opts = dict(job.options)
        eng = self.engine
        if job.kind == "eigh":
            out = {"eigenvalues": torch.empty(n, dtype=a.dtype, device=a.device), "eigenvectors": torch.empty_like(a)}
            jid = eng.submit_eigh(
                job.block_id, job.version, job.deadline, a, out["eigenvalues"], out["eigenvectors"],
                ridge=float(opts.get("ridge", 0.0)), descending=bool(opts.get("descending", False)), wait_stream=stream,
            )
        elif job.kind == "inverse_root":
            out = {"root": torch.empty_like(a)}
            jid = eng.submit_inverse_root(
                job.block_id, job.version, job.deadline, a, out["root"],
                root=float(opts["root"]), epsilon=float(opts["epsilon"]), wait_stream=stream,
            )
        else:
            out = {"basis": torch.empty_like(a), "permutation": torch.empty(n, dtype=torch.int64, device=a.device)}
            jid = eng.submit_eigenbasis_refresh(
                job.block_id, job.version, job.deadline, a, job.q, out["basis"], out["permutation"],
                sort=bool(opts.get("sort", True)), wait_stream=stream,
            )
        jid = int(jid)
        self._outputs[jid] = out
        self._inputs[jid] = (a, job.q)  # alive until the engine is done with them
        return jid

    def _wrap(self, res: Any) -> DeviceResult:
        jid = int(res.job_id)
        out = self._outputs.pop(jid, {})
        self._inputs.pop(jid, None)
        return DeviceResult(
            ok=bool(res.ok), status=str(res.status), message=str(res.message), outputs=out if res.ok else {},
            version=int(res.version), deadline=int(res.deadline), block_id=int(res.block_id),
            latency_s=float(res.latency_s), job_id=jid,
        )

    def poll(self) -> list[DeviceResult]:
        """Completed jobs (never blocks)."""
        return [self._wrap(r) for r in self.engine.poll()]

    def wait(self, job_id: int) -> DeviceResult:
        """Blocks the calling thread (not the device) until the job completes."""
        return self._wrap(self.engine.wait(int(job_id)))

    def stats(self) -> dict[str, Any]:
        return dict(self.engine.stats())

    def close(self) -> None:
        self.engine.close()
        self._outputs.clear()
        self._inputs.clear()
