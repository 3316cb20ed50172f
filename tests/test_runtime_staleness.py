"""The staleness schedule (asteria/runtime/staleness.py): S fixed, or chosen from the measured refresh latency."""

from __future__ import annotations

import math
import time

import pytest
import torch

import asteria
from asteria import _core
from asteria.runtime.config import AUTO_STALENESS_ROUNDS, DEFAULT_STALENESS, DEFAULT_STALENESS_STAGGERED
from asteria.runtime.pipeline import accepted_refresh_step
from asteria.runtime.staleness import StalenessSchedule, choose_staleness
from helpers import assert_same_bits


def test_choose_staleness_is_the_smallest_bound_with_the_margin():
    assert choose_staleness(0.0, 0.1) == 1  # at least 1: an async refresh is never installed in its own step
    assert choose_staleness(0.05, 0.1) == 1  # 1.5 x 0.05 = 0.075 s fits in one step period
    assert choose_staleness(0.1, 0.1) == 2
    assert choose_staleness(1.0, 0.1) == 15
    assert choose_staleness(1.0, 0.1, margin=2.0) == 20
    assert choose_staleness(1.0, float("nan")) == DEFAULT_STALENESS  # no period measured: keep the start value
    assert choose_staleness(1e9, 1e-9) == 1024  # bounded


def _drive(schedule, steps, f=4, latency=0.2, period=0.1):
    """Runs the schedule like the pipeline of an eigenbasis optimizer (o = 1) with one block: each taken refresh step
    submits one batch, installed at its deadline, with the given latency. Returns the (snapshot step, deadline) pairs."""
    taken, in_flight = [], []
    for t in range(1, steps + 1):
        schedule.on_period(period)
        if schedule.accepts(t, lambda x: x % f == 0, f, f, lambda: not in_flight, lambda s: s):
            deadline = t + 1 + schedule.staleness_at(t)
            schedule.on_submitted(t)
            taken.append((t, deadline))
            in_flight.append((t, deadline))
        for v, d in list(in_flight):  # installs at boundary t + 1, at the end of step t
            if d <= t + 1:
                in_flight.remove((v, d))
                schedule.on_installed(v, [latency])
        assert len(in_flight) <= 1  # at most one refresh in flight per block, whatever S does
    return taken


def test_auto_measures_the_first_rounds_then_fixes_s():
    schedule = StalenessSchedule("auto", offset=1)
    taken = _drive(schedule, 80)
    # f = 4 and o + S = 6 at first: every other refresh step is taken while calibrating (4, 12)
    assert taken[:AUTO_STALENESS_ROUNDS] == [(4, 10), (12, 18)]
    chosen = schedule.chosen
    assert chosen["staleness"] == choose_staleness(0.2, 0.1) == 3 and chosen["rounds"] == AUTO_STALENESS_ROUNDS
    start = chosen["at_step"]
    assert start == 20 and schedule.epochs == [(0, DEFAULT_STALENESS), (20, 3)]  # the first free refresh step
    after = [(t, d) for t, d in taken if t >= start]
    assert after[0] == (20, 24) and all(d - t == 1 + 3 for t, d in after)
    # o + S = 4 = f: from then on every refresh step is taken, exactly as the fixed-S rule from that step says
    assert [t for t, _ in after] == [t for t in range(start, 81) if accepted_refresh_step(t, lambda x: x % 4 == 0, start, 4, 4)]
    assert [t for t, _ in after] == list(range(20, 81, 4))


def test_a_fixed_s_never_changes_and_cannot_be_recalibrated():
    schedule = StalenessSchedule(2, offset=0)
    taken = _drive(schedule, 40)
    assert schedule.epochs == [(0, 2)] and schedule.chosen is None
    assert all(d - t == 1 + 2 for t, d in taken)  # (the driver's deadlines use o = 1)
    with pytest.raises(RuntimeError, match="staleness='auto'"):
        schedule.recalibrate()


def test_recalibration_and_checkpoints_of_the_schedule():
    schedule = StalenessSchedule("auto", offset=1)
    _drive(schedule, 40)
    saved = schedule.export()
    restored = StalenessSchedule("auto", offset=1)
    restored.load(saved)
    assert restored.epochs == schedule.epochs and restored.current == schedule.current and not restored.calibrating
    fixed = StalenessSchedule(4, offset=1)
    fixed.load(saved)  # a fixed S given now wins over the checkpoint's measurement
    assert fixed.epochs == [(0, 4)]
    schedule.recalibrate()
    assert schedule.calibrating and schedule.current == 3  # S stays until the new rounds are measured
    _drive(schedule, 40, latency=0.45)
    assert schedule.current == choose_staleness(0.45, 0.1) == 7 and len(schedule.epochs) == 3


