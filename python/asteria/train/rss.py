"""Peak memory of a training run, as users measure it: the process's resident set (and torch's GPU allocator).

Linux keeps the peak resident set size of a process (``VmHWM`` in ``/proc/self/status``) and lets the process
reset it to the current size (writing ``5`` to ``/proc/self/clear_refs``), so the runs of one ``asteria-train``
comparison, which share a process, each get their own peak: `reset_peak` before a run, `peak` after it. Where
either is not available (not Linux, a restricted ``/proc``) the peak is unknown (None), never a wrong number.
"""

from __future__ import annotations

import dataclasses

import torch


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_peak_rss_bytes() -> int | None:
    """The process's peak resident set since it started or since the last `reset_peak` (None: unknown)."""
    return _status_bytes("VmHWM")


@dataclasses.dataclass(frozen=True)
class PeakMark:
    """What `reset_peak` found: the resident set when the run started, and whether the peak could be reset."""

    start_rss_bytes: int | None
    reset: bool


def reset_peak(device: str | torch.device = "cpu") -> PeakMark:
    """Starts a new peak: the process's peak RSS becomes its current RSS, and on a CUDA ``device`` torch's
    peak-memory statistics are reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return PeakMark(_status_bytes("VmRSS"), reset)


def peak(mark: PeakMark, device: str | torch.device = "cpu") -> dict[str, int | None]:
    """The peaks since ``mark``: ``peak_rss_bytes`` (None when it could not be reset, since the process's
    earlier peak would be reported), ``start_rss_bytes``, and on CUDA ``gpu_peak_allocated_bytes``."""
    out: dict[str, int | None] = {
        "peak_rss_bytes": process_peak_rss_bytes() if mark.reset else None,
        "start_rss_bytes": mark.start_rss_bytes,
    }
    if torch.device(device).type == "cuda":
        out["gpu_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def allocator_stats() -> dict[str, int] | None:
    """What glibc's allocator holds now (``malloc_info``), or None where it is not glibc's.

    Returns:
        ``main_arena_bytes`` / ``main_arena_free_bytes``: the heap of the main thread's arena and the part of it
        that is free (freed by the program, kept by the allocator: resident where it was touched);
        ``thread_arena_bytes`` / ``thread_arena_free_bytes``: the same for the arenas other threads allocate
        from (the refresh workers, the install helper, autograd's threads); ``mmapped_bytes``: blocks the
        allocator mapped on their own (large ones, returned to the system when freed); ``arenas``.
    """
    import ctypes  # noqa: PLC0415
    import os  # noqa: PLC0415
    import re  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    try:
        libc = ctypes.CDLL("libc.so.6")
        info, fdopen, fclose = libc.malloc_info, libc.fdopen, libc.fclose
    except (OSError, AttributeError):
        return None
    fdopen.restype = ctypes.c_void_p
    fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
    fclose.argtypes = [ctypes.c_void_p]
    info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.TemporaryFile() as f:
        fp = fdopen(os.dup(f.fileno()), b"w")
        if not fp or info(0, fp) != 0:
            if fp:
                fclose(fp)
            return None
        fclose(fp)
        f.seek(0)
        text = f.read().decode(errors="replace")
    out = {"main_arena_bytes": 0, "main_arena_free_bytes": 0, "thread_arena_bytes": 0, "thread_arena_free_bytes": 0,
           "mmapped_bytes": 0, "arenas": 0}
    for nr, body in re.findall(r'<heap nr="(\d+)">(.*?)</heap>', text, flags=re.S):
        system = re.search(r'<system type="current" size="(\d+)"/>', body)
        free = sum(int(x) for x in re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"/>', body))
        where = "main" if nr == "0" else "thread"
        out[f"{where}_arena_bytes"] += int(system.group(1)) if system else 0
        out[f"{where}_arena_free_bytes"] += free
        out["arenas"] += 1
    tail = text.rsplit("</heap>", 1)[-1]
    mmapped = re.search(r'<total type="mmap" count="\d+" size="(\d+)"/>', tail)
    out["mmapped_bytes"] = int(mmapped.group(1)) if mmapped else 0
    return out
