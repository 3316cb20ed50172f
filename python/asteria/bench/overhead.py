"""``asteria-bench overhead``: how much of the refresh cost the asynchronous runtime hides.

A small GPT-like model (`asteria.train.model.GPT`) is trained on the CPU with torch using one thread, on
asteria-train's corpus (``--data corpus``, the default; random tokens with ``--data random``), for AdamW and
for each second-order optimizer in three modes:

* ``sync``: the refresh runs inline at the refresh step (the reference algorithm; spikes every f steps);
* ``async``: the default runtime (staleness 5, deterministic installs) on the free cores;
* ``eager`` (not run unless listed in ``--modes``): the same with ``install="eager"``: each block's result is
  installed at the first step boundary after it is ready, so the installs of one refresh spread over steps;
* ``floor``: the same optimizer with every refresh after the first basis/root disabled: the per-step cost
  with nothing to hide (what async would achieve if the refresh were free);
* ``sync-gpu`` / ``async-gpu`` (``--device cuda`` with the CUDA backend): the refreshes run on the GPU
  (cuSOLVER on a low-priority stream) instead of the host workers;
* any mode with a ``+bf16`` suffix (``async-gpu+bf16``): the same with ``compute_dtype=torch.bfloat16`` (the
  per-step products in bf16; fast on GPUs and on CPUs with AVX-512-BF16/AMX, ~100x slower on other CPUs).

The first-order baselines (``--baselines``): ``adamw`` (``torch.optim.AdamW``, always run: the reference of the
memory and time ratios) and ``muon`` (``torch.optim.Muon`` on the hidden 2-D weights and AdamW elsewhere,
`asteria.train.optimizers.MuonWithAdamW`, at ``--muon-lr``).

With ``--device cuda`` the model trains on the GPU and each step is timed up to a device synchronisation
(the benchmark's, not the runtime's), so the step time includes the kernels it queued.

Each round (``--repeats``, seed r in round r) trains all configurations in lockstep: one refresh period of
each in turn, the order rotating every period (see `_run_round`), so drift of a shared machine reaches all of
them alike; the medians over rounds are reported. ``--pin`` pins the training thread to the first CPU the process may use and the refresh workers to
the others (`RuntimeConfig.worker_cpus`), so that the scheduler never moves one onto the other's core. The
report has: per-step median, p99, max and mean of the full training
step (forward, backward, ``opt.step()``), the stalls of the async runtime, and the *hidden fraction*
``(sync mean − async mean) / (sync mean − floor mean)``: 1 means the refresh is completely off the critical
path, 0 means async is no better than sync. A PNG of the step-time timelines (first round) is written.

Each configuration's step time by position in the refresh period is printed too (`period_profile`: per position,
the median over the periods): it shows where the remaining cost is (the snapshot and install steps), and its mean
gives a second, *robust* hidden fraction. On a shared machine a neighbour may slow a whole period of one
configuration by 10-20%, which moves a mean by several points of the hidden fraction; the medians drop such
periods and keep the refresh work, which recurs at the same positions every period. The hidden fraction of each
round is in ``overhead.json`` (``hidden_fraction_rounds``).

Every configuration's training losses are kept (read back once, at the end of the run: no per-step
synchronisation on a GPU), and the *time to target* is the training time of the steps up to the first one whose
smoothed loss (asteria-train's no-lag moving average) reaches ``--target``: a loss, or ``adamw`` (the default),
the smoothed loss AdamW reaches at its last step, so that every configuration is timed to what the baseline
achieves in the run.

On the corpus, each run ends with the validation loss on fixed held-out batches (outside the timed steps).
Round ``r`` uses seed ``r`` for every configuration, so the synchronous rounds give the seed-to-seed spread σ
of the reference algorithm. The per-seed differences ``async − sync`` are printed, and the staleness costs
nothing measurable when the mean difference over the seeds stays within ``max(0.02, 2σ)`` nats.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .output import write_json

_NAMES = {"shampoo": "Shampoo", "soap": "SOAP", "kl-shampoo": "KLShampoo", "kl-soap": "KLSOAP"}
_MODES = ("sync", "async", "eager", "floor", "sync-gpu", "async-gpu")
_BASELINES = ("adamw", "muon")
#: Muon's default learning rate here: 6x AdamW's 1e-3 (its update is scaled to AdamW's RMS; on the race's GPT the
#: best rates were 6e-3 against AdamW's 1e-3, see BENCHMARKS.md).
_MUON_LR = 6e-3
_COLORS = {"sync": "tab:red", "async": "tab:blue", "eager": "tab:cyan", "floor": "tab:green", "sync-gpu": "tab:orange",
           "async-gpu": "tab:purple"}


def _no_refresh(cls: type) -> type:
    """A subclass whose refreshes after the first root/basis never run (the floor of the comparison)."""

    class Floor(cls):  # type: ignore[misc, valid-type]
        def _refresh_due(self, t: int, group: dict[str, Any], phase: int | None = None, block: Any = None) -> bool:
            if cls.__name__ == "Shampoo":
                return t == group["start_preconditioning_step"]
            return False

    Floor.__name__ = f"{cls.__name__}Floor"
    return Floor


def _suffixes(mode: str) -> tuple[str, list[str]]:
    base, *suffixes = mode.split("+")
    return base, suffixes


def parse_mode(mode: str) -> tuple[str, bool]:
    """``"async-gpu+bf16"`` → ``("async-gpu", True)`` (the bf16 products); a ``+bf16state`` suffix
    (``state_dtype=torch.bfloat16``, see `bf16_state`) may follow the base too. Raises SystemExit naming the choices
    for an unknown mode."""
    base, suffixes = _suffixes(mode)
    if base not in _MODES or any(s not in ("bf16", "bf16state") for s in suffixes) or len(set(suffixes)) < len(suffixes):
        raise SystemExit(f"asteria-bench overhead: unknown mode {mode!r}; choose from {', '.join(_MODES)}, "
                         "each optionally with '+bf16' and/or '+bf16state'")
    return base, "bf16" in suffixes


def bf16_state(mode: str) -> bool:
    """Whether a mode asks for bfloat16 state (``+bf16state``: ``state_dtype=torch.bfloat16``)."""
    return "bf16state" in _suffixes(mode)[1]


def _build(name: str, mode: str, model: torch.nn.Module, freq: int, staleness: int = 5,
           lr: float | None = None, worker_cpus: tuple[int, ...] | None = None,
           parallel_install: bool = True, muon_lr: float = _MUON_LR,
           budgets: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    import asteria

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr or 1e-3, weight_decay=0.01)
    if name == "muon":
        from asteria.train.optimizers import MuonWithAdamW

        groups = [{"params": list(model.parameters()), "weight_decay": 0.01}]
        return MuonWithAdamW(groups, model.hidden_matrices(), lr=lr or muon_lr, weight_decay=0.01, betas=(0.9, 0.999))
    cls = getattr(asteria, _NAMES[name])
    state16 = bf16_state(mode)
    mode, bf16 = parse_mode(mode)
    kw: dict[str, Any] = dict(precondition_frequency=freq)
    if bf16:
        kw["compute_dtype"] = torch.bfloat16
    if state16:
        kw["state_dtype"] = torch.bfloat16
    if name == "shampoo":
        kw["start_preconditioning_step"] = freq
    refresh, _, where = mode.partition("-")
    route = "gpu" if where == "gpu" else "host"
    extra = dict(budgets or {})
    if refresh == "floor":
        cls = _no_refresh(cls)
        runtime = asteria.RuntimeConfig(refresh="sync", refresh_device=route, worker_cpus=worker_cpus,
                                        parallel_install=parallel_install, **extra)
    elif refresh == "sync":
        runtime = asteria.RuntimeConfig(refresh="sync", refresh_device=route, worker_cpus=worker_cpus,
                                        parallel_install=parallel_install, **extra)
    else:
        runtime = asteria.RuntimeConfig(refresh="async", staleness=staleness, refresh_device=route,
                                        install="eager" if refresh == "eager" else "deterministic",
                                        worker_cpus=worker_cpus, parallel_install=parallel_install, **extra)
    lr = lr or (1e-4 if name.startswith("kl") else 1e-3)
    return cls(model.parameters(), lr=lr, runtime=runtime, **kw)


@functools.lru_cache(maxsize=1)
def _corpus() -> Any:
    """asteria-train's corpus, loaded once per process."""
    from asteria.train.corpus import load_corpus

    return load_corpus()


