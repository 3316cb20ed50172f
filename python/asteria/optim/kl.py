"""`asteria.KLShampoo` and `asteria.KLSOAP` with the KL-Shampoo authors' semantics (docs/algorithms.md §4).

State per 2-D/3-D block: factors ``S_i``, bases ``Q_i`` and the eigenvalue estimates, stored (as the
reference does) as ``s_i = D_i^{-1/2}`` (``eigen_sqrt_inv_i``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from asteria.optim import tensor_ops as ops
from asteria.optim.base import Bucket, _Rows, check_range, math_dtype
from asteria.optim.eigenbasis import EigenbasisOptimizer, RowsUpdate
from asteria.optim.soap import adam_in_basis, apply_post_update_weight_decay, rotate_into_new_bases
from asteria.runtime.config import RuntimeConfig

__all__ = [
    "KLShampoo",
    "KLSOAP",
    "klshampoo_direction",
    "eigenvalue_ema",
    "kl_statistics_2d",
    "kl_statistics_3d",
    "install_kl_bases",
]


# ------------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------------
def klshampoo_direction(
    G: torch.Tensor,
    m: torch.Tensor,
    bases: Sequence[torch.Tensor],
    sqrt_inv: Sequence[torch.Tensor],
    beta1: float,
    eps: float,
    finite: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-Shampoo direction: ``m ← lerp(m, G, 1−β1)``; ``U = Q (Qᵀ m Q ⊙ c) Qᵀ`` with ``c = ⊗s / (1 + ε·⊗s)``.

    ``c`` equals ``1/(√(D_a D_b) + ε)``: the ``(D_a ⊗ D_b)^{-1/2}`` preconditioner in the basis, damped by ε.
    Blocks with ``finite`` False keep m (None: no masking, the caller masks).

    Returns:
        ``(U, m)``; m stays in the original coordinates.
    """
    m = ops.masked(finite, m.lerp(G, 1.0 - beta1), m)
    c = ops.outer_scale(sqrt_inv)
    c = c / (1.0 + c * eps)
    U = ops.project_out(ops.project_in(m, bases) * c, bases)
    return U, m


def eigenvalue_ema(s: torch.Tensor, delta: torch.Tensor, beta: float, clamp: float | None) -> torch.Tensor:
    """One EMA step of the eigenvalue estimate, stored as ``s = D^{-1/2}``.

    ``D = 1/s²`` (non-finite → 0), ``D ← lerp(D, δ, 1−β)``, ``s = 1/√D`` (non-finite → 0), then
    ``s ≤ clamp`` when clamping (the clamped s is what is stored).

    Args:
        s: ``(B, d)`` current ``D^{-1/2}``.
        delta: ``(B, d)`` new diagonal term.
        beta: EMA coefficient.
        clamp: Upper bound on s, or None.

    Returns:
        The new s; NaN where ``delta`` is not finite (an overflowed statistic: the reference's ``nan_to_num``
        would silently turn it into s = 0), so that the caller's finiteness check rejects the step.
    """
    D = torch.nan_to_num(1.0 / (s * s), nan=0.0, posinf=0.0, neginf=0.0)
    D = D.lerp(delta, 1.0 - beta)
    out = torch.nan_to_num(1.0 / torch.sqrt(D), nan=0.0, posinf=0.0, neginf=0.0)
    if clamp is not None:
        out = out.clamp(max=clamp)
    return torch.where(torch.isfinite(delta), out, torch.full((), float("nan"), dtype=out.dtype, device=out.device))


def clamp_value(d: int, using_clamping: bool, max_clamp_value: float) -> float | None:
    """The reference's clamp on ``s_i``: ``max(10, min(d_i, max_clamp_value))``, or None when off."""
    return float(max(10, min(d, max_clamp_value))) if using_clamping else None


