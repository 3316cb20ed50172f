"""Optimizer construction and optimizer-side measurements for ``asteria-train``.

The second-order optimizers come from the ``asteria`` package and are imported lazily, only
when one is requested, so ``--optimizer adamw`` works even where the compiled library is
unavailable. Everything the training loop learns about an optimizer (state memory, stall
time, which steps refreshed the preconditioner) is read here.

Refresh detection: after every step the loop reads ``opt.runtime.stats()`` and flattens it.
A step is a *refresh step* when a counter of submitted refresh work (see
:data:`REFRESH_COUNTER_WORDS`, e.g. ``jobs_submitted``) increased during that step, and an
*install step* when a counter of installed results (:data:`INSTALL_COUNTER_WORDS`, e.g.
``batches_installed``) increased. Stall time is the increase during the step of the time
the training thread spent waiting for refresh results (top-level ``wait_s`` or ``stall*``
keys). Without ``opt.runtime`` (AdamW) no step refreshes and stall time is 0.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any, NamedTuple

import torch

#: Optimizer names accepted by ``--optimizer`` and ``--compare``, in display order. ``muon`` is
#: ``torch.optim.Muon`` on the hidden 2-D weights and ``torch.optim.AdamW`` on the rest (`MuonWithAdamW`).
OPTIMIZER_NAMES = ("adamw", "muon", "shampoo", "soap", "kl-shampoo", "kl-soap")

#: The first-order baselines (no preconditioner refresh), which come from torch.
TORCH_OPTIMIZERS = ("adamw", "muon")

#: The asteria class behind each second-order name.
ASTERIA_CLASSES = {
    "shampoo": "Shampoo",
    "soap": "SOAP",
    "kl-shampoo": "KLShampoo",
    "kl-soap": "KLSOAP",
}

#: Refresh modes (``--refresh`` and the ``:sync``/``:async`` suffix of ``--compare``).
REFRESH_MODES = ("sync", "async")


#: Muon's learning rate for the demo setting; the sweep behind it is in BENCHMARKS.md ("asteria-train").
MUON_LR = 2.4e-2


@dataclasses.dataclass(frozen=True)
class OptimizerDefaults:
    """Training defaults of one optimizer for the asteria-train models.

    These are tuned for the small byte-level GPTs here (short runs, warmup + cosine decay),
    so they differ from the library defaults, which follow the reference implementations.
    """

    lr: float
    weight_decay: float
    betas: tuple[float, float]


#: Defaults from a learning-rate sweep on the demo setting (tiny model, batch 16 x 128,
#: 300 steps, warmup 30 + cosine; final validation loss in nats/byte):
#: adamw 1.5e-3: 2.28, 2e-3: 2.25, **3e-3: 2.19**, 6e-3: 2.50, 1.2e-2: 2.62;
#: soap 6e-3: 2.04, **1.2e-2: 1.74**, 2.4e-2: 1.83;
#: shampoo 6e-3: 1.94, **1.2e-2: 1.85**, 2.4e-2: 2.35;
#: kl-soap 6e-3: 1.80, **1.2e-2: 1.68**, 2.4e-2: 1.82;
#: kl-shampoo 6e-3: 2.20, **1.2e-2: 2.17**.
#: muon (one lr for Muon and its AdamW part: Muon's update is scaled to AdamW's RMS; Newton-Schulz in fp32 on
#: the AVX2 machine): 3e-3: 2.11, 6e-3: 1.90, 1.2e-2: 1.75, **2.4e-2: 1.73**, 4.8e-2: 2.10, 9.6e-2: 2.61
#: (``asteria-train --optimizer muon --lr LR``).
DEFAULTS: dict[str, OptimizerDefaults] = {
    "adamw": OptimizerDefaults(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)),
    "muon": OptimizerDefaults(lr=MUON_LR, weight_decay=0.1, betas=(0.9, 0.95)),
    "shampoo": OptimizerDefaults(lr=1.2e-2, weight_decay=0.1, betas=(0.9, 0.95)),
    "soap": OptimizerDefaults(lr=1.2e-2, weight_decay=0.1, betas=(0.95, 0.95)),
    "kl-shampoo": OptimizerDefaults(lr=1.2e-2, weight_decay=0.1, betas=(0.9, 0.95)),
    "kl-soap": OptimizerDefaults(lr=1.2e-2, weight_decay=0.1, betas=(0.9, 0.95)),
}


def is_second_order(name: str) -> bool:
    """True for the asteria optimizers (those with a preconditioner refresh)."""
    return name in ASTERIA_CLASSES


def fast_bf16_matmul(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix products are fast on ``device``: a CUDA device with bf16 tensor cores (compute
    capability 8.0 or newer), or a CPU where oneDNN has a bf16 path (AVX-512 or AMX). Elsewhere (an AVX2 CPU)
    torch's bf16 matmul is a scalar loop, about a hundred times slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        return False


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                       eps: float) -> torch.Tensor:
    """Muon's quintic Newton–Schulz orthogonalisation of a 2-D ``grad``, in float32.

    The same iteration as ``torch.optim.Muon`` (normalise by the Frobenius norm, then ``ns_steps`` times
    ``X ← a·X + (b·A + c·A²)·X`` with ``A = X·Xᵀ``, on the wide orientation), in float32 instead of bf16.
    """
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(grad.dtype)


class MuonWithAdamW:
    """``torch.optim.Muon`` on the hidden 2-D weights, ``torch.optim.AdamW`` on every other parameter.

    The usual split: Muon orthogonalises the updates of the matrices inside the transformer blocks; the
    embeddings (and the tied output projection), LayerNorms and biases use AdamW. Muon runs with
    ``adjust_lr_fn="match_rms_adamw"`` (its update scaled to AdamW's RMS), so one learning rate serves
    both and the training loop's schedule drives them alike through `param_groups`.

    On a device without fast bf16 matrix products (`fast_bf16_matmul`: an AVX2 CPU) torch's Muon, which
    runs its Newton–Schulz iterations in bf16, would spend seconds per matrix in torch's scalar bf16
    fallback; there the iterations run in float32 instead (`newton_schulz_fp32`; ``newton_schulz`` says
    which), the fair baseline on such a machine.

    Args:
        groups: Param groups (``params`` and ``weight_decay`` as from `asteria.train.model.param_groups`).
        hidden: The parameters Muon optimizes (``GPT.hidden_matrices()``).
        lr: Learning rate of both.
        weight_decay: Decoupled weight decay of the decayed groups.
        betas: AdamW's betas.
        momentum: Muon's momentum (torch's default 0.95, Nesterov).
        newton_schulz: ``"bf16"`` (torch as shipped), ``"fp32"``, or ``"auto"`` (bf16 where it is fast).
    """

    def __init__(self, groups: list[dict], hidden: list[torch.Tensor], *, lr: float, weight_decay: float,
                 betas: tuple[float, float], momentum: float = 0.95, newton_schulz: str = "auto") -> None:
        if newton_schulz not in ("auto", "bf16", "fp32"):
            raise ValueError(f"newton_schulz must be 'auto', 'bf16' or 'fp32', got {newton_schulz!r}")
        ids = {id(p) for p in hidden}
        muon, adamw = [], []
        for g in groups:
            mine = [p for p in g["params"] if id(p) in ids]
            rest = [p for p in g["params"] if id(p) not in ids]
            if mine:
                muon.append({**g, "params": mine})
            if rest:
                adamw.append({**g, "params": rest})
        if not muon:
            raise ValueError("MuonWithAdamW: none of the parameters is a hidden 2-D weight")
        device = muon[0]["params"][0].device
        if newton_schulz == "auto":
            newton_schulz = "bf16" if fast_bf16_matmul(device) else "fp32"
        self.newton_schulz = newton_schulz
        self.muon = torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adamw, lr=lr, betas=betas, weight_decay=weight_decay) if adamw else None

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + (self.adamw.param_groups if self.adamw is not None else [])

    @property
    def state(self) -> dict:
        return {**self.muon.state, **(self.adamw.state if self.adamw is not None else {})}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.newton_schulz == "fp32":
            from torch.optim import _muon  # noqa: PLC0415

            shipped = _muon._zeropower_via_newtonschulz
            _muon._zeropower_via_newtonschulz = newton_schulz_fp32  # this step only: torch's Muon, NS in fp32
            try:
                self.muon.step()
            finally:
                _muon._zeropower_via_newtonschulz = shipped
        else:
            self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        if self.adamw is not None:
            self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw is not None else None,
                "newton_schulz": self.newton_schulz}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])
        self.newton_schulz = state.get("newton_schulz", self.newton_schulz)


class OptimizerUnavailable(RuntimeError):
    """The requested optimizer cannot be built here (library missing or feature absent)."""


def _import_asteria():
    try:
        import asteria  # noqa: PLC0415  (lazy on purpose: AdamW works without the library)
    except Exception as exc:  # ImportError, or a broken extension module
        raise OptimizerUnavailable(
            f"the asteria library could not be imported ({type(exc).__name__}: {exc})"
        ) from exc
    return asteria


def build_optimizer(
    name: str,
    param_groups: list[dict],
    *,
    lr: float,
    weight_decay: float,
    refresh: str = "sync",
    staleness: int | None = None,
    precondition_frequency: int | None = None,
    memory: dict[str, Any] | None = None,
    hidden: list[torch.Tensor] | None = None,
) -> torch.optim.Optimizer:
    """Create the optimizer for a training run.

    Args:
        name: one of :data:`OPTIMIZER_NAMES`.
        param_groups: groups as from :func:`asteria.train.model.param_groups`; a group's own
            ``weight_decay`` is scaled so that decayed groups use ``weight_decay``.
        lr: learning rate (peak value of the schedule).
        weight_decay: decoupled weight decay of the matrix parameters.
        refresh: ``"sync"`` or ``"async"`` (second-order optimizers only).
        staleness: bound S of asynchronous refresh; None keeps the library default.
        precondition_frequency: steps between preconditioner refreshes; None keeps the
            library default.
        memory: ``device_budget``, ``host_budget`` and ``nvme_path`` for the runtime (None values
            are left out); ignored by AdamW and Muon.
        hidden: for ``muon``, the hidden 2-D weights Muon optimizes (``GPT.hidden_matrices()``; the
            others get AdamW). Required for ``muon``, ignored otherwise.

    Returns:
        The optimizer.

    Raises:
        ValueError: unknown name or refresh mode.
        OptimizerUnavailable: a second-order optimizer when ``asteria`` (or the class, or the
            refresh mode) is not available; the message says why.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZER_NAMES)})")
    if refresh not in REFRESH_MODES:
        raise ValueError(f"unknown refresh mode {refresh!r} (choose from sync, async)")
    groups = [
        {**g, "weight_decay": weight_decay if g.get("weight_decay", 0.0) else 0.0}
        for g in param_groups
    ]
    betas = DEFAULTS[name].betas
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "muon":
        if hidden is None:
            raise ValueError("build_optimizer('muon') needs hidden=, the weights Muon optimizes")
        return MuonWithAdamW(groups, hidden, lr=lr, weight_decay=weight_decay, betas=betas)

    asteria = _import_asteria()
    cls_name = ASTERIA_CLASSES[name]
    cls = getattr(asteria, cls_name, None)
    if cls is None:
        raise OptimizerUnavailable(f"this asteria build has no asteria.{cls_name}")
    runtime_cls = getattr(asteria, "RuntimeConfig", None)
    if runtime_cls is None:
        raise OptimizerUnavailable("this asteria build has no asteria.RuntimeConfig")
    runtime_kwargs: dict[str, Any] = {"refresh": refresh}
    if staleness is not None:
        runtime_kwargs["staleness"] = staleness
    runtime_kwargs.update({k: v for k, v in (memory or {}).items() if v is not None})
    try:
        runtime = runtime_cls(**runtime_kwargs)
    except (NotImplementedError, OptimizerUnavailable) as exc:
        raise OptimizerUnavailable(f"{cls_name} with refresh={refresh!r}: {exc}") from exc
    kwargs: dict[str, Any] = dict(lr=lr, betas=betas, weight_decay=weight_decay, runtime=runtime)
    if precondition_frequency is not None:
        kwargs["precondition_frequency"] = precondition_frequency
        params = inspect.signature(cls).parameters
        if "start_preconditioning_step" in params:
            # Shampoo requires start_preconditioning_step >= precondition_frequency; start
            # preconditioning at the first refresh.
            kwargs["start_preconditioning_step"] = precondition_frequency
    try:
        return cls(groups, **kwargs)
    except NotImplementedError as exc:
        raise OptimizerUnavailable(f"{cls_name} with refresh={refresh!r}: {exc}") from exc


