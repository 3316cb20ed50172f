"""``asteria-bench race``: which optimizer reaches a target loss first, in wall-clock, on the same machine and data.

Each configuration trains a GPT (`asteria.train.model.GPT`, untied or tied embeddings as asteria-train) on
asteria-train's corpus with the same batches, the same learning-rate schedule shape (linear warm-up, then
constant) and the same number of torch threads. The configurations advance in lockstep, one chunk of
``--frequency`` steps each in turn (the order rotating), so a shared machine's drift reaches all of them alike.

Configurations (``--configs``, comma-separated ``NAME[:MODE]``):

* ``adamw``: ``torch.optim.AdamW``; ``muon``: ``torch.optim.Muon`` on the hidden 2-D weights and AdamW elsewhere
  (`asteria.train.optimizers.MuonWithAdamW`, Newton–Schulz in fp32 where bf16 products are slow);
* ``shampoo``, ``soap``, ``kl-shampoo``, ``kl-soap`` with a mode: ``sync`` (the reference algorithm), ``async``
  (the default runtime, ``staleness="auto"``, staggered phases), ``aligned`` (async with
  ``refresh_phases="aligned"``: every block refreshes at the same steps), ``async5`` (S = 5), ``backward`` (async, with
  ``fold_statistics="backward"``: the step computed on the helper thread during backward), ``bf16`` (async with
  ``compute_dtype=torch.bfloat16``), ``bf16state`` (async with ``state_dtype=torch.bfloat16``: factors, bases and
  moments stored in bf16, the step's math in fp32).

``--emulate-bf16`` runs the ``bf16`` products at fp32 speed with the same rounding where the CPU has no fast bf16
path (an AVX2 CPU, where torch's bf16 matmul is ~100x slower than fp32): operands rounded to bf16, the product
accumulated in fp32 and rounded to bf16, which is what oneDNN and tensor cores compute up to the order of the
accumulation. It measures the loss of ``compute_dtype=torch.bfloat16``, not its speed.

Per configuration it reports the median and mean step time (forward, backward and ``step()``), the time of
``opt.step()`` alone (the optimizer's part of the critical path; with ``backward`` the work done on the helper
during backward is not in it), the first step whose smoothed training loss (the no-lag moving average of
asteria-train's report) reaches ``--target`` and the training time to it, the validation loss at the end, and the
staleness the runtime chose. Learning rates per configuration with ``--lr NAME=LR`` (repeatable; default: 1e-3
for AdamW, the ``--lr-default`` for the others).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .output import write_json
from .overhead import time_to_target

_ASTERIA = {"shampoo": "Shampoo", "soap": "SOAP", "kl-shampoo": "KLShampoo", "kl-soap": "KLSOAP"}
_MODES = ("sync", "async", "aligned", "async5", "backward", "bf16", "bf16state")


def parse_configs(text: str) -> list[tuple[str, str]]:
    """``"adamw,soap:sync"`` → ``[("adamw", ""), ("soap", "sync")]`` (a second-order name without mode: async)."""
    out = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        name, _, mode = entry.partition(":")
        if name in ("adamw", "muon"):
            if mode:
                raise SystemExit(f"asteria-bench race: {entry!r}: {name} takes no mode")
        elif name in _ASTERIA:
            mode = mode or "async"
            if mode not in _MODES:
                raise SystemExit(f"asteria-bench race: {entry!r}: mode must be one of {', '.join(_MODES)}")
        else:
            raise SystemExit(f"asteria-bench race: unknown optimizer {name!r}")
        out.append((name, mode))
    return out


def _build(name: str, mode: str, model: Any, lr: float, args: Any) -> Any:
    import asteria
    from asteria.train.model import param_groups
    from asteria.train.optimizers import MuonWithAdamW

    groups = param_groups(model, args.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    if name == "muon":
        return MuonWithAdamW(groups, model.hidden_matrices(), lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    kw: dict[str, Any] = dict(precondition_frequency=args.frequency, weight_decay=args.weight_decay)
    if name == "shampoo":
        kw["start_preconditioning_step"] = args.frequency
    if mode == "bf16":
        kw["compute_dtype"] = torch.bfloat16
    if mode == "bf16state":
        kw["state_dtype"] = torch.bfloat16
    runtime = {
        "sync": dict(refresh="sync"),
        "async": dict(),
        "aligned": dict(refresh_phases="aligned"),
        "async5": dict(staleness=5),
        "backward": dict(fold_statistics="backward"),
        "bf16": dict(),
        "bf16state": dict(),
    }[mode]
    return getattr(asteria, _ASTERIA[name])(groups, lr=lr, runtime=asteria.RuntimeConfig(**runtime), **kw)


class _Run:
    def __init__(self, name: str, mode: str, lr: float, args: Any, corpus: Any) -> None:
        from asteria.train.model import GPT, ModelConfig

        torch.manual_seed(args.seed)
        self.name, self.mode, self.lr, self.args, self.corpus = name, mode, lr, args, corpus
        self.model = GPT(ModelConfig(n_layer=args.layers, n_head=args.heads, d_model=args.d_model, context=args.context))
        self.opt = _build(name, mode, self.model, lr, args)
        self.times: list[float] = []
        self.opt_times: list[float] = []
        self.losses: list[float] = []

    @property
    def label(self) -> str:
        return self.name + (f":{self.mode}" if self.mode else "")

    def advance(self, steps: int) -> None:
        from asteria.train.corpus import train_batch

        args = self.args
        for step in range(len(self.times), min(args.steps, len(self.times) + steps)):
            x, y = train_batch(self.corpus.train, args.batch, args.context, args.seed, step)
            lr = self.lr * min(1.0, (step + 1) / max(args.warmup, 1))
            for group in self.opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            _, loss = self.model(x, y)
            loss.backward()
            t1 = time.perf_counter()
            self.opt.step()
            t2 = time.perf_counter()
            self.times.append(t2 - t0)
            self.opt_times.append(t2 - t1)
            self.losses.append(float(loss.detach()))

    def finish(self) -> dict[str, Any]:
        from asteria.train.corpus import val_batches
        from asteria.train.loop import evaluate
        args = self.args
        try:
            val = evaluate(self.model, val_batches(self.corpus.val, args.batch, args.context, args.eval_batches), "cpu")
            target_step, target_time = time_to_target(self.times, self.losses, args.target)
            out = {
                "config": self.label, "lr": self.lr, "val_loss": val,
                "median_step_s": statistics.median(self.times[args.skip:]),
                "mean_step_s": statistics.fmean(self.times[args.skip:]),
                "mean_opt_s": statistics.fmean(self.opt_times[args.skip:]),
                "target_step": target_step,
                "target_time_s": target_time,
                "losses": self.losses, "times": self.times,
            }
            runtime = getattr(self.opt, "runtime", None)
            if runtime is not None:
                st = runtime.stats()
                out.update(staleness=st["staleness"], stalls=st["stalls"], stall_s=st["wait_s"],
                           backward_steps=st.get("backward_steps"))
            return out
        finally:
            close = getattr(self.opt, "close", None)
            if callable(close):
                close()


def _lrs(args: Any) -> dict[str, float]:
    out = {"adamw": 1e-3}
    for item in args.lr or []:
        key, _, value = item.partition("=")
        out[key.strip()] = float(value)
    return out


def _emulated_bf16_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A bf16 product's rounding at fp32 speed (see the module docstring)."""
    from asteria.optim import tensor_ops as ops

    dtype = getattr(ops._COMPUTE, "dtype", None)
    if dtype != torch.bfloat16 or a.dtype == torch.bfloat16:
        return _SHIPPED_MATMUL(a, b)
    product = torch.matmul(a.bfloat16().to(a.dtype), b.bfloat16().to(a.dtype))
    return product.bfloat16().to(a.dtype)