def kl_statistics_2d(
    G: torch.Tensor,
    factors: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    sqrt_inv: Sequence[torch.Tensor],
    beta: float,
    clamps: Sequence[float | None],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Jacobi-style KL statistics update of 2-D blocks (every term uses the Q and s of the step start).

    ``S_a ← β S_a + (1−β)/n · G Q_b diag(s_b²) Q_bᵀ Gᵀ``, ``S_b ← β S_b + (1−β)/m · Gᵀ Q_a diag(s_a²) Q_aᵀ G``,
    ``δ_a = mean_j (g̃ s_b)²``, ``δ_b = mean_i (g̃ s_a)²`` with ``g̃ = Q_aᵀ G Q_b``, then the eigenvalue EMA.

    Returns:
        ``(factors, sqrt_inv)`` after the update (unmasked).
    """
    (Sa, Sb), (Qa, Qb), (sa, sb) = factors, bases, sqrt_inv
    m, n = G.shape[1], G.shape[2]
    left = ops.matmul(G, Qb) * sb.unsqueeze(1)  # G Q_b diag(s_b)
    Sa = Sa.mul(beta).add_(ops.matmul(left, left.transpose(1, 2)), alpha=(1.0 - beta) / n)
    qa_g = ops.matmul(Qa.transpose(1, 2), G)  # Q_aᵀ G
    right = qa_g * sa.unsqueeze(2)  # diag(s_a) Q_aᵀ G
    Sb = Sb.mul(beta).add_(ops.matmul(right.transpose(1, 2), right), alpha=(1.0 - beta) / m)
    g = ops.matmul(qa_g, Qb)
    delta_a = (g * sb.unsqueeze(1)).square().mean(dim=2)
    delta_b = (g * sa.unsqueeze(2)).square().mean(dim=1)
    sa_new = eigenvalue_ema(sa, delta_a, beta, clamps[0])
    sb_new = eigenvalue_ema(sb, delta_b, beta, clamps[1])
    return [Sa, Sb], [sa_new, sb_new]


def kl_statistics_3d(
    G: torch.Tensor,
    factors: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    sqrt_inv: Sequence[torch.Tensor],
    beta: float,
    clamps: Sequence[float | None],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """KL statistics update of 3-D blocks, in the reference's partly Gauss–Seidel order.

    Order: ``S_3`` and ``S_2`` (old s), then ``D_3``, then ``D_2`` (reading the new ``s_3``), then ``S_1`` and
    ``D_1`` (reading the new ``s_2`` and the old ``s_3``). Each ``S_i`` term is the mode-i Gram of G whitened
    along the other two dims, divided by their product; each δ is a mean over the other two axes.

    Returns:
        ``(factors, sqrt_inv)`` after the update (unmasked).
    """
    S1, S2, S3 = factors
    Q1, Q2, Q3 = bases
    s1, s2, s3 = sqrt_inv
    d1, d2, d3 = G.shape[1:]
    bs = lambda v, dim: v.reshape((v.shape[0],) + tuple(v.shape[1] if j == dim else 1 for j in range(3)))  # noqa: E731
    A1 = ops.contract(G, Q1 * s1.unsqueeze(1), 0)  # G whitened along dim 1
    A12 = ops.contract(A1, Q2, 1)
    A123 = ops.contract(A12, Q3, 2)
    S3 = S3.mul(beta).add_(ops.mode_gram(A12 * bs(s2, 1), 2), alpha=(1.0 - beta) / (d1 * d2))
    A13 = ops.contract(A1, Q3, 2)
    S2 = S2.mul(beta).add_(ops.mode_gram(A13 * bs(s3, 2), 1), alpha=(1.0 - beta) / (d1 * d3))
    s3_new = eigenvalue_ema(s3, (A123 * bs(s2, 1)).square().mean(dim=(1, 2)), beta, clamps[2])
    s2_new = eigenvalue_ema(s2, (A123 * bs(s3_new, 2)).square().mean(dim=(1, 3)), beta, clamps[1])
    C3 = ops.contract(G, Q3 * s3.unsqueeze(1), 2)  # whitened along dim 3 with the old s_3
    C32 = ops.contract(C3, Q2, 1)
    C321 = ops.contract(C32, Q1, 0)
    S1 = S1.mul(beta).add_(ops.mode_gram(C32 * bs(s2_new, 1), 0), alpha=(1.0 - beta) / (d2 * d3))
    s1_new = eigenvalue_ema(s1, (C321 * bs(s2_new, 1)).square().mean(dim=(2, 3)), beta, clamps[0])
    return [S1, S2, S3], [s1_new, s2_new, s3_new]


def install_kl_bases(
    bases: Sequence[torch.Tensor],
    new_bases: Sequence[torch.Tensor],
    perms: Sequence[torch.Tensor],
    sqrt_inv: Sequence[torch.Tensor],
    ok: torch.Tensor | None,
    m_in_basis: torch.Tensor | None = None,
    v_in_basis: torch.Tensor | None = None,
    rotations: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """KL install: swap Q; D carries over column by column (permuted only if π is not the identity).

    KL-SOAP also rotates its first moment exactly into the new basis and permutes its second moment by π
    (never rotated). KL-Shampoo keeps its moment in the original coordinates. ``ok`` is the ``(B,)`` mask of
    rows to install (the others keep everything), or None when every row installs. A ``perms`` entry may be
    None: the identity for every row of that dim.

    Returns:
        ``(bases, sqrt_inv, m, v)`` after the install (m and v None when not given).
    """
    out_s = [s if p is None else ops.masked(ok, torch.gather(s, 1, p), s) for s, p in zip(sqrt_inv, perms)]
    m_out = v_out = None
    if m_in_basis is not None:
        m_out = ops.masked(ok, rotate_into_new_bases(m_in_basis, bases, new_bases, rotations), m_in_basis)
    if v_in_basis is not None:
        v_new = v_in_basis
        for i, p in enumerate(perms):
            if p is not None:
                v_new = ops.permute_along(v_new, p, i)
        v_out = ops.masked(ok, v_new, v_in_basis)
    out_q = [ops.masked(ok, qn, q) for q, qn in zip(bases, new_bases)]
    return out_q, out_s, m_out, v_out


# ------------------------------------------------------------------------------------------------------
# optimizers
# ------------------------------------------------------------------------------------------------------
class _KLBase(EigenbasisOptimizer):
    _klsoap = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        precondition_frequency: int = 10,
        shampoo_beta: float | None = None,
        init_factor: float = 0.1,
        using_clamping: bool = True,
        max_clamp_value: float = 4000,
        max_preconditioner_dim: int | float = 2048,
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
            init_factor=init_factor,
            using_clamping=using_clamping,
            max_clamp_value=max_clamp_value,
            max_preconditioner_dim=max_preconditioner_dim,
            eigh_ridge=eigh_ridge,
            num_tolerated_failures=num_tolerated_failures,
            state_dtype=state_dtype,
            compute_dtype=compute_dtype,
        )
        self._validate_group(defaults)
        super().__init__(params, defaults, runtime)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._validate_common(group)
        check_range("init_factor", group["init_factor"], 0.0, low_open=True)
        if not isinstance(group["using_clamping"], bool):
            raise ValueError(f"Invalid using_clamping: {group['using_clamping']!r}; expected a bool")
        check_range("max_clamp_value", group["max_clamp_value"], 0.0, low_open=True)

    @staticmethod
    def _beta(group: dict[str, Any]) -> float:
        sb = group["shampoo_beta"]
        return group["betas"][1] if sb is None else sb

    def _init_bucket_state(self, bucket: Bucket, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        st = self._common_state(bucket, group)
        dt, dev, B = group["state_dtype"], bucket.device, bucket.size
        shape = (B,) + bucket.shape
        st["exp_avg"] = torch.zeros(shape, dtype=dt, device=dev)
        if self._klsoap or not bucket.factored:
            st["exp_avg_sq"] = torch.zeros(shape, dtype=dt, device=dev)
        if bucket.factored:
            s0 = 1.0 / torch.sqrt(torch.tensor(float(group["init_factor"]), dtype=math_dtype(group)))
            for i, d in enumerate(bucket.shape):
                st[f"eigen_sqrt_inv_{i}"] = torch.full((B, d), float(s0), dtype=dt, device=dev)
        return st

    def _refresh_options(self) -> dict[str, Any]:
        # only KL-SOAP rotates a moment at install; KL-Shampoo's jobs skip computing R = Q_oldᵀ·Q_new
        return {"sort": False, "rotation": self._klsoap}

    def _first_statistics(self, bucket: Bucket, rows: _Rows, G: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        beta = self._beta(group)
        numel = 1
        for d in bucket.shape:
            numel *= d
        out = {}
        for i, d in enumerate(bucket.shape):
            S = rows.state[f"factor_{i}"]
            out[f"factor_{i}"] = S.mul(beta).add_(ops.mode_gram(G, i), alpha=(1.0 - beta) / (numel // d))
        return out

    def _compute_rows(self, bucket: Bucket, rows: _Rows, t: int, group: dict[str, Any]) -> RowsUpdate:
        st = rows.state
        beta1, beta2 = group["betas"]
        G, finite = self.stacked_grads(rows, math_dtype(group))
        W = self.stacked_params(rows, math_dtype(group))
        if not bucket.factored:  # AdamW fallback (SOAP conventions: bias correction in the step size)
            U, m, v = adam_in_basis(G, st["exp_avg"], st["exp_avg_sq"], [None], beta1, beta2, group["eps"], None)
            step_size = group["lr"] * (1.0 - beta2**t) ** 0.5 / (1.0 - beta1**t)
            W_new = apply_post_update_weight_decay(W, U, step_size, group["lr"], group["weight_decay"], None)
            updates = {"exp_avg": m, "exp_avg_sq": v}
        else:
            k = len(bucket.shape)
            bases = [st[f"basis_{i}"] for i in range(k)]
            sqrt_inv = [st[f"eigen_sqrt_inv_{i}"] for i in range(k)]
            if self._klsoap:
                U, m, v = adam_in_basis(G, st["exp_avg"], st["exp_avg_sq"], bases, beta1, beta2, group["eps"], None)
                updates = {"exp_avg": m, "exp_avg_sq": v}
            else:
                U, m = klshampoo_direction(G, st["exp_avg"], bases, sqrt_inv, beta1, group["eps"], None)
                updates = {"exp_avg": m}
            W_new = apply_post_update_weight_decay(W, U, group["lr"], group["lr"], group["weight_decay"], None)
            # statistics (consumed by the next step's direction and by refreshes); they use the state of the
            # step start, so computing them before anything is stored changes nothing
            updates.update(self._statistics(bucket, rows, G, group))
        return RowsUpdate(finite, updates, W, W_new)

    def _statistics(self, bucket: Bucket, rows: _Rows, G: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The factors and eigenvalue estimates after folding G (pure and unmasked: reads the state, returns new values)."""
        if not bucket.factored:
            return {}
        st = rows.state
        k = len(bucket.shape)
        bases = [st[f"basis_{i}"] for i in range(k)]
        sqrt_inv = [st[f"eigen_sqrt_inv_{i}"] for i in range(k)]
        clamps = [clamp_value(d, group["using_clamping"], group["max_clamp_value"]) for d in bucket.shape]
        factors = [st[f"factor_{i}"] for i in range(k)]
        fn = kl_statistics_2d if k == 2 else kl_statistics_3d
        new_f, new_s = fn(G, factors, bases, sqrt_inv, self._beta(group), clamps)
        out = {f"factor_{i}": new_f[i] for i in range(k)}
        out.update({f"eigen_sqrt_inv_{i}": new_s[i] for i in range(k)})
        return out

    def _install_rows(self, state: dict[str, torch.Tensor], new_bases: list[torch.Tensor], perms: list[torch.Tensor], ok: torch.Tensor | None, group: dict[str, Any], rotations: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        k = len(new_bases)
        bases, s, m, v = install_kl_bases(
            [state[f"basis_{i}"] for i in range(k)],
            new_bases,
            perms,
            [state[f"eigen_sqrt_inv_{i}"] for i in range(k)],
            ok,
            state["exp_avg"] if self._klsoap else None,
            state["exp_avg_sq"] if self._klsoap else None,
            rotations,
        )
        out = {f"basis_{i}": q for i, q in enumerate(bases)}
        out.update({f"eigen_sqrt_inv_{i}": x for i, x in enumerate(s)})
        if m is not None:
            out["exp_avg"] = m
        if v is not None:
            out["exp_avg_sq"] = v
        return out


_KL_DOC = r"""
    Per 2-D/3-D block (larger dims split into blocks of ``max_preconditioner_dim``; 4-D+ weights have their
    trailing dims merged down to 3-D), following the KL-Shampoo authors' code: the first call only sets
    ``S_i = (1−β_s)·Γ_i(G₀)/(N/d_i)`` and ``Q_i = eigh(S_i)`` (descending), with eigenvalue estimates
    ``D_i = init_factor``, and does not update the parameter. Each later step computes the direction with
    the state of the step start, then ``W ← W − lr·U`` and ``W ← W − lr·λ·W`` (no bias correction), then
    updates each factor with the gradient whitened by the other factors' installed basis and eigenvalue
    estimate, divided by the other dims (Jacobi order in 2-D, the reference's Gauss–Seidel order in 3-D),
    and the eigenvalue EMA ``D ← β_s·D + (1−β_s)·δ`` (clamped: ``D^{-1/2} ≤ max(10, min(d, max_clamp_value))``).
    Every ``precondition_frequency`` steps the basis is refreshed by one power step and QR (no sort), for use
    from the next step; D carries over. 0-D/1-D parameters use an AdamW fallback (bias correction in the
    step size, post-update weight decay, first call skipped).

    Args:
        params: Parameters or param groups.
        lr: Learning rate (default: 1e-4).
        betas: ``(β1, β2)`` (default: (0.9, 0.98)).
        eps: {eps_doc} (default: 1e-8).
        weight_decay: Decoupled weight decay, applied after the update with the raw lr (default: 0.01).
        precondition_frequency: Steps between basis refreshes T (default: 10).
        shampoo_beta: Factor and eigenvalue EMA coefficient; None uses β2 (default: None).
        init_factor: Initial eigenvalue estimate D (default: 0.1).
        using_clamping: Clamp ``D^{-1/2}`` (default: True).
        max_clamp_value: Cap of the clamp's dim-dependent bound (default: 4000).
        max_preconditioner_dim: Largest factor side; larger dims are split into blocks (default: 2048).
        eigh_ridge: Ridge before the initial eigh; None is scale-aware, 1e-30 reproduces the reference
            (default: None).
        num_tolerated_failures: Consecutive failed refreshes tolerated per block (default: 3).
        state_dtype: dtype of all state: torch.float32 (default; the reference defaults to bf16), torch.float64 or
            torch.bfloat16 (the step's math in float32, what it stores rounded stochastically, refreshes in
            float32; docs/algorithms.md §5.5).
        compute_dtype: dtype of the per-step matrix products (projections into and out of the basis, the
            statistics' products); the state stays in ``state_dtype`` and refreshes run in fp32 or better from
            the snapshot. None (default): ``state_dtype``, the very same kernels as before the option existed.
            ``torch.bfloat16`` pays only where bf16 products are fast (GPUs with bf16 tensor cores, CPUs with
            AVX-512/AMX; on an AVX2 CPU torch's bf16 matmul is about 100x slower than fp32); see BENCHMARKS.md for
            its measured effect on the loss.
        runtime: An `asteria.RuntimeConfig` or a shared `asteria.Runtime` (default: None, i.e. ``RuntimeConfig()``:
            asynchronous refresh with the staleness chosen from measurement, ``staleness="auto"``; ``RuntimeConfig(refresh="sync")`` is the reference algorithm).

    Deviations from the reference, on purpose: fp32 state by default; blocking of large dims; size-1 dims
    are kept (the reference squeezes them); 1-D parameters get AdamW (the reference fails); non-finite
    gradients are skipped per block and counted; failed refreshes keep the basis.

    Non-finite gradients and overflow: when a block's gradient contains NaN/Inf, or when its new moments,
    factors, eigenvalue estimates or parameter values would not be finite (a finite but huge gradient such
    as 1e30 overflows the whitened Gram in fp32; the reference would store Inf factors and, through its
    ``nan_to_num``, a zero eigenvalue scale), that step is rejected for the block, on the first call too:
    its state and parameter stay unchanged, a refresh snapshot of that step holds the previous factors, and
    the event is counted (`nonfinite_steps`, ``runtime.stats()["nonfinite_steps"]``). Later ordinary
    gradients train normally. The same holds for the AdamW fallback of 0-D/1-D parameters. A parameter update
    that would not be finite is not written either (counted; that step's finite state is kept).

    Failed refreshes: a job that fails (non-finite input, solver failure) or returns a non-finite basis or
    rotation installs nothing for its block: the basis, eigenvalue estimates and moments stay as they are and
    ``refresh_failures`` grows (a success resets it); ``num_tolerated_failures`` failures in a row are
    tolerated and the next one (the 4th by default) raises `RefreshFailureError`. A failed *initial* eigh
    leaves the identity basis until a refresh succeeds.
    """


class KLShampoo(_KLBase):
    __doc__ = (
        r"""KL-Shampoo: the ``(D_a ⊗ D_b)^{-1/2}`` preconditioner applied to the momentum in the KL eigenbasis.
"""
        + _KL_DOC.replace("{eps_doc}", "Damping of the scale: ``1/(√(D_a·D_b) + ε)``")
    )
    _klsoap = False
    _install_reads_old_bases = False  # its moment stays in the original coordinates: nothing is rotated
    _parallel_install_pays = False  # an install only copies the new bases


class KLSOAP(_KLBase):
    __doc__ = (
        r"""KL-SOAP: Adam (no bias correction) in the eigenbasis of the KL-Shampoo factors.
"""
        + _KL_DOC.replace("{eps_doc}", "Adam's ε, added after the square root")
    )
    _klsoap = True
