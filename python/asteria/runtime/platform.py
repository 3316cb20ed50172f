"""What kind of memory system the optimizer state lives on, for the tier placement policy.

Three kinds (`Platform.kind`):

* ``"cpu"``: the parameters are on the CPU. The "device" tier is ordinary process memory, the host tier is
  asteria's pinned pool; both are computed on in place, so host-tier state costs no copies.
* ``"discrete"``: a GPU with its own memory behind PCIe (or similar). Host-tier and NVMe-tier state is
  copied into device work buffers for the step and back after it. The host↔device bandwidth is measured
  once, lazily (`Platform.host_to_device_gbps`), and is reported with the tier statistics.
* ``"unified"``: a GPU that reads host memory directly and coherently: an integrated GPU (one physical
  memory), or a system whose GPU uses the host's page tables (hardware coherence, e.g. Grace Hopper). There
  host-tier state needs no copies: the GPU computes on page-locked host memory in place.

The device attributes come from ``asteria._core.cuda_device_info`` when asteria was built with its CUDA
backend (``_core.cuda_built()``), and from ``torch.cuda.get_device_properties`` otherwise (which knows
only ``is_integrated``, so a coherent discrete-looking system is then treated as discrete: correct, just
with copies). Software coherence through HMM (``pageable_memory_access`` without host page tables) moves
pages on faults, which is slower than explicit copies for state touched every step, so it counts as
discrete.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import torch

__all__ = ["Platform", "PLATFORM_KINDS", "classify", "detect"]

PLATFORM_KINDS = ("cpu", "discrete", "unified")

_CACHE: dict[str, Platform] = {}
_BANDWIDTH: dict[str, float] = {}
_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Platform:
    """The memory system of one device.

    Attributes:
        kind: ``"cpu"``, ``"discrete"`` or ``"unified"``.
        device: The torch device (``cpu`` or ``cuda:N``).
        name: A readable name of the device.
        attributes: What the detection read (device attributes, and where they came from: ``source``).
    """

    kind: str
    device: torch.device
    name: str
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def host_state_in_place(self) -> bool:
        """True when state in pinned host memory can be computed on without copying it to the device."""
        return self.kind in ("cpu", "unified")

    def host_to_device_gbps(self) -> float | None:
        """Host→device copy bandwidth in GB/s from pinned memory (measured once per device; None on CPU)."""
        if self.device.type != "cuda":
            return None
        key = str(self.device)
        with _LOCK:
            if key not in _BANDWIDTH:
                _BANDWIDTH[key] = _measure_h2d(self.device)
            return _BANDWIDTH[key]

    def as_dict(self, *, measure: bool = False) -> dict[str, Any]:
        """A JSON-friendly description (``measure`` runs the bandwidth measurement if not done yet)."""
        out: dict[str, Any] = {"kind": self.kind, "device": str(self.device), "name": self.name}
        out.update({k: v for k, v in self.attributes.items() if isinstance(v, (bool, int, float, str))})
        bw = self.host_to_device_gbps() if measure else _BANDWIDTH.get(str(self.device))
        if bw is not None:
            out["host_to_device_gbps"] = bw
        return out


def classify(attributes: dict[str, Any]) -> str:
    """The platform kind of a CUDA device from its attributes (see the module docstring).

    Args:
        attributes: ``integrated``, ``pageable_memory_access``,
            ``pageable_memory_access_uses_host_page_tables`` (missing keys count as False).

    Returns:
        ``"unified"`` or ``"discrete"``.
    """
    if attributes.get("integrated"):
        return "unified"
    if attributes.get("pageable_memory_access") and attributes.get("pageable_memory_access_uses_host_page_tables"):
        return "unified"
    return "discrete"


def detect(device: torch.device | str | None = None) -> Platform:
    """Returns the `Platform` of ``device`` (cached per device; the bandwidth is measured only when asked).

    Args:
        device: A torch device; None or a CPU device gives the ``"cpu"`` platform.
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    key = str(dev)
    with _LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    if dev.type == "cuda":
        attrs = _cuda_attributes(dev.index or 0)
        plat = Platform(classify(attrs), dev, str(attrs.get("name", key)), attrs)
    elif dev.type == "cpu":
        plat = Platform("cpu", dev, "cpu", {"source": "torch"})
    else:  # another accelerator: state is copied to and from it, as for a discrete GPU
        plat = Platform("discrete", dev, dev.type, {"source": "torch"})
    with _LOCK:
        _CACHE.setdefault(key, plat)
        return _CACHE[key]


def _cuda_attributes(index: int) -> dict[str, Any]:
    try:
        from asteria import _core  # noqa: PLC0415

        if getattr(_core, "cuda_built", None) is not None and _core.cuda_built() and hasattr(_core, "cuda_device_info"):
            attrs = dict(_core.cuda_device_info(index))
            attrs["source"] = "asteria"
            return attrs
    except Exception:  # noqa: BLE001 - fall back to torch's view of the device
        pass
    props = torch.cuda.get_device_properties(index)
    return {
        "source": "torch",
        "name": props.name,
        "integrated": bool(getattr(props, "is_integrated", False)),
        "total_memory": int(props.total_memory),
    }


def _measure_h2d(device: torch.device, nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Median GB/s of pinned host→device copies of ``nbytes`` (after one warm-up copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return nbytes / times[len(times) // 2] / 1e9
