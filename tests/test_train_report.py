"""Tests of asteria.train.report: summary, verdict, table, metrics file and plots."""

import json

import numpy as np
import pytest

from asteria.train.config import RunConfig
from asteria.train.loop import RunResult
from asteria.train.report import (
    MetricsWriter,
    format_table,
    read_metrics,
    smooth,
    summarize,
    write_plots,
    write_summary,
)

PNGS = ("loss_vs_step.png", "loss_vs_wallclock.png", "step_time.png", "memory.png")


def _fake_run(name, optimizer, rate, step_time, steps=40, refresh_every=0):
    cfg = RunConfig(name=name, optimizer=optimizer, steps=steps)
    result = RunResult(config=cfg, num_parameters=1000, state_bytes=8000)
    wall = 0.0
    result.val_history.append({"step": 0, "wall": 0.0, "val_loss": 5.5})
    for s in range(1, steps + 1):
        refresh = bool(refresh_every) and s % refresh_every == 0
        dt = step_time * (3 if refresh else 1)
        wall += dt
        loss = 2.0 + 3.5 * np.exp(-rate * s)
        rec = {"config": name, "step": s, "loss": float(loss), "lr": 1e-3, "step_time": dt,
               "wall": wall, "stall": 0.0, "refresh": refresh, "install": refresh}
        if s % 10 == 0:
            rec["val_loss"] = float(loss + 0.01)
            result.val_history.append({"step": s, "wall": wall, "val_loss": rec["val_loss"]})
        result.records.append(rec)
    return result


def _runs():
    return [
        _fake_run("adamw", "adamw", 0.05, 0.1),
        _fake_run("soap", "soap", 0.10, 0.15, refresh_every=10),  # fewer steps, less time
        _fake_run("shampoo", "shampoo", 0.08, 0.5, refresh_every=5),  # fewer steps, more time
        _fake_run("kl-soap", "kl-soap", 0.01, 0.1),  # never reaches the target
    ]


def test_summary_and_time_to_target():
    summary = summarize(_runs())
    assert summary["baseline"] == "adamw"
    by = {s["name"]: s for s in summary["runs"]}
    assert summary["target_loss"] == by["adamw"]["final_val_loss"]
    assert by["adamw"]["target"]["step"] == 40
    assert by["soap"]["target"]["step"] < 40 and by["soap"]["wall_ratio"] < 1
    assert by["shampoo"]["steps_ratio"] < 1 and by["shampoo"]["wall_ratio"] > 1
    assert by["kl-soap"]["target"] is None
    assert by["soap"]["refresh_steps"] == 4
    assert by["soap"]["step_time_max_s"] == pytest.approx(0.45)
    assert by["adamw"]["step_time_median_s"] == pytest.approx(0.1)
    text = "\n".join(summary["verdict"])
    assert "Verdict: yes. soap" in text and "kl-soap: did not reach it" in text


def test_verdict_no_and_unavailable():
    runs = [_fake_run("adamw", "adamw", 0.2, 0.1), _fake_run("soap", "soap", 0.01, 0.1)]
    unavailable = RunResult(config=RunConfig(optimizer="kl-soap"), status="unavailable",
                            message="not built")
    summary = summarize(runs + [unavailable])
    text = "\n".join(summary["verdict"])
    assert "Verdict: no" in text and "kl-soap: unavailable (not built)" in text
    table = format_table(summary)
    assert "unavailable" in table and "not reached" in table


def test_explicit_target_and_baseline_without_adamw():
    summary = summarize([_fake_run("soap", "soap", 0.1, 0.1)], target_loss=3.5)
    assert summary["baseline"] == "soap" and summary["target_loss"] == 3.5
    assert summary["runs"][0]["target"]["step"] == 10


def test_summary_files(tmp_path):
    summary = summarize(_runs())
    path = write_summary(tmp_path, summary)
    loaded = json.loads(path.read_text())
    assert [r["name"] for r in loaded["runs"]] == ["adamw", "soap", "shampoo", "kl-soap"]
    assert "Verdict" in (tmp_path / "summary.txt").read_text()