_SHIPPED_MATMUL = None


def run(args: Any) -> list[dict[str, Any]]:
    from asteria.train.corpus import load_corpus

    global _SHIPPED_MATMUL
    if getattr(args, "emulate_bf16", False):
        from asteria.optim import tensor_ops as ops

        _SHIPPED_MATMUL = ops.matmul
        ops.matmul = _emulated_bf16_matmul  # contract() and mode_gram() call it through the module
    torch.set_num_threads(args.threads)
    configs = parse_configs(args.configs)
    lrs = _lrs(args)
    corpus = load_corpus()
    print(f"asteria-bench race: GPT {args.layers} layers, d_model {args.d_model}, {args.heads} heads, context "
          f"{args.context}, batch {args.batch}; {args.steps} steps, warm-up {args.warmup}, refresh every {args.frequency};"
          f" torch threads {torch.get_num_threads()}; target smoothed train loss {args.target}", flush=True)
    runs = []
    try:
        for name, mode in configs:
            label = name + (f":{mode}" if mode else "")
            lr = lrs.get(label, lrs.get(name, args.lr_default))
            runs.append(_Run(name, mode, lr, args, corpus))
        for chunk in range(-(-args.steps // args.frequency)):
            k = chunk % len(runs)
            for r in runs[k:] + runs[:k]:
                r.advance(args.frequency)
            print(f"  step {min(args.steps, (chunk + 1) * args.frequency)}: "
                  + ", ".join(f"{r.label} {statistics.fmean(r.losses[-args.frequency:]):.3f}" for r in runs), flush=True)
        results = [r.finish() for r in runs]
    except BaseException:
        for r in runs:
            close = getattr(r.opt, "close", None)
            if callable(close):
                close()
        raise
    base = next((r for r in results if r["config"] == "adamw"), results[0])
    print()
    print(f"{'configuration':<18}{'lr':>8}{'median':>9}{'mean':>9}{'vs ' + base['config']:>10}{'step()':>9}"
          f"{'target at':>11}{'time to it':>12}{'val loss':>10}{'S':>4}")
    for r in results:
        ratio = r["median_step_s"] / base["median_step_s"]
        tt = f"{r['target_time_s']:.1f} s" if r["target_time_s"] is not None else "never"
        ts = str(r["target_step"]) if r["target_step"] is not None else "-"
        print(f"{r['config']:<18}{r['lr']:>8.0e}{r['median_step_s'] * 1e3:>7.0f}ms{r['mean_step_s'] * 1e3:>7.0f}ms"
              f"{ratio:>9.2f}x{r['mean_opt_s'] * 1e3:>7.0f}ms{ts:>11}{tt:>12}{r['val_loss']:>10.3f}"
              f"{str(r.get('staleness', '')):>4}")
    path = write_json(args.out, "race.json", {"args": vars(args), "results": results}, default=str)
    print(f"\nwrote {path}")
    return results