def _train(opt, p, steps, *, pause=0.0, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        if pause:
            time.sleep(pause)


def test_the_optimizer_chooses_s_records_it_and_resumes_with_it():
    """SOAP with the default runtime (staggered phases; one block, so its phase is 0): the first rounds run with S = 2, then S is chosen from the measured latency
    (a worker slowed to 50 ms per job here) and step period; stats() and state_dict() carry it, installs from then on
    are S steps late, and a resumed run (a new process would do the same) continues bit-identically."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 12))
    sched = _core.RefreshScheduler(workers=1, test_delay_s=0.05)
    rt = asteria.Runtime(asteria.RuntimeConfig(), scheduler=sched)
    opt = asteria.SOAP([p], precondition_frequency=4, runtime=rt)
    gen = torch.Generator().manual_seed(1)
    assert opt.runtime.stats()["staleness"] == DEFAULT_STALENESS_STAGGERED
    _train(opt, p, 40, pause=0.01, gen=gen)
    stats = opt.runtime.stats()
    chosen = stats["staleness_auto"]["chosen"]
    assert chosen is not None and chosen["staleness"] == stats["staleness"] >= 1
    assert chosen["latency_s"] >= 0.05 * 2  # two jobs (one per factor), 50 ms each, one worker
    assert stats["staleness"] == max(1, math.ceil(1.5 * chosen["latency_s"] / chosen["period_s"] - 1e-9))
    late = stats["installed_staleness"]
    assert late[: 1 + AUTO_STALENESS_ROUNDS] == [0] + [DEFAULT_STALENESS_STAGGERED] * AUTO_STALENESS_ROUNDS  # first basis, rounds
    assert set(late[1 + AUTO_STALENESS_ROUNDS:]) == {stats["staleness"]}
    state = opt.state_dict()
    assert state["asteria"]["staleness"]["epochs"][-1] == [chosen["at_step"], chosen["staleness"]]
    q = torch.nn.Parameter(p.detach().clone())
    other = asteria.SOAP([q], precondition_frequency=4)
    other.load_state_dict(state)
    assert other.runtime.stats()["staleness"] == stats["staleness"]
    _train(opt, p, 12, gen=torch.Generator().manual_seed(2))
    _train(other, q, 12, gen=torch.Generator().manual_seed(2))
    assert_same_bits(p.detach(), q.detach())
    assert_same_bits(opt.state_dict()["state"], other.state_dict()["state"])
    opt.close()
    other.close()
    rt.close()


def _drive_staggered(schedule, steps, f=4, latency=0.05, period=0.1, start=1):
    """As `_drive`, for f blocks of staggered phases 0..f-1 (one block per phase, keys (0, φ, 0)): every step is
    some block's refresh step. Returns per block the (snapshot step, deadline) pairs."""
    taken = {phase: [] for phase in range(f)}
    in_flight = []
    for t in range(start, steps + 1):
        schedule.on_period(period)
        for phase in range(f):
            block = (0, phase, 0)
            if schedule.accepts(t, lambda x: x % f == 0, f, f, lambda: not in_flight, lambda s: s, phase, block):
                deadline = t + 1 + schedule.staleness_at(t)
                schedule.on_submitted(t)
                taken[phase].append((t, deadline))
                in_flight.append((phase, t, deadline))
        for entry in list(in_flight):
            if entry[2] <= t + 1:
                in_flight.remove(entry)
                schedule.on_installed(entry[1], [latency])
        for phase in range(f):  # at most one refresh in flight per block, whatever S does
            assert sum(1 for e in in_flight if e[0] == phase) <= 1
    return taken


def test_staggered_phases_shift_the_refresh_steps_and_choose_s_with_refreshes_in_flight():
    schedule = StalenessSchedule("auto", offset=1, staggered=True)
    schedule.epochs = [(0, DEFAULT_STALENESS)]  # (started as after a recalibration at S = 5: o + S > f)
    taken = _drive_staggered(schedule, 60)
    # calibration: o + S = 6 > f = 4, so each block takes every other refresh step of its own shifted sequence
    for phase in range(4):
        assert taken[phase][0] == (4 + phase, 4 + phase + 6)
        assert taken[phase][1][0] == 12 + phase
    chosen = schedule.chosen
    assert chosen is not None and chosen["staleness"] == choose_staleness(0.05, 0.1) == 1
    start = chosen["at_step"]
    # decided although refreshes were in flight (the aligned rule waits for a free refresh step), effective the
    # step after the decision, once the measured rounds span every phase
    assert schedule.epochs == [(0, DEFAULT_STALENESS), (start, 1)]
    assert StalenessSchedule("auto", offset=1, staggered=True).current == DEFAULT_STALENESS_STAGGERED
    for phase in range(4):
        after = [(t, d) for t, d in taken[phase] if t >= start]
        assert after and all(d == t + 2 for t, d in after)
        assert all(b - a == 4 for (a, _), (b, _) in zip(after, after[1:]))  # o + S = 2 <= f: every refresh step
        assert all((t - phase) % 4 == 0 for t, _ in taken[phase])


def test_a_resumed_staggered_schedule_takes_the_same_refresh_steps():
    """With o + S > f, whether a block's refresh step is taken depends on its last taken one: a checkpoint carries
    it, so a resumed schedule keeps the skip rule of the uninterrupted one."""
    whole = _drive_staggered(StalenessSchedule(5, offset=1), 60)
    first = StalenessSchedule(5, offset=1)
    before = _drive_staggered(first, 21)
    resumed = StalenessSchedule(5, offset=1)
    resumed.load(first.export())
    after = _drive_staggered(resumed, 60, start=22)
    for phase in range(4):
        assert before[phase] + after[phase] == whole[phase]
    fresh = _drive_staggered(StalenessSchedule(5, offset=1), 60, start=22)  # without the checkpoint: other steps
    assert any(fresh[phase] != after[phase] for phase in range(4))