def _iter_tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _iter_tensors(value)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors held in ``opt.state`` (each storage counted once).

    This is what the optimizer keeps per parameter (moments, statistics, bases, roots).
    Storage shared by several tensors (views) is counted once; tensors kept outside
    ``opt.state`` (for instance by a runtime's tiered store) are reported separately from
    ``opt.runtime.stats()`` when available; when the state is tiered (memory budgets), the
    result is the runtime's ``memory_report()["state_bytes"]``, the bytes of every state tensor
    whatever its tier.
    """
    report = getattr(getattr(opt, "runtime", None), "memory_report", None)
    if callable(report):
        try:
            rep = report()
            if isinstance(rep, dict) and rep.get("tiered"):
                return int(rep["state_bytes"])
        except Exception:  # fall back to counting opt.state
            pass
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in _iter_tensors(list(opt.state.values())):
        try:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            key = (str(tensor.device), id(tensor))
            nbytes = tensor.numel() * tensor.element_size()
        if key in seen:
            continue
        seen.add(key)
        total += nbytes
    return total


def flatten_stats(obj: Any, prefix: str = "") -> dict[str, float]:
    """Flatten a nested stats dict into ``{"a.b.c": number}`` (numbers and bools only)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten_stats(value, f"{prefix}{key}."))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out.update(flatten_stats(dataclasses.asdict(obj), prefix))
    elif isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    elif isinstance(obj, (int, float)) and math.isfinite(obj):
        out[prefix[:-1]] = float(obj)
    return out


