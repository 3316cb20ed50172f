"""`asteria.SOAP`: SOAP with the semantics of the paper's reference code (docs/algorithms.md §3)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from asteria.optim import tensor_ops as ops
from asteria.optim.base import Bucket, _Rows, math_dtype
from asteria.optim.eigenbasis import EigenbasisOptimizer, RowsUpdate
from asteria.runtime.config import RuntimeConfig

__all__ = [
    "SOAP",
    "adam_in_basis",
    "apply_post_update_weight_decay",
    "update_soap_factors",
    "rotate_into_new_bases",
    "install_soap_bases",
]


# ------------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------------
def adam_in_basis(
    G: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    bases: Sequence[torch.Tensor | None],
    beta1: float,
    beta2: float,
    eps: float,
    finite: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam in the eigenbasis: ``g̃ = project_in(G)``, EMAs of ``g̃`` and ``g̃²``, ``U = project_out(m/(√v+ε))``.

    Bias correction is not applied here (SOAP folds it into the step size, convention (B); KL-SOAP has
    none). With every basis None this is the plain Adam direction (the AdamW fallback).

    Args:
        G: Stacked gradient blocks (finite).
        m: First moment in basis coordinates.
        v: Second moment in basis coordinates.
        bases: One ``(B, d, d)`` basis per dim, or None.
        beta1: First-moment coefficient.
        beta2: Second-moment coefficient.
        eps: Added after the square root.
        finite: ``(B,)`` mask; False keeps m and v. None: no masking (the caller masks).

    Returns:
        ``(U, m, v)``: the direction in the original coordinates and the new moments.
    """
    g = ops.project_in(G, bases)
    m = ops.masked(finite, m.mul(beta1).add_(g, alpha=1.0 - beta1), m)
    v = ops.masked(finite, v.mul(beta2).add_(g.square(), alpha=1.0 - beta2), v)
    U = ops.project_out(m / v.sqrt().add_(eps), bases)
    return U, m, v


def apply_post_update_weight_decay(
    W: torch.Tensor, U: torch.Tensor, step_size: float, lr: float, weight_decay: float, finite: torch.Tensor | None
) -> torch.Tensor:
    """``W' = W − η·U``, then ``W ← W' − lr·λ·W'`` (convention (ii)); blocks with ``finite`` False unchanged
    (``finite`` None: no masking)."""
    W_new = W.add(U, alpha=-step_size)
    if weight_decay > 0.0:
        W_new = W_new.add(W_new, alpha=-lr * weight_decay)
    return ops.masked(finite, W_new, W)


def update_soap_factors(
    factors: Sequence[torch.Tensor], G: torch.Tensor, shampoo_beta: float, finite: torch.Tensor | None
) -> list[torch.Tensor]:
    """``L_i ← lerp(L_i, Γ_i(G), 1−β_s)`` for every dim, masked per block (None: not; no bias correction)."""
    return [ops.masked(finite, L.lerp(ops.mode_gram(G, i), 1.0 - shampoo_beta), L) for i, L in enumerate(factors)]


