"""Reports of ``asteria-train``: metrics file, summary, console table and plots.

A report folder holds:

* ``metrics.jsonl`` — one JSON object per training step of every configuration:
  ``config, step, loss, lr, step_time, wall, stall, refresh, install`` and ``val_loss`` on
  steps where validation ran (times in seconds; ``wall`` is training time, see
  :mod:`asteria.train.loop`; ``refresh``/``install`` say whether refresh work was started /
  its results installed during the step, see :mod:`asteria.train.optimizers`).
* ``summary.json`` — per configuration: final train loss (mean of the last
  :data:`FINAL_WINDOW` steps), final validation loss, step-time median/p99/max, training
  wall-clock, stall time, refresh steps, optimizer-state bytes, and the steps and
  wall-clock it took to reach the target loss; plus the comparison verdict.
* ``loss_vs_step.png``, ``loss_vs_wallclock.png``, ``step_time.png``, ``memory.png``.

The target loss is the final validation loss of the baseline (AdamW when it is part of the
comparison, else the first configuration) unless ``--target-loss`` sets it. A run reaches
the target at the first *evaluation* whose validation loss is at or below it, so the
resolution is ``--eval-every`` steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .loop import RunResult

#: Steps averaged for the "final train loss".
FINAL_WINDOW = 20

#: Line colours per configuration, in order (colour-blind-safe "tab10" subset).
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22"]


class MetricsWriter:
    """Appends step records to ``metrics.jsonl`` as they are produced (crash-safe)."""

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")

    def __call__(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def reach(val_history: list[dict], target: float) -> dict | None:
    """First evaluation at or below ``target``: ``{"step", "wall"}``, or None."""
    for point in val_history:
        if point["step"] > 0 and point["val_loss"] <= target:
            return {"step": point["step"], "wall": point["wall"]}
    return None


#: A run's step times are called noisy when more than this share of its ordinary steps
#: (no refresh, no install) took more than :data:`NOISY_FACTOR` times the median step time.
#: (Asynchronous refresh itself slows the steps while a worker thread shares the cores, by
#: up to about 2-3x on two cores; another process competing for the CPU shows as 5-20x.)
NOISY_FRACTION = 0.05
NOISY_FACTOR = 3.0


def _noisy_fraction(recs: list[dict]) -> float | None:
    """Share of ordinary steps slower than NOISY_FACTOR x the median: CPU contention."""
    if len(recs) < 20:
        return None
    median = float(np.median([r["step_time"] for r in recs]))
    plain = [r["step_time"] for r in recs if not r.get("refresh") and not r.get("install")]
    if not plain:
        return None
    return sum(t > NOISY_FACTOR * median for t in plain) / len(plain)


def summarize_run(result: RunResult) -> dict[str, Any]:
    """Summary numbers of one run (no comparison yet)."""
    cfg = result.config
    recs = result.records
    times = [r["step_time"] for r in recs]
    refresh_times = [r["step_time"] for r in recs if r.get("refresh")]
    other_times = [r["step_time"] for r in recs if not r.get("refresh")]
    vals = [v for v in result.val_history if v["step"] > 0]
    rs = result.runtime_stats or {}
    workers = (rs.get("scheduler") or {}).get("worker_busy_s") or []
    return {
        "name": cfg.name,
        "training_threads": cfg.threads,
        "runtime_workers": len(workers) if rs else None,
        "staleness": rs.get("staleness") if rs and cfg.refresh == "async" else None,
        "staleness_auto": rs.get("staleness_auto") if rs and cfg.refresh == "async" else None,
        "optimizer": cfg.optimizer,
        "refresh": cfg.refresh,
        "status": result.status,
        "message": result.message,
        "config": cfg.to_dict(),
        "lr": cfg.effective_lr,
        "weight_decay": cfg.effective_weight_decay,
        "num_parameters": result.num_parameters,
        "steps": recs[-1]["step"] if recs else 0,
        "final_train_loss": float(np.mean([r["loss"] for r in recs[-FINAL_WINDOW:]]))
        if recs else None,
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "initial_val_loss": result.val_history[0]["val_loss"] if result.val_history else None,
        "step_time_median_s": _percentile(times, 50),
        "step_time_p99_s": _percentile(times, 99),
        "step_time_max_s": max(times) if times else None,
        "refresh_steps": len(refresh_times),
        "refresh_step_time_median_s": _percentile(refresh_times, 50),
        "other_step_time_median_s": _percentile(other_times, 50),
        "noisy_step_fraction": _noisy_fraction(recs),
        "train_wall_s": recs[-1]["wall"] if recs else 0.0,
        "stall_total_s": float(sum(r.get("stall", 0.0) for r in recs)),
        "optimizer_state_bytes": result.state_bytes,
        "peak_rss_bytes": result.memory.get("peak_rss_bytes"),
        "start_rss_bytes": result.memory.get("start_rss_bytes"),
        "gpu_peak_allocated_bytes": result.memory.get("gpu_peak_allocated_bytes"),
        "tier_bytes": result.tier_bytes,
        "val_history": result.val_history,
        "corpus_fingerprint": result.corpus_fingerprint,
    }


def summarize(
    results: list[RunResult], target_loss: float | None = None
) -> dict[str, Any]:
    """Summary of a set of runs, with the comparison against the baseline.

    Args:
        results: the runs, in the order they were requested.
        target_loss: loss to reach; None uses the baseline's final validation loss.

    Returns:
        ``{"runs": [...], "baseline", "target_loss", "verdict": [lines]}``; each run also
        gets ``target`` (``{"step", "wall"}`` or None) and its ratios to the baseline.
    """
    runs = [summarize_run(r) for r in results]
    ok = [s for s in runs if s["status"] == "ok" and s["final_val_loss"] is not None]
    baseline = next((s for s in ok if s["optimizer"] == "adamw"), ok[0] if ok else None)
    if target_loss is None and baseline is not None:
        target_loss = baseline["final_val_loss"]
    base_reach = None
    if baseline is not None and target_loss is not None:
        base_reach = reach(baseline["val_history"], target_loss)
    for s in runs:
        hit = reach(s["val_history"], target_loss) if target_loss is not None else None
        s["target"] = hit
        s["steps_ratio"] = s["wall_ratio"] = None
        if hit and base_reach:
            s["steps_ratio"] = hit["step"] / base_reach["step"]
            s["wall_ratio"] = hit["wall"] / base_reach["wall"] if base_reach["wall"] else None
    summary = {
        "baseline": baseline["name"] if baseline else None,
        "target_loss": target_loss,
        "runs": runs,
    }
    summary["verdict"] = verdict(summary)
    return summary


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1e3:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}min"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


def _fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def verdict(summary: dict[str, Any]) -> list[str]:
    """Plain-language answer to "does second-order training pay off here?"."""
    base, target = summary["baseline"], summary["target_loss"]
    runs = summary["runs"]
    if base is None or target is None:
        return ["No configuration finished with a validation loss; nothing to compare."]
    lines = [f"Target: the final validation loss of {base}, {target:.4f} nats/byte."]
    wins_wall, wins_steps = [], []
    for s in runs:
        if s["name"] == base:
            continue
        if s["status"] != "ok":
            lines.append(f"  {s['name']}: {s['status']} ({s['message']})")
            continue
        hit = s["target"]
        if hit is None:
            lines.append(
                f"  {s['name']}: did not reach it in {s['steps']} steps "
                f"(final validation loss {_fmt_loss(s['final_val_loss'])})"
            )
            continue
        detail = f"  {s['name']}: reached it at step {hit['step']}"
        if s["steps_ratio"] is not None:
            detail += f" ({s['steps_ratio']:.2f}x {base}'s steps)"
        detail += f" after {_fmt_time(hit['wall'])} of training"
        if s["wall_ratio"] is not None:
            detail += f" ({s['wall_ratio']:.2f}x {base}'s time)"
            if s["wall_ratio"] < 1:
                wins_wall.append(s["name"])
        if s["steps_ratio"] is not None and s["steps_ratio"] < 1:
            wins_steps.append(s["name"])
        lines.append(detail)
    base_run = next(s for s in runs if s["name"] == base)
    costs = [
        f"{s['name']} {s['step_time_median_s'] / base_run['step_time_median_s']:.2f}x"
        for s in runs
        if s["name"] != base and s["status"] == "ok" and s["step_time_median_s"]
        and base_run["step_time_median_s"]
    ]
    if costs:
        lines.append(f"  median step time relative to {base}: {', '.join(costs)}")
    others = [s for s in runs if s["name"] != base]
    if not others:
        lines.append(f"Only {base} ran: nothing to compare against.")
    elif wins_wall:
        lines.append(
            f"Verdict: yes. {', '.join(wins_wall)} reached {base}'s final loss in less "
            "wall-clock time."
        )
    elif wins_steps:
        lines.append(
            f"Verdict: per step yes ({', '.join(wins_steps)} needed fewer steps), per second "
            f"no: their extra optimizer work cost more time than the steps saved."
        )
    else:
        lines.append(f"Verdict: no, not in this setting; {base} was at least as good.")
    noisy = [s["name"] for s in runs
             if s.get("noisy_step_fraction") is not None
             and s["noisy_step_fraction"] > NOISY_FRACTION]
    if noisy:
        lines.append(
            f"Warning: the step times of {', '.join(noisy)} were noisy (more than "
            f"{NOISY_FRACTION:.0%} of ordinary steps took over {NOISY_FACTOR:g}x the median step "
            "time): something else was probably competing for the CPU, so the wall-clock "
            "numbers are unreliable. Steps to target are not affected. On a shared machine, "
            "--threads 1 or OMP_WAIT_POLICY=PASSIVE in the environment keep step times stable."
        )
    return lines


def format_table(summary: dict[str, Any]) -> str:
    """The console summary table plus the verdict lines."""
    header = ["config", "status", "steps", "train", "val", "step med", "p99", "max",
              "stall", "wall", "to target", "opt state", "peak RSS"]
    rows = [header]
    for s in summary["runs"]:
        hit = s.get("target")
        rows.append([
            s["name"],
            s["status"],
            str(s["steps"]),
            _fmt_loss(s["final_train_loss"]),
            _fmt_loss(s["final_val_loss"]),
            _fmt_time(s["step_time_median_s"]),
            _fmt_time(s["step_time_p99_s"]),
            _fmt_time(s["step_time_max_s"]),
            _fmt_time(s["stall_total_s"]),
            _fmt_time(s["train_wall_s"]),
            f"{hit['step']} / {_fmt_time(hit['wall'])}" if hit else "not reached",
            _fmt_bytes(s["optimizer_state_bytes"]),
            _fmt_bytes(s.get("peak_rss_bytes")),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [
        "",
        "train: mean loss of the last %d steps; val: final validation loss (nats/byte)." % FINAL_WINDOW,
        "step med/p99/max: step time; wall: training time (evaluation excluded);",
        "to target: step / training time of the first evaluation at or below the target.",
        "opt state: bytes of the optimizer's state tensors; peak RSS: the process's peak resident set during the",
        "run (the runs of a comparison share one process: memory one run freed may still be resident in the next).",
    ]
    notes += _setup_lines(summary)
    notes += _tier_lines(summary)
    return "\n".join(lines + notes + [""] + summary["verdict"])


def _setup_lines(summary: dict[str, Any]) -> list[str]:
    """How many threads trained, how many served the refresh runtime, and the staleness of async runs."""
    runs = [s for s in summary["runs"] if s["status"] != "unavailable"]
    threads = sorted({s.get("training_threads") for s in runs if s.get("training_threads")})
    workers = sorted({s["runtime_workers"] for s in runs if s.get("runtime_workers")})
    out = []
    if threads:
        line = f"threads: {'/'.join(map(str, threads))} training thread(s) in every configuration"
        if workers:
            line += f"; the refresh runtime of the second-order ones ran {'/'.join(map(str, workers))} worker(s)"
        out.append(line + ".")
    def how(s: dict[str, Any]) -> str:
        auto = s.get("staleness_auto") or {}
        if not auto.get("auto"):
            return ""
        return " (chosen from the measured refresh latency)" if auto.get("chosen") else " (auto: still measuring)"

    stale = [f"{s['name']} S={s['staleness']}{how(s)}" for s in runs if s.get("staleness") is not None]
    if stale:
        out.append("staleness of the asynchronous runs: " + ", ".join(stale) + ".")
    return out


def _tier_lines(summary: dict[str, Any]) -> list[str]:
    """One line per run whose optimizer state was tiered (memory budgets): bytes per tier and pager speed."""
    out = []
    for s in summary["runs"]:
        t = s.get("tier_bytes") or {}
        if not t.get("tiered"):
            continue
        line = (f"memory tiers of {s['name']}: device {_fmt_bytes(t.get('device', 0))}, host "
                f"{_fmt_bytes(t.get('host', 0))} (+ staging {_fmt_bytes(t.get('staging', 0))}), NVMe "
                f"{_fmt_bytes(t.get('nvme', 0))}")
        if "pager_read" in t:
            line += (f"; pager read {_fmt_bytes(t['pager_read'])} at {t.get('pager_read_gbps', 0):.2f} GB/s, "
                     f"wrote {_fmt_bytes(t['pager_written'])} at {t.get('pager_write_gbps', 0):.2f} GB/s")
        out.append(line)
    return ([""] + out) if out else []


def write_summary(report_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` and ``summary.txt`` (the console table)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    (report_dir / "summary.txt").write_text(format_table(summary) + "\n")
    return path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read ``metrics.jsonl`` back into a list of records."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- plots


def smooth(values: Iterable[float], window: int | None = None) -> np.ndarray:
    """Centred moving average (no lag), with the window shrinking at both ends.

    Args:
        values: the series.
        window: odd window length; None picks about 1/25 of the series (at least 5).
    """
    y = np.asarray(list(values), dtype=float)
    if y.size == 0:
        return y
    if window is None:
        window = max(5, y.size // 25)
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(y.size)
    lo = np.maximum(0, idx - half)
    hi = np.minimum(y.size, idx + half + 1)
    # Symmetric window: as wide on both sides as the nearer end allows.
    width = np.minimum(idx - lo, hi - 1 - idx)
    lo, hi = idx - width, idx + width + 1
    return (csum[hi] - csum[lo]) / (hi - lo)


def _new_figure(width: float = 9.0, height: float = 5.5):
    from matplotlib.figure import Figure  # lazy: matplotlib is only needed for plots

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def _loss_plot(results: list[RunResult], summary: dict, x_key: str, path: Path) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    lows = []
    for i, r in enumerate(results):
        if not r.records:
            continue
        color = COLORS[i % len(COLORS)]
        xs = np.array([rec[x_key] for rec in r.records])
        losses = np.array([rec["loss"] for rec in r.records])
        ax.plot(xs, losses, color=color, alpha=0.15, linewidth=0.8)
        ax.plot(xs, smooth(losses), color=color, linewidth=1.8, label=r.config.name)
        vh = [v for v in r.val_history if v["step"] > 0]
        if vh:
            vx = [v[x_key if x_key == "wall" else "step"] for v in vh]
            vy = [v["val_loss"] for v in vh]
            ax.plot(vx, vy, color=color, linestyle="--", marker="o", markersize=3.5,
                    linewidth=1.2)
            lows.append(min(vy))
        lows.append(float(np.min(smooth(losses))))
    target = summary.get("target_loss")
    ax.plot([], [], color="gray", linewidth=1.8, label="train loss (smoothed; raw faint)")
    ax.plot([], [], color="gray", linestyle="--", marker="o", markersize=3.5, linewidth=1.2,
            label="validation loss")
    if target is not None:
        ax.axhline(target, color="black", linestyle=":", linewidth=1,
                   label=f"target {target:.3f} ({summary['baseline']} final validation)")
    if lows:
        # Keep the interesting part: the first steps (loss ~5.5) would flatten everything.
        low = min(lows)
        first = [r.records[min(len(r.records) - 1, max(5, len(r.records) // 10))]["loss"]
                 for r in results if r.records]
        high = max(first) if first else low + 1
        margin = max(0.05 * (high - low), 0.02)
        ax.set_ylim(low - margin, max(high, low) + margin)
    xlabel = "optimizer step" if x_key == "step" else "training wall-clock (s, evaluation excluded)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy (nats per byte)")
    title = "Loss vs step" if x_key == "step" else "Loss vs wall-clock"
    ax.set_title(f"{title} — {_setup_line(results)}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path)


def _setup_line(results: list[RunResult]) -> str:
    cfg = results[0].config
    return (f"model {cfg.model}, batch {cfg.batch_size}x{cfg.context} bytes, "
            f"{cfg.device}, seed {cfg.seed}")


def _step_time_plot(results: list[RunResult], path: Path) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    stalls = any(rec.get("stall", 0.0) > 0 for r in results for rec in r.records)
    fig = _new_figure(9.0, 7.0 if stalls else 6.0)
    if stalls:
        ax, ax_stall = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, ax_stall = fig.add_subplot(), None
    any_refresh = any_install = False
    for i, r in enumerate(results):
        color = COLORS[i % len(COLORS)]
        steps = np.array([rec["step"] for rec in r.records])
        ms = np.array([rec["step_time"] * 1e3 for rec in r.records])
        med = float(np.median(ms))
        ax.plot(steps, ms, color=color, linewidth=0.9, alpha=0.85,
                label=f"{r.config.name} (median {med:.0f} ms, p99 {np.percentile(ms, 99):.0f} ms)")
        mask = np.array([bool(rec.get("refresh")) for rec in r.records])
        if mask.any():
            any_refresh = True
            ax.scatter(steps[mask], ms[mask], color=color, marker="^", s=24, zorder=3,
                       edgecolors="black", linewidths=0.4)
        installs = np.array([bool(rec.get("install")) and not rec.get("refresh")
                             for rec in r.records])
        if installs.any():
            any_install = True
            ax.scatter(steps[installs], ms[installs], facecolors="white", edgecolors=color,
                       marker="v", s=20, zorder=3, linewidths=1.0)
        if ax_stall is not None:
            stall = np.array([rec.get("stall", 0.0) * 1e3 for rec in r.records])
            hit = stall > 0
            if hit.any():
                ax_stall.vlines(steps[hit], 0, stall[hit], color=color, linewidth=1.5,
                                label=f"{r.config.name}: {stall.sum() / 1e3:.2f} s in total")
    if any_refresh:
        ax.scatter([], [], color="gray", marker="^", edgecolors="black", linewidths=0.4,
                   label="refresh started (opt.runtime.stats() counters)")
    if any_install:
        ax.scatter([], [], facecolors="white", edgecolors="gray", marker="v", linewidths=1.0,
                   label="refresh result installed")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if high / low > 30 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("step time (ms, log scale)")
    ax.set_title(f"Step-time timeline — {_setup_line(results)}")
    ax.grid(True, which="major", alpha=0.3)
    # Outside the axes: with several configurations the timeline fills the whole plot.
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center",
               ncol=3 if len(results) > 2 else 2)
    if ax_stall is not None:
        ax_stall.set_ylabel("stall (ms)")
        ax_stall.set_ylim(bottom=0)
        ax_stall.grid(True, alpha=0.3)
        ax_stall.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                        title="waiting for refresh", title_fontsize=7)
        ax_stall.set_xlabel("optimizer step")
    else:
        ax.set_xlabel("optimizer step")
    fig.savefig(path)


def _memory_plot(results: list[RunResult], path: Path) -> None:
    fig = _new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    names = [r.config.name for r in results]
    state = [r.state_bytes / 2**20 for r in results]
    params = [r.num_parameters * 4 / 2**20 for r in results]
    y = np.arange(len(names))
    ax.barh(y + 0.2, params, height=0.38, color="#bbbbbb", label="model parameters (fp32)")
    tiered = [bool((r.tier_bytes or {}).get("tiered")) for r in results]
    colors = [COLORS[i % len(COLORS)] for i in range(len(names))]
    plain = [v if not t else 0.0 for v, t in zip(state, tiered)]
    ax.barh(y - 0.2, plain, height=0.38, color=colors, label="optimizer state (tensors in optimizer.state)")
    if any(tiered):  # the state of runs with memory budgets, split by tier
        left = np.zeros(len(names))
        for tier, hatch, alpha in (("device", None, 1.0), ("host", "//", 0.6), ("nvme", "xx", 0.3)):
            width = np.array([(r.tier_bytes or {}).get(tier, 0.0) / 2**20 if t else 0.0
                              for r, t in zip(results, tiered)])
            ax.barh(y - 0.2, width, height=0.38, left=left, color=colors, alpha=alpha, hatch=hatch,
                    edgecolor="black", linewidth=0.4,
                    label=f"optimizer state in the {'NVMe' if tier == 'nvme' else tier} tier")
            left += width
    for yi, v, w in zip(y, state, params):
        ratio = f" ({v / w:.1f}x the model)" if w else ""
        ax.text(v, yi - 0.2, f" {v:.2f} MiB{ratio}", va="center", fontsize=8)
    ax.set_xlim(0, max(state + params) * 1.35 if state else 1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("memory (MiB)")
    ax.set_title("Optimizer state memory per configuration"
                 + (" (bytes per tier with memory budgets)" if any(tiered) else ""))
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path)


def write_plots(report_dir: str | os.PathLike, results: list[RunResult],
                summary: dict[str, Any]) -> list[Path]:
    """Draw the PNG plots of a report; returns their paths."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    drawn = [r for r in results if r.records]
    paths = []
    if drawn:
        for name, fn in (
            ("loss_vs_step.png", lambda p: _loss_plot(drawn, summary, "step", p)),
            ("loss_vs_wallclock.png", lambda p: _loss_plot(drawn, summary, "wall", p)),
            ("step_time.png", lambda p: _step_time_plot(drawn, p)),
            ("memory.png", lambda p: _memory_plot(drawn, p)),
        ):
            fn(report_dir / name)
            paths.append(report_dir / name)
    return paths




