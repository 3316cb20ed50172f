"""Batched Kronecker-factor algebra shared by the optimizers (pure functions, no state).

Every tensor here is a *stack* of same-shape blocks: a block tensor has shape ``(B, d_1, ..., d_k)`` and
a matrix acting on dim i has shape ``(B, d_i, e_i)``. Everything runs as batched matmuls on the blocks'
device, with no host synchronisation.

Conventions (docs/algorithms.md §1.2): ``contract(x, M, i)`` contracts dim i of x with dim 0 of M, i.e. it
applies ``Mᵀ`` along dim i. *project-in* applies ``Qᵀ`` along every dim (``Q_Lᵀ X Q_R`` in 2-D),
*project-out* applies ``Q`` (``Q_L X Q_Rᵀ``), and a symmetric preconditioner ``P_i`` applied along every dim
gives ``P_L X P_R``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "compute_dtype",
    "round_stochastic",
    "matmul",
    "contract",
    "project_in",
    "project_out",
    "mode_gram",
    "permute_along",
    "finite_blocks",
    "masked",
    "expand_mask",
    "block_norm",
    "outer_scale",
]


_COMPUTE = threading.local()  # the dtype of the per-step products of this thread (None: the operands')


@contextlib.contextmanager
def compute_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Runs the matrix products of `matmul`, `contract`, `project_in`, `project_out` and `mode_gram` in ``dtype``
    on this thread while the block runs (the optimizers' ``compute_dtype``). Operands are cast to ``dtype`` and
    the products cast back to the operands' dtype; None (or the operands' own dtype) runs them unchanged, the very
    same kernels as without this block. Thread-local: installs on a helper thread are not affected."""
    previous = getattr(_COMPUTE, "dtype", None)
    _COMPUTE.dtype = dtype
    try:
        yield
    finally:
        _COMPUTE.dtype = previous


