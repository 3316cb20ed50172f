"""`asteria.Shampoo`: Shampoo with Distributed Shampoo semantics (docs/algorithms.md §2 and §5)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from asteria.optim import tensor_ops as ops
from asteria.optim.base import (BlockOptimizer, Bucket, _Rows, check_betas, check_compute_dtype, check_dtype, check_range,
                                contiguous_rows, math_dtype)
from asteria.optim.blocking import ParamLayout, shampoo_layout
from asteria.optim.results import output_finite, stack_results, to_device
from asteria.runtime.config import RuntimeConfig
from asteria.runtime.pipeline import RefreshJob

__all__ = [
    "Shampoo",
    "GRAFTING_TYPES",
    "block_exponents",
    "is_refresh_step",
    "update_factors",
    "update_graft_accumulator",
    "graft_direction",
    "precondition",
    "install_roots",
    "bf16_root_input",
]

GRAFTING_TYPES = ("adam", "adagrad", "rmsprop", "sgd", "none")
_GRAFT_BETA2_DEFAULT = {"adam": 0.999, "rmsprop": 0.99, "adagrad": 1.0}


# ------------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------------
def block_exponents(order: int, override: Mapping[int, Any] | None) -> tuple[float, ...]:
    """Per-dim exponents of an order-``order`` block (default ``1/(2·order)``; 0 = dim not preconditioned).

    Args:
        order: Number of dims of the block.
        override: ``{order: exponent}`` or ``{order: {dim: exponent}}`` (DS ``inverse_exponent_override``).

    Returns:
        One exponent per dim.
    """
    default = 1.0 / (2 * max(order, 1))
    spec = (override or {}).get(order)
    if spec is None:
        return (default,) * order
    if isinstance(spec, Mapping):
        return tuple(float(spec.get(i, default)) for i in range(order))
    return (float(spec),) * order


def is_refresh_step(t: int, frequency: int, start: int | float) -> bool:
    """DS amortization rule: refresh at ``t == start`` and every ``frequency`` steps after it."""
    return (t % frequency == 0 and t > start) or t == start


def update_factors(
    factors: Sequence[torch.Tensor], G: torch.Tensor, dims: Sequence[int], beta2: float, finite: torch.Tensor | None
) -> list[torch.Tensor]:
    """``L_i ← β2·L_i + w·Γ_i(G)`` with ``w = 1−β2`` (``w = 1`` when β2 = 1), masked per block.

    Args:
        factors: Current ``(B, d_i, d_i)`` factors, one per preconditioned dim.
        G: Stacked gradient blocks (finite; non-finite blocks already zeroed).
        dims: The preconditioned dims, aligned with ``factors``.
        beta2: EMA coefficient.
        finite: ``(B,)`` mask; False keeps the old factor. None: no masking (the caller masks).

    Returns:
        The new factors.
    """
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    out = []
    for L, i in zip(factors, dims):
        gram = ops.mode_gram(G, i)
        new = L + gram if beta2 == 1.0 else L.mul(beta2).add_(gram, alpha=weight)
        out.append(ops.masked(finite, new, L))
    return out


def update_graft_accumulator(
    V: torch.Tensor, G: torch.Tensor, kind: str, beta2: float, finite: torch.Tensor | None
) -> torch.Tensor:
    """Grafting second moment: AdaGrad ``V + G²``; RMSprop/Adam ``β·V + (1−β)·G²``; masked per block (None: not)."""
    if kind == "adagrad":
        new = V.addcmul(G, G)
    else:
        new = V.mul(beta2).addcmul_(G, G, value=1.0 - beta2)
    return ops.masked(finite, new, V)


def graft_direction(gbar: torch.Tensor, V: torch.Tensor | None, kind: str, bias_correction2: float, eps: float) -> torch.Tensor:
    """The grafting direction: ``Ḡ`` (SGD) or ``Ḡ / (√(V/bc2) + ε)`` (AdaGrad, RMSprop, Adam)."""
    if kind == "sgd" or V is None:
        return gbar
    denom = (V / bias_correction2).sqrt_().add_(eps) if bias_correction2 != 1.0 else V.sqrt().add_(eps)
    return gbar / denom


def precondition(gbar: torch.Tensor, roots: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Applies the inverse roots along their dims: ``X_L Ḡ X_R`` in 2-D (None: dim left alone)."""
    return ops.project_in(gbar, roots)  # X is symmetric, so applying Xᵀ is applying X