#: A flattened stats counter counts refresh work started when its last name component
#: contains one of these words (``jobs_submitted``, ``refreshes``, ``refresh_count``...).
REFRESH_COUNTER_WORDS = ("submitted", "refreshes", "refresh_count")

#: ... and refresh results installed when it contains one of these (``batches_installed``).
INSTALL_COUNTER_WORDS = ("installed", "installs", "install_count")


def _is_counter(key: str, words: tuple[str, ...]) -> bool:
    leaf = key.rsplit(".", 1)[-1].lower()
    if leaf.endswith(("_s", "_ms", "_us", "_ns", "time", "seconds", "bytes")):
        return False
    return any(word in leaf for word in words)


def _stall_seconds(flat: dict[str, float]) -> float:
    """Total time the training thread waited for refresh work, in seconds.

    Top-level keys only (nested scheduler stats measure worker time, not the training
    thread): names containing ``stall`` or starting with ``wait`` (``wait_s``,
    ``stall_time_ms``...), with the unit read from the suffix (seconds by default).
    """
    total = 0.0
    for key, value in flat.items():
        if "." in key:
            continue
        leaf = key.lower()
        if not (re.search(r"(^|_)stall", leaf) or leaf.startswith("wait")) or "count" in leaf:
            continue
        if leaf.endswith("stalls") or leaf.endswith("waits"):
            continue  # event counts, not durations
        if leaf.endswith("_ms"):
            total += value / 1e3
        elif leaf.endswith("_us"):
            total += value / 1e6
        elif leaf.endswith("_ns"):
            total += value / 1e9
        else:
            total += value
    return total


