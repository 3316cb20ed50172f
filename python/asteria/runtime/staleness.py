"""The staleness bound S over a run: fixed, or chosen from measurement (``RuntimeConfig(staleness="auto")``).

`StalenessSchedule` answers, for the refresh pipeline, the two questions the install rule needs: which S applies
to a snapshot of step t (its deadline is ``t + o + S``) and whether refresh step t is taken under the
at-most-one-in-flight rule. With a fixed S both are pure functions of t. With ``"auto"`` the schedule is a list
of *epochs* ``(first step, S)``: the run starts with ``DEFAULT_STALENESS``; the pipeline reports each refresh
round's latency (submission to completion of its slowest job) and the time between steps; once
``AUTO_STALENESS_ROUNDS`` rounds are measured, the first refresh step at which no refresh is in flight starts a
new epoch with ``S = max(1, ceil(AUTO_STALENESS_MARGIN · latency / period))``. Within an epoch the taken refresh
steps follow `asteria.runtime.pipeline.accepted_refresh_step` from the epoch's first refresh step (nothing is
pending when an epoch starts, so the rule's chain restarts there). The epochs are part of checkpoints
(`export`/`load`), so a resumed run installs at the same steps.

Staggered phases (``RuntimeConfig.refresh_phases="staggered"``, the asynchronous default) change three things:
a block of phase φ takes the refresh steps of the aligned schedule shifted by φ; since every step is then some
block's refresh step and something is always in flight, the at-most-one-in-flight rule is kept per block (its last
taken refresh step, also checkpointed); and ``"auto"`` starts with ``DEFAULT_STALENESS_STAGGERED``, measures until
the timed snapshot steps span ``AUTO_STALENESS_ROUNDS`` rounds of f steps, and starts the new epoch at the step
after the decision, whatever is in flight.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

from asteria.runtime.config import AUTO_STALENESS_MARGIN, AUTO_STALENESS_ROUNDS, DEFAULT_STALENESS, DEFAULT_STALENESS_STAGGERED

__all__ = ["StalenessSchedule", "choose_staleness"]

MAX_AUTO_STALENESS = 1024
"""Upper bound of a chosen S (a refresh that slow would leave the preconditioner unrefreshed for good)."""


def choose_staleness(latency_s: float, period_s: float, margin: float = AUTO_STALENESS_MARGIN) -> int:
    """The smallest S >= 1 whose deadline, S step periods after the snapshot, leaves ``margin`` times the latency.

    Args:
        latency_s: Seconds from a refresh round's submission to the completion of its slowest job.
        period_s: Seconds between consecutive optimizer steps (forward, backward and ``step()``).
        margin: Factor of the latency the deadline must leave (> 0).

    Returns:
        ``max(1, ceil(margin · latency / period))``, at most `MAX_AUTO_STALENESS`.
    """
    if not (period_s > 0 and math.isfinite(period_s)) or not math.isfinite(latency_s):
        return DEFAULT_STALENESS
    return int(min(MAX_AUTO_STALENESS, max(1, math.ceil(margin * max(latency_s, 0.0) / period_s - 1e-9))))


class StalenessSchedule:
    """S per step for one refresh pipeline (see the module docstring).

    Args:
        staleness: An int >= 0 (fixed) or ``"auto"``.
        offset: The optimizer's install offset o.
        staggered: Staggered refresh phases: ``"auto"`` starts with `DEFAULT_STALENESS_STAGGERED`.
    """

    def __init__(self, staleness: int | str, offset: int, staggered: bool = False) -> None:
        self.auto = staleness == "auto"
        self.offset = offset
        start = DEFAULT_STALENESS_STAGGERED if staggered else DEFAULT_STALENESS
        self.epochs: list[tuple[int, int]] = [(0, start if self.auto else int(staleness))]
        self.calibrating = self.auto
        self.rounds: dict[int, float] = {}  # snapshot step -> latency (s) of the rounds measured while calibrating
        self._open: dict[int, list] = {}  # snapshot step -> [batches not installed yet, latency so far]
        self._periods: deque[float] = deque(maxlen=64)
        self.chosen: dict[str, Any] | None = None  # how the current S was chosen (auto only)
        # staggered phases: the last refresh step taken per block (stable block key)
        self.last_taken: dict[Any, int] = {}

    # -- the rule ------------------------------------------------------------------------------------------------
    @property
    def current(self) -> int:
        """The S new snapshots get."""
        return self.epochs[-1][1]

    def staleness_at(self, step: int) -> int:
        """The S of a snapshot taken at ``step``."""
        for start, s in reversed(self.epochs):
            if step >= start:
                return s
        return self.epochs[0][1]

    def epoch_start(self, step: int) -> int:
        for start, _ in reversed(self.epochs):
            if step >= start:
                return start
        return 0

    def accepts(self, t: int, is_refresh: Callable[[int], bool], first: int | float, frequency: int,
                idle: Callable[[], bool], agree: Callable[[int], int], phase: int | None = None,
                block: Any = None) -> bool:
        """Whether refresh step ``t`` is taken; may start a new epoch first (auto, calibrated, nothing in flight).

        Args:
            t: The step (1-based).
            is_refresh: The optimizer's refresh-step predicate (of the aligned schedule).
            first: The first refresh step of the optimizer (``math.inf``: never).
            frequency: The refresh interval f.
            idle: Whether no refresh is in flight (the pipeline's).
            agree: Makes the ranks of a distributed run agree on a chosen S (the largest); identity otherwise.
            phase: None for aligned phases; with ``refresh_phases="staggered"``, the block's phase φ: its refresh
                steps are the aligned ones shifted by φ.
            block: With a phase: the block's stable key, under which its last taken refresh step is kept.
        """
        from asteria.runtime.pipeline import accepted_refresh_step  # noqa: PLC0415 - the rule lives with the pipeline

        if phase is None:
            if not is_refresh(t):
                return False
            if self.calibrating and self._measured() and t > self.epochs[-1][0] and idle():
                self._decide(t, agree)
            start = self.epoch_start(t)
            if start > 0:  # a later epoch begins at the refresh step that chose it: the rule's chain restarts there
                first = start
            return accepted_refresh_step(t, is_refresh, first, frequency, self.offset + self.staleness_at(t))
        # Staggered phases: every step is some phase's refresh step and something is always in flight, so the rule
        # is kept per block: a refresh step of the block is taken when its previous refresh is installed by then
        # (the at-most-one-in-flight rule itself; within an epoch the same steps as `accepted_refresh_step`). A
        # new S may therefore start at any step; it applies from the next step on, so that all blocks of this step
        # keep the S the step began with, and is decided before the block's own test, at the first call of the
        # step, whichever blocks a rank holds.
        if self.calibrating and self._measured(frequency) and t >= self.epochs[-1][0]:
            self._decide(t + 1, agree)
        u = t - phase
        if u < first or not is_refresh(u):
            return False
        prev = self.last_taken.get(block)
        if prev is not None and prev != t and t < prev + self.offset + self.staleness_at(prev):
            return False
        self.last_taken[block] = t
        return True

    def _measured(self, frequency: int | None = None) -> bool:
        """Whether enough rounds are timed: `AUTO_STALENESS_ROUNDS` of them; with staggered phases (``frequency``
        given: f), where every snapshot step holds some phases' part of a round, also spanning at least
        ``(AUTO_STALENESS_ROUNDS - 1) · f + 1`` steps, so that every phase is in and the queueing of the
        refreshes of consecutive steps shows in the latencies."""
        if len(self.rounds) < AUTO_STALENESS_ROUNDS:
            return False
        return frequency is None or max(self.rounds) - min(self.rounds) >= (AUTO_STALENESS_ROUNDS - 1) * frequency

    def _decide(self, t: int, agree: Callable[[int], int]) -> None:
        latency = max(self.rounds.values())
        period = statistics.median(self._periods) if self._periods else float("nan")
        s = agree(choose_staleness(latency, period))
        self.chosen = {"staleness": s, "at_step": t, "latency_s": latency, "period_s": period,
                       "margin": AUTO_STALENESS_MARGIN, "rounds": len(self.rounds)}
        self.epochs.append((t, s))
        self.calibrating = False
        self.rounds = {}

    def recalibrate(self) -> None:
        """Measures the next rounds again and chooses S anew (the current S stays until then)."""
        if not self.auto:
            raise RuntimeError("recalibrate_staleness() needs RuntimeConfig(staleness='auto'); this runtime's S is fixed")
        self.calibrating = True
        self.rounds = {}
        self._open = {}

    # -- measurements (fed by the pipeline) ----------------------------------------------------------------------
    def on_period(self, seconds: float) -> None:
        """Seconds between the starts of two consecutive steps."""
        if self.calibrating and seconds > 0:
            self._periods.append(seconds)

    def on_submitted(self, version: int) -> None:
        """A refresh batch of the round of snapshot step ``version`` (first bases, version 0, are not timed)."""
        if self.calibrating and version > 0:
            self._open.setdefault(version, [0, 0.0])[0] += 1

    def on_installed(self, version: int, latencies: list[float]) -> None:
        """A batch of round ``version`` was installed; ``latencies``: its locally computed jobs' latencies."""
        if not self.calibrating or version not in self._open:
            return
        entry = self._open[version]
        entry[0] -= 1
        entry[1] = max([entry[1], *latencies])
        if entry[0] == 0:  # the round is measured once all its batches are in
            del self._open[version]
            # (counted on every rank alike, so that all decide at the same step; a round whose jobs all ran on
            # other ranks has latency 0 here, and `agree` takes the largest S)
            self.rounds[version] = entry[1]

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        return {"auto": self.auto, "epochs": [list(e) for e in self.epochs], "calibrating": self.calibrating,
                "chosen": dict(self.chosen) if self.chosen else None,
                "last_taken": [[list(k), t] for k, t in sorted(self.last_taken.items())]}

    def load(self, saved: dict[str, Any] | None) -> None:
        """Restores a schedule from `export` (a checkpoint of a run with the same ``staleness`` setting; the staggered
        phases' last refresh steps whatever the setting, so that a resumed run keeps at most one refresh per block in
        flight)."""
        if saved:
            self.last_taken = {tuple(int(x) for x in k): int(t) for k, t in saved.get("last_taken", [])}
        if not saved or bool(saved.get("auto")) != self.auto:
            return  # a fixed S given now wins over what the checkpoint's run measured
        self.epochs = [(int(a), int(b)) for a, b in saved["epochs"]]
        self.calibrating = bool(saved["calibrating"])
        self.chosen = dict(saved["chosen"]) if saved.get("chosen") else None
        self.rounds, self._open = {}, {}

    def report(self) -> dict[str, Any]:
        """For ``stats()["staleness_auto"]``."""
        return {"auto": self.auto, "calibrating": self.calibrating, "chosen": self.chosen,
                "epochs": [list(e) for e in self.epochs]}
