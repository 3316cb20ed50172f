"""``asteria-train`` under ``torchrun``: data-parallel training on several processes.

``torchrun --nproc-per-node N -m asteria.train ...`` starts N copies; each finds ``WORLD_SIZE``/``RANK`` in
its environment, joins the process group (gloo on CPU, NCCL on CUDA, one GPU per local rank), wraps the
model in ``DistributedDataParallel`` and trains on its own rows of the step's global batch
(``--batch-size`` sequences per rank: the global batch is ``N × batch_size`` sequences, the same data a
single process with that batch size would see). The asteria optimizers find the process group themselves
(``RuntimeConfig.process_group="auto"``): refreshes are computed once, by their owner rank. Rank 0 alone
prints, evaluates and writes the report and checkpoints (a checkpoint holds the full optimizer state,
gathered from every rank, and resumes with any number of processes).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

__all__ = ["DistContext", "init_from_env", "wrap_model", "rows", "agree", "full_optimizer_state"]


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process's place in the run (``world_size`` 1: a single process)."""

    world_size: int = 1
    rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str) -> DistContext:
    """Joins the process group described by torchrun's environment (``WORLD_SIZE`` > 1), once.

    Args:
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL; the process uses GPU ``LOCAL_RANK``).

    Returns:
        The context (a single process when ``WORLD_SIZE`` is unset or 1).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available():
        return DistContext()
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistContext(dist.get_world_size(), dist.get_rank())


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """The module to train with: ``DistributedDataParallel(model)`` in a multi-process run, else ``model``."""
    if not ctx.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def rows(ctx: DistContext, batch_size: int) -> slice:
    """This rank's rows of a global batch of ``world_size × batch_size`` sequences."""
    return slice(ctx.rank * batch_size, (ctx.rank + 1) * batch_size)


def agree(ctx: DistContext, loss: float, stop: bool) -> tuple[float, bool]:
    """The mean loss over ranks and whether any rank wants to stop (so every rank stops at the same step)."""
    if not ctx.enabled:
        return loss, stop
    import torch.distributed as dist

    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t)  # one collective: the sum of the losses and the number of ranks that want to stop
    return float(t[0]) / ctx.world_size, bool(t[1] > 0)


def full_optimizer_state(opt: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any] | None:
    """The optimizer's full state for a checkpoint (a collective in a multi-process run; None on ranks > 0)."""
    if not ctx.enabled:
        return opt.state_dict()
    if getattr(opt, "_dist", None) is not None:
        import asteria

        return asteria.gather_state_dict(opt, dst=0)
    return opt.state_dict() if ctx.is_main else None  # replicated (AdamW): rank 0's is everyone's