class StepEvents(NamedTuple):
    """Optimizer runtime events of one step.

    Attributes:
        refresh: refresh work started (statistics snapshot submitted) during the step.
        install: refresh results were installed during the step.
        stall: seconds the step waited for refresh work.
    """

    refresh: bool = False
    install: bool = False
    stall: float = 0.0


class RuntimeProbe:
    """Reads the runtime's counters around each step (see the module docstring).

    Per step it reads ``opt.runtime.counters()`` when the runtime has it (a few numbers), else
    ``opt.runtime.stats()``; the full ``stats()`` (with the per-step timeline) is read only when
    `last` is asked for, at the end of a run.

    Attributes:
        available: whether the optimizer exposes runtime stats.
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        runtime = getattr(opt, "runtime", None)
        self._stats_fn = getattr(runtime, "stats", None) if runtime is not None else None
        self.available = callable(self._stats_fn)
        self._runtime = runtime
        counters = getattr(runtime, "counters", None) if runtime is not None else None
        self._counters_fn = counters if callable(counters) else self._stats_fn
        self._flat: dict[str, float] = {}
        if self.available:
            self._flat = self._read()

    @property
    def last(self) -> dict:
        """The latest full ``opt.runtime.stats()`` (a dict; empty when unavailable or failing)."""
        if not self.available:
            return {}
        try:
            raw = self._stats_fn()
        except Exception:  # a stats failure must not end training; report nothing
            return {}
        return raw if isinstance(raw, dict) else {}

    def _read(self) -> dict[str, float]:
        try:
            raw = self._counters_fn()
        except Exception:  # a stats failure must not end training; report nothing
            return {}
        return flatten_stats(raw) if isinstance(raw, dict) else {}

    def after_step(self) -> StepEvents:
        """Call once after each ``opt.step()``; returns what happened during that step."""
        if not self.available:
            return StepEvents()
        before, after = self._flat, self._read()
        self._flat = after

        def grew(words: tuple[str, ...]) -> bool:
            return any(after[k] > before.get(k, 0.0) for k in after if _is_counter(k, words))

        stall = max(0.0, _stall_seconds(after) - _stall_seconds(before))
        return StepEvents(grew(REFRESH_COUNTER_WORDS), grew(INSTALL_COUNTER_WORDS), stall)

    def tier_bytes(self) -> dict[str, float]:
        """Bytes per memory tier: from ``opt.runtime.memory_report()`` when the runtime has one (``device``,
        ``host``, ``nvme``, ``pageable``, ``refresh``, ``state``, ``staging``, ``tiered`` and the pager's
        ``pager_read``/``pager_written`` bytes and GB/s), else the stats' keys mentioning ``bytes``."""
        report = getattr(self._runtime, "memory_report", None)
        if callable(report):
            try:
                rep = report()
            except Exception:  # a report failure must not end training; fall back to the stats
                rep = None
            if isinstance(rep, dict) and "tiers" in rep:
                out = {k: float(v) for k, v in rep["tiers"].items()}
                out["state"] = float(rep["state_bytes"])
                out["tiered"] = float(bool(rep.get("tiered")))
                out["staging"] = float(rep.get("buffers", {}).get("staging_bytes", 0))
                pager = rep.get("pager") or {}
                for src, dst in (("bytes_read", "pager_read"), ("bytes_written", "pager_written"),
                                 ("read_gbps", "pager_read_gbps"), ("write_gbps", "pager_write_gbps")):
                    if src in pager:
                        out[dst] = float(pager[src])
                return out
        return {k: v for k, v in flatten_stats(self.last).items() if "bytes" in k.lower()}
