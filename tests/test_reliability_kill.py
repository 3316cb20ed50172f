"""Kill-and-resume: a training process SIGKILLed at random points loses at most the steps since its last
checkpoint, and the resumed runs end bit-identical to a run that was never interrupted.

The training process is tests/kill_worker.py: async deterministic refreshes, optimizer state on the device,
host and NVMe tiers (every step pages buckets through the swap file), a checkpoint every few steps with
``asteria.save_checkpoint``. The kill points are drawn at random from three families: a random moment of a
step (pager I/O, refresh jobs in flight), a random moment of a checkpoint write (the worker slows its writes
down so the window is wide), and a random moment after the process starts (imports, loading the checkpoint).
After every kill:

* the checkpoint on disk is either absent (none completed yet) or loads and verifies, and it is the last
  one the process finished or the one it was writing (a write is atomic: never torn, never lost);
* nothing is left behind: no swap file or swap directory under ``nvme_path``, no temporary checkpoint file.
  (Where the file system has no ``O_TMPFILE`` the writer uses a named temporary file, which a kill during a save
  leaves behind; it is never taken for the checkpoint: either not a checkpoint at all, or a complete copy of the
  save that was being written.)

``ASTERIA_KILL_CYCLES`` (default 20) sets the number of kills; set it higher to run a longer campaign.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import asteria
from helpers import default_signal_dispositions, has_o_tmpfile

HERE = Path(__file__).resolve().parent
WORKER = HERE / "kill_worker.py"
KILLS = int(os.environ.get("ASTERIA_KILL_CYCLES", "20"))
SEED = int(os.environ.get("ASTERIA_KILL_SEED", "20261122"))
STEPS, SAVE_EVERY = 24, 3
CHAINS = ("soap", "kl-soap", "shampoo")
TEMP_NAME = re.compile(r"^\.ckpt\.pt\..+\.tmp$")  # the writer's named temporary file for ckpt.pt


class _Server:
    """kill_worker.py's fork server and the event lines it and its children print, read by a thread."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self._err = open(log, "w")
        with default_signal_dispositions():  # the server's children are aimed SIGINT and SIGTERM at
            self.proc = subprocess.Popen([sys.executable, str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._err, text=True)
        self.lines: queue.Queue[tuple[str, list[int]] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            word, *nums = line.split()
            self.lines.put((word, [int(n) for n in nums if n.lstrip("-").isdigit()]))
        self.lines.put(None)

    def stderr(self) -> str:
        self._err.flush()
        return self.log.read_text()[-4000:]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


class _Child:
    """One training run: a process forked by the server."""

    def __init__(self, server: _Server, workdir: Path, name: str, *, save_delay: float = 0.0) -> None:
        self.server = server
        argv = [str(workdir), "--optimizer", name, "--steps", str(STEPS), "--save-every", str(SAVE_EVERY)]
        self.started = time.monotonic()
        assert server.proc.stdin is not None
        server.proc.stdin.write(json.dumps({"argv": argv, "save_delay": save_delay}) + "\n")
        server.proc.stdin.flush()
        event = server.lines.get(timeout=60)
        assert event is not None and event[0] == "PID", (event, server.stderr())
        self.pid = event[1][0]
        self.returncode: int | None = None
        self.late: list[tuple[str, int]] = []  # the events `finish` read instead of the caller

    def next_event(self, timeout: float) -> tuple[str, int] | None:
        """The next event line of the run; None when it ended (or printed nothing for `timeout` seconds)."""
        if self.returncode is not None:
            return None
        try:
            event = self.server.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        assert event is not None, f"the fork server died: {self.server.stderr()}"
        word, nums = event
        if word == "EXIT":
            self.returncode = nums[1]
            return None
        return word, (nums[0] if nums else -1)

    def kill(self, sig: int) -> float:
        """Sends `sig` and waits for the process to end; returns how long it took to exit. The events the run
        printed before it died (possibly after the caller's last read: the signal lands some time after that)
        are in `late`."""
        t0 = time.monotonic()
        os.kill(self.pid, sig)
        rc = self.finish()
        assert rc != 0, "the process ignored the signal"
        return time.monotonic() - t0

    def finish(self, timeout: float = 60.0) -> int:
        """Waits for the end of the run and returns its exit status; its remaining events go to `late`."""
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            if time.monotonic() > deadline:  # pragma: no cover - a hang is the failure this reports
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"the training process did not exit within {timeout:.0f} s")
            event = self.next_event(max(0.0, deadline - time.monotonic()))
            if event is not None:
                self.late.append(event)
        return self.returncode


def _flatten(obj, prefix=""):
    """(path, value) pairs of every leaf of nested dicts/lists/tuples."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _flatten(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def _assert_bit_identical(a: dict, b: dict) -> None:
    fa, fb = dict(_flatten(a)), dict(_flatten(b))
    assert fa.keys() == fb.keys()
    for key, x in fa.items():
        y = fb[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                          and torch.equal(x.nan_to_num(), y.nan_to_num())), key
        else:
            assert x == y, key


def _leftovers(workdir: Path, named_temp: bool, pending: int | None, checked: set[str]) -> list[str]:
    """Files a killed process must not leave behind: swap files/directories and temporary checkpoints.

    The writer's named temporary file is allowed, checked once (names in `checked`) when it appears, as a
    complete copy of the save in progress (step `pending`): with O_TMPFILE the finished file is linked under that
    name just before the rename, and a kill in between leaves it. With ``named_temp`` (no O_TMPFILE in
    `workdir`) the file exists from the start, so it may also be an unfinished one, which is not a checkpoint
    (the header is written last)."""
    extra = [f"swap/{p}" for p in os.listdir(workdir / "swap")] if (workdir / "swap").exists() else []
    for p in os.listdir(workdir):
        if p in ("swap", "ckpt.pt") or p in checked:
            continue
        if not TEMP_NAME.match(p):
            extra.append(p)
            continue
        try:
            step = asteria.load_checkpoint(workdir / p)["step"]
        except asteria.CheckpointError as e:
            assert named_temp, f"{p}: an unfinished checkpoint under a name, written through O_TMPFILE: {e}"
            assert e.reason == "not_a_checkpoint", f"{p}: {e.reason}: {e}"
        else:
            assert pending is not None and step == pending, f"{p} is a complete checkpoint of step {step}"
        checked.add(p)
    return extra


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _Server(tmp_path_factory.mktemp("server") / "stderr.log")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The final checkpoint of an uninterrupted run per optimizer, from a fresh interpreter (not the fork
    server), computed on first use."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            workdir = tmp_path_factory.mktemp(f"reference-{name}")
            subprocess.run([sys.executable, str(WORKER), str(workdir), "--optimizer", name, "--steps", str(STEPS),
                            "--save-every", str(SAVE_EVERY)], check=True, capture_output=True, timeout=300)
            cache[name] = asteria.load_checkpoint(workdir / "ckpt.pt")
        return cache[name]

    return get


def _one_cycle(child: _Child, rng: random.Random, family: str, sig: int) -> tuple[bool, int | None, int | None]:
    """Runs `child` until the kill point of `family`, then sends `sig`. Returns (done, last completed save,
    save in progress)."""
    last_end = pending = None
    steps = 0
    deadline = None

    def track(word: str, num: int) -> None:
        nonlocal last_end, pending
        if word == "SAVE-BEGIN":
            pending = num
        elif word == "SAVE-END":
            last_end, pending = num, None

    if family == "start":
        deadline = child.started + rng.uniform(0.0, 0.4)  # building the optimizer, loading the checkpoint
    target_steps = rng.randint(1, 2 * SAVE_EVERY)
    while True:
        timeout = 120.0 if deadline is None else max(0.0, deadline - time.monotonic())
        event = child.next_event(timeout)
        if event is None:
            if deadline is not None and time.monotonic() >= deadline and child.returncode is None:
                elapsed = child.kill(sig)
                assert sig == signal.SIGKILL or elapsed < 10.0, f"{elapsed:.1f} s to exit after signal {sig}"
                for late in child.late:  # printed before it died, after the last read: they happened
                    track(*late)
                return False, last_end, pending
            rc = child.finish()
            raise AssertionError(f"the training process ended early (exit {rc}): {child.server.stderr()}")
        word, num = event
        track(word, num)
        if word == "DONE":
            assert child.finish() == 0, child.server.stderr()
            return True, last_end, pending
        if word == "STEP":
            steps += 1
            if family == "step" and steps >= target_steps and deadline is None:
                deadline = time.monotonic() + rng.uniform(0.0, 0.03)  # somewhere inside the next step
        elif word == "SAVE-BEGIN":
            if family == "save" and deadline is None:
                deadline = time.monotonic() + rng.uniform(0.0, 0.25)  # inside the (slowed) write


@pytest.mark.signals
@pytest.mark.parametrize("sig,cycles", [(signal.SIGKILL, KILLS), (signal.SIGTERM, 4), (signal.SIGINT, 4)],
                         ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_at_random_points_never_loses_or_corrupts_state(tmp_path, server, references, sig, cycles):
    """SIGKILL (no cleanup at all), SIGTERM (default action: no Python cleanup either) and SIGINT
    (KeyboardInterrupt wherever the main thread is) at random points: prompt exit, nothing left behind,
    the last checkpoint intact, and the resumed chain bit-identical to the uninterrupted run."""
    rng = random.Random(SEED + sig)
    named_temp = not has_o_tmpfile(tmp_path)
    kills = bit_identical = chains = 0
    families: dict[str, int] = {"step": 0, "save": 0, "start": 0}
    while kills < cycles:
        name = CHAINS[chains % len(CHAINS)]
        workdir = tmp_path / f"chain-{chains}"
        workdir.mkdir()
        committed = None
        checked: set[str] = set()
        while True:
            family = rng.choice(("step", "step", "save", "start")) if kills < cycles else "none"
            child = _Child(server, workdir, name, save_delay=0.05 if family == "save" else 0.0)
            if family == "none":
                assert child.finish() == 0, server.stderr()
                break
            done, last_end, pending = _one_cycle(child, rng, family, sig)
            if done:
                break
            kills += 1
            families[family] += 1
            committed = last_end if last_end is not None else committed
            ckpt = workdir / "ckpt.pt"
            if not ckpt.exists():
                assert committed is None, f"the checkpoint of step {committed} was lost"
            else:  # loads and verifies: never torn; the last one finished, or the one being written
                step = asteria.load_checkpoint(ckpt)["step"]
                allowed = {s for s in (committed, pending) if s is not None}
                assert step in allowed, (step, allowed)
                committed = step
            left = _leftovers(workdir, named_temp, pending, checked)
            assert left == [], f"left behind after signal {sig} ({family}): {left}"
        final = asteria.load_checkpoint(workdir / "ckpt.pt")
        assert final["step"] == STEPS
        _assert_bit_identical(final, references(name))
        bit_identical += 1
        chains += 1
    print(f"\n{signal.Signals(sig).name} campaign: {kills} kills {families}, {chains} chains resumed to the end, "
          f"{bit_identical} bit-identical to the uninterrupted run")
    assert bit_identical == chains >= 1
    assert families["step"] and (families["save"] or cycles < KILLS)
