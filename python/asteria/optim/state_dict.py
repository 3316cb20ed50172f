"""Checkpoint conversion for asteria optimizers (pure functions over state dicts).

An asteria ``state_dict()`` has torch.optim's layout (``"state"`` keyed by parameter index and
``"param_groups"``) plus an ``"asteria"`` header naming the optimizer class, the format version and every
parameter's shape. Per parameter, ``state[i]`` holds the scalar state (``step``, ...) and ``"blocks"``:
one dict of tensors per block (statistics, bases/roots, moments, counters, the snapshot step of the
installed result). Loading checks the header first, so a checkpoint from another optimizer or from other
shapes is refused with a message that says what differs, and copies each block tensor into the live
(stacked) storage on the parameter's device, keeping the statistics' dtype.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from asteria.optim.base import BlockOptimizer

__all__ = ["FORMAT_VERSION", "header", "convert_for_load", "restore_block"]

FORMAT_VERSION = 1


def header(opt: BlockOptimizer) -> dict[str, Any]:
    """Returns the ``"asteria"`` header describing ``opt`` (class, format, parameter shapes)."""
    return {
        "optimizer": type(opt).__name__,
        "format": FORMAT_VERSION,
        "param_shapes": [[list(p.shape) for p in g["params"]] for g in opt.param_groups],
    }


def convert_for_load(opt: BlockOptimizer, state_dict: dict[str, Any]) -> dict[torch.Tensor, dict[str, Any]]:
    """Validates a checkpoint against ``opt`` and maps its state onto ``opt``'s parameters.

    Args:
        opt: The optimizer being loaded.
        state_dict: A dict produced by ``opt.state_dict()`` (possibly in another process or on another
            device).

    Returns:
        Per parameter, a fresh state dict (scalars deep-copied; block tensors left to `restore_block`).

    Raises:
        ValueError: If the checkpoint is not an asteria checkpoint of the same optimizer class and format,
            or its param groups / parameter shapes differ.
    """
    name = type(opt).__name__
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'")
    hdr = state_dict.get("asteria")
    if not isinstance(hdr, dict) or "optimizer" not in hdr:
        raise ValueError(
            f"{name}.load_state_dict: this checkpoint has no 'asteria' header; it was not saved by an asteria "
            "optimizer (e.g. it comes from torch.optim or another library)"
        )
    if hdr["optimizer"] != name:
        raise ValueError(f"{name}.load_state_dict: the checkpoint was saved by {hdr['optimizer']}, not {name}")
    if hdr.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{name}.load_state_dict: checkpoint format {hdr.get('format')!r} is not supported "
            f"(this version reads format {FORMAT_VERSION})"
        )
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"{name}.load_state_dict: the checkpoint has {len(groups)} param groups, the optimizer has "
            f"{len(opt.param_groups)}"
        )
    shapes = hdr.get("param_shapes", [])
    out: dict[torch.Tensor, dict[str, Any]] = {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{name}.load_state_dict: param group {gi} has {len(saved['params'])} parameters in the "
                f"checkpoint and {len(group['params'])} in the optimizer"
            )
        for pi, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            want = list(p.shape)
            got = shapes[gi][pi] if gi < len(shapes) and pi < len(shapes[gi]) else None
            if got != want:
                raise ValueError(
                    f"{name}.load_state_dict: parameter {pi} of group {gi} has shape {tuple(want)} but the "
                    f"checkpoint has {None if got is None else tuple(got)}"
                )
            saved_state = state_dict["state"].get(saved_id)
            if saved_state is None:
                continue
            pstate: dict[str, Any] = {}
            for key, value in saved_state.items():
                if key == "blocks":
                    pstate["blocks"] = list(value)
                else:
                    pstate[key] = copy.deepcopy(value)
            out[p] = pstate
    return out


def restore_block(bucket_state: dict[str, torch.Tensor], row: int, saved: dict[str, Any], label: str) -> None:
    """Copies one saved block's tensors into row ``row`` of the stacked bucket state.

    Args:
        bucket_state: The bucket's stacked tensors (freshly initialised).
        row: The block's row.
        saved: The block dict from the checkpoint.
        label: The block's name for errors.

    Raises:
        ValueError: If keys or shapes differ (other optimizer options, other blocking).
    """
    missing = sorted(set(bucket_state) - set(saved))
    extra = sorted(set(saved) - set(bucket_state))
    if missing or extra:
        raise ValueError(
            f"checkpoint state of {label} does not match this optimizer's configuration: missing {missing}, "
            f"unexpected {extra}"
        )
    for key, dest in bucket_state.items():
        src = saved[key]
        if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(dest.shape[1:]):
            got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
            raise ValueError(
                f"checkpoint state {key!r} of {label} has shape {got}, expected {tuple(dest.shape[1:])}"
            )
        dest[row].copy_(src)
