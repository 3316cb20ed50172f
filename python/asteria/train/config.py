"""Run configuration of ``asteria-train`` and the ``--compare`` syntax."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .corpus import DEFAULT_MAX_BYTES
from .model import PRESETS
from .optimizers import DEFAULTS, OPTIMIZER_NAMES, REFRESH_MODES, is_second_order

#: Fields that change the numbers of a run; a resumed run must keep them.
NUMERIC_FIELDS = (
    "optimizer", "refresh", "staleness", "precondition_frequency", "lr", "weight_decay",
    "model", "context", "batch_size", "steps", "warmup", "grad_clip", "seed", "corpus_bytes",
)


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """Everything that defines one training run (one configuration of a comparison).

    Attributes:
        name: label used in tables, plots and metrics (``soap:async``...).
        optimizer: one of ``adamw, shampoo, soap, kl-shampoo, kl-soap``.
        refresh: ``sync`` or ``async`` (second-order optimizers only; ``sync`` for AdamW).
        staleness: staleness bound S for async refresh; None: library default.
        precondition_frequency: steps between refreshes; None: library default.
        lr: peak learning rate; None: the optimizer's default (see ``optimizers.DEFAULTS``).
        weight_decay: decoupled weight decay of matrices; None: the optimizer's default.
        model: model preset (``tiny``, ``small``, ``base``).
        context: sequence length in bytes.
        batch_size: sequences per step.
        steps: number of optimizer steps (also the length of the cosine schedule); None to
            train until ``time_budget`` with a constant rate after warmup.
        time_budget: seconds of training time (sum of step times) after which the run stops;
            None for no limit.
        warmup: linear warmup steps.
        grad_clip: global gradient-norm clip (0 disables).
        seed: seed of the model initialisation and of the data order.
        eval_every: validation every this many steps (and at the end); 0: only at the end.
        eval_batches: number of validation batches (fixed windows of the validation text).
        corpus_bytes: cap on the corpus size.
        device: ``cpu`` or ``cuda``.
        threads: ``torch.set_num_threads`` value; None leaves PyTorch's choice.
        device_budget, host_budget, nvme_path: memory tiers of a second-order optimizer's state
            (``asteria.RuntimeConfig``; budgets in bytes or strings such as ``"64MiB"``); None: the
            library's defaults (no limit, everything in memory). They never change the numbers, so a
            resumed run may change them. AdamW ignores them.
    """

    name: str = ""
    optimizer: str = "adamw"
    refresh: str = "sync"
    staleness: int | None = None
    precondition_frequency: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    model: str = "tiny"
    context: int = 128
    batch_size: int = 16
    steps: int | None = 300
    time_budget: float | None = None
    warmup: int = 30
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 25
    eval_batches: int = 8
    corpus_bytes: int = DEFAULT_MAX_BYTES
    device: str = "cpu"
    threads: int | None = None
    device_budget: int | str | None = None
    host_budget: int | str | None = None
    nvme_path: str | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZER_NAMES)})"
            )
        if self.refresh not in REFRESH_MODES:
            raise ValueError(f"refresh must be 'sync' or 'async', got {self.refresh!r}")
        if self.refresh == "async" and not is_second_order(self.optimizer):
            raise ValueError(
                f"{self.optimizer} has no preconditioner refresh; 'async' applies only to "
                "shampoo, soap, kl-shampoo and kl-soap"
            )
        if self.staleness is not None and self.refresh != "async":
            raise ValueError(
                f"staleness={self.staleness} applies only to async refresh (use --refresh async "
                "or the ':async' suffix); synchronous refresh has staleness 0"
            )
        if self.model not in PRESETS:
            raise ValueError(f"unknown model {self.model!r} (choose from {', '.join(PRESETS)})")
        checks = [
            ("context", self.context, 2, None),
            ("batch_size", self.batch_size, 1, None),
            ("warmup", self.warmup, 0, None),
            ("eval_every", self.eval_every, 0, None),
            ("eval_batches", self.eval_batches, 1, None),
            ("corpus_bytes", self.corpus_bytes, 4096, None),
        ]
        if self.steps is not None:
            checks.append(("steps", self.steps, 1, None))
        if self.staleness is not None:
            checks.append(("staleness", self.staleness, 0, None))
        if self.precondition_frequency is not None:
            checks.append(("precondition_frequency", self.precondition_frequency, 1, None))
        if self.threads is not None:
            checks.append(("threads", self.threads, 1, None))
        for field, value, low, _ in checks:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")
        if self.steps is None and self.time_budget is None:
            raise ValueError("give steps, time_budget, or both")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        try:
            from asteria.runtime.config import parse_bytes  # noqa: PLC0415
        except Exception:  # the compiled library is unavailable: AdamW ignores the budgets anyway
            parse_bytes = None
        for field in ("device_budget", "host_budget"):
            value = getattr(self, field)
            if value is not None and parse_bytes is not None:
                parse_bytes(value, "--" + field.replace("_", "-"))
        if self.nvme_path is not None and not isinstance(self.nvme_path, str):
            raise ValueError(f"nvme_path must be a directory path, got {self.nvme_path!r}")
        if not self.name:
            self.name = self.optimizer
            if is_second_order(self.optimizer) and self.refresh == "async":
                self.name += ":async"

    @property
    def effective_lr(self) -> float:
        """The peak learning rate used (explicit, or the optimizer's default)."""
        return self.lr if self.lr is not None else DEFAULTS[self.optimizer].lr

    @property
    def effective_weight_decay(self) -> float:
        """The weight decay used (explicit, or the optimizer's default)."""
        if self.weight_decay is not None:
            return self.weight_decay
        return DEFAULTS[self.optimizer].weight_decay

    def lr_at(self, step: int) -> float:
        """Learning rate of 1-based ``step``: linear warmup, then cosine decay to 10%.

        Without ``steps`` (time-budget runs) the rate stays at its peak after warmup.
        """
        peak = self.effective_lr
        if self.warmup and step <= self.warmup:
            return peak * step / self.warmup
        if self.steps is None or self.steps <= self.warmup:
            return peak
        progress = min(1.0, (step - self.warmup) / (self.steps - self.warmup))
        return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (also stored in checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict` (unknown keys are rejected)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run configuration keys: {', '.join(unknown)}")
        return cls(**data)


def parse_compare(text: str) -> list[tuple[str, str, str]]:
    """Parse a ``--compare`` list.

    Args:
        text: comma-separated entries ``OPTIMIZER[:sync|:async]``, e.g.
            ``"adamw,soap:sync,soap:async"``. Without a suffix a second-order optimizer
            uses the ``--refresh`` mode.

    Returns:
        ``(label, optimizer, refresh)`` triples in the given order; ``refresh`` is ``""``
        when no suffix was given (the caller fills in ``--refresh``).

    Raises:
        ValueError: with a message naming the bad entry, for an empty list, an unknown
            optimizer or suffix, a suffix on AdamW, or a repeated entry.
    """
    entries = [e.strip() for e in text.split(",")]
    if not text.strip() or any(not e for e in entries):
        raise ValueError(
            f"--compare {text!r}: expected a comma-separated list such as 'adamw,soap:async' "
            "with no empty entries"
        )
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for entry in entries:
        name, _, refresh = entry.lower().partition(":")
        if name not in OPTIMIZER_NAMES:
            raise ValueError(
                f"--compare: unknown optimizer {name!r} in {entry!r} "
                f"(choose from {', '.join(OPTIMIZER_NAMES)})"
            )
        if refresh and refresh not in REFRESH_MODES:
            raise ValueError(
                f"--compare: unknown refresh mode {refresh!r} in {entry!r} (use :sync or :async)"
            )
        if refresh and not is_second_order(name):
            raise ValueError(
                f"--compare: {entry!r}: {name} has no preconditioner refresh, "
                "so it takes no :sync/:async suffix"
            )
        label = entry.lower()
        if label in seen:
            raise ValueError(f"--compare: {entry!r} is listed twice")
        seen.add(label)
        out.append((label, name, refresh))
    return out