BF16_RIDGE = 2.0**-8
"""Ridge of the inverse roots of bfloat16 factors, relative to the factor's trace (see `bf16_root_input`)."""


def bf16_root_input(A: torch.Tensor, bc2: float) -> torch.Tensor:
    """The statistic an inverse root of bfloat16 factors is computed from: ``A/bc2 + 2^-8·tr(A/bc2)·I`` (float32).

    A factor stored in bfloat16 (stochastically rounded each step) carries an error of up to 2^-8 of its entries,
    so its eigenvalues below about 2^-8·λ_max are rounding noise, and so are their eigenvectors; with the default
    ``epsilon=1e-12`` their inverse root (up to ``ε^{-1/2}``) amplifies that noise above the preconditioned signal
    (BENCHMARKS.md, "bf16 state"). The ridge, at least ``2^-8·λ_max`` (the trace bounds λ_max), damps them at the
    resolution of the stored factor; it also bounds the root's condition number to ``(2^8)^{1/p}``, which a
    bfloat16 root can hold. Computed on the device without a host synchronisation.

    Args:
        A: ``(B, n, n)`` factors read in float32 (`asteria.optim.base.math_dtype`).
        bc2: The bias correction ``A`` is divided by (1.0: none).

    Returns:
        A new ``(B, n, n)`` tensor (the snapshot's source; ``epsilon`` is still added by the root).
    """
    out = A / bc2
    trace = torch.diagonal(out, dim1=-2, dim2=-1).sum(-1)
    out.diagonal(dim1=-2, dim2=-1).add_((BF16_RIDGE * trace).unsqueeze(-1))
    return out


def install_roots(
    roots: Sequence[torch.Tensor], new: Sequence[torch.Tensor], ok: torch.Tensor | None
) -> None:
    """Shampoo install: swap every root of a block at once; rows whose refresh failed keep the old roots.

    Args:
        roots: The installed ``(B, d_i, d_i)`` roots (modified in place).
        new: The new roots, aligned with ``roots``.
        ok: ``(B,)`` bool mask of rows whose every job succeeded, or None when every row installs.
    """
    mask = None if ok is None else to_device(ok, roots[0].device)
    for X, X_new in zip(roots, new):
        X.copy_(ops.masked(mask, X_new.to(device=X.device, dtype=X.dtype), X))