def round_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16 stochastically: up with probability equal to the fraction of the way from
    the bfloat16 value below ``|x|`` to the one above, so the rounding is unbiased (``E[round(x)] = x``).

    A bfloat16 number is the upper half of a float32 one: a uniform 16-bit integer is added to the float32 bits and
    the lower 16 bits are cleared. Values already representable come back unchanged, ±Inf stays ±Inf and NaN stays
    NaN; a value within one bfloat16 step of the largest finite one may round up to Inf (as round to nearest may).

    Why: the state's EMAs ``x ← β·x + (1−β)·y`` stop moving in bfloat16 under round to nearest once ``(1−β)·|y−x|``
    is below half a bfloat16 step of ``x`` (2^-9 to 2^-8 of ``|x|``): with β = 0.999 neither a decay nor a change
    up to about 2x is ever stored. Stochastic rounding stores them in expectation (docs/algorithms.md §5.5).

    Args:
        x: A float32 tensor.
        generator: The generator of the draws, on ``x``'s device (one uniform 16-bit draw per element).

    Returns:
        A bfloat16 tensor of ``x``'s shape.

    Raises:
        TypeError: If ``x`` is not float32.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_stochastic rounds float32 to bfloat16, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_(0, 1 << 16, generator=generator)
    # (the cleared float32 bits make the conversion exact)
    return bits.add(noise).bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)``, in the dtype of `compute_dtype` when one is set (the result in ``a``'s dtype).

    With a bf16 or fp16 compute dtype the backends accumulate in fp32 (oneDNN on CPUs with AVX-512/AMX, tensor
    cores on GPUs) and round the product to the compute dtype before it is cast back.
    """
    dtype = getattr(_COMPUTE, "dtype", None)
    if dtype is None or dtype == a.dtype:
        return torch.matmul(a, b)
    return torch.matmul(a.to(dtype), b.to(dtype)).to(a.dtype)


def contract(x: torch.Tensor, mat: torch.Tensor, dim: int) -> torch.Tensor:
    """Contracts block dim ``dim`` of ``x`` with dim 0 of ``mat`` (applies ``matᵀ`` along ``dim``).

    Args:
        x: Stacked blocks ``(B, d_1, ..., d_k)``.
        mat: Stacked matrices ``(B, d_dim, e)``.
        dim: Block dim (0-based, not counting the batch dim).

    Returns:
        ``(B, ..., e, ...)`` with ``e`` in place of ``d_dim``.
    """
    k = x.dim() - 1
    if k == 1:
        return matmul(x.unsqueeze(1), mat).squeeze(1)
    if k == 2:
        if dim == 0:
            return matmul(mat.transpose(1, 2), x)
        return matmul(x, mat)
    xt = x.movedim(dim + 1, -1)
    lead = xt.shape[:-1]
    y = matmul(xt.reshape(x.shape[0], -1, x.shape[dim + 1]), mat)
    return y.reshape(*lead, mat.shape[-1]).movedim(-1, dim + 1)


def project_in(x: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Applies ``Qᵀ`` along every dim that has a basis (``Q_Lᵀ X Q_R`` in 2-D).

    Args:
        x: Stacked blocks.
        bases: One ``(B, d_i, d_i)`` basis per dim, or None for an unrotated dim.

    Returns:
        The blocks in eigenbasis coordinates.
    """
    for i, q in enumerate(bases):
        if q is not None:
            x = contract(x, q, i)
    return x


def project_out(x: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Applies ``Q`` along every dim that has a basis (``Q_L X Q_Rᵀ`` in 2-D).

    Args:
        x: Stacked blocks in eigenbasis coordinates.
        bases: One ``(B, d_i, d_i)`` basis per dim, or None.

    Returns:
        The blocks in the original coordinates.
    """
    for i, q in enumerate(bases):
        if q is not None:
            x = contract(x, q.transpose(1, 2), i)
    return x


def mode_gram(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mode-``dim`` Gram ``Γ_dim(X) = X_(dim) X_(dim)ᵀ`` of every block.

    Args:
        x: Stacked blocks ``(B, d_1, ..., d_k)``.
        dim: Block dim.

    Returns:
        ``(B, d_dim, d_dim)``.
    """
    k = x.dim() - 1
    if k == 1:
        return x.unsqueeze(2) * x.unsqueeze(1)
    if k == 2:
        if dim == 0:
            return matmul(x, x.transpose(1, 2))
        return matmul(x.transpose(1, 2), x)
    xm = x.movedim(dim + 1, 1).reshape(x.shape[0], x.shape[dim + 1], -1)
    return matmul(xm, xm.transpose(1, 2))


def permute_along(x: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorders block dim ``dim`` of every block: ``y[..., j, ...] = x[..., perm[j], ...]``.

    Args:
        x: Stacked blocks ``(B, d_1, ..., d_k)``.
        perm: ``(B, d_dim)`` int64 permutations.
        dim: Block dim.

    Returns:
        The permuted blocks.
    """
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim + 1] = x.shape[dim + 1]
    index = perm.reshape(shape).expand_as(x)
    return torch.gather(x, dim + 1, index)


def finite_blocks(mask: torch.Tensor | None, *tensors: torch.Tensor) -> torch.Tensor:
    """``mask`` and, per block, whether the entries of every tensor are finite (no host sync).

    One reduction per tensor: a block sum is Inf/NaN when an entry is. A block of finite entries whose sum
    exceeds the dtype's range (so within a factor of its size of overflowing itself) is reported as
    non-finite too: a conservative margin that costs one plain sum instead of an elementwise test.

    Args:
        mask: ``(B,)`` bool mask (e.g. whether the gradient block was finite), or None (all True).
        tensors: Stacked ``(B, ...)`` tensors (at least one when ``mask`` is None); zero-size blocks count as
            finite.

    Returns:
        The ``(B,)`` bool mask, True where ``mask`` is True and every tensor's block sum is finite.
    """
    sums = [x.flatten(1).sum(dim=1) if x.dim() > 1 else x for x in tensors]
    if not sums:
        if mask is None:
            raise ValueError("finite_blocks needs a mask or at least one tensor")
        return mask
    finite = torch.isfinite(sums[0]) if len(sums) == 1 else torch.isfinite(torch.stack(sums, dim=1)).all(dim=1)
    return finite if mask is None else mask & finite


def masked(mask: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where the ``(B,)`` mask is True, else ``old``; ``new`` itself when the mask is None."""
    return new if mask is None else torch.where(expand_mask(mask, new), new, old)


def expand_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshapes a ``(B,)`` mask to broadcast against ``like`` of shape ``(B, ...)``."""
    return mask.reshape((mask.shape[0],) + (1,) * (like.dim() - 1))


def block_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of every block, shaped ``(B, 1, ..., 1)`` to broadcast against ``x``."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).reshape((x.shape[0],) + (1,) * (x.dim() - 1))


def outer_scale(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Outer product of one ``(B, d_i)`` vector per dim: ``(B, d_1, ..., d_k)``."""
    out = None
    k = len(vectors)
    for i, v in enumerate(vectors):
        shape = [v.shape[0]] + [1] * k
        shape[i + 1] = v.shape[1]
        term = v.reshape(shape)
        out = term if out is None else out * term
    assert out is not None
    return out
