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