# ------------------------------------------------------------------------------------------------------
# optimizer
# ------------------------------------------------------------------------------------------------------
class Shampoo(BlockOptimizer):
    r"""Shampoo with Distributed Shampoo semantics, refreshed by asteria's C++ runtime.

    Each parameter is merged and blocked as in Distributed Shampoo (small dims merged down to one dim by
    default, dims above ``max_preconditioner_dim`` split; a 1-D block gets one full-matrix factor). Per
    block and step: factors ``L_i ← β2·L_i + (1−β2)·Γ_i(G)``; every ``precondition_frequency`` steps from
    ``start_preconditioning_step`` the inverse roots ``X_i = (L_i/bc2 + εI)^{-exponent_i}`` are recomputed
    by the scheduler (eigh, fp64 retry) from factors that already include ``G_t`` and used at the same step;
    the first moment ``M`` (bias-corrected) is preconditioned ``X_L M X_R``, re-normalised per block to the
    norm of the grafting direction, decoupled weight decay ``P += λW`` is added and ``W ← W − lr·P``.
    Before ``start_preconditioning_step`` the grafting direction alone is used.

    Args:
        params: Parameters or param groups (named parameters are used in error messages).
        lr: Learning rate (default: 1e-3).
        betas: ``(β1, β2)``: first-moment and factor EMA coefficients (default: (0.9, 0.999)); β2 = 1 sums.
        epsilon: Added to the factor before the root (default: 1e-12).
        weight_decay: Decoupled weight decay λ (default: 0.0).
        precondition_frequency: Steps between root refreshes f (default: 10).
        start_preconditioning_step: First refresh step s, >= f, or ``math.inf`` (default: 10).
        max_preconditioner_dim: Largest factor side; larger dims are split (default: 2048).
        merge_dims: Merge small dims as Distributed Shampoo (target dimensionality 1) (default: True).
        grafting: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or ``"none"`` (default: "adam").
        grafting_beta2: Grafting second-moment coefficient; None: 0.999 (Adam), 0.99 (RMSprop)
            (default: None).
        grafting_epsilon: Grafting ε, added after the square root (default: 1e-8).
        use_bias_correction: Bias-correct the first moment and the factors (default: True).
        inverse_exponent_override: ``{order: exponent}`` or ``{order: {dim: exponent}}``; exponent 0 leaves
            a dim unpreconditioned (default: None, i.e. ``1/(2·order)``).
        root_method: ``"eigh"`` or ``"newton"`` (coupled inverse Newton) (default: "eigh").
        num_tolerated_failures: Consecutive failed refreshes tolerated per block; one more raises
            (default: 3).
        state_dtype: dtype of factors, roots and moments: torch.float32 (default), torch.float64 or torch.bfloat16
            (the step's math in float32, what it stores rounded stochastically, roots computed in float32 with a
            ``2^-8·trace`` ridge, which costs loss; docs/algorithms.md §5.5).
        compute_dtype: dtype of the per-step matrix products (projections into and out of the basis, the
            statistics' products); the state stays in ``state_dtype`` and refreshes run in fp32 or better from
            the snapshot. None (default): ``state_dtype``, the very same kernels as before the option existed.
            ``torch.bfloat16`` pays only where bf16 products are fast (GPUs with bf16 tensor cores, CPUs with
            AVX-512/AMX; on an AVX2 CPU torch's bf16 matmul is about 100x slower than fp32); see BENCHMARKS.md for
            its measured effect on the loss.
            (default: torch.float32).
        runtime: An `asteria.RuntimeConfig` or a shared `asteria.Runtime` (default: None, i.e. ``RuntimeConfig()``:
            asynchronous refresh with the staleness chosen from measurement, ``staleness="auto"``; ``RuntimeConfig(refresh="sync")`` is the reference algorithm).

    Non-finite gradients and overflow: when a block's gradient contains NaN/Inf, or when its new factors,
    grafting accumulator or first moment would not be finite (a finite but huge gradient such as 1e30, whose
    ``G·Gᵀ`` overflows fp32), that step is rejected for the block: its factors, moments and parameter are
    left unchanged, the refresh snapshot of that step holds the previous factors, and the event is counted
    (`nonfinite_steps`, ``runtime.stats()["nonfinite_steps"]``). A parameter update that would not be finite
    is not written either (counted; that step's finite factors and moments are kept). Later ordinary
    gradients train normally.

    Failed refreshes: a refresh whose job fails (non-finite input, solver failure) or whose root is not
    finite installs nothing: the block keeps *all* its previous roots (a deviation from Distributed Shampoo,
    which keeps only the failed factor's, so the installed roots always come from one snapshot) and its
    ``refresh_failures`` counter grows; a success resets it. ``num_tolerated_failures`` failures in a row are
    tolerated, the next one (the 4th with the default 3) raises `RefreshFailureError` naming the parameter.
    """

    _offset = 0

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        *,
        precondition_frequency: int = 10,
        start_preconditioning_step: int | float = 10,
        max_preconditioner_dim: int | float = 2048,
        merge_dims: bool = True,
        grafting: str = "adam",
        grafting_beta2: float | None = None,
        grafting_epsilon: float = 1e-8,
        use_bias_correction: bool = True,
        inverse_exponent_override: Mapping[int, Any] | None = None,
        root_method: str = "eigh",
        num_tolerated_failures: int = 3,
        state_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
        runtime: RuntimeConfig | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            epsilon=epsilon,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim,
            merge_dims=merge_dims,
            grafting=grafting,
            grafting_beta2=grafting_beta2,
            grafting_epsilon=grafting_epsilon,
            use_bias_correction=use_bias_correction,
            inverse_exponent_override=dict(inverse_exponent_override or {}),
            root_method=root_method,
            num_tolerated_failures=num_tolerated_failures,
            state_dtype=state_dtype,
            compute_dtype=compute_dtype,
        )
        self._validate_group(defaults)
        super().__init__(params, defaults, runtime)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"], beta2_one=True)
        check_range("epsilon", group["epsilon"], 0.0, low_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("precondition_frequency", group["precondition_frequency"], 1, integer=True)
        check_range("start_preconditioning_step", group["start_preconditioning_step"], 1, integer=True, allow_inf=True)
        if group["start_preconditioning_step"] < group["precondition_frequency"]:
            raise ValueError(
                f"Invalid start_preconditioning_step: {group['start_preconditioning_step']!r}; it must be >= "
                f"precondition_frequency ({group['precondition_frequency']}) or math.inf"
            )
        check_range("max_preconditioner_dim", group["max_preconditioner_dim"], 1, integer=True, allow_inf=True)
        if not isinstance(group["merge_dims"], bool):
            raise ValueError(f"Invalid merge_dims: {group['merge_dims']!r}; expected a bool")
        if group["grafting"] not in GRAFTING_TYPES:
            raise ValueError(f"Invalid grafting: {group['grafting']!r}; allowed values are {GRAFTING_TYPES}")
        if group["grafting_beta2"] is not None:
            check_range("grafting_beta2", group["grafting_beta2"], 0.0, 1.0, low_open=True)
        check_range("grafting_epsilon", group["grafting_epsilon"], 0.0, low_open=True)
        if not isinstance(group["use_bias_correction"], bool):
            raise ValueError(f"Invalid use_bias_correction: {group['use_bias_correction']!r}; expected a bool")
        override = group["inverse_exponent_override"]
        if not isinstance(override, Mapping):
            raise ValueError(f"Invalid inverse_exponent_override: {override!r}; expected a dict keyed by order")
        for order, spec in override.items():
            if not isinstance(order, int) or order < 1:
                raise ValueError(f"Invalid inverse_exponent_override key {order!r}; expected an order >= 1")
            values = spec.values() if isinstance(spec, Mapping) else [spec]
            for v in values:
                check_range(f"inverse_exponent_override[{order}]", v, 0.0)
        if group["root_method"] not in ("eigh", "newton"):
            raise ValueError(f"Invalid root_method: {group['root_method']!r}; allowed values are ('eigh', 'newton')")
        check_range("num_tolerated_failures", group["num_tolerated_failures"], 0, integer=True)
        check_dtype("state_dtype", group["state_dtype"])
        check_compute_dtype(group.get("compute_dtype"))

    # -- layout and state -----------------------------------------------------------------------------
    def _layout(self, param: torch.Tensor, group: dict[str, Any]) -> ParamLayout:
        return shampoo_layout(param.shape, group["max_preconditioner_dim"], group["merge_dims"])

    @staticmethod
    def _dims(bucket: Bucket, group: dict[str, Any]) -> tuple[list[int], tuple[float, ...]]:
        exps = block_exponents(len(bucket.shape), group["inverse_exponent_override"])
        return [i for i, e in enumerate(exps) if e != 0.0], exps

    def _graft_beta2(self, group: dict[str, Any]) -> float:
        if group["grafting_beta2"] is not None:
            return float(group["grafting_beta2"])
        return _GRAFT_BETA2_DEFAULT.get(group["grafting"], 1.0)

    def _init_bucket_state(self, bucket: Bucket, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        B, dev, dt = bucket.size, bucket.device, group["state_dtype"]
        dims, _ = self._dims(bucket, group)
        st: dict[str, torch.Tensor] = {}
        for i in dims:
            d = bucket.shape[i]
            st[f"factor_{i}"] = torch.zeros(B, d, d, dtype=dt, device=dev)
            st[f"root_{i}"] = torch.eye(d, dtype=dt, device=dev).expand(B, d, d).clone()
        if group["betas"][0] != 0.0:
            st["filtered_grad"] = torch.zeros((B,) + bucket.shape, dtype=dt, device=dev)
        if group["grafting"] in ("adam", "adagrad", "rmsprop"):
            st["graft_sq"] = torch.zeros((B,) + bucket.shape, dtype=dt, device=dev)
        st["nonfinite_steps"] = torch.zeros(B, dtype=torch.int64, device=dev)
        st["refresh_failures"] = torch.zeros(B, dtype=torch.int64)
        st["root_version"] = torch.zeros(B, dtype=torch.int64)
        return st

    # -- step -------------------------------------------------------------------------------------------------
    def _step_rows(self, work: list[tuple[Bucket, _Rows, Any]]) -> None:
        # 1. fold G_t into the factors, the grafting accumulator and the first moment (a block whose new values
        #    are not all finite keeps the old ones), then snapshot/submit the refreshes of step t (o = 0);
        # 2. install what the install rule says is due at step t (with S = 0: this step's refreshes);
        # 3. directions and parameter updates with the installed roots.
        staged: list[tuple[Bucket, list[int], torch.Tensor, torch.Tensor, int]] = []
        max_t = 0
        for bucket, rows, step in work:
            group = self.param_groups[bucket.group_index]
            t = step + 1
            max_t = max(max_t, t)
            G, finite = self.stacked_grads(rows, math_dtype(group))
            dims, exps = self._dims(bucket, group)
            with torch.profiler.record_function("asteria.Shampoo.factors"), ops.compute_dtype(group.get("compute_dtype")):
                updates = self.step_statistics(bucket, rows, G, group, step)
                updates.update(self._moments(rows, G, group))
                ok = self.acceptance(finite, updates)
                self.accept_rows(rows, ok, updates)
            rows.commit()
            due = self.refresh_rows(rows, t, group) if dims else []
            if due:
                self._submit_roots(bucket, rows, dims, exps, t, group, due)
            staged.append((bucket, rows.rows, G, ok, t))
        self.runtime.install_due(max_t)
        for bucket, row_list, G, ok, t in staged:
            rows = _Rows(bucket, row_list)  # re-gathered: an install may have replaced roots of these rows
            group = self.param_groups[bucket.group_index]
            with ops.compute_dtype(group.get("compute_dtype")):
                self._direction_and_update(bucket, rows, G, ok, t, group)
            rows.commit()

    def _precompute(self, bucket: Bucket, rows: _Rows, key: Any, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """During backward (``fold_statistics="backward"``): the bucket's factors after this step's gradient. The
        rest of Shampoo's step needs the roots the step itself installs, so it stays in ``step()``."""
        G, _ = self.stacked_grads(rows, math_dtype(group))
        with ops.compute_dtype(group.get("compute_dtype")):
            return self._statistics(bucket, rows, G, group)

    def _moments(self, rows: _Rows, G: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The grafting accumulator and the first moment after folding G (pure and unmasked: returns new values)."""
        st = rows.state
        out: dict[str, torch.Tensor] = {}
        if "graft_sq" in st:
            out["graft_sq"] = update_graft_accumulator(st["graft_sq"], G, group["grafting"], self._graft_beta2(group), None)
        beta1 = group["betas"][0]
        if beta1 != 0.0 and "filtered_grad" in st:
            out["filtered_grad"] = st["filtered_grad"].mul(beta1).add_(G, alpha=1.0 - beta1)
        return out

    def _statistics(self, bucket: Bucket, rows: _Rows, G: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The factors after folding G (pure and unmasked: reads the state, returns new values)."""
        dims, _ = self._dims(bucket, group)
        new = update_factors([rows.state[f"factor_{i}"] for i in dims], G, dims, group["betas"][1], None)
        return {f"factor_{i}": L for i, L in zip(dims, new)}

    def _refresh_due(self, t: int, group: dict[str, Any], phase: int | None = None, block: Any = None) -> bool:
        """Whether step t snapshots the factors of the blocks of ``phase`` for new roots (`is_refresh_step`, shifted
        by the phase, minus the steps skipped while a refresh is pending; ``block``: its stable key)."""
        f, start = group["precondition_frequency"], group["start_preconditioning_step"]
        return self.runtime.accepts(t, lambda x: is_refresh_step(x, f, start), start, f, phase, block)

    def _bias_correction2(self, group: dict[str, Any], t: int) -> float:
        beta2 = group["betas"][1]
        return 1.0 - beta2**t if group["use_bias_correction"] and beta2 < 1.0 else 1.0

    def _submit_roots(self, bucket: Bucket, rows: _Rows, dims: list[int], exps: tuple[float, ...], t: int,
                      group: dict[str, Any], due: list[int]) -> None:
        """Snapshots the bias-corrected factors of the rows at positions ``due`` and submits their root jobs."""
        bc2 = self._bias_correction2(group, t)
        deadline = self.runtime.deadline(t)
        jobs: list[RefreshJob] = []
        members = [rows.members[k] for k in due]
        for i in dims:
            A = contiguous_rows(rows.state[f"factor_{i}"], due)
            route = self.runtime.route(int(A.shape[-1]), A.device, group["root_method"])
            if bucket.upcast is not None:  # bfloat16 factors: A/bc2 + the ridge of their resolution, in float32
                A = bf16_root_input(A, bc2)
            elif bc2 != 1.0:
                A = A / bc2
            snap = self.runtime.snapshot(A, route=route)
            for k, m in enumerate(members):
                jobs.append(
                    RefreshJob(
                        "inverse_root", m.block_id, i, t, deadline, snap.matrices[0][k],
                        options=dict(root=1.0 / exps[i], epsilon=float(group["epsilon"]), method=group["root_method"]),
                        ready=snap.ready, copy=snap.copy,
                    )
                )
        tag = {"what": "roots", "version": t, "blocks": self.member_keys(members)}
        self.runtime.submit(jobs, self.installer(tag), tag=tag)

    def _install_batch(self, tag: dict[str, Any], results: Sequence[Any]) -> None:
        """Installs a batch of inverse roots (all roots of a block from one snapshot, or none)."""
        bucket, row_list = self._locate(tag["blocks"])
        group = self.param_groups[bucket.group_index]
        dims, _ = self._dims(bucket, group)
        t = int(tag["version"])
        n = len(row_list)
        ok = [True] * n
        msgs = [""] * n
        outs: dict[int, list[np.ndarray | None]] = {i: [None] * n for i in dims}
        for j, res in enumerate(results):
            i, k = dims[j // n], j % n
            root = res.outputs.get("root") if res.ok else None
            if root is None or not output_finite(res, root):
                ok[k] = False
                msgs[k] = res.message if not res.ok else "non-finite inverse root"
            else:
                outs[i][k] = root
        self._install(bucket, row_list, dims, outs, ok, t)
        self.record_refresh_outcome(bucket, row_list, ok, msgs, group["num_tolerated_failures"])

    def _install(self, bucket: Bucket, row_list: list[int], dims: list[int], outs: dict[int, list[Any]], ok: list[bool], t: int) -> None:
        idx = to_device(torch.tensor(row_list, dtype=torch.long), bucket.device)
        # rows that keep their old roots are masked out; when every row installs there is nothing to mask
        okm = None if all(ok) else torch.tensor(ok, dtype=torch.bool)
        roots, new = [], []
        for i in dims:
            cur = bucket.state[f"root_{i}"].index_select(0, idx)
            stacked = stack_results([o if o is not None else cur[k] for k, o in enumerate(outs[i])], cur.device, cur.dtype)
            roots.append(cur)
            new.append(stacked)
        install_roots(roots, new, okm)
        for i, cur in zip(dims, roots):
            bucket.state[f"root_{i}"].index_copy_(0, idx, cur)
        version = bucket.state["root_version"]
        for k, r in enumerate(row_list):
            if ok[k]:
                if int(version[r]) >= t:  # invariant 2 of docs/design.md: versions only increase per block
                    raise RuntimeError(
                        f"Shampoo: install of version {t} over version {int(version[r])} for {bucket.members[r].label}"
                    )
                version[r] = t

    def _direction_and_update(self, bucket: Bucket, rows: _Rows, G: torch.Tensor, ok: torch.Tensor, t: int, group: dict[str, Any]) -> None:
        """The direction from the (already updated) moments and the installed roots, and the parameter update.

        ``ok`` is the acceptance mask of step 1 of `_step_rows`; a block whose new parameter values would not be
        finite (or representable in the parameter's dtype) is not written either. Every block whose parameter
        was not written is counted in ``nonfinite_steps``.
        """
        beta1 = group["betas"][0]
        kind = group["grafting"]
        dims, _ = self._dims(bucket, group)
        st = rows.state
        V = None
        bc2g = 1.0
        if "graft_sq" in st:
            V = st["graft_sq"]
            if kind == "adam" and group["use_bias_correction"]:
                bc2g = 1.0 - self._graft_beta2(group) ** t
        if beta1 != 0.0 and "filtered_grad" in st:
            M = st["filtered_grad"]
            gbar = M / (1.0 - beta1**t) if group["use_bias_correction"] else M
        else:
            gbar = G
        graft_only = t < group["start_preconditioning_step"] and kind != "none"
        if graft_only:
            P = graft_direction(gbar, V, kind, bc2g, group["grafting_epsilon"])
        else:
            roots: list[torch.Tensor | None] = [None] * len(bucket.shape)
            for i in dims:
                roots[i] = st[f"root_{i}"]
            P = precondition(gbar, roots)
            if kind != "none":
                g = graft_direction(gbar, V, kind, bc2g, group["grafting_epsilon"])
                P = P * (ops.block_norm(g) / (ops.block_norm(P) + 1e-16))
        W = self.stacked_params(rows, math_dtype(group))
        if group["weight_decay"] != 0.0:
            P = P.add(W, alpha=group["weight_decay"])
        W_new = W.add(P, alpha=-group["lr"])
        self.write_accepted_params(rows, ok, W, W_new)