def test_metrics_writer_round_trip(tmp_path):
    with MetricsWriter(tmp_path / "m" / "metrics.jsonl") as w:
        w({"step": 1, "loss": 2.0})
        w({"step": 2, "loss": 1.5, "val_loss": 1.7})
    assert read_metrics(tmp_path / "m" / "metrics.jsonl") == [
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.7}]


SIZES = {"loss_vs_step.png": (605, 990), "loss_vs_wallclock.png": (605, 990), "step_time.png": None,
         "memory.png": (495, 880)}


ALPHAS = {"step_time.png": 0.85}  # its lines are drawn with this opacity over white


def _pixels_of(image, hex_color, alpha=1.0, tol=0.06):
    """Mask of the pixels of ``image`` (H, W, 3+ floats in [0, 1]) within ``tol`` per channel of ``hex_color`` drawn
    with opacity ``alpha`` over white."""
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)]) * alpha + (1.0 - alpha)
    return (np.abs(image[..., :3] - rgb) <= tol).all(axis=-1)


@pytest.mark.parametrize("count", [4, 2])
def test_plots_show_one_series_per_run(tmp_path, count):
    """Each PNG opens, has the figure's size, is not blank, and shows the runs drawn, each in its own colour, and
    no others: a line across the plot per run, a bar per run in the memory plot."""
    from matplotlib.image import imread

    from asteria.train.report import COLORS

    runs = _runs()[:3] + [_fake_run("kl-soap", "kl-soap", 0.01, 0.2)]  # step times apart, so no line hides another
    runs = runs[:count]
    paths = write_plots(tmp_path, runs, summarize(runs))
    assert sorted(p.name for p in paths) == sorted(PNGS)
    for name in PNGS:
        image = imread(tmp_path / name)
        if SIZES[name] is not None:
            assert image.shape[:2] == SIZES[name], name
        assert (image[..., :3] < 0.9).any(axis=-1).mean() > 0.02, f"{name} is (almost) blank"
        for i, color in enumerate(COLORS[:4]):
            mask = _pixels_of(image, color, ALPHAS.get(name, 1.0))
            if i >= count:
                assert mask.sum() < 20, f"{name}: colour of run {i} drawn, but only {count} runs were given"
                continue
            assert mask.sum() > 200, f"{name}: no series in the colour of run {i} ({runs[i].config.name})"
            cols = np.flatnonzero(mask.any(axis=0))
            if name.startswith("loss_vs_step"):  # every run has 40 steps: its line spans most of the axes
                assert cols.max() - cols.min() > 0.5 * image.shape[1], f"{name}: run {i} does not span the steps"


def test_smooth_has_no_lag():
    y = np.arange(100, dtype=float)
    assert np.allclose(smooth(y), y)  # a centred mean of a line is the line
    assert smooth([]).size == 0


def test_the_table_says_how_many_threads_trained_and_the_staleness_chosen():
    runs = _runs()[:2]
    runs[0].config = RunConfig(name="adamw", optimizer="adamw", steps=40, threads=1)
    runs[1].config = RunConfig(name="soap:async", optimizer="soap", refresh="async", steps=40, threads=1)
    runs[1].runtime_stats = {"scheduler": {"worker_busy_s": [0.5]}, "staleness": 2,
                             "staleness_auto": {"auto": True, "chosen": {"staleness": 2}}}
    table = format_table(summarize(runs))
    assert "threads: 1 training thread(s) in every configuration; the refresh runtime of the second-order ones ran 1" in table
    assert "soap:async S=2 (chosen from the measured refresh latency)" in table


def test_the_table_prints_each_runs_peak_rss_and_the_summary_keeps_it(tmp_path):
    runs = _runs()[:2]
    runs[0].memory = {"peak_rss_bytes": 600 * 2**20, "start_rss_bytes": 300 * 2**20}
    summary = summarize(runs)  # the second run has no measurement (not Linux): '-'
    by = {s["name"]: s for s in summary["runs"]}
    assert by["adamw"]["peak_rss_bytes"] == 600 * 2**20 and by["soap"]["peak_rss_bytes"] is None
    table = format_table(summary)
    header, _, adamw, soap = table.splitlines()[:4]
    assert header.split()[-2:] == ["peak", "RSS"] and adamw.split()[-1] == "600.0MiB"
    assert soap.split()[-1] == "-"