def rotate_into_new_bases(
    x: torch.Tensor,
    old: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    rotations: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Re-expresses ``x`` (basis coordinates) in the new bases: ``Q_newᵀ (Q_old x Q_oldᵀ) Q_new`` in 2-D.

    Computed as one contraction per dim with ``R_i = Q_old,iᵀ Q_new,i``; ``rotations`` gives the ``R_i``
    when the refresh job already computed them (off the training thread).
    """
    for i, (qo, qn) in enumerate(zip(old, new)):
        R = rotations[i] if rotations is not None else torch.matmul(qo.transpose(1, 2), qn)
        x = ops.contract(x, R, i)
    return x


def install_soap_bases(
    bases: Sequence[torch.Tensor],
    new_bases: Sequence[torch.Tensor],
    perms: Sequence[torch.Tensor],
    m: torch.Tensor,
    v: torch.Tensor,
    ok: torch.Tensor | None,
    rotations: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """SOAP install: permute v by π along every dim, rotate m exactly into the new basis, swap Q.

    ``π_i`` is relative to the basis installed when the snapshot was taken (``new = qr(L·Q[:, π]).Q``).

    Args:
        bases: Installed bases (one per dim).
        new_bases: Bases returned by the refresh.
        perms: ``(B, d_i)`` permutations returned by the refresh (None: the identity for every row).
        m: First moment in the installed basis.
        v: Second moment in the installed basis.
        ok: ``(B,)`` rows to install (others keep everything), or None when every row installs.
        rotations: ``R_i = Q_old,iᵀ Q_new,i`` per dim when the refresh computed them, else None.

    Returns:
        ``(bases, m, v)`` after the install.
    """
    m_new = rotate_into_new_bases(m, bases, new_bases, rotations)
    v_new = v
    for i, p in enumerate(perms):
        if p is not None:
            v_new = ops.permute_along(v_new, p, i)
    out_bases = [ops.masked(ok, qn, q) for q, qn in zip(bases, new_bases)]
    return out_bases, ops.masked(ok, m_new, m), ops.masked(ok, v_new, v)


# ------------------------------------------------------------------------------------------------------
# optimizer
# ------------------------------------------------------------------------------------------------------
class SOAP(EigenbasisOptimizer):
    r"""SOAP (Adam in Shampoo's eigenbasis) with the semantics of the paper's reference code.

    Per 2-D/3-D block (larger dims split into blocks of ``max_preconditioner_dim``; 4-D+ weights have their
    trailing dims merged down to 3-D): the first call only sets ``L_i = (1−β_s)·Γ_i(G₀)`` and the basis
    ``Q_i = eigh(L_i)`` (descending) and does not update the parameter. Later calls project the gradient
    in, run Adam there, project out, step with ``η_t = lr·√(1−β2^t)/(1−β1^t)``, apply post-update decoupled
    weight decay ``W ← W − lr·λ·W``, and then fold the gradient into the factors; every
    ``precondition_frequency`` steps the basis is refreshed (Rayleigh-quotient sort of the old basis, the
    second moment permuted the same way, one power step, QR) and the first moment rotated exactly into it,
    for use from the next step. 0-D and 1-D parameters use the same Adam update with no rotation (AdamW
    fallback, including the skipped first call).

    Args:
        params: Parameters or param groups.
        lr: Learning rate (default: 3e-3).
        betas: ``(β1, β2)`` of Adam in the eigenbasis (default: (0.95, 0.95)).
        eps: Added after the square root (default: 1e-8).
        weight_decay: Decoupled weight decay, applied after the update with the raw lr (default: 0.01).
        precondition_frequency: Steps between basis refreshes (default: 10).
        shampoo_beta: Factor EMA coefficient; None uses β2 (default: None).
        max_preconditioner_dim: Largest factor side; larger dims are split into blocks (default: 2048).
        correct_bias: Fold Adam's bias correction into the step size (default: True).
        eigh_ridge: Ridge added before the initial eigh; None is scale-aware (``1e-9·trace/n``), 1e-30
            reproduces the reference exactly (default: None).
        num_tolerated_failures: Consecutive failed refreshes tolerated per block (default: 3).
        state_dtype: dtype of factors, bases and moments: torch.float32 (default), torch.float64 or torch.bfloat16
            (half the bytes; the step's math in float32, what it stores rounded stochastically, refreshes in
            float32; docs/algorithms.md §5.5).
        compute_dtype: dtype of the per-step matrix products (projections into and out of the basis, the
            statistics' products); the state stays in ``state_dtype`` and refreshes run in fp32 or better from
            the snapshot. None (default): ``state_dtype``, the very same kernels as before the option existed.
            ``torch.bfloat16`` pays only where bf16 products are fast (GPUs with bf16 tensor cores, CPUs with
            AVX-512/AMX; on an AVX2 CPU torch's bf16 matmul is about 100x slower than fp32); see BENCHMARKS.md for
            its measured effect on the loss.
        runtime: An `asteria.RuntimeConfig` or a shared `asteria.Runtime` (default: None, i.e. ``RuntimeConfig()``:
            asynchronous refresh with the staleness chosen from measurement, ``staleness="auto"``; ``RuntimeConfig(refresh="sync")`` is the reference algorithm).

    Deviations from the reference, on purpose: dims above ``max_preconditioner_dim`` are blocked instead of
    left unrotated; state is fp32 by default; the first moment is rotated only when the basis changes
    (the reference does an identity rotation every step); non-finite gradients are skipped per block and
    counted; failed refreshes keep the basis (up to ``num_tolerated_failures`` in a row).

    Non-finite gradients and overflow: when a block's gradient contains NaN/Inf, or when its new moments,
    factors or parameter values would not be finite (a finite but huge gradient such as 1e30, whose
    ``G·Gᵀ`` and ``g̃²`` overflow fp32), that step is rejected for the block, on the first call too: moments,
    factors and parameter stay unchanged, a refresh snapshot of that step holds the previous factors, and the
    event is counted (`nonfinite_steps`, ``runtime.stats()["nonfinite_steps"]``). Later ordinary gradients
    train normally. The same holds for the AdamW fallback of 0-D/1-D parameters. A parameter update
    that would not be finite is not written either (counted; that step's finite state is kept).

    Failed refreshes: a job that fails (non-finite input, solver failure) or returns a non-finite basis,
    rotation or an invalid permutation installs nothing for its block: the basis and the moments stay as
    they are and ``refresh_failures`` grows (a success resets it); ``num_tolerated_failures`` failures in a
    row are tolerated and the next one (the 4th by default) raises `RefreshFailureError`. A failed *initial*
    eigh leaves the identity basis (Adam in the original coordinates) until a refresh succeeds.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        precondition_frequency: int = 10,
        shampoo_beta: float | None = None,
        max_preconditioner_dim: int | float = 2048,
        correct_bias: bool = True,
        eigh_ridge: float | None = None,
        num_tolerated_failures: int = 3,
        state_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
        runtime: RuntimeConfig | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            shampoo_beta=shampoo_beta,
            max_preconditioner_dim=max_preconditioner_dim,
            correct_bias=correct_bias,
            eigh_ridge=eigh_ridge,
            num_tolerated_failures=num_tolerated_failures,
            state_dtype=state_dtype,
            compute_dtype=compute_dtype,
        )
        self._validate_group(defaults)
        super().__init__(params, defaults, runtime)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._validate_common(group)
        if not isinstance(group["correct_bias"], bool):
            raise ValueError(f"Invalid correct_bias: {group['correct_bias']!r}; expected a bool")

    @staticmethod
    def _shampoo_beta(group: dict[str, Any]) -> float:
        sb = group["shampoo_beta"]
        return group["betas"][1] if sb is None else sb

    def _init_bucket_state(self, bucket: Bucket, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        st = self._common_state(bucket, group)
        shape = (bucket.size,) + bucket.shape
        st["exp_avg"] = torch.zeros(shape, dtype=group["state_dtype"], device=bucket.device)
        st["exp_avg_sq"] = torch.zeros(shape, dtype=group["state_dtype"], device=bucket.device)
        return st

    def _refresh_options(self) -> dict[str, Any]:
        return {"sort": True}

    def _first_statistics(self, bucket: Bucket, rows: _Rows, G: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        # SOAP's first call folds G like every later step (called for factored buckets only)
        return self._statistics(bucket, rows, G, group)

    def _compute_rows(self, bucket: Bucket, rows: _Rows, t: int, group: dict[str, Any]) -> RowsUpdate:
        st = rows.state
        beta1, beta2 = group["betas"]
        G, finite = self.stacked_grads(rows, math_dtype(group))
        k = len(bucket.shape)
        bases = [st[f"basis_{i}"] for i in range(k)] if bucket.factored else [None] * k
        U, m, v = adam_in_basis(G, st["exp_avg"], st["exp_avg_sq"], bases, beta1, beta2, group["eps"], None)
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * (1.0 - beta2**t) ** 0.5 / (1.0 - beta1**t)
        W = self.stacked_params(rows, math_dtype(group))
        W_new = apply_post_update_weight_decay(W, U, step_size, group["lr"], group["weight_decay"], None)
        # the statistics are folded after the parameter update (they do not depend on it)
        updates = {"exp_avg": m, "exp_avg_sq": v}
        if bucket.factored:
            updates.update(self._statistics(bucket, rows, G, group))
        return RowsUpdate(finite, updates, W, W_new)

    def _statistics(self, bucket: Bucket, rows: _Rows, G: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The factors after folding G (pure and unmasked: reads the state, returns new values)."""
        if not bucket.factored:
            return {}
        k = len(bucket.shape)
        new = update_soap_factors([rows.state[f"factor_{i}"] for i in range(k)], G, self._shampoo_beta(group), None)
        return {f"factor_{i}": L for i, L in enumerate(new)}

    def _install_rows(self, state: dict[str, torch.Tensor], new_bases: list[torch.Tensor], perms: list[torch.Tensor], ok: torch.Tensor | None, group: dict[str, Any], rotations: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        k = len(new_bases)
        bases, m, v = install_soap_bases(
            [state[f"basis_{i}"] for i in range(k)], new_bases, perms, state["exp_avg"], state["exp_avg_sq"], ok,
            rotations,
        )
        out = {f"basis_{i}": q for i, q in enumerate(bases)}
        out["exp_avg"] = m
        out["exp_avg_sq"] = v
        return out
