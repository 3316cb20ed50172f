"""Turning parameters into blocks: pure functions on shapes (no tensors are copied here).

Two layouts are used (docs/algorithms.md §2.1 and §3.1):

* **Shampoo** merges small dims as Distributed Shampoo does (`merge_small_dims`: squeeze size-1 dims,
  then fold dims from last to first while the product stays within ``max_preconditioner_dim``, down to
  one dim by default), then splits every dim of the merged view into chunks of at most
  ``max_preconditioner_dim``. A 0-D parameter becomes ``(1,)``; 1-D blocks get one full-matrix factor.
* **SOAP / KL** never merge a weight of two or more dims down to one dim: 2-D and 3-D weights keep their
  shape, weights of order four or more get their trailing dims merged until three dims remain (a 4-D conv
  ``(out, in, kh, kw)`` becomes ``(out, in, kh·kw)``), and every dim is split into chunks of at most
  ``max_preconditioner_dim``. 0-D and 1-D parameters are one unfactored block (the AdamW fallback).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "BlockSpec",
    "ParamLayout",
    "merge_small_dims",
    "merge_trailing_dims",
    "split_blocks",
    "shampoo_layout",
    "soap_layout",
    "block_views",
]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block of a parameter's merged view.

    Attributes:
        index: Position of the block in the parameter's row-major block grid.
        offsets: Start of the block along each dim of the merged view.
        shape: Shape of the block.
    """

    index: int
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        """Slices selecting the block from the merged view."""
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.shape))


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """How one parameter is viewed and cut into blocks.

    Attributes:
        param_shape: The parameter's shape.
        merged_shape: Shape of the view the blocks are cut from (same number of elements).
        blocks: The blocks, in row-major order of the block grid.
        factored: Whether the blocks are preconditioned at all (False: diagonal fallback).
    """

    param_shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    blocks: tuple[BlockSpec, ...]
    factored: bool


def merge_small_dims(shape: Sequence[int], threshold: int | float, target: int | float = 1) -> tuple[int, ...]:
    """Merges small dims the way Distributed Shampoo does (docs/algorithms.md §2.1).

    Args:
        shape: The tensor shape.
        threshold: Largest allowed size of a merged dim (``max_preconditioner_dim``).
        target: Stop merging once this many dims would remain; ``math.inf`` disables merging (the shape
            is returned unchanged, not even squeezed).

    Returns:
        The merged shape: ``(0,)`` if any dim is 0; otherwise size-1 dims are dropped (all ones gives
        ``(1,)``) and dims are folded from last to first while the product stays ``<= threshold`` and more
        than ``target`` dims would otherwise remain.

    Raises:
        ValueError: If ``target`` is a float other than ``math.inf`` or an int < 1.
    """
    shape = tuple(int(d) for d in shape)
    if isinstance(target, float) and target != math.inf or (not isinstance(target, float) and target < 1):
        raise ValueError(f"target must be an int >= 1 or math.inf, got {target!r}")
    if 0 in shape:
        return (0,)
    if target == math.inf:
        return shape
    squeezed = [d for d in reversed(shape) if d != 1] or [1]
    merged = [squeezed[0]]
    for processed, nxt in enumerate(squeezed[1:], start=1):
        remaining = len(squeezed) - processed
        if len(merged) + remaining > target and merged[-1] * nxt <= threshold:
            merged[-1] *= nxt
        else:
            merged.append(nxt)
    return tuple(reversed(merged))


def merge_trailing_dims(shape: Sequence[int], max_order: int = 3) -> tuple[int, ...]:
    """Merges trailing dims until at most ``max_order`` dims remain (SOAP/KL layout).

    Args:
        shape: The tensor shape.
        max_order: The largest order kept.

    Returns:
        The shape with dims ``max_order-1 ..`` folded into one, e.g. ``(64, 32, 3, 3) -> (64, 32, 9)``.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) <= max_order:
        return shape
    return shape[: max_order - 1] + (math.prod(shape[max_order - 1 :]),)


def split_blocks(shape: Sequence[int], max_dim: int | float) -> tuple[BlockSpec, ...]:
    """Splits every dim into chunks of at most ``max_dim`` (the last chunk may be smaller).

    Args:
        shape: The merged shape.
        max_dim: The chunk size (``math.inf``: no split).

    Returns:
        The blocks of the grid in row-major order; no blocks if the shape has no elements.
    """
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) == 0:
        return ()
    per_dim = []
    for d in shape:
        step = d if max_dim == math.inf else int(max_dim)
        per_dim.append([(o, min(step, d - o)) for o in range(0, d, step)])
    blocks = []
    for index, combo in enumerate(itertools.product(*per_dim)):
        blocks.append(BlockSpec(index, tuple(o for o, _ in combo), tuple(s for _, s in combo)))
    return tuple(blocks)


def shampoo_layout(shape: Sequence[int], max_dim: int | float, merge_dims: bool = True) -> ParamLayout:
    """Layout of a parameter for `asteria.Shampoo` (Distributed Shampoo merging and blocking).

    Args:
        shape: The parameter shape.
        max_dim: ``max_preconditioner_dim``.
        merge_dims: Merge small dims (DS default, target dimensionality 1); False keeps the shape.

    Returns:
        The layout; every block is factored (each of its dims gets a factor unless its exponent is 0).
    """
    shape = tuple(int(d) for d in shape)
    merged = merge_small_dims(shape, max_dim, 1 if merge_dims else math.inf)
    if len(merged) == 0:
        merged = (1,)
    return ParamLayout(shape, merged, split_blocks(merged, max_dim), True)


def soap_layout(shape: Sequence[int], max_dim: int | float) -> ParamLayout:
    """Layout of a parameter for `asteria.SOAP`, `asteria.KLShampoo` and `asteria.KLSOAP`.

    Args:
        shape: The parameter shape.
        max_dim: ``max_preconditioner_dim``.

    Returns:
        The layout: 0-D/1-D parameters are one unfactored block; 2-D/3-D keep their shape; higher orders
        merge trailing dims down to 3-D; every factored dim is split into chunks of at most ``max_dim``.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 1:
        merged = shape if shape else (1,)
        blocks = () if math.prod(merged) == 0 else (BlockSpec(0, (0,), merged),)
        return ParamLayout(shape, merged, blocks, False)
    merged = merge_trailing_dims(shape, 3)
    return ParamLayout(shape, merged, split_blocks(merged, max_dim), True)


def block_views(tensor: torch.Tensor, layout: ParamLayout) -> list[torch.Tensor]:
    """Returns the blocks of ``tensor`` (shaped like the parameter) as views when possible.

    Args:
        tensor: A tensor with the parameter's shape.
        layout: The parameter's layout.

    Returns:
        One tensor per block: views of ``tensor`` if it can be viewed as the merged shape, otherwise views
        of a contiguous copy (callers writing through them must check `can_view`).
    """
    merged = tensor.reshape(layout.merged_shape)
    return [merged[b.slices] for b in layout.blocks]


def can_view(tensor: torch.Tensor, layout: ParamLayout) -> bool:
    """Whether `block_views` returns views sharing ``tensor``'s memory."""
    try:
        tensor.view(layout.merged_shape)
    except RuntimeError:
        return False
    return True
