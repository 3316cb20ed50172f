"""The training loop of ``asteria-train``: one configuration, start to end.

A run trains :class:`~asteria.train.model.GPT` on the byte corpus with the requested
optimizer, measures every step, evaluates on the validation split, and can be checkpointed
and resumed. Measurements:

* ``step_time``: wall seconds of one step (batch, forward, backward, clipping,
  ``opt.step()``, ``zero_grad``; on CUDA synchronised by reading the loss).
* ``wall``: training wall-clock, the running sum of step times. Evaluation and
  checkpointing are left out, so evaluating more often does not make a run look slower.
* ``stall``, ``refresh`` and ``install``: from ``opt.runtime.stats()`` (see
  :mod:`asteria.train.optimizers`).

Resuming: the batch of a step depends only on ``(seed, step)``; a checkpoint holds the
model, the optimizer state, the step, the RNG states, the measurement history and the
training wall-clock, so a resumed run continues the uninterrupted one exactly (same losses,
bit for bit, on the same machine and thread count). Checkpoints are asteria's crash-safe
checkpoint files (:func:`asteria.save_checkpoint`): written to a temporary file, synced and
renamed over the previous one, so a crash or a full disk never leaves a torn checkpoint, and
``save_every`` bounds the steps a killed run loses.

Signals: the first SIGINT (Ctrl-C) or SIGTERM stops the run at the next step boundary and
writes the checkpoint; a second one aborts at once (the last checkpoint on disk stays).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import NUMERIC_FIELDS, RunConfig
from . import distributed as _dist
from . import rss
from .corpus import Corpus, train_batch, val_batches
from .model import GPT, param_groups, preset
from .optimizers import (
    OptimizerUnavailable,
    RuntimeProbe,
    build_optimizer,
    optimizer_state_bytes,
)

CHECKPOINT_FORMAT = "asteria-train-checkpoint/1"


@dataclasses.dataclass
class RunResult:
    """Outcome of one run.

    Attributes:
        config: the run's configuration.
        status: ``ok``, ``unavailable`` (optimizer could not be built), ``diverged``
            (non-finite loss), ``failed`` (an error during training) or ``interrupted``
            (SIGINT/Ctrl-C or SIGTERM).
        message: explanation for any status but ``ok``.
        records: one dict per step (the rows of ``metrics.jsonl``).
        val_history: ``{"step", "wall", "val_loss"}`` per evaluation, step 0 included.
        num_parameters: model parameter count.
        state_bytes: bytes of tensors in ``optimizer.state`` at the end.
        tier_bytes: byte counters from ``opt.runtime.stats()`` (empty without a runtime).
        runtime_stats: the last raw ``opt.runtime.stats()`` (empty without a runtime).
        corpus_fingerprint: SHA-256 of the corpus trained on.
        checkpoint_path: where this session's checkpoint was written (None: not written).
        checkpoints_written: checkpoints this session wrote (periodic ones and the last).
        stop_signal: the signal that stopped or aborted the run (``signal.SIGINT`` or
            ``signal.SIGTERM``), 0 when none did.
        memory: peak memory of the run (`asteria.train.rss.peak`): ``peak_rss_bytes`` (the process's
            peak resident set during this run, None where it cannot be measured), ``start_rss_bytes``, and
            on CUDA ``gpu_peak_allocated_bytes``.
    """

    config: RunConfig
    status: str = "ok"
    message: str = ""
    records: list[dict] = dataclasses.field(default_factory=list)
    val_history: list[dict] = dataclasses.field(default_factory=list)
    num_parameters: int = 0
    state_bytes: int = 0
    tier_bytes: dict = dataclasses.field(default_factory=dict)
    runtime_stats: dict = dataclasses.field(default_factory=dict)
    corpus_fingerprint: str = ""
    checkpoint_path: str | None = None
    checkpoints_written: int = 0
    stop_signal: int = 0
    memory: dict = dataclasses.field(default_factory=dict)


def resolve_device(requested: str | None) -> str:
    """``cuda`` when requested or (for None/``auto``) available, else ``cpu``.

    Raises:
        ValueError: ``cuda`` requested on a machine without CUDA.
    """
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but PyTorch sees no CUDA device")
    return requested


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str) -> float:
    """Mean validation cross-entropy (nats per byte) over fixed batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a checkpoint crash-safely with :func:`asteria.save_checkpoint`.

    The previous file at ``path`` stays intact until the new one is complete and on stable
    storage; the parent directory is created when missing.

    Args:
        path: the checkpoint file.
        payload: the checkpoint dict (``format``, ``step``, ``config``, ``model``, ...).

    Raises:
        OSError: the file could not be written (full disk, unwritable directory...); the
            message names the path and the fix, and the previous checkpoint is intact.
    """
    from asteria.checkpoint import save_checkpoint as save  # noqa: PLC0415 (needs the compiled core)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(payload.get("step", ""))}
    name = payload.get("config", {}).get("name")
    if name:
        metadata["run"] = name
    save(payload, path, metadata=metadata)


def _looks_like_plain_torch_save(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"  # the zip archive torch.save writes
    except OSError:
        return False


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train`.

    The file's integrity is checked first (header, sizes, CRC32C; see
    :func:`asteria.load_checkpoint`), then ``torch.load(weights_only=True)`` reads it: a
    checkpoint holds tensors and plain Python values only, so no code from the file is run.

    Raises:
        FileNotFoundError: no such file.
        asteria.CheckpointError: the file is torn or corrupted (a ``ValueError``).
        ValueError: the file is not an asteria-train checkpoint (another program's file, or a
            plain ``torch.save`` file of an older asteria-train), with the fix.
    """
    from asteria.checkpoint import CheckpointError, load_checkpoint as load  # noqa: PLC0415

    try:
        payload = load(path, map_location="cpu")
    except CheckpointError as exc:
        if getattr(exc, "reason", "") != "not_a_checkpoint":
            raise
        if _looks_like_plain_torch_save(path):
            raise ValueError(
                f"{path} is not an asteria-train checkpoint: it is a plain torch.save file (older "
                "asteria-train versions wrote those; checkpoints are now crash-safe asteria checkpoint "
                "files). Fix: convert it once, if you trust the file, with python -c \"import asteria, "
                f"torch; asteria.save_checkpoint(torch.load('{path}', weights_only=True), 'NEW.pt')\" and "
                "resume from NEW.pt, or start a new run"
            ) from None
        raise ValueError(
            f"{path} is not an asteria-train checkpoint: it is not an asteria checkpoint file at all. "
            "Fix: pass the path given to --save"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path} is not an asteria-train checkpoint: it is an asteria checkpoint file, but its "
            f"payload is {found!r}, not {CHECKPOINT_FORMAT!r} (it was saved by another program). "
            "Fix: pass a checkpoint written by asteria-train --save"
        )
    return payload


