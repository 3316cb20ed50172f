"""The statistics of `asteria-bench overhead` (the benchmark itself is a script, not a test)."""

import statistics

import pytest

from asteria.bench.overhead import _summary, hidden_fraction, period_profile


def test_period_profile_keeps_the_recurring_spike_and_drops_a_slowed_period():
    f = 5
    base = [10.0, 10.0, 30.0, 10.0, 10.0]  # the refresh work at position 2 of every period
    times = [99.0] * 3 + [0.0] * 2  # a warm-up period, excluded
    for c in range(6):
        slow = 1.2 if c == 3 else 1.0  # a noisy neighbour slows one whole period
        times += [t * slow for t in base]
    times += [1.0, 1.0]  # a partial period at the end is left out
    profile = period_profile(times, warmup=3, frequency=f)
    assert profile == base
    # the profile's mean is the mean step time without the slowed period; the plain mean is not
    assert statistics.fmean(profile) == pytest.approx(14.0)
    assert _summary(times[f:-2])["mean"] == pytest.approx(14.0 + 0.2 * 14.0 / 6)


def test_period_profile_needs_a_whole_period_after_the_warmup():
    with pytest.raises(ValueError, match="no whole period"):
        period_profile([1.0] * 12, warmup=10, frequency=5)


def test_hidden_fraction():
    assert hidden_fraction(60.0, 51.0, 50.0) == pytest.approx(0.9)
    assert hidden_fraction(60.0, 60.0, 50.0) == 0.0
    assert hidden_fraction(50.0, 40.0, 50.0) is None  # sync no slower than the floor: nothing to hide


def test_summary_p99_is_an_observed_step():
    times = [float(i) for i in range(1, 201)]
    s = _summary(times)
    assert s["p99"] == 198.0 and s["max"] == 200.0 and s["median"] == 100.5 and s["mean"] == 100.5


def test_modes_take_a_bf16_suffix_and_unknown_ones_are_refused():
    from asteria.bench.overhead import bf16_state, parse_mode

    assert parse_mode("async-gpu+bf16") == ("async-gpu", True)
    assert parse_mode("floor") == ("floor", False)
    assert parse_mode("sync+bf16state") == ("sync", False) and bf16_state("sync+bf16+bf16state")
    assert not bf16_state("async+bf16")
    for bad in ("fast", "async+fp8", "async-gpu+", "async+bf16state+bf16state"):
        with pytest.raises(SystemExit, match="unknown mode"):
            parse_mode(bad)


def test_target_is_a_loss_or_adamw():
    from asteria.bench.overhead import parse_target

    assert parse_target("adamw") is None and parse_target("AdamW") is None
    assert parse_target("2.5") == 2.5 and parse_target(1.8) == 1.8
    with pytest.raises(SystemExit, match="--target"):
        parse_target("low")


def test_time_to_target_sums_the_steps_up_to_the_first_smoothed_hit():
    from asteria.bench.overhead import time_to_target

    losses = [5.0] * 10 + [1.0] * 30  # the centred average crosses 3.0 a little before step 11
    times = [0.1] * 40
    step, seconds = time_to_target(times, losses, 3.0)
    assert 8 <= step <= 11 and seconds == pytest.approx(0.1 * step)
    assert time_to_target(times, losses, 0.5) == (None, None)


def test_hidden_fraction_of_a_bf16_mode_uses_the_bf16_sync_and_floor():
    from asteria.bench.overhead import _hidden_references

    table = {k: {"k": k} for k in ("soap:sync", "soap:floor", "soap:sync+bf16", "soap:floor+bf16")}
    assert _hidden_references("soap", "async-gpu", table) == (table["soap:sync"], table["soap:floor"])
    assert _hidden_references("soap", "async+bf16", table) == (table["soap:sync+bf16"], table["soap:floor+bf16"])
    assert _hidden_references("soap", "sync", table) is None
    assert _hidden_references("muon", "-", table) is None
    assert _hidden_references("kl-soap", "async", table) is None  # its sync and floor were not run


def test_times_to_target_take_adamws_last_loss_per_round_and_none_when_a_round_misses():
    from asteria.bench.overhead import _times_to_target

    down = [5.0 - 0.1 * i for i in range(20)]  # AdamW: its own last smoothed loss is reached at the end
    fast = [5.0 - 0.3 * i for i in range(20)]  # reaches it about three times sooner
    flat = [5.0] * 20  # never
    rounds = {("adamw", "-"): [{"times": [0.1] * 20, "losses": down}] * 2,
              ("soap", "async"): [{"times": [0.2] * 20, "losses": fast}] * 2,
              ("soap", "sync"): [{"times": [0.2] * 20, "losses": fast}, {"times": [0.2] * 20, "losses": flat}]}
    table = {f"{n}:{m}": {} for n, m in rounds}
    _times_to_target(table, rounds, None)
    adamw, fast_row, missed = table["adamw:-"], table["soap:async"], table["soap:sync"]
    assert adamw["target"] == fast_row["target"] == pytest.approx(3.1)  # the window shrinks to the last step
    assert 17 <= adamw["target_step"] <= 20 and adamw["target_time_s"] == pytest.approx(0.1 * adamw["target_step"])
    assert fast_row["target_step"] < adamw["target_step"] / 2
    assert missed["target_step"] is None and missed["target_time_s"] is None  # one round never got there
    _times_to_target(table, rounds, 4.0)  # an explicit target
    assert table["soap:sync"]["target"] == 4.0 and table["soap:sync"]["target_step"] is None
    assert table["soap:async"]["target_step"] <= 5
