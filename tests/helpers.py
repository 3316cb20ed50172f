"""Small pieces the test modules share: a probe for unnamed temporary files, the signal dispositions of child
processes, stopping a subprocess without leaving it behind, and bit-exact comparison of nested state."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import torch


def has_o_tmpfile(directory: str | os.PathLike) -> bool:
    """Whether the checkpoint writer gets an unnamed temporary file (``O_TMPFILE``) in ``directory``.

    The same test the writer makes: ``/proc/self/fd`` must be searchable (the unnamed file gets its name through
    it) and the file system must accept ``O_TMPFILE``. Where either is missing, the writer uses a named temporary
    file, ``.<name>.<random>.tmp``, which a killed process leaves behind.

    Args:
        directory: an existing directory.

    Returns:
        True when an unnamed file can be created there; False when the writer falls back to a named one.

    Raises:
        OSError: ``directory`` cannot be opened, or creating the file failed for another reason (no space,
            no permission): the writer would refuse to save there too.
    """
    if not hasattr(os, "O_TMPFILE") or not os.access("/proc/self/fd", os.X_OK):
        return False
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd))
    except OSError as e:
        # EOPNOTSUPP: the file system has no O_TMPFILE; EISDIR: the kernel does not know the flag; EINVAL and
        # ENOENT: reported by some file systems and older kernels instead
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return False
        raise
    finally:
        os.close(dir_fd)
    return True


@contextlib.contextmanager
def default_signal_dispositions() -> Iterator[None]:
    """SIGINT and SIGTERM at their default dispositions while the block runs, for this process and its children.

    A test run started in the background by a non-interactive shell, under ``nohup`` or by some CI runners
    inherits SIGINT ignored, and so does every child it starts: Python then installs no ``KeyboardInterrupt``
    handler and a Ctrl-C test's signal does nothing. Inside this block SIGINT raises ``KeyboardInterrupt`` here,
    SIGTERM ends the process, and children started here begin with both at their defaults (a caught signal is
    reset to its default action by ``exec``; an ignored one would stay ignored). The previous dispositions are
    restored on exit. Main thread only, as for `signal.signal`.
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if previous[signal.SIGTERM] == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def io_uring_expected() -> tuple[bool, str]:
    """Whether this platform must run the pager's io_uring backend, and if not, why.

    Always, unless the build has no io_uring (configured with ``ASTERIA_WITH_LIBURING=OFF``) or the environment
    variable ``ASTERIA_NO_IO_URING`` (non-empty, not ``0``) says the platform lacks it (an old kernel, a seccomp
    profile that blocks io_uring). Elsewhere a pager that cannot set io_uring up fails the tests instead of
    skipping them.
    """
    from asteria import _core

    if not _core.pager_built_with_io_uring():
        return False, "asteria was built without liburing (ASTERIA_WITH_LIBURING=OFF)"
    off = os.environ.get("ASTERIA_NO_IO_URING", "")
    if off not in ("", "0"):
        return False, f"ASTERIA_NO_IO_URING={off} says this platform has no io_uring"
    return True, ""