def config_for_resume(checkpoint: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """The configuration of a resumed run: the checkpoint's, with allowed overrides.

    Args:
        checkpoint: from :func:`load_checkpoint`.
        overrides: options given on the command line for the resumed session. Fields in
            :data:`~asteria.train.config.NUMERIC_FIELDS` other than ``steps`` must equal
            the checkpoint's (they define the numbers); the rest (``time_budget``,
            ``eval_every``, ``device``, ``threads``...) may change. ``steps`` may grow;
            with the default cosine schedule that changes the rates from the resume point.

    Raises:
        ValueError: an override conflicts with the checkpoint, naming the option.
    """
    data = dict(checkpoint["config"])
    for key, value in overrides.items():
        if value is None or key == "name":
            continue
        if key in NUMERIC_FIELDS and key != "steps" and data.get(key) != value:
            option = "--" + key.replace("_", "-")
            raise ValueError(
                f"{option} {value!r} conflicts with the checkpoint ({data.get(key)!r}); a "
                "resumed run keeps the settings that define its numbers"
            )
        data[key] = value
    return RunConfig.from_dict(data)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    cfg: RunConfig,
    corpus: Corpus,
    *,
    on_record: Callable[[dict], None] | None = None,
    progress: bool = True,
    save: str | os.PathLike | None = None,
    checkpoint: dict[str, Any] | None = None,
    stop_at: int | None = None,
    position: int = 0,
    save_every: int = 0,
) -> RunResult:
    """Train one configuration.

    Args:
        cfg: the run configuration (``cfg.device`` must already be resolved).
        corpus: the corpus.
        on_record: called with each step's record as soon as it exists (the report's
            ``metrics.jsonl`` writer).
        progress: show a tqdm progress bar.
        save: write a checkpoint here at the end of the session (also after the first Ctrl-C
            or SIGTERM).
        checkpoint: a checkpoint from :func:`load_checkpoint` to resume from.
        stop_at: end this session after this step (an interruption on purpose: the
            schedule still follows ``cfg.steps``); None runs to the end.
        position: row of the progress bar.
        save_every: with ``save``, also write the checkpoint after every ``save_every`` steps
            (counted from step 0), so a killed run loses at most that many steps; 0: only at
            the end.

    Returns:
        The :class:`RunResult`. Optimizer construction failures give status
        ``unavailable``; other exceptions propagate (a failed checkpoint write raises
        ``OSError``; the previous checkpoint is intact).

    Raises:
        ValueError: ``save_every`` is negative.
        KeyboardInterrupt: a second SIGINT/SIGTERM arrived while the checkpoint at the end
            of the session was being written: that write is abandoned and the previous
            checkpoint on disk is intact. (A second signal during training ends the run with
            status ``interrupted`` and writes no checkpoint.)
    """
    if not isinstance(save_every, int) or save_every < 0:
        raise ValueError(f"save_every must be an integer >= 0 (0: only at the end), got {save_every!r}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = cfg.device
    ctx = _dist.init_from_env(device)  # torchrun: join the process group (see asteria.train.distributed)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gc.collect()
    mark = rss.reset_peak(device)
    model = GPT(preset(cfg.model, context=cfg.context)).to(device)
    result = RunResult(
        config=cfg, num_parameters=model.num_parameters(), corpus_fingerprint=corpus.fingerprint()
    )
    try:
        opt = build_optimizer(
            cfg.optimizer,
            param_groups(model, cfg.effective_weight_decay),
            lr=cfg.effective_lr,
            weight_decay=cfg.effective_weight_decay,
            refresh=cfg.refresh,
            staleness=cfg.staleness,
            precondition_frequency=cfg.precondition_frequency,
            memory={"device_budget": cfg.device_budget, "host_budget": cfg.host_budget,
                    "nvme_path": cfg.nvme_path},
            hidden=model.hidden_matrices(),
        )
    except OptimizerUnavailable as exc:
        result.status, result.message = "unavailable", str(exc)
        return result
    try:
        out = _run(cfg, corpus, model, opt, result, on_record=on_record, progress=progress and ctx.is_main,
                   save=save, checkpoint=checkpoint, stop_at=stop_at, position=position, ctx=ctx,
                   save_every=save_every)
        out.memory = rss.peak(mark, device)
        return out
    finally:
        # Stop the refresh worker threads, whatever happened.
        close = getattr(getattr(opt, "runtime", None), "close", None)
        if callable(close):
            close()


class _GracefulStop:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM into a request to stop at the next step boundary.

    Stopping between steps keeps the model and optimizer consistent, so the checkpoint
    written by ``--save`` can be resumed. A second signal of either kind raises
    ``KeyboardInterrupt`` at once (``aborted`` is then true and no further checkpoint is
    written; one being written is abandoned and the previous file stays). Only active in
    the main thread. A SIGINT the process was started with ignored (a background job of a
    non-interactive shell, ``nohup``) stays ignored, as Python itself leaves it; SIGTERM still
    stops the run.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.aborted = False
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if sig == signal.SIGINT and previous == signal.SIG_IGN:
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.aborted = True
            self.signum = signum
            raise KeyboardInterrupt(signum)  # the signal, for the exit status (128 + signum)
        self.requested = True
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        sys.stderr.write(f"\n{name}: stopping after this step (send it again to abort at once)\n")

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def _stopped_by(signum: int) -> str:
    return "the user" if signum in (0, signal.SIGINT) else signal.Signals(signum).name


def _run(
    cfg: RunConfig,
    corpus: Corpus,
    model: GPT,
    opt: torch.optim.Optimizer,
    result: RunResult,
    *,
    on_record: Callable[[dict], None] | None,
    progress: bool,
    save: str | os.PathLike | None,
    checkpoint: dict[str, Any] | None,
    stop_at: int | None,
    position: int,
    ctx: _dist.DistContext = _dist.DistContext(),
    save_every: int = 0,
) -> RunResult:
    """The body of :func:`train` once model and optimizer exist (same arguments; ``ctx``: the torchrun rank)."""
    device = cfg.device
    vbatches = val_batches(corpus.val, cfg.batch_size, cfg.context, cfg.eval_batches)
    step, wall = 0, 0.0
    if checkpoint is not None:
        if checkpoint["corpus_fingerprint"] != result.corpus_fingerprint:
            raise ValueError(
                "the checkpoint was trained on a different corpus (another Python version "
                "or --corpus-bytes); it cannot be resumed here"
            )
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        step, wall = int(checkpoint["step"]), float(checkpoint["wall"])
        result.records = list(checkpoint["records"])
        result.val_history = list(checkpoint["val_history"])
        _set_rng_state(checkpoint["rng"])
    else:
        result.val_history.append(
            {"step": 0, "wall": 0.0, "val_loss": evaluate(model, vbatches, device)}
        )

    net = _dist.wrap_model(model, ctx)  # DistributedDataParallel under torchrun
    probe = RuntimeProbe(opt)
    last_step = cfg.steps if cfg.steps is not None else math.inf
    if stop_at is not None:
        last_step = min(last_step, stop_at)
    session_start_wall = wall
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=None if cfg.steps is None else cfg.steps,
            initial=step,
            desc=f"{cfg.name:>12}",
            unit="step",
            position=position,
            leave=True,
            dynamic_ncols=True,
        )
    smooth = None
    consistent = True  # False while a step is half done

    def write_checkpoint() -> None:
        # A collective in a multi-process run: every rank calls it at the same step; rank 0 writes the
        # full state, gathered from every rank.
        optimizer_state = _dist.full_optimizer_state(opt, ctx)
        if optimizer_state is None:
            return
        save_checkpoint(
            save,
            {
                "format": CHECKPOINT_FORMAT,
                "config": cfg.to_dict(),
                "corpus_fingerprint": result.corpus_fingerprint,
                "step": step,
                "wall": wall,
                "model": model.state_dict(),
                "optimizer": optimizer_state,
                "rng": _rng_state(),
                "records": result.records,
                "val_history": result.val_history,
            },
        )
        result.checkpoint_path = str(save)
        result.checkpoints_written += 1

    stopper = _GracefulStop()
    stopper.__enter__()
    try:
        try:
            model.train()
            while step < last_step:
                over_budget = cfg.time_budget is not None and wall - session_start_wall >= cfg.time_budget
                if ctx.enabled:  # every rank stops at the same step
                    _, any_stop = _dist.agree(ctx, 0.0, over_budget or stopper.requested)
                    over_budget = any_stop and not stopper.requested
                if over_budget:
                    break
                if stopper.requested:
                    result.status = "interrupted"
                    result.stop_signal = stopper.signum
                    result.message = f"stopped by {_stopped_by(stopper.signum)} after step {step}"
                    break
                consistent = False
                step += 1
                lr = cfg.lr_at(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                x, y = train_batch(corpus.train, cfg.batch_size * ctx.world_size, cfg.context, cfg.seed, step)
                if ctx.enabled:  # this rank's rows of the global batch
                    x, y = x[_dist.rows(ctx, cfg.batch_size)], y[_dist.rows(ctx, cfg.batch_size)]
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                _, loss = net(x, y)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss_value = loss.item()  # also synchronises the device
                if ctx.enabled:  # the loss of the global batch, identical on every rank
                    loss_value, _ = _dist.agree(ctx, loss_value, False)
                step_time = time.perf_counter() - t0
                consistent = True
                events = probe.after_step()
                wall += step_time
                record = {
                    "config": cfg.name,
                    "step": step,
                    "loss": loss_value,
                    "lr": lr,
                    "step_time": step_time,
                    "wall": wall,
                    "stall": events.stall,
                    "refresh": events.refresh,
                    "install": events.install,
                }
                if not math.isfinite(loss_value):
                    result.status = "diverged"
                    result.message = f"loss became {loss_value} at step {step}"
                end = (
                    step >= last_step
                    or result.status != "ok"
                    or (cfg.time_budget is not None and wall - session_start_wall >= cfg.time_budget)
                )
                paused = stop_at is not None and step >= stop_at and (
                    cfg.steps is None or step < cfg.steps
                )
                final = end and not paused  # evaluate at the end, unless only pausing (stop_at)
                if result.status == "ok" and ctx.is_main and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or final
                ):
                    val = evaluate(model, vbatches, device)
                    record["val_loss"] = val
                    result.val_history.append({"step": step, "wall": wall, "val_loss": val})
                result.records.append(record)
                if on_record is not None:
                    on_record(record)
                if bar is not None:
                    smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
                    postfix = {
                        "loss": f"{smooth:.3f}",
                        "step": f"{step_time * 1e3:.0f}ms",
                        "stall": f"{events.stall * 1e3:.0f}ms",
                    }
                    if result.val_history and result.val_history[-1]["step"] > 0:
                        postfix["val"] = f"{result.val_history[-1]['val_loss']:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                if result.status != "ok":
                    break
                # Periodic; the one at the end of the session follows the loop. Decided from the step number only:
                # `end` also depends on this rank's own clock (the time budget), and the ranks of a distributed
                # run must all take part in a save (it gathers the optimizer state) or none.
                if save is not None and save_every and step % save_every == 0 and step < last_step:
                    write_checkpoint()
        except KeyboardInterrupt:
            result.status = "interrupted"
            result.stop_signal = stopper.signum or signal.SIGINT
            who = _stopped_by(result.stop_signal)
            result.message = f"aborted by {who} during step {step}" if not consistent else (
                f"aborted by {who} after step {step}" if stopper.aborted else f"stopped by {who} after step {step}")
        finally:
            if bar is not None:
                bar.close()

        result.state_bytes = optimizer_state_bytes(opt)
        result.runtime_stats = probe.last
        result.tier_bytes = probe.tier_bytes()
        # The handlers are still installed: a second signal during this write abandons it cleanly.
        if save is not None and not consistent:
            result.message += f"; no checkpoint written (step {step} was half done)"
        elif save is not None and stopper.aborted:
            result.message += "; no checkpoint written (aborted)"
        elif save is not None:
            write_checkpoint()
    finally:  # whatever happened (an exception from a callback included), the signal handlers go
        stopper.__exit__(None, None, None)
    return result