class _Run:
    """One configuration's training run, advanced a chunk of steps at a time (see `_run_round`)."""

    def __init__(self, name: str, mode: str, args: Any, seed: int) -> None:
        from asteria.train.model import GPT, ModelConfig

        torch.manual_seed(seed)
        self.args, self.seed = args, seed
        self.device = torch.device(getattr(args, "device", "cpu"))
        self.cfg = ModelConfig(n_layer=args.layers, n_head=4, d_model=args.d_model, context=args.context)
        self.model = GPT(self.cfg).to(self.device)
        self.opt = _build(name, mode, self.model, args.frequency, getattr(args, "staleness", 5), getattr(args, "lr", None),
                          getattr(args, "worker_cpus", None), getattr(args, "parallel_install", True),
                          getattr(args, "muon_lr", _MUON_LR))
        self.gen = torch.Generator().manual_seed(seed)
        self.corpus = _corpus() if getattr(args, "data", "random") == "corpus" else None
        self.times: list[float] = []
        self.losses: list[torch.Tensor] = []  # on the device; read back once in finish()
        self.loss = torch.zeros(())

    def advance(self, steps: int) -> None:
        from asteria.train.corpus import train_batch

        args, device, cuda = self.args, self.device, self.device.type == "cuda"
        for step in range(len(self.times), min(args.steps, len(self.times) + steps)):
            if self.corpus is not None:
                x, y = (t.to(device) for t in train_batch(self.corpus.train, args.batch, args.context, self.seed, step))
            else:
                idx = torch.randint(0, self.cfg.vocab_size, (args.batch, args.context + 1), generator=self.gen).to(device)
                x, y = idx[:, :-1], idx[:, 1:]
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            _, self.loss = self.model(x, y)
            self.loss.backward()
            self.opt.step()
            if cuda:
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter() - t0)
            self.losses.append(self.loss.detach())

    def finish(self) -> dict[str, Any]:
        """Evaluates, collects the runtime's stats and closes the optimizer."""
        from asteria.train.corpus import val_batches
        from asteria.train.loop import evaluate

        args = self.args
        try:
            losses = torch.stack(self.losses).float().cpu().tolist() if self.losses else []
            out: dict[str, Any] = {"times": self.times, "loss": float(self.loss.detach()), "losses": losses}
            if self.corpus is not None:
                batches = val_batches(self.corpus.val, args.batch, args.context, getattr(args, "eval_batches", 16))
                out["val_loss"] = evaluate(self.model, batches, str(self.device))
            runtime = getattr(self.opt, "runtime", None)
            if runtime is not None:
                st = runtime.stats()
                out.update(
                    stalls=st["stalls"],
                    stall_s=sum(st["timeline"]["stall_s"][args.warmup:]),
                    submit_s=sum(st["timeline"]["submit_s"][args.warmup:]),
                    install_s=sum(st["timeline"]["install_s"][args.warmup:]),
                    jobs=st["jobs_submitted"],
                    max_staleness=st["summary"]["max_staleness"],
                    worker_busy_s=sum(st.get("scheduler", {}).get("worker_busy_s", [0.0])),
                )
        finally:
            self.close()
        return out

    def close(self) -> None:
        """Stops the optimizer's refresh workers (AdamW has none)."""
        close = getattr(self.opt, "close", None)
        if callable(close):
            close()