def load_results(report_dir: str | os.PathLike) -> tuple[list[RunResult], dict[str, Any]]:
    """Rebuild the runs of a report folder from ``summary.json`` and ``metrics.jsonl``.

    Returns:
        ``(results, summary)``; enough to redraw the plots with :func:`write_plots`.
    """
    from .config import RunConfig

    report_dir = Path(report_dir)
    summary = json.loads((report_dir / "summary.json").read_text())
    records = read_metrics(report_dir / "metrics.jsonl")
    results = []
    for run in summary["runs"]:
        results.append(RunResult(
            config=RunConfig.from_dict(run["config"]),
            status=run["status"],
            message=run["message"],
            records=[r for r in records if r.get("config") == run["name"]],
            val_history=run["val_history"],
            num_parameters=run["num_parameters"],
            state_bytes=run["optimizer_state_bytes"],
            tier_bytes=run["tier_bytes"],
            corpus_fingerprint=run["corpus_fingerprint"],
            memory={k: run[k] for k in ("peak_rss_bytes", "start_rss_bytes", "gpu_peak_allocated_bytes")
                    if run.get(k) is not None},
        ))
    return results, summary


def main(argv: list[str] | None = None) -> int:
    """``python -m asteria.train.report DIR...``: redraw the plots of report folders."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m asteria.train.report",
        description="Redraw the PNG plots of asteria-train report folders from their "
                    "summary.json and metrics.jsonl.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="report folder")
    args = parser.parse_args(argv)
    for d in args.dirs:
        results, summary = load_results(d)
        for path in write_plots(d, results, summary):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