def stop(proc: subprocess.Popen, sig: int, timeout: float = 30.0) -> tuple[object, object, float]:
    """Sends ``sig`` to ``proc`` and waits for it to exit, collecting the rest of its output.

    Whatever happens (the process outlives ``timeout``, the wait is interrupted), ``proc`` is killed and reaped
    before this returns or raises, so no test leaves a process running (or a pipe open).

    Args:
        proc: a process started with ``subprocess.Popen`` (its ``stdout``/``stderr`` pipes, if any, are drained).
        sig: the signal to send.
        timeout: seconds to wait for the exit.

    Returns:
        ``(stdout, stderr, seconds)``: the output that ``communicate()`` collected (None for a stream that is not
        a pipe) and the seconds from sending the signal to the exit.

    Raises:
        subprocess.TimeoutExpired: ``proc`` did not exit within ``timeout`` seconds (it was killed).
    """
    try:
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
        return out, err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()  # waits, and closes the pipes


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same_bits(a, b, path: str = "") -> None:
    """Asserts that two nested containers are the same, tensors bit for bit.

    Dicts must have the same keys, lists and tuples the same type and length, tensors the same dtype, shape and
    device and bytes (so NaN payloads and the sign of zero count), other values must compare equal.

    Args:
        a: the expected value (dicts, lists and tuples of tensors and plain values).
        b: the value to check.
        path: where ``a`` sits in an enclosing structure, shown in the failure message.

    Raises:
        AssertionError: at the first difference, naming its path.
    """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path or '/'}: a tensor against {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (
            f"{path or '/'}: {a.dtype} {tuple(a.shape)} on {a.device} against {b.dtype} {tuple(b.shape)} on {b.device}")
        assert torch.equal(_bits(a), _bits(b)), f"{path or '/'}: the bits differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (
            f"{path or '/'}: keys {list(a)} against {list(b) if isinstance(b, dict) else type(b).__name__}")
        for k in a:
            assert_same_bits(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (
            f"{path or '/'}: {type(a).__name__} of {len(a)} against {type(b).__name__}")
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_bits(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path or '/'}: {a!r} != {b!r}"


def regression_run(make_opt, steps: int, state_dtype: torch.dtype, runtime) -> dict[str, object]:
    """A small two-layer regression trained by ``make_opt(params, state_dtype=..., runtime=...)`` (the bf16-state
    tests): the losses, the parameters before and after, and the optimizer's final ``memory_report()``."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(128, 12, generator=gen)
    Y = torch.tanh(X @ torch.randn(12, 6, generator=gen))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 6))
    start = [p.detach().clone() for p in model.parameters()]
    opt = make_opt(model.parameters(), state_dtype=state_dtype, runtime=runtime)
    losses = []
    try:
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X), Y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        losses.append(float(torch.nn.functional.mse_loss(model(X), Y).detach()))
        report = opt.runtime.memory_report()
        state = opt.state_dict()
    finally:
        opt.close()
    return {"losses": losses, "start": start, "params": [p.detach().clone() for p in model.parameters()],
            "report": report, "state": state}


def float_state_bytes(state_dict: dict, itemsize: int | None = None) -> tuple[int, int]:
    """``(floating, other)`` bytes of the block tensors of an asteria ``state_dict()``; floating ones counted at
    ``itemsize`` bytes per element when given (their own size otherwise)."""
    floating = other = 0
    for st in state_dict["state"].values():
        for block in st.get("blocks", []):
            for t in block.values():
                if t.is_floating_point():
                    floating += t.numel() * (itemsize or t.element_size())
                else:
                    other += t.numel() * t.element_size()
    return floating, other


def check_bf16_state_run(make_opt, runtime, steps: int = 24, closeness: float = 0.1) -> dict[str, object]:
    """The checks every optimizer's bf16-state test makes (returns the bf16 run):

    * it trains: the loss falls below half its first value;
    * it stays close to float32 state: at every step the loss differs from the float32 run's by at most
      ``closeness`` of the float32 run's progress (first loss minus last);
    * every floating state tensor is bfloat16, and ``memory_report()["state_bytes"]`` is the float32 run's state at
      2 bytes per floating element (integer counters unchanged): half the floating bytes.
    """
    ref = regression_run(make_opt, steps, torch.float32, runtime)
    run = regression_run(make_opt, steps, torch.bfloat16, runtime)
    l32, l16 = ref["losses"], run["losses"]
    assert l16[-1] < 0.5 * l16[0], l16
    progress = l32[0] - l32[-1]
    worst = max(abs(a - b) for a, b in zip(l32, l16))
    assert worst <= closeness * progress, (worst, progress, l32, l16)
    floating32, other = float_state_bytes(ref["state"])
    floating16, other16 = float_state_bytes(run["state"])
    assert floating16 == floating32 // 2 and other16 == other  # every floating state tensor is bfloat16
    assert run["report"]["state_bytes"] == ref["report"]["state_bytes"] - floating32 // 2 == floating16 + other
    return run
