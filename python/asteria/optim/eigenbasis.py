"""Shared coordinator of the eigenbasis optimizers (`SOAP`, `KLShampoo`, `KLSOAP`).

What the three share (docs/algorithms.md §5.1): the first call only initialises the statistics and the
basis (a full eigh per factor, installed before the next step whatever the staleness) and updates no
parameter; a refresh computed from the statistics of step t is first used at step t+1 (offset o = 1);
0-D and 1-D parameters get the AdamW fallback; a failed job keeps the previous basis and is counted.
The optimizer-specific math (direction, statistics, install) is in pure functions in `soap.py`/`kl.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from asteria.optim import tensor_ops as ops
from asteria.optim.base import (BlockOptimizer, Bucket, _Rows, check_betas, check_compute_dtype, check_dtype, check_range,
                                contiguous_rows, math_dtype)
from asteria.optim.blocking import ParamLayout, soap_layout
from asteria.optim.results import all_finite, outputs_checked, stack_results, to_device
from asteria.runtime.pipeline import RefreshJob

__all__ = ["EigenbasisOptimizer", "RowsUpdate", "eigh_ridge_for", "result_problem"]


@dataclasses.dataclass
class RowsUpdate:
    """One step of some rows of a bucket, computed and not stored yet (`EigenbasisOptimizer._compute_rows`).

    Attributes:
        finite: ``(B,)`` rows whose gradient was finite.
        updates: The rows' new state tensors (moments, statistics), unmasked.
        W: The rows' parameters before the step (stacked, state dtype).
        W_new: Their new values.
    """

    finite: torch.Tensor
    updates: dict[str, torch.Tensor]
    W: torch.Tensor
    W_new: torch.Tensor


def eigh_ridge_for(trace: float, n: int, ridge: float | None) -> float:
    """Ridge added to the diagonal before the initial eigh.

    Args:
        trace: The trace of the (n, n) statistic.
        n: Its size.
        ridge: A fixed ridge (1e-30 reproduces the SOAP/KL reference code), or None for the scale-aware
            default ``1e-9 · trace/n`` (at least 1e-30), which does not change the eigenvectors but keeps
            LAPACK away from the exactly singular, tiny-eigenvalue factors of the first steps.

    Returns:
        The ridge.
    """
    if ridge is not None:
        return float(ridge)
    scale = float(trace) / max(n, 1)
    return max(1e-9 * scale, 1e-30) if math.isfinite(scale) else 1e-30


def result_problem(basis: Any, permutation: Any, rotation: Any, n: int, message: str = "", finite_checked: bool = False) -> str:
    """Why a refresh result must not be installed ("" when it may be).

    Args:
        basis: The new ``(n, n)`` basis (None when the job failed).
        permutation: The ``(n,)`` permutation relative to the snapshot's basis, or None (identity).
        rotation: ``R = Q_oldᵀ Q_new`` when the job computed it, or None.
        n: The factor's size.
        message: The job's error message when it failed.
        finite_checked: The result comes from asteria's C++ scheduler (`asteria.optim.results.outputs_checked`):
            its outputs were checked for NaN/Inf where they were computed and its permutation is one by
            construction, so neither is scanned again.

    Returns:
        "" for an installable result, else a message naming the problem.
    """
    if basis is None:
        return message or "the refresh returned no basis"
    if finite_checked:
        return ""
    if not all_finite(basis):
        return "non-finite basis"
    if rotation is not None and not all_finite(rotation):
        return "non-finite basis rotation"
    # device results (CUDA tensors) were checked by the engine and are not read back (no host sync)
    if permutation is not None and not (isinstance(permutation, torch.Tensor) and permutation.is_cuda):
        p = np.asarray(permutation)
        if p.shape != (n,) or not np.array_equal(np.sort(p), np.arange(n)):
            return f"invalid permutation (not a permutation of 0..{n - 1})"
    return ""


def _is_identity(perm: Any) -> bool:
    """Whether a host permutation is the identity (device permutations are not read back: treated as not)."""
    if isinstance(perm, torch.Tensor):
        if perm.is_cuda:
            return False
        perm = perm.numpy()
    p = np.asarray(perm)
    return bool((p == np.arange(p.shape[0])).all())


class EigenbasisOptimizer(BlockOptimizer):
    """Base of `SOAP`, `KLShampoo`, `KLSOAP`; see the module docstring."""

    _offset = 1
    # whether `_install_rows` reads the bases installed before (SOAP and KL-SOAP rotate their first moment
    # from them when the job computed no rotation); False lets a full install write the new bases in place
    _install_reads_old_bases = True

    def _validate_common(self, group: dict[str, Any]) -> None:
        """Checks the hyperparameters SOAP, KLShampoo and KLSOAP share (ValueError naming value and range)."""
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("precondition_frequency", group["precondition_frequency"], 1, integer=True)
        if group["shampoo_beta"] is not None:
            check_range("shampoo_beta", group["shampoo_beta"], 0.0, 1.0, high_open=True)
        check_range("max_preconditioner_dim", group["max_preconditioner_dim"], 1, integer=True, allow_inf=True)
        if group["eigh_ridge"] is not None:
            check_range("eigh_ridge", group["eigh_ridge"], 0.0)
        check_range("num_tolerated_failures", group["num_tolerated_failures"], 0, integer=True)
        check_dtype("state_dtype", group["state_dtype"])
        check_compute_dtype(group.get("compute_dtype"))

    # -- layout / param state ----------------------------------------------------------------------

    def _layout(self, param: torch.Tensor, group: dict[str, Any]) -> ParamLayout:
        return soap_layout(param.shape, group["max_preconditioner_dim"])

    def _new_param_state(self) -> dict[str, Any]:
        return {"step": 0, "initialized": False}

    def _row_key(self, param_state: dict[str, Any]) -> Any:
        return (bool(param_state["initialized"]), int(param_state["step"]))

    def _advance_param_state(self, pstate: dict[str, Any]) -> None:
        if not pstate["initialized"]:
            pstate["initialized"] = True  # the first call does not count as a step (reference semantics)
        else:
            pstate["step"] += 1

    def _common_state(self, bucket: Bucket, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        B, dev = bucket.size, bucket.device
        st: dict[str, torch.Tensor] = {}
        if bucket.factored:
            for i, d in enumerate(bucket.shape):
                st[f"factor_{i}"] = torch.zeros(B, d, d, dtype=group["state_dtype"], device=dev)
                st[f"basis_{i}"] = torch.eye(d, dtype=group["state_dtype"], device=dev).expand(B, d, d).clone()
            st["refresh_failures"] = torch.zeros(B, dtype=torch.int64)
            st["basis_version"] = torch.full((B,), -1, dtype=torch.int64)
        st["nonfinite_steps"] = torch.zeros(B, dtype=torch.int64, device=dev)
        return st

    # -- hooks for subclasses -------------------------------------------------------------------------
    def _first_statistics(self, bucket: Bucket, rows: _Rows, G: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The factors after the first call's gradient, by state key (pure and unmasked: not stored)."""
        raise NotImplementedError

    def _compute_rows(self, bucket: Bucket, rows: _Rows, t: int, group: dict[str, Any]) -> RowsUpdate:
        """Step t of the rows, computed from the state and the gradients without storing anything (pure)."""
        raise NotImplementedError

    def _update_rows(self, bucket: Bucket, rows: _Rows, t: int, group: dict[str, Any],
                     done: RowsUpdate | None = None) -> None:
        """Step t of the rows: `_compute_rows` (or ``done``, computed during backward), then stored: the accepted
        rows take their new state and parameters (`commit_rows`), and a refresh is snapshotted when due."""
        if done is None:
            with ops.compute_dtype(group.get("compute_dtype")):
                done = self._compute_rows(bucket, rows, t, group)
        self.commit_rows(rows, done.finite, done.updates, done.W, done.W_new)
        if bucket.factored:
            due = self.refresh_rows(rows, t, group)
            if due:
                self._submit_refresh(bucket, rows, t, group, due)

    def _precompute(self, bucket: Bucket, rows: _Rows, key: Any, group: dict[str, Any]) -> RowsUpdate | None:
        """What ``fold_statistics="backward"`` computes during backward for a bucket whose gradients are final: the
        whole step of an initialized bucket (`_compute_rows`), or None for a first call."""
        initialized, step = key
        if not initialized:
            return None
        with ops.compute_dtype(group.get("compute_dtype")):
            return self._compute_rows(bucket, rows, step + 1, group)

    def _install_rows(
        self,
        state: dict[str, torch.Tensor],
        new_bases: list[torch.Tensor],
        perms: list[torch.Tensor],
        ok: torch.Tensor | None,
        group: dict[str, Any],
        rotations: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The rows' state after installing ``new_bases`` (``ok``: ``(B,)`` rows to install, None for all)."""
        raise NotImplementedError

    def _refresh_options(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- step ----------------------------------------------------------------------------------------------------
    def _step_rows(self, work: list[tuple[Bucket, _Rows, Any]]) -> None:
        boundary = 1
        first: list[tuple[Bucket, _Rows, dict[str, Any]]] = []
        for bucket, rows, (initialized, step) in work:
            group = self.param_groups[bucket.group_index]
            if not initialized:
                if bucket.factored:
                    G, finite = self.stacked_grads(rows, math_dtype(group))
                    with ops.compute_dtype(group.get("compute_dtype")):
                        updates = self._first_statistics(bucket, rows, G, group)
                    ok = self.acceptance(finite, updates)  # an overflowed first statistic is rejected too
                    self.accept_rows(rows, ok, updates)
                    self.count_rejected(rows, ok)
                    rows.commit()
                    first.append((bucket, rows, group))
                continue
            t = step + 1
            boundary = max(boundary, t + 1)
            self._update_rows(bucket, rows, t, group, self.precomputed(bucket, rows, (initialized, step)))
        if first:
            self._initial_bases(first)
        # the results are used from the next step on: their installs may overlap the next forward and backward (with
        # fold_statistics="backward", the work computed during backward runs after them on the same helper thread)
        self.runtime.install_due(boundary, overlap=True)

    def _initial_bases(self, first: list[tuple[Bucket, _Rows, dict[str, Any]]]) -> None:
        """Submits the first bases of the blocks of a first call (installed at the end of the call, deadline 1). With
        staggered phases (`RuntimeConfig.refresh_phases`), one phase at a time, each installed before the next is
        snapshot: the snapshots then hold the factors of one phase, about 1/f of them, not all at once."""
        if not self.runtime.staggered:
            for bucket, rows, group in first:
                self._submit_initial_bases(bucket, rows, group, list(range(len(rows.rows))))
            return
        phases = sorted({m.phase for _, rows, _ in first for m in rows.members})
        for phase in phases:
            for bucket, rows, group in first:
                due = [k for k, m in enumerate(rows.members) if m.phase == phase]
                if due:
                    self._submit_initial_bases(bucket, rows, group, due)
            if phase != phases[-1]:
                self.runtime.install_due(1)  # waits for this phase's bases (nothing reads them before step 2)

    def _submit_initial_bases(self, bucket: Bucket, rows: _Rows, group: dict[str, Any], due: list[int]) -> None:
        jobs = []
        members = [rows.members[k] for k in due]
        for i, d in enumerate(bucket.shape):
            x = contiguous_rows(rows.stored(f"factor_{i}"), due)  # (bfloat16 state: the snapshot makes the float32 copy)
            snap = self.runtime.snapshot(x, route=self.runtime.route(d, x.device), later=False)
            # the first basis is computed synchronously anyway: reading the traces here costs no overlap
            traces = torch.diagonal(x, dim1=-2, dim2=-1).sum(-1, dtype=torch.float64).tolist()
            for k, m in enumerate(members):
                jobs.append(
                    RefreshJob(
                        "eigh", m.block_id, i, 0, 1, snap.matrices[0][k],
                        options=dict(ridge=eigh_ridge_for(traces[k], d, group["eigh_ridge"]), descending=True),
                        ready=snap.ready, copy=snap.copy,
                    )
                )
        tag = {"what": "initial", "version": 0, "blocks": self.member_keys(members)}
        self.runtime.submit(jobs, self.installer(tag), tag=tag)

    def _refresh_due(self, t: int, group: dict[str, Any], phase: int | None = None, block: Any = None) -> bool:
        """Whether step t snapshots a basis refresh of the blocks of ``phase`` (every f steps from f, shifted by the
        phase, minus those skipped while one is pending; ``block``: its stable key)."""
        f = group["precondition_frequency"]
        return self.runtime.accepts(t, lambda x: x % f == 0, f, f, phase, block)

    def _submit_refresh(self, bucket: Bucket, rows: _Rows, t: int, group: dict[str, Any], due: list[int]) -> None:
        """Snapshots the factors and installed bases of the rows at positions ``due`` at step t and submits their
        refresh jobs."""
        jobs = []
        deadline = self.runtime.deadline(t)
        members = [rows.members[k] for k in due]
        for i, d in enumerate(bucket.shape):
            x = contiguous_rows(rows.stored(f"factor_{i}"), due)  # (bfloat16 state: the snapshot makes the float32 copies)
            q0 = contiguous_rows(rows.stored(f"basis_{i}"), due)
            snap = self.runtime.snapshot(x, q0, route=self.runtime.route(d, x.device))
            a, q = snap.matrices
            for k, m in enumerate(members):
                jobs.append(
                    RefreshJob(
                        "eigenbasis_refresh", m.block_id, i, t, deadline, a[k], q[k], self._refresh_options(),
                        ready=snap.ready, copy=snap.copy,
                    )
                )
        tag = {"what": "basis", "version": t, "blocks": self.member_keys(members)}
        self.runtime.submit(jobs, self.installer(tag), tag=tag)

    def _install_batch(self, tag: dict[str, Any], results: Sequence[Any]) -> None:
        """Installs a batch of bases (the initial eigh, or a refresh relative to the basis installed at snapshot)."""
        bucket, row_list = self._locate(tag["blocks"])
        group = self.param_groups[bucket.group_index]
        output = "eigenvectors" if tag["what"] == "initial" else "basis"
        version = int(tag["version"])
        k_dims = len(bucket.shape)
        n = len(row_list)
        ok = [True] * n
        msgs = [""] * n
        bases: list[list[np.ndarray | None]] = [[None] * n for _ in range(k_dims)]
        perms: list[list[np.ndarray | None]] = [[None] * n for _ in range(k_dims)]
        rots: list[list[Any]] = [[None] * n for _ in range(k_dims)]
        for j, res in enumerate(results):
            i, k = j // n, j % n
            outputs = res.outputs if res.ok else {}  # (a C++ result builds the dict on every read)
            q = outputs.get(output)
            perm = outputs.get("permutation")
            rot = outputs.get("rotation")
            problem = result_problem(q, perm, rot, bucket.shape[i], "" if res.ok else res.message,
                                     finite_checked=outputs_checked(res))
            if problem:
                ok[k] = False
                msgs[k] = problem
                continue
            bases[i][k] = q
            perms[i][k] = perm
            rots[i][k] = rot
        self._install(bucket, row_list, bases, perms, ok, version, group, rots)
        self.record_refresh_outcome(bucket, row_list, ok, msgs, group["num_tolerated_failures"])

    def _install(
        self,
        bucket: Bucket,
        row_list: list[int],
        bases: list[list[np.ndarray | None]],
        perms: list[list[np.ndarray | None]],
        ok: list[bool],
        version: int,
        group: dict[str, Any],
        rots: list[list[Any]] | None = None,
    ) -> None:
        if not any(ok):
            return
        rows = _Rows(bucket, row_list)
        n = len(row_list)
        version_t = rows.state["basis_version"].clone()
        for k in range(n):  # checked before anything is written
            if ok[k]:
                if int(version_t[k]) >= version:  # invariant 2 of docs/design.md: versions only increase per block
                    raise RuntimeError(
                        f"{type(self).__name__}: install of version {version} over version {int(version_t[k])} "
                        f"for {bucket.members[row_list[k]].label}"
                    )
                version_t[k] = version
        new_bases: list[torch.Tensor] = []
        new_perms: list[torch.Tensor | None] = []
        # R = Q_oldᵀ·Q_new from the refresh jobs (host jobs compute it off the training thread); used only
        # when every installed row has one, else the install computes it
        have_rot = rots is not None and all(r is not None for i in range(len(bucket.shape)) for k, r in enumerate(rots[i]) if ok[k])
        rotations = [] if have_rot else None
        # an install that reads no old basis (KL's, or SOAP's with the jobs' rotations) may write the new one
        # straight into the (untiered) state: one copy, not two, and no stacked bases beside the state
        in_place = (self._install_reads_old_bases is False or have_rot) and rows.full and all(ok) and self._tiers is None
        sorts = bool(self._refresh_options().get("sort", True))  # unsorted refreshes keep the column order
        for i, d in enumerate(bucket.shape):
            cur = rows.state[f"basis_{i}"]
            items = [b if b is not None else cur[k] for k, b in enumerate(bases[i])]
            q = stack_results(items, cur.device, cur.dtype, out=cur if in_place else None)
            if sorts and any(pp is not None and not _is_identity(pp) for pp in perms[i]):
                ident = torch.arange(d, dtype=torch.int64)
                p = stack_results([pp if pp is not None else ident for pp in perms[i]], cur.device, torch.int64)
            else:
                p = None  # every row keeps its column order (KL refreshes, and rows that keep their basis)
            new_bases.append(q)
            new_perms.append(p)
            if rotations is not None:
                eye = torch.eye(d, dtype=cur.dtype)
                rotations.append(
                    stack_results([r if ok[k] else eye for k, r in enumerate(rots[i])], cur.device, cur.dtype)
                )
        # rows that keep their old basis are masked out; when every row installs there is nothing to mask
        okm = None if all(ok) else to_device(torch.tensor(ok, dtype=torch.bool), bucket.device)
        updated = self._install_rows(rows.state, new_bases, new_perms, okm, group, rotations)
        for key, value in updated.items():
            rows.set(key, value)
        rows.set("basis_version", version_t)
        rows.commit()