def _run_round(configs: list[tuple[str, str]], args: Any, seed: int) -> dict[tuple[str, str], dict[str, Any]]:
    """Trains every configuration with ``seed``, in lockstep: each runs one refresh period (``--frequency`` steps,
    aligned with the refresh steps) in turn, the order rotating every period. Machine drift (these VMs speed up
    and slow down by 10-20% over minutes) then reaches every configuration alike, at the scale of a second. The
    chunks are aligned with the refresh schedule, so with ``o + S < frequency`` a refresh submitted in a chunk is
    installed in the same chunk: no refresh runs while another configuration trains."""
    runs: list[_Run] = []
    try:
        for name, mode in configs:  # built one by one, so those already built are closed if one fails
            runs.append(_Run(name, mode, args, seed))
        for chunk in range(-(-args.steps // args.frequency)):
            k = chunk % len(runs)
            for run in runs[k:] + runs[:k]:
                run.advance(args.frequency)
        return {c: run.finish() for c, run in zip(configs, runs)}
    except BaseException:
        for run in runs:
            run.close()
        raise


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, max(0, int(round(0.99 * len(ordered))) - 1))]
    return {"median": statistics.median(ordered), "p99": p99, "max": ordered[-1], "mean": statistics.fmean(ordered)}


def period_profile(times: list[float], warmup: int, frequency: int) -> list[float]:
    """Step time by position in the refresh period: for each position ``p`` (step index ``≡ p mod frequency``),
    the median over the whole periods after ``warmup`` of that position's step time.

    The refresh work recurs at the same positions every period (the snapshot step, the install step), so the
    median keeps it, while a step or a whole period that a noisy machine slowed is dropped. Its mean is a robust
    estimate of the mean step time.

    Raises:
        ValueError: If no whole period follows the warm-up.
    """
    first = -(-warmup // frequency)
    periods = range(first, len(times) // frequency)
    if not periods:
        raise ValueError(f"period_profile: no whole period of {frequency} steps after the first {warmup} of {len(times)}")
    return [statistics.median(times[c * frequency + p] for c in periods) for p in range(frequency)]


def hidden_fraction(sync: float, other: float, floor: float) -> float | None:
    """``(sync − other) / (sync − floor)``: the share of the refresh cost (sync over floor) that ``other`` does not
    pay; None when sync is not slower than the floor (nothing to hide)."""
    return (sync - other) / (sync - floor) if sync - floor > 0 else None


def run(args: Any) -> dict[str, Any]:
    torch.set_num_threads(getattr(args, "threads", 1))
    opts = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    modes = [m.strip() for m in getattr(args, "modes", "sync,async,floor").split(",") if m.strip()]
    for m in modes:
        parse_mode(m)
    baselines = [b.strip() for b in getattr(args, "baselines", "adamw").split(",") if b.strip()]
    for b in baselines:
        if b not in _BASELINES:
            raise SystemExit(f"asteria-bench overhead: unknown baseline {b!r}; choose from {', '.join(_BASELINES)}")
    configs = [("adamw", "-")] + [(b, "-") for b in baselines if b != "adamw"] + [(o, m) for o in opts for m in modes]
    target = parse_target(getattr(args, "target", "adamw"))
    import asteria

    pinned = ""
    if getattr(args, "pin", False):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("asteria-bench overhead --pin: needs at least 2 CPUs (one for training, one for the workers)")
        os.sched_setaffinity(0, {cpus[0]})  # this thread; threads started later inherit it unless told otherwise
        args.worker_cpus = tuple(cpus[1:])
        pinned = f"; training pinned to CPU {cpus[0]}, workers to CPUs {','.join(map(str, cpus[1:]))}"
    workers = asteria.RuntimeConfig(worker_cpus=getattr(args, "worker_cpus", None)).resolved_workers()
    device = getattr(args, "device", "cpu")
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print(f"asteria-bench overhead: GPT {args.layers} layers, d_model {args.d_model}, context {args.context}, "
          f"batch {args.batch} on {where}; {args.steps} steps (first {args.warmup} excluded), refresh every "
          f"{args.frequency}, staleness {getattr(args, 'staleness', 5)}; torch threads {torch.get_num_threads()}, "
          f"refresh workers {workers} (cores {len(os.sched_getaffinity(0)) + len(getattr(args, 'worker_cpus', None) or ())})"
          f"{pinned}; {args.repeats} rounds (seeds), configurations in lockstep by refresh period"
          f"{'' if getattr(args, 'parallel_install', True) else '; parallel installs off'}")
    if getattr(args, "staleness", 5) + 1 >= args.frequency:
        print(f"  note: staleness + 1 >= frequency: a refresh may still run while another configuration trains, "
              "which flatters the async modes")
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for (name, mode), res in _run_round(configs, args, seed=r).items():
            rounds[(name, mode)].append(res)
            s = _summary(res["times"][args.warmup:])
            print(f"  round {r + 1} {name:>10} {mode:>5}: mean {s['mean'] * 1e3:7.2f} ms  max {s['max'] * 1e3:7.2f} ms",
                  flush=True)
    table = {}
    for (name, mode), results in rounds.items():
        sums = [_summary(res["times"][args.warmup:]) for res in results]
        row = {k: statistics.median(s[k] for s in sums) for k in ("median", "p99", "max", "mean")}
        row["means"] = [s["mean"] for s in sums]
        profiles = [period_profile(res["times"], args.warmup, args.frequency) for res in results]
        row["profile"] = [statistics.median(p[i] for p in profiles) for i in range(args.frequency)]
        row["profile_mean"] = statistics.median(statistics.fmean(p) for p in profiles)
        if "stalls" in results[0]:
            row["stalls"] = statistics.median(res["stalls"] for res in results)
            row["stall_s"] = statistics.median(res["stall_s"] for res in results)
            row["max_staleness"] = max(res["max_staleness"] for res in results)
            periods = (args.steps - args.warmup) / args.frequency
            for key in ("submit_s", "install_s"):  # the runtime's own time on the training thread, per period
                row[f"{key}_per_period"] = statistics.median(res[key] for res in results) / periods
        if "val_loss" in results[0]:
            row["val_loss"] = [res["val_loss"] for res in results]
        table[f"{name}:{mode}"] = row
    _times_to_target(table, rounds, target)
    print()
    print(f"{'configuration':<22}{'median ms':>10}{'p99 ms':>10}{'max ms':>10}{'mean ms':>10}{'p99/med':>8}{'stall s':>9}"
          f"{'hidden':>8}{'robust':>8}{'to target':>11}")
    for name, mode in configs:
        row = table[f"{name}:{mode}"]
        hidden = robust = ""
        refs = _hidden_references(name, mode, table)
        if refs is not None:
            sync, floor = refs
            row["hidden_fraction"] = hidden_fraction(sync["mean"], row["mean"], floor["mean"])
            row["hidden_fraction_robust"] = hidden_fraction(sync["profile_mean"], row["profile_mean"], floor["profile_mean"])
            row["hidden_fraction_rounds"] = [hidden_fraction(*m) for m in zip(sync["means"], row["means"], floor["means"])]
            hidden = f"{row['hidden_fraction'] * 100:7.0f}%" if row["hidden_fraction"] is not None else ""
            robust = f"{row['hidden_fraction_robust'] * 100:7.0f}%" if row["hidden_fraction_robust"] is not None else ""
        stall = f"{row['stall_s']:9.3f}" if "stall_s" in row else f"{'':>9}"
        reach = f"{row['target_time_s']:9.2f} s" if row.get("target_time_s") is not None else f"{'never':>11}"
        print(f"{name + ':' + mode:<22}{row['median'] * 1e3:10.2f}{row['p99'] * 1e3:10.2f}{row['max'] * 1e3:10.2f}"
              f"{row['mean'] * 1e3:10.2f}{row['p99'] / row['median']:8.2f}{stall}{hidden:>8}{robust:>8}{reach}")
    if table["adamw:-"].get("target") is not None:
        print(f"to target: training time (median over rounds) to a smoothed training loss of "
              f"{table['adamw:-']['target']:.3f} ({'AdamW at its last step' if target is None else '--target'})")
    _print_profiles(table, configs, args.frequency)
    losses = _loss_check(table, configs)
    path = write_json(args.out, "overhead.json", {
        "args": vars(args), "device": where, "workers": workers, "table": table, "val_loss_check": losses,
        "timelines": {f"{n}:{m}": rounds[(n, m)][0]["times"] for n, m in configs}})
    png = _plot(rounds, configs, opts, path.parent / "overhead_timeline.png")
    print(f"\nwrote {path}" + (f" and {png}" if png else " (matplotlib missing: no PNG)"))
    return table


def parse_target(text: str | float) -> float | None:
    """``--target``: a loss, or ``"adamw"`` (None: AdamW's smoothed loss at its last step)."""
    if isinstance(text, (int, float)):
        return float(text)
    if text.strip().lower() == "adamw":
        return None
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"asteria-bench overhead: --target must be a loss or 'adamw', got {text!r}") from None


def time_to_target(times: list[float], losses: list[float], target: float) -> tuple[int | None, float | None]:
    """The first step (1-based) whose smoothed loss is at most ``target``, and the training time of the steps up to
    it; ``(None, None)`` when no step reaches it."""
    from asteria.train.report import smooth

    smoothed = smooth(losses)
    hit = next((i for i, v in enumerate(smoothed) if v <= target), None)
    return (None, None) if hit is None else (hit + 1, float(sum(times[: hit + 1])))


def _times_to_target(table: dict[str, dict[str, Any]], rounds: dict, target: float | None) -> None:
    """Adds ``target``, ``target_step`` and ``target_time_s`` (medians over the rounds; None when a round never
    reaches it) to every row; ``target`` None: AdamW's smoothed loss at its last step, per round."""
    from asteria.train.report import smooth

    adamw = rounds[("adamw", "-")]
    if not adamw[0]["losses"]:
        return
    goals = [target if target is not None else float(smooth(res["losses"])[-1]) for res in adamw]
    for (name, mode), results in rounds.items():
        hits = [time_to_target(res["times"], res["losses"], goal) for res, goal in zip(results, goals)]
        row = table[f"{name}:{mode}"]
        row["target"] = statistics.median(goals)
        row["target_step"] = None if any(h[0] is None for h in hits) else statistics.median(h[0] for h in hits)
        row["target_time_s"] = None if any(h[1] is None for h in hits) else statistics.median(h[1] for h in hits)


def _hidden_references(name: str, mode: str, table: dict[str, dict[str, Any]]) -> tuple[dict, dict] | None:
    """The sync and floor rows a hidden fraction of ``name:mode`` is computed against (same ``+bf16`` suffix), or
    None (not an async/eager mode, or they were not run)."""
    base, bf16 = parse_mode(mode) if name in _NAMES else (mode, False)
    if not base.startswith(("async", "eager")):
        return None
    suffix = "+bf16" if bf16 else ""
    sync, floor = table.get(f"{name}:sync{suffix}"), table.get(f"{name}:floor{suffix}")
    return None if sync is None or floor is None else (sync, floor)


def _print_profiles(table: dict[str, dict[str, Any]], configs: list, frequency: int) -> None:
    """Prints each configuration's `period_profile` (medians over rounds) and its cost per period over the floor."""
    print(f"\nstep time (ms) by position in the refresh period: median over the periods, then over the rounds; "
          f"'robust' hidden uses the mean of these")
    print(f"{'configuration':<22}" + "".join(f"{p:>7}" for p in range(frequency))
          + f"{'mean':>8}{'+/period':>10}{'submit':>8}{'install':>8}")
    for name, mode in configs:
        row = table[f"{name}:{mode}"]
        floor = table.get(f"{name}:floor{'+bf16' if mode.endswith('+bf16') else ''}")
        extra = f"{(row['profile_mean'] - floor['profile_mean']) * frequency * 1e3:10.1f}" if floor else f"{'':>10}"
        own = "".join(f"{row[k] * 1e3:8.1f}" for k in ("submit_s_per_period", "install_s_per_period") if k in row)
        print(f"{name + ':' + mode:<22}" + "".join(f"{x * 1e3:7.1f}" for x in row["profile"])
              + f"{row['profile_mean'] * 1e3:8.2f}{extra}{own}")
    print("+/period: the profile's cost per refresh period over the floor; submit, install: the runtime's own time on "
          "the training thread per period (snapshots and submissions; installs without stalls), from opt.runtime.stats()")


def _loss_check(table: dict[str, dict[str, Any]], configs: list) -> dict[str, Any]:
    """Final validation loss of each async configuration against the synchronous seeds (printed and returned).

    Per seed, ``async − sync`` of the same seed; the tolerance is ``max(0.02, 2σ)`` with σ the sample standard
    deviation of the synchronous losses over the seeds.
    """
    checks: dict[str, Any] = {}
    for name, mode in configs:
        if name not in _NAMES or not mode.startswith(("async", "eager")) or "val_loss" not in table[f"{name}:{mode}"]:
            continue
        sync_key = f"{name}:{mode.replace('async', 'sync').replace('eager', 'sync')}"
        if sync_key not in table or "val_loss" not in table[sync_key]:
            continue
        sync, other = table[sync_key]["val_loss"], table[f"{name}:{mode}"]["val_loss"]
        sigma = statistics.stdev(sync) if len(sync) > 1 else float("nan")
        tol = max(0.02, 2 * sigma) if len(sync) > 1 else 0.02
        diffs = [a - b for a, b in zip(other, sync)]
        mean_diff = statistics.fmean(other) - statistics.fmean(sync)
        checks[f"{name}:{mode}"] = {"sync": sync, "async": other, "sigma": sigma, "tolerance": tol,
                                    "per_seed_diff": diffs, "mean_diff": mean_diff, "within": abs(mean_diff) <= tol}
    if checks:
        print(f"\n{'validation loss':<18}{'sync (seeds)':>26}{'async (seeds)':>26}{'mean diff':>11}{'max(.02,2σ)':>13}")
        for key, c in checks.items():
            fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
            print(f"{key:<18}{fmt(c['sync']):>26}{fmt(c['async']):>26}{c['mean_diff']:+11.4f}{c['tolerance']:13.4f}"
                  f"  {'within' if c['within'] else 'OUTSIDE'}")
    return checks


def _plot(rounds: dict, configs: list, opts: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(opts), 1, figsize=(11, 2.6 * len(opts)), sharex=True, squeeze=False)
    adamw = [t * 1e3 for t in rounds[("adamw", "-")][0]["times"]]
    muon = rounds.get(("muon", "-"))
    for ax, name in zip(axes[:, 0], opts):
        ax.plot(adamw, color="0.7", lw=0.8, label="adamw")
        if muon:
            ax.plot([t * 1e3 for t in muon[0]["times"]], color="0.4", lw=0.8, label="muon")
        for key, results in rounds.items():
            if key[0] != name:
                continue
            base, bf16 = parse_mode(key[1])
            ax.plot([t * 1e3 for t in results[0]["times"]], lw=0.9, color=_COLORS[base], ls="--" if bf16 else "-",
                    label=f"{name}:{key[1]}")
        ax.set_ylabel("step ms")
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("asteria-bench overhead: training step time (round 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
