"""Command line of ``asteria-train`` (also ``python -m asteria.train``)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

#: The comparison run when no ``--optimizer`` or ``--compare`` is given (``make demo``).
DEMO_COMPARE = "adamw,muon,soap:sync,soap:async,kl-soap,shampoo"

DESCRIPTION = """\
Train a small GPT-style language model on the source code of the Python standard
library (read from this interpreter's installation: no download) with AdamW or one of
asteria's second-order optimizers, and write a report: a summary table, metrics.jsonl,
summary.json and PNG plots (loss vs step, loss vs wall-clock, step-time timeline with the
preconditioner refresh steps marked, optimizer memory).

With no arguments it runs the demo: a comparison of %s
on the tiny model for 300 steps each (about 5 minutes on a 2-core CPU) that answers "does
second-order training pay off here?", and shows what asynchronous refresh does to the
step-time spikes of the preconditioner refreshes.
""" % DEMO_COMPARE

EPILOG = """\
optimizers: adamw is torch.optim.AdamW; muon is torch.optim.Muon on the hidden 2-D weights
(attention and MLP projections) and AdamW on the embeddings (tied to the output), LayerNorms
and biases, the usual split, one learning rate for both (Muon's update matched to AdamW's RMS);
its Newton-Schulz iterations run in bf16 as torch ships them where bf16 matrix products are
fast (GPUs with bf16 tensor cores, CPUs with AVX-512/AMX) and in float32 elsewhere (an AVX2 CPU,
where torch's bf16 matmul is a scalar loop); shampoo, soap, kl-shampoo and kl-soap are asteria's.

model presets (byte vocabulary of 256, tied input/output embedding, context 128):
%s

examples:
  asteria-train                                   the demo comparison
  asteria-train --optimizer soap --steps 500      one run
  asteria-train --compare adamw,soap:sync,soap:async --time-budget 60
                                                  equal time for each configuration
  asteria-train --optimizer soap --steps 1000 --stop-at 400 --save run.pt
  asteria-train --resume run.pt                   continue that run exactly where it stopped
  asteria-train --optimizer soap --steps 5000 --save run.pt --save-every 200
                                                  a killed run loses at most 200 steps

Ctrl-C or SIGTERM stops at the next step boundary and writes the --save checkpoint
(exit status 130 or 143); a second one aborts at once, keeping the last checkpoint.
Checkpoints are written to a temporary file and renamed into place once complete, so
a crash or a full disk never leaves a torn checkpoint behind.

Times in the report are training time: the sum of step times, evaluation excluded.
The target loss is the final validation loss of AdamW (or of the first configuration).
"""


def _presets_text() -> str:
    from .model import PRESETS, preset

    lines = []
    for name, shape in PRESETS.items():
        n = preset(name).num_parameters()
        lines.append(
            f"  {name:<6} {shape['n_layer']} layers, width {shape['d_model']}, "
            f"{shape['n_head']} heads: {n / 1e6:.2f}M parameters"
        )
    return "\n".join(lines)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults are None so that explicit options can be told apart)."""
    from .model import PRESETS
    from .optimizers import OPTIMIZER_NAMES

    p = argparse.ArgumentParser(
        prog="asteria-train",
        description=DESCRIPTION,
        epilog=EPILOG % _presets_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to train")
    mode = what.add_mutually_exclusive_group()
    mode.add_argument("--optimizer", choices=OPTIMIZER_NAMES,
                      help="train one configuration with this optimizer")
    mode.add_argument("--compare", metavar="LIST",
                      help="train several configurations one after another on the same data "
                           "and seed, e.g. 'adamw,soap:sync,soap:async'; ':sync'/':async' "
                           f"sets the refresh mode (default: {DEMO_COMPARE} when neither "
                           "--optimizer nor --compare is given)")
    what.add_argument("--model", choices=list(PRESETS), help="model preset (default: tiny)")
    what.add_argument("--lr", type=_positive_float,
                      help="peak learning rate (default: per optimizer, tuned for the "
                           "demo: adamw 3e-3, muon 2.4e-2, the second-order optimizers 1.2e-2)")
    what.add_argument("--weight-decay", type=float, help="decoupled weight decay of matrices "
                      "(default: 0.1)")
    what.add_argument("--refresh", choices=["sync", "async"],
                      help="preconditioner refresh of second-order optimizers: inline (sync, "
                           "the reference algorithm) or on background threads (async) "
                           "(default: sync)")
    what.add_argument("--staleness", type=_int_at_least(0),
                      help="async refresh: a refresh from step s is installed by step s+o+S "
                           "(default: the library's)")
    what.add_argument("--precondition-frequency", type=_int_at_least(1), metavar="STEPS",
                      help="steps between preconditioner refreshes (default: the library's)")

    length = p.add_argument_group("how long")
    length.add_argument("--steps", type=_int_at_least(1),
                        help="optimizer steps per configuration; also the length of the "
                             "warmup+cosine learning-rate schedule (default: 300, or unlimited "
                             "with --time-budget)")
    length.add_argument("--time-budget", type=_positive_float, metavar="SECONDS",
                        help="stop each configuration after this much training time; without "
                             "--steps the learning rate stays constant after warmup")
    length.add_argument("--stop-at", type=_int_at_least(1), metavar="STEP",
                        help="end the session after this step, as an interruption (use with "
                             "--save, continue with --resume); the schedule still follows --steps")

    data = p.add_argument_group("data and evaluation")
    data.add_argument("--batch-size", type=_int_at_least(1), help="sequences per step (default: 16)")
    data.add_argument("--context", type=_int_at_least(2),
                      help="sequence length in bytes (default: 128)")
    data.add_argument("--warmup", type=_int_at_least(0),
                      help="linear learning-rate warmup steps (default: 30)")
    data.add_argument("--grad-clip", type=float, help="gradient-norm clip, 0 disables (default: 1.0)")
    data.add_argument("--seed", type=int, help="seed of initialisation and data order (default: 0)")
    data.add_argument("--eval-every", type=_int_at_least(0), metavar="STEPS",
                      help="validation loss every this many steps and at the end; 0: only at "
                           "the end (default: 25)")
    data.add_argument("--eval-batches", type=_int_at_least(1),
                      help="validation batches per evaluation (default: 8)")
    data.add_argument("--corpus-bytes", type=_int_at_least(4096),
                      help="cap on the corpus size in bytes (default: 4 MiB)")
    data.add_argument("--target-loss", type=_positive_float,
                      help="loss whose time-to-reach is reported (default: the final validation "
                           "loss of AdamW, or of the first configuration)")

    machine = p.add_argument_group("machine")
    machine.add_argument("--device", choices=["auto", "cpu", "cuda"],
                         help="where to train (default: auto = cuda if available)")
    machine.add_argument("--threads", type=_int_at_least(1),
                         help="torch.set_num_threads for training, the same for every configuration "
                              "(default: the CPUs this process may use minus one, at least 1: the refresh "
                              "runtime of the second-order optimizers gets the rest)")
    machine.add_argument("--device-budget", metavar="BYTES",
                         help="memory tiers of the second-order optimizers' state: bytes kept where "
                              "the optimizer computes, e.g. 64MiB (default: no limit)")
    machine.add_argument("--host-budget", metavar="BYTES",
                         help="bytes of pinned host memory for state beyond the device budget, "
                              "including the NVMe staging buffers, e.g. 256MiB (default: none)")
    machine.add_argument("--nvme-path", metavar="DIR",
                         help="directory (on a fast drive) for state that fits neither budget; a "
                              "private swap file there is removed at the end (default: none)")

    out = p.add_argument_group("output and checkpoints")
    out.add_argument("--report", metavar="DIR",
                     help="report folder (default: reports/<date>-<time>-<name>)")
    out.add_argument("--name", help="name of the report (default: the optimizer or 'compare')")
    out.add_argument("--save", metavar="PATH",
                     help="write a checkpoint (model, optimizer, data position, RNG, history) "
                          "at the end of the session, also after Ctrl-C or SIGTERM")
    out.add_argument("--save-every", type=_int_at_least(0), metavar="STEPS",
                     help="with --save, also write the checkpoint every STEPS steps during the "
                          "run, so a killed run loses at most STEPS steps (default: 0, only at "
                          "the end)")
    out.add_argument("--resume", metavar="PATH",
                     help="continue a run from a checkpoint; its settings are kept, only "
                          "--steps, --time-budget, --stop-at, evaluation and output options "
                          "may change")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    out.add_argument("--quiet", action="store_true",
                     help="no progress bars or messages; only the summary table is printed")
    return p


#: argparse destination -> RunConfig field, for options that are part of a run's config.
_CONFIG_OPTIONS = (
    "optimizer", "refresh", "staleness", "precondition_frequency", "lr", "weight_decay",
    "model", "context", "batch_size", "steps", "time_budget", "warmup", "grad_clip", "seed",
    "eval_every", "eval_batches", "corpus_bytes", "threads",
    "device_budget", "host_budget", "nvme_path",
)


def _overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in _CONFIG_OPTIONS if getattr(args, k) is not None}


def plan_runs(args: argparse.Namespace, device: str):
    """Turn parsed arguments into the list of :class:`RunConfig` to train.

    Raises:
        ValueError: invalid combinations, with a message for the user.
    """
    from .config import RunConfig, parse_compare
    from .optimizers import is_second_order

    base = _overrides(args)
    base.pop("optimizer", None)
    base.setdefault("threads", default_training_threads())
    if args.steps is None and args.time_budget is not None:
        base["steps"] = None
    base["device"] = device
    if args.optimizer is not None:
        return [RunConfig(optimizer=args.optimizer, **base)]
    entries = parse_compare(args.compare if args.compare is not None else DEMO_COMPARE)
    runs = []
    default_refresh = base.pop("refresh", "sync")
    staleness = base.pop("staleness", None)
    for label, name, refresh in entries:
        mode = refresh or (default_refresh if is_second_order(name) else "sync")
        if not refresh and is_second_order(name) and mode == "async":
            label = f"{name}:async"
        runs.append(RunConfig(name=label, optimizer=name, refresh=mode,
                              staleness=staleness if mode == "async" else None, **base))
    return runs


def default_training_threads() -> int:
    """Training threads when ``--threads`` is not given: one less than the CPUs this process may use (at least
    one), the same for every configuration, so that the refresh runtime of the second-order optimizers has a
    core of its own and the comparison with AdamW and Muon is made on equal terms."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _report_dir(args: argparse.Namespace, runs) -> Path:
    if args.report:
        return Path(args.report)
    name = args.name or (runs[0].name.replace(":", "-") if len(runs) == 1 else "compare")
    return Path("reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``asteria-train``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)

    import torch

    from . import loop, report
    from .corpus import load_corpus
    from .model import preset

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    try:
        device = loop.resolve_device(args.device)
        checkpoint = None
        if args.resume:
            if args.compare:
                raise ValueError("--resume continues one run; it cannot be combined with --compare")
            checkpoint = loop.load_checkpoint(args.resume)
            overrides = _overrides(args)
            overrides["device"] = device
            runs = [loop.config_for_resume(checkpoint, overrides)]
        else:
            runs = plan_runs(args, device)
        if args.save and len(runs) > 1:
            raise ValueError("--save checkpoints one run; use --optimizer instead of --compare")
        if args.save_every and not args.save:
            raise ValueError("--save-every needs --save PATH (where to write the checkpoint)")
        if args.stop_at is not None and len(runs) > 1:
            raise ValueError("--stop-at applies to one run; use --optimizer instead of --compare")
    except (ValueError, OSError) as exc:  # OSError: an unreadable --resume file
        parser.exit(2, f"asteria-train: error: {exc}\n")

    from .distributed import init_from_env

    ctx = init_from_env(device)  # under torchrun: only rank 0 prints and writes the report
    if not ctx.is_main:
        args.quiet = True
        say = lambda *a: None  # noqa: E731
    torch.set_num_threads(runs[0].threads or torch.get_num_threads())
    report_dir = _report_dir(args, runs)
    corpus = load_corpus(max_bytes=runs[0].corpus_bytes)
    first = runs[0]
    n_params = preset(first.model, first.context).num_parameters()
    say(corpus.describe())
    say(f"model: {first.model}, {n_params:,} parameters ({n_params / 1e6:.2f}M); "
        f"batch {first.batch_size} x {first.context} bytes; device {device}, "
        f"{torch.get_num_threads()} threads" + (f"; {ctx.world_size} processes (DDP), batch "
                                                f"{first.batch_size} per process" if ctx.enabled else ""))
    length = []
    if first.steps is not None:
        length.append(f"{first.steps} steps")
    if first.time_budget is not None:
        length.append(f"{first.time_budget:g} s of training time")
    say(f"training {len(runs)} configuration(s) for {' or '.join(length)} each: "
        + ", ".join(f"{r.name} (lr {r.effective_lr:g})" for r in runs))
    if checkpoint is not None:
        say(f"resuming {runs[0].name} from {args.resume} at step {checkpoint['step']}")
    say(f"report: {report_dir}")

    results = []
    interrupted = False
    writer_cm = report.MetricsWriter(report_dir / "metrics.jsonl") if ctx.is_main else contextlib.nullcontext(None)
    with writer_cm as writer:
        if checkpoint is not None and writer is not None:
            for record in checkpoint["records"]:
                writer(record)
        for i, cfg in enumerate(runs):
            try:
                result = loop.train(
                    cfg,
                    corpus,
                    on_record=writer,
                    progress=not args.quiet,
                    save=args.save,
                    checkpoint=checkpoint,
                    stop_at=args.stop_at,
                    save_every=args.save_every or 0,
                )
            except KeyboardInterrupt as exc:  # a second signal while the last checkpoint was being written
                print(f"asteria-train: {cfg.name}: aborted; the checkpoint being written was abandoned "
                      "(the previous one, if any, is intact)", file=sys.stderr, flush=True)
                signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
                return 128 + int(signum)  # 130 for Ctrl-C, 143 for SIGTERM
            except Exception as exc:  # one broken configuration must not lose the others
                traceback.print_exc(file=sys.stderr)
                result = loop.RunResult(
                    config=cfg, status="failed", message=f"{type(exc).__name__}: {exc}"
                )
            results.append(result)
            if result.status == "unavailable":
                say(f"{cfg.name}: unavailable: {result.message}")
            elif result.status != "ok":
                say(f"{cfg.name}: {result.status}: {result.message}")
            if result.status == "interrupted":
                interrupted = True
                break

    if not ctx.is_main:
        return 1 if any(r.status in ("failed", "diverged") for r in results) else 0
    summary = report.summarize(results, target_loss=args.target_loss)
    report.write_summary(report_dir, summary)
    stop_signal = results[-1].stop_signal if interrupted else 0
    if not args.no_plots and stop_signal != signal.SIGTERM:  # after SIGTERM: exit promptly, no plots
        report.write_plots(report_dir, results, summary)
    print()
    print(report.format_table(summary))
    print(f"\nreport written to {report_dir}/", flush=True)
    if args.save and results and results[-1].checkpoint_path:
        say(f"checkpoint written to {results[-1].checkpoint_path}")
    if interrupted:
        return 128 + (stop_signal or signal.SIGINT)  # 130 (SIGINT) or 143 (SIGTERM)
    if len(runs) == 1 and results[0].status == "unavailable":
        print(f"asteria-train: error: {runs[0].name}: {results[0].message}", file=sys.stderr)
        return 1
    if any(r.status in ("failed", "diverged") for r in results):
        return 1
    return 0
