"""The shared base of asteria's optimizers: parameters → blocks → buckets of same-shape blocks.

The base class is a coordinator (docs/style.md pattern 15): it validates parameters, turns each parameter
into blocks (`asteria.optim.blocking`), groups the blocks of a param group that share a shape and a
device into *buckets* whose state is stored stacked (``(B, ...)`` tensors), and hands each bucket to the
optimizer's pure per-step functions, so the per-step work is a handful of batched matmuls instead of a
Python loop of tiny ones. The per-parameter state seen through ``optimizer.state[p]`` is a view of the
bucket storage: ``{"step": int, ..., "blocks": [ {name: tensor view, ...} per block ]}``; checkpoints are
param-keyed (`asteria.optim.state_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from asteria.optim import state_dict as _sd
from asteria.optim import tensor_ops as ops
from asteria.optim.blocking import BlockSpec, ParamLayout, can_view
from asteria.optim.results import outputs_checked, to_device
from asteria.runtime import distributed as _dist
from asteria.runtime.config import RuntimeConfig
from asteria.runtime import tiers as _tiers
from asteria.runtime.pipeline import RefreshPipeline
from asteria.runtime.tiers import StepFailedError
from asteria.runtime.workers import Runtime

__all__ = ["BlockOptimizer", "Bucket", "Member", "RefreshFailureError", "check_range", "check_betas", "math_dtype"]


class RefreshFailureError(RuntimeError):
    """Raised by ``step()`` when a block's refresh failed more times in a row than ``num_tolerated_failures``.

    It is raised mid-step, while the step installs the refreshes due: the step has already stored the new
    statistics and moments, so parameters and optimizer state no longer match. From then on ``step()`` and
    ``state_dict()`` raise `StepFailedError` until ``load_state_dict`` of the last checkpoint (together with
    the model's ``load_state_dict``) makes the optimizer usable again.
    """


# --------------------------------------------------------------------------------------------------
# validation helpers (ValueError naming the value and the allowed range)
# --------------------------------------------------------------------------------------------------
def check_range(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    allow_inf: bool = False,
) -> None:
    """Raises ValueError unless ``value`` is a real number in the given interval.

    Args:
        name: Hyperparameter name used in the message.
        value: The value to check.
        low: Lower bound.
        high: Upper bound.
        low_open: Exclude ``low``.
        high_open: Exclude ``high``.
        integer: Require an int (``math.inf`` is accepted when ``allow_inf``).
        allow_inf: Accept ``math.inf``.

    Raises:
        ValueError: With the value and the allowed range.
    """
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    allowed = f"{lo}{low}, {high}{hi}" + (" (an int)" if integer else "") + (" or math.inf" if allow_inf else "")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and allow_inf and value == math.inf:
        return
    if ok and integer and not isinstance(value, int):
        ok = False
    if ok:
        v = float(value)
        ok = not math.isnan(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; allowed range is {allowed}")


def check_betas(name: str, betas: Any, *, beta2_one: bool = False) -> None:
    """Checks a ``(beta1, beta2)`` pair: beta1 in [0, 1), beta2 in [0, 1) (or [0, 1] with ``beta2_one``)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r}; expected a pair (beta1, beta2)")
    check_range(f"{name}[0]", betas[0], 0.0, 1.0, high_open=True)
    check_range(f"{name}[1]", betas[1], 0.0, 1.0, high_open=not beta2_one)


STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def check_dtype(name: str, dtype: Any) -> None:
    """Statistics/basis dtype: float32, float64 or bfloat16 (docs/algorithms.md §5.5)."""
    if dtype not in STATE_DTYPES:
        raise ValueError(
            f"Invalid {name}: {dtype!r}; allowed values are torch.float32, torch.float64 and torch.bfloat16"
        )


def math_dtype(group: dict[str, Any]) -> torch.dtype:
    """The dtype a group's per-step math runs in: its ``state_dtype``, except float32 for bfloat16 state (the
    state is read upcast, the new values rounded back stochastically when stored; docs/algorithms.md §5.5)."""
    dtype = group["state_dtype"]
    return torch.float32 if dtype == torch.bfloat16 else dtype


COMPUTE_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_compute_dtype(dtype: Any) -> None:
    """``compute_dtype``: None (the state dtype) or a floating dtype of the matrix products."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"Invalid compute_dtype: {dtype!r}; allowed values are None (the state dtype), torch.float32, "
            "torch.float64, torch.bfloat16 and torch.float16"
        )


def check_param(p: torch.Tensor, name: str) -> None:
    """Refuses parameters asteria cannot precondition (integer, complex, DTensor, FSDP flat parameters).

    Raises:
        TypeError: Naming the parameter, the reason and what to do instead.
    """
    if p.is_complex():
        raise TypeError(
            f"{name}: complex parameters ({p.dtype}) are not supported by asteria optimizers; store the real and "
            "imaginary parts as two real parameters, or optimize this parameter with a torch.optim optimizer"
        )
    cls = type(p).__name__
    if cls == "DTensor" or hasattr(p, "_spec") and hasattr(p, "to_local"):
        raise TypeError(
            f"{name}: DTensor parameters (FSDP2 / tensor parallel) are not supported yet; "
            "asteria currently optimizes local tensors only"
        )
    if cls == "FlatParameter" or getattr(p, "_is_flat_param", False):
        raise TypeError(
            f"{name}: FSDP flat parameters are not supported (their 1-D flattening destroys the matrix "
            "structure); wrap the model with use_orig_params=True or optimize unsharded parameters"
        )
    if not p.is_floating_point():
        raise TypeError(
            f"{name}: only floating-point parameters can be optimized, got {p.dtype}; leave integer tensors out of "
            "the optimizer's params (register them as buffers) or convert them with .float()"
        )


# --------------------------------------------------------------------------------------------------
# buckets
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Member:
    """One block of one parameter, as a row of a bucket."""

    param: torch.Tensor
    group_index: int
    param_index: int
    layout: ParamLayout
    block: BlockSpec
    name: str
    block_id: int
    # the refresh phase in [0, f) (RuntimeConfig.refresh_phases="staggered"; 0 with aligned phases)
    phase: int = 0

    @property
    def label(self) -> str:
        """Human-readable block name for errors."""
        if len(self.layout.blocks) == 1:
            return f"parameter {self.name} (shape {tuple(self.layout.param_shape)})"
        return (
            f"parameter {self.name} (shape {tuple(self.layout.param_shape)}), block {self.block.index} "
            f"{self.block.shape} at {self.block.offsets}"
        )


@dataclasses.dataclass
class Bucket:
    """Same-shape blocks of one param group on one device, with their state stacked along dim 0."""

    group_index: int
    shape: tuple[int, ...]
    factored: bool
    device: torch.device
    members: list[Member]
    state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # the dtype the step reads the bucket's bfloat16 state in (`math_dtype`), None when the state is not bfloat16
    upcast: torch.dtype | None = None

    @property
    def size(self) -> int:
        return len(self.members)


_OUTCOME_LOCK = threading.Lock()
"""Guards the refresh-failure counters: a step's installs may run on two threads (``parallel_install``)."""


class _Upcast(dict):
    """The gathered state of some rows whose bfloat16 tensors read as ``dtype`` (each converted at its first read,
    so a step converts only what it uses). The stored tensors stay readable through `stored`."""

    def __init__(self, raw: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__(raw)
        self.raw = dict(raw)
        self._dtype = dtype
        self._seen: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        value = dict.__getitem__(self, key)
        if key not in self._seen:
            self._seen.add(key)
            if value.dtype == torch.bfloat16:
                value = value.to(self._dtype)
                dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        dict.__setitem__(self, key, value)
        self._seen.add(key)


class _Rows:
    """A subset of a bucket's rows taking part in one step, with state gathered and scattered back.

    The state of a bucket stored in bfloat16 reads in float32 (`Bucket.upcast`), and `commit` rounds what it writes
    back: stochastically with ``rounding`` (a ``torch.Generator`` on the bucket's device: the step's EMAs, see
    `asteria.optim.tensor_ops.round_stochastic`), to nearest without (installs).
    """

    def __init__(self, bucket: Bucket, rows: list[int], rounding: torch.Generator | None = None) -> None:
        self.bucket = bucket
        self.rows = rows
        self.full = rows == list(range(bucket.size))
        self.rounding = rounding
        self._index: dict[torch.device, torch.Tensor] = {}
        self._state: dict[str, torch.Tensor] | None = None
        self._replaced: set[str] = set()

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The rows' state tensors, gathered at first use (a tiered bucket is brought in then); bfloat16 state reads
        as `Bucket.upcast`."""
        if self._state is None:
            raw = {
                key: value if self.full else value.index_select(0, self.index(value.device))
                for key, value in self.bucket.state.items()
            }
            self._state = raw if self.bucket.upcast is None else _Upcast(raw, self.bucket.upcast)
        return self._state

    def stored(self, key: str) -> torch.Tensor:
        """The rows' state tensor ``key`` in its stored dtype (`state` upcasts bfloat16; a snapshot reads this one and
        makes the upcast copy itself, `asteria.runtime.shadow`)."""
        st = self.state
        return st.raw[key] if isinstance(st, _Upcast) and key not in self._replaced else st[key]

    def index(self, device: torch.device) -> torch.Tensor:
        if device not in self._index:
            self._index[device] = to_device(torch.tensor(self.rows, dtype=torch.long), device)
        return self._index[device]

    @property
    def members(self) -> list[Member]:
        return [self.bucket.members[r] for r in self.rows]

    def set(self, key: str, value: torch.Tensor) -> None:
        """Replaces a state tensor of these rows (written back to the bucket by `commit`)."""
        self.state[key] = value
        self._replaced.add(key)

    def commit(self) -> None:
        """Writes the replaced state tensors of the rows back into the bucket storage (in place, keeping the views
        alive). Tensors that were not replaced are not written: a refresh worker may be reading them."""
        if self._state is not None:
            for key in sorted(self._replaced):  # (sorted: the stochastic rounding draws in a fixed order)
                value, dest = self._state[key], self.bucket.state[key]
                if dest.dtype == torch.bfloat16 and value.dtype != torch.bfloat16:
                    value = ops.round_stochastic(value, self.rounding) if self.rounding is not None else value.to(dest.dtype)
                if self.full:
                    if value is not dest:
                        dest.copy_(value)
                else:
                    dest.index_copy_(0, self.index(dest.device), value.to(dest.dtype))
        # Later reads gather the committed values again: the new tensors are not kept alive for the rest of
        # the step (a step's work list holds the rows of every bucket).
        self._state = None
        self._replaced = set()


def assign_phases(buckets: Sequence[Bucket], groups: Sequence[dict[str, Any]]) -> None:
    """Sets the staggered refresh phase of every factored block (`RuntimeConfig.refresh_phases`).

    Per param group with frequency f, the blocks in parameter order (parameters, then their blocks) are weighted
    by the sum of the squares of their dims (the size of their refresh snapshot); a block's phase is
    ``floor(f · W_before / W)``, where ``W_before`` is the weight of the blocks before it and ``W`` the group's. Each
    phase then holds about 1/f of the group's refresh work, and the phases of a bucket's blocks are non-decreasing
    along its rows, so the rows of one phase are contiguous. A pure function of the layout and f.
    """
    by_group: dict[int, list[Member]] = {}
    for bucket in buckets:
        if bucket.factored:
            by_group.setdefault(bucket.group_index, []).extend(bucket.members)
    for gi, members in by_group.items():
        f = int(groups[gi]["precondition_frequency"])
        members.sort(key=lambda m: (m.param_index, m.block.index))
        weights = [sum(int(d) * int(d) for d in m.block.shape) for m in members]
        total = sum(weights)
        before = 0
        for m, w in zip(members, weights):
            m.phase = min(f - 1, f * before // total) if total else 0
            before += w


def contiguous_rows(x: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """``x``'s rows at ``positions`` along dim 0: a view when they are consecutive (a phase's rows always are),
    else a gathered copy."""
    if len(positions) == x.shape[0]:
        return x
    first, last = positions[0], positions[-1]
    if last - first + 1 == len(positions):
        return x[first : last + 1]
    return x.index_select(0, torch.tensor(list(positions), dtype=torch.long, device=x.device))


def _fingerprint(grad: torch.Tensor) -> tuple[int, float]:
    """What tells whether a gradient changed between backward and ``step()``: its version counter (clipping,
    accumulation and all-reduce write it in place) and the float64 sum of its magnitudes (GradScaler's ``unscale_``
    multiplies gradients without bumping the version). CPU tensors only: on a GPU the sum would synchronise."""
    return grad._version, float(torch.linalg.vector_norm(grad.detach(), 1, dtype=torch.float64))


@dataclasses.dataclass
class _Precomputed:
    """A bucket's step work started during backward (``fold_statistics="backward"``): the step key it is for, the
    gradients (tensor, version) it reads, and its future on the helper thread (None: computed inline, ``value``)."""

    key: Any
    grads: list[tuple[torch.Tensor, int]]
    future: Any
    value: Any = None


class _WeakInstaller:
    """The installer of one refresh batch: calls ``opt._install_batch(tag, results)`` through a weak reference.

    The batch is described by a picklable ``tag`` (what is refreshed, the snapshot step, the blocks as stable
    ``(group, param, block)`` keys), so the same installer can be rebuilt from a checkpoint, and the pipeline
    holds no strong reference to the optimizer (its worker threads die with the optimizer).
    """

    def __init__(self, opt: BlockOptimizer, tag: dict[str, Any]) -> None:
        self._ref = weakref.ref(opt)
        self.tag = tag

    def __call__(self, results: Sequence[Any]) -> None:
        opt = self._ref()
        if opt is not None:
            opt._install_tagged(self.tag, results)

    @property
    def parallel_safe(self) -> bool:
        """Whether this batch may be installed on another thread than the training thread, next to other
        batches: its optimizer's state is in CPU memory and untiered (a tiered bucket is brought in by the tier
        manager, and CUDA work on another thread would run on another stream)."""
        opt = self._ref()
        return opt is not None and opt._installs_thread_safe()

    def overlap_safe(self, results: Sequence[Any]) -> bool:
        """Whether this batch may be installed on the helper thread while training computes the next step
        (`RefreshPipeline.install_due` with ``overlap``): `parallel_safe`, and every job succeeded with outputs
        checked where they were computed, so the install cannot warn, count a failure or raise one."""
        return self.parallel_safe and all(r is not None and r.ok and outputs_checked(r) for r in results)

    @property
    def parallel_pays(self) -> bool:
        """Whether this batch's install gains from a second thread (see `BlockOptimizer._parallel_install_pays`)."""
        opt = self._ref()
        return opt is not None and opt._parallel_install_pays


def _grad_ready_hook(ref: weakref.ref) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            if opt._fold_backward:
                opt._fold_in_backward(param)
            if opt.runtime.is_async and opt.runtime.config.hooks:
                opt.runtime.on_grad_ready()
            if opt._tiers is not None:  # start reading the first NVMe-tier buckets of the coming step
                opt._tiers.on_grad_ready()

    return hook


def _refuse_fold_when_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise RuntimeError(
            "RuntimeConfig(fold_statistics='backward') is for single-process loops: under DDP or any "
            "multi-process run the gradients are all-reduced after the hooks fire; use fold_statistics='step'"
        )


class BlockOptimizer(torch.optim.Optimizer):
    """Base of `Shampoo`, `SOAP`, `KLShampoo` and `KLSOAP` (not used directly).

    Subclasses set ``_offset`` (install offset o) and implement `_layout`, `_init_bucket_state`,
    `_new_param_state` and `_step_rows`.

    Hostile numbers (the policy every subclass follows, per block and step, without host synchronisation):

    * A gradient block containing NaN/Inf is zeroed before any use and the block's step is rejected.
    * A finite gradient whose statistics or moments overflow (``G·Gᵀ`` of a 1e30 gradient is Inf in fp32)
      is rejected the same way: the new values are computed, checked (`acceptance`) and discarded with
      ``torch.where`` when any is non-finite, so no Inf/NaN ever enters the running state and later ordinary
      gradients train normally. (Computing the statistics in a way that cannot overflow was not chosen: an
      fp32 EMA holding a ~1e60 term could not represent the ordinary gradients that follow anyway, so the
      block would be stuck for thousands of steps.)
    * A rejected step leaves the block's statistics, moments, grafting state, eigenvalue estimates and
      parameter unchanged; a refresh snapshotted at that step holds the previous statistics.
    * A parameter update that would not be finite, or not representable in the parameter's dtype (an fp16
      parameter beyond 65504), while the statistics and moments are finite, is not written (`params_ok`);
      the step's statistics and moments are kept, so a state that produces such updates can still evolve.
    * The finiteness test is one sum per checked tensor and block (`asteria.optim.tensor_ops.finite_blocks`):
      a block of finite values whose sum exceeds the dtype's range counts as overflowed, a margin of at most
      the block size below the overflow itself.
    * Each block step whose parameter was not updated for these reasons adds one to the block's
      ``nonfinite_steps`` (`nonfinite_steps`, ``runtime.stats()["nonfinite_steps"]``). The parameter's step
      counter still advances (unlike torch.amp's ``GradScaler``, which skips ``optimizer.step()`` altogether
      when it finds Inf/NaN gradients).
    * A refresh result that is non-finite (or, for an eigenbasis, whose rotation is non-finite or whose
      permutation is not a permutation) is never installed, like the result of a failed job: the previous
      root/basis is kept and the failure counted (per block, consecutive: the ``refresh_failures`` state;
      in total: ``runtime.stats()["refresh_failures"]``); more than ``num_tolerated_failures`` failures in a
      row raise `RefreshFailureError`.
    * Parameters whose ``.grad`` is None are skipped (their state and step counter are untouched).
    """

    _offset: int = 0
    _param_state_keys: tuple[str, ...] = ("step",)
    # State tensors touched only when a refresh is installed (lifecycle class "cold" of asteria.runtime.tiers).
    _cold_state_keys: tuple[str, ...] = _tiers.DEFAULT_COLD_KEYS

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], runtime: RuntimeConfig | Runtime | None
    ) -> None:
        if runtime is not None and not isinstance(runtime, (RuntimeConfig, Runtime)):
            raise TypeError(
                f"runtime must be an asteria.RuntimeConfig, an asteria.Runtime or None, got {type(runtime).__name__}"
            )
        super().__init__(params, defaults)
        self.runtime = RefreshPipeline(runtime, offset=self._offset)
        me = weakref.ref(self)  # no reference cycle: the pipeline (and its worker threads) dies with the optimizer
        self.runtime.add_stats_source("nonfinite_steps", lambda: me()._nonfinite_total() if me() is not None else 0)
        # block refreshes that installed nothing (failed job, or a result refused at install), since construction
        self._refresh_failure_total = 0
        self._failed_step: str | None = None  # why the optimizer refuses to continue (a step failed midway)
        self._state_touched = False
        self.runtime.add_stats_source("refresh_failures", lambda: me()._refresh_failure_total if me() is not None else 0)
        self._buckets: list[Bucket] | None = None
        self._rounding_rngs: dict[str, torch.Generator] = {}  # by device: stochastic rounding of bfloat16 state
        self._next_block_id = 0
        self._member_index: dict[tuple[int, int, int], tuple[Bucket, int]] = {}
        self._hook_handles: list[Any] = []
        # Distributed runs: refresh ownership, result exchange, optional sharded state (None: single process).
        self._dist = _dist.DistributedCoordinator.attach(self)
        # fold_statistics="backward": per-row statistics computed in the hooks, committed by step()
        self._fold_backward = self.runtime.config.fold_statistics == "backward"
        self._pre: dict[int, _Precomputed] = {}  # by id(bucket): the step work started during backward
        self._ready: dict[int, set[int]] = {}  # by id(bucket): rows whose gradient is final in this backward
        self._backward_counts = {"used": 0, "recomputed": 0}
        self.runtime.add_stats_source("backward_steps", lambda: dict(me()._backward_counts) if me() is not None else {})
        self._members_by_param: dict[int, list[tuple[Bucket, int]]] | None = None
        if self._fold_backward and not self.runtime.config.hooks:
            raise ValueError("RuntimeConfig(fold_statistics='backward') folds in the gradient hooks; it needs hooks=True")
        if self._fold_backward:
            _refuse_fold_when_distributed()
        # Memory tiers (None without budgets): where the bucket state lives; checked against the budgets now.
        self._tiers = self.runtime.runtime.tiers
        self.runtime.add_stats_source("memory", lambda: _tiers.memory_report(me()) if me() is not None else {})
        if self._tiers is not None and self._dist is None:
            try:
                self._tiers.check_construction(self)
            except BaseException:
                self.runtime.close()  # removes the swap directory at once
                raise
        hooks = self.runtime.config.hooks
        if self._fold_backward or (self.runtime.is_async and hooks) or (self._tiers is not None and hooks):
            self._register_hooks(me)

    def _register_hooks(self, me: weakref.ref, groups: list[dict[str, Any]] | None = None) -> None:
        """One post-accumulate-grad hook per leaf parameter: collects finished refresh jobs during backward."""
        hook = _grad_ready_hook(me)
        for group in self.param_groups if groups is None else groups:
            for p in group["params"]:
                if p.requires_grad and p.is_leaf:
                    self._hook_handles.append(p.register_post_accumulate_grad_hook(hook))

    # -- torch.optim plumbing -----------------------------------------------------------------------
    @property  # type: ignore[override]
    def state(self) -> defaultdict[Any, dict[str, Any]]:
        """Per-parameter state, torch.optim's layout (views of the bucket storage; see the module docstring).

        Reading it waits for the previous step's installs if they still run on the helper thread
        (``RuntimeConfig.parallel_install``), so it always shows the state ``step()`` left.
        """
        pipeline = self.__dict__.get("runtime")
        # (not inside step(): its last part only touches the per-parameter counters, which installs never write)
        if pipeline is not None and pipeline.installs_running and not self.__dict__.get("_stepping", False):
            self._finish_installs()
        return self.__dict__["state"]

    @state.setter
    def state(self, value: defaultdict[Any, dict[str, Any]]) -> None:
        self.__dict__["state"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group (torch.optim semantics), refusing a tensor passed twice.

        Raises:
            ValueError: If a tensor appears twice in the group or is already in another group.
            TypeError: If a parameter is not a floating-point local tensor (`check_param`).
        """
        self._check_unique_params(param_group)
        if getattr(self, "_buckets", None) is not None:  # installs on the helper thread locate blocks in the buckets
            self._finish_installs()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        for pi, p in enumerate(group["params"]):
            check_param(p, self._param_name(group, gi, pi))
        self._validate_group(group)
        if getattr(self, "_tiers", None) is not None:
            self._detach_tiers()
        self._buckets = None  # rebuilt (keeping existing state) at the next step
        if getattr(self, "_hook_handles", None) is not None and (
            (self.runtime.is_async or self._tiers is not None) and self.runtime.config.hooks or self._fold_backward
        ):
            self._register_hooks(weakref.ref(self), [group])

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - overridden
        pass

    def _check_unique_params(self, param_group: Any) -> None:
        """Raises ValueError when the new group holds a tensor twice, or one already in another group.

        torch.optim only warns about a duplicate inside one group; for asteria it would fold the gradient into
        the block's statistics twice per step and update the parameter twice, so it is refused, as is a tensor
        shared by two groups (one set of statistics cannot follow two sets of hyperparameters).
        """
        if not isinstance(param_group, dict) or "params" not in param_group:
            return  # torch raises its own error
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            items: list[Any] = [params]
        elif isinstance(params, set):
            return  # torch raises: a set has no stable order
        else:
            items = list(params)
            param_group["params"] = items  # a generator is consumed here; torch reads the list
        gi = len(self.param_groups)
        named = bool(items) and isinstance(items[0], tuple)
        tensors = [x[1] if named and isinstance(x, tuple) else x for x in items]

        def label(g: int, i: int, name: Any = None) -> str:
            where = f"param_groups[{g}]['params'][{i}]"
            return f"{where} ({name!r})" if name is not None else where

        seen: dict[int, int] = {}
        for i, p in enumerate(tensors):
            if not isinstance(p, torch.Tensor):
                continue  # refused by torch / check_param with their own message
            name = items[i][0] if named and isinstance(items[i], tuple) else None
            if id(p) in seen:
                j = seen[id(p)]
                first = items[j][0] if named and isinstance(items[j], tuple) else None
                raise ValueError(
                    f"{type(self).__name__}: the same tensor is passed twice in param group {gi}: {label(gi, j, first)} "
                    f"and {label(gi, i, name)}; asteria would fold its gradient into the statistics twice per step. "
                    "Pass each parameter once (model.parameters() already removes shared/tied weights; for a "
                    "hand-built list use list({id(p): p for p in params}.values()))"
                )
            seen[id(p)] = i
        for gj, group in enumerate(self.param_groups):
            for k, q in enumerate(group["params"]):
                if id(q) in seen:
                    i = seen[id(q)]
                    name = items[i][0] if named and isinstance(items[i], tuple) else None
                    names = group.get("param_names")
                    other = names[k] if names is not None else None
                    raise ValueError(
                        f"{type(self).__name__}: {label(gi, i, name)} is already in param group {gj} as "
                        f"{label(gj, k, other)}; a parameter can belong to one param group only. Remove it from one "
                        "of the groups"
                    )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_buckets", None)
        self.__dict__.setdefault("_next_block_id", 0)
        self.__dict__.setdefault("_rounding_rngs", {})
        self.__dict__.setdefault("_member_index", {})
        self.__dict__.setdefault("_hook_handles", [])
        self.__dict__.setdefault("_dist", None)
        self.__dict__.setdefault("_tiers", None)
        self.__dict__.setdefault("_refresh_failure_total", 0)
        self.__dict__.setdefault("_failed_step", None)
        self.__dict__.setdefault("_state_touched", False)
        self.__dict__.setdefault("_stepping", False)
        self.__dict__.setdefault("_pre", {})
        self.__dict__.setdefault("_ready", {})
        self.__dict__.setdefault("_backward_counts", {"used": 0, "recomputed": 0})

    @staticmethod
    def _param_name(group: dict[str, Any], gi: int, pi: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return str(names[pi])
        return f"param_groups[{gi}]['params'][{pi}]"

    # -- hooks for subclasses ---------------------------------------------------------------------------
    def _layout(self, param: torch.Tensor, group: dict[str, Any]) -> ParamLayout:
        raise NotImplementedError

    def _init_bucket_state(self, bucket: Bucket, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _new_param_state(self) -> dict[str, Any]:
        return {"step": 0}

    def _row_key(self, param_state: dict[str, Any]) -> Any:
        return param_state["step"]

    def _step_rows(self, groups: list[tuple[Bucket, _Rows, Any]]) -> None:
        raise NotImplementedError

    # -- bucket construction ------------------------------------------------------------------------------
    def _ensure_buckets(self) -> list[Bucket]:
        if self._buckets is not None:
            return self._buckets
        table: dict[tuple[Any, ...], Bucket] = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                layout = self._layout(p, group)
                name = self._param_name(group, gi, pi)
                pstate = self.state[p]
                for key, value in self._new_param_state().items():
                    pstate.setdefault(key, value)
                old_blocks = pstate.get("blocks")
                pstate["blocks"] = [{} for _ in layout.blocks]
                pstate["_restore"] = old_blocks
                for blk in layout.blocks:
                    # fold_statistics="backward": one bucket per parameter, so that a bucket's gradients are final
                    # as soon as its parameter's are, while backward still runs
                    key = (gi, blk.shape, p.device, layout.factored, pi if self._fold_backward else -1)
                    bucket = table.get(key)
                    if bucket is None:
                        bucket = table[key] = Bucket(gi, blk.shape, layout.factored, p.device, [])
                    bucket.members.append(Member(p, gi, pi, layout, blk, name, self._next_block_id))
                    self._next_block_id += 1
        buckets = list(table.values())
        if self.runtime.staggered:  # from the whole layout, before buckets are partitioned or split
            assign_phases(buckets, self.param_groups)
        if self._dist is not None:  # owners of every block; with sharded state, only this rank's rows stay
            buckets = self._dist.partition(self, buckets)
        if self._tiers is not None:  # the unit of placement: chunks of a bucket's blocks (RuntimeConfig.max_chunk_bytes)
            buckets = self._tiers.split(self, buckets)
        self._member_index = {}
        for bucket in buckets:
            for row, m in enumerate(bucket.members):
                self._member_index[(m.group_index, m.param_index, m.block.index)] = (bucket, row)
        if self._tiers is not None:  # decides each bucket's tier (BudgetError when the budgets cannot hold them)
            self._tiers.begin(self, buckets)
        for bucket in buckets:
            group = self.param_groups[bucket.group_index]
            bucket.upcast = math_dtype(group) if group["state_dtype"] == torch.bfloat16 else None
            bucket.state = self._init_bucket_state(bucket, group)
            for row, m in enumerate(bucket.members):
                pstate = self.state[m.param]
                restore = pstate.get("_restore")
                if restore is not None and m.block.index < len(restore) and restore[m.block.index]:
                    _sd.restore_block(bucket.state, row, restore[m.block.index], m.label)
                if self._tiers is None:
                    pstate["blocks"][m.block.index] = {k: v[row] for k, v in bucket.state.items()}
            if self._tiers is not None:  # into its tier, before the next bucket's state is created
                self._tiers.adopt(self, bucket)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].pop("_restore", None)
                if self._tiers is not None:  # tiered: the blocks are read through state_dict()
                    self.state[p].pop("blocks", None)
        self._buckets = buckets
        self._members_by_param = None
        return buckets

    # -- stepping ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one optimization step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or None.

        Raises:
            StepFailedError: An earlier step was interrupted (by any exception, e.g. ``KeyboardInterrupt``) after it
                had updated some parameters or optimizer state but not all: parameters and state no longer match. ``state_dict()``
                raises too, so no inconsistent checkpoint is written; ``load_state_dict`` of the last checkpoint
                (with the model's) makes the optimizer usable again. An exception before any parameter was
                updated leaves everything as it was, and the step may be repeated. The same holds after installs
                left running on the helper thread (``RuntimeConfig.parallel_install``) failed: their error is
                raised by the call that waits for them, and StepFailedError afterwards.
        """
        if self._failed_step is not None:  # checked before the closure: a refused step runs no forward/backward
            raise StepFailedError(self._failed_step)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.runtime.begin_step()
        self._state_touched = False
        self._stepping = True
        try:
            self._finish_installs()  # the previous step's, if they still run on the helper thread
            buckets = self._ensure_buckets()
            if self._dist is not None:
                self._dist.before_step(self)
            if self._fold_backward:
                _refuse_fold_when_distributed()
            self._step_buckets(buckets)
            if self._dist is not None:
                self._dist.after_step(self)
        except BaseException as exc:
            tiers_refuse = self._tiers is not None and self._tiers.failure(self) is not None  # (its own message)
            if self._state_touched and not tiers_refuse:  # some blocks took this step and others did not
                self._failed_step = (
                    f"{type(self).__name__}: a step was interrupted after it had updated some parameters or state "
                    f"({type(exc).__name__}: {exc}); parameters and optimizer state no longer match, so step() and "
                    "state_dict() refuse to continue. Reload the last checkpoint: model.load_state_dict(...) and "
                    "optimizer.load_state_dict(...)"
                )
            raise
        finally:
            self._stepping = False
            self._settle_precomputes()
            self.runtime.end_step()
        return loss

    def _finish_installs(self) -> None:
        """Waits for the installs of the previous step still running on the helper thread (`RefreshPipeline.install_due`
        with ``overlap``). An install that raised there fails the optimizer like an error inside a step: its state
        no longer matches the install schedule (see `step`)."""
        if not self.runtime.installs_running:
            return
        try:
            self.runtime.finish_installs()
        except BaseException as exc:
            if not self.runtime.installs_running:  # the install failed (not the wait, e.g. a KeyboardInterrupt)
                self._failed_step = (
                    f"{type(self).__name__}: installing refresh results failed ({type(exc).__name__}: {exc}); the "
                    "optimizer state no longer matches the install schedule, so step() and state_dict() refuse to "
                    "continue. Reload the last checkpoint: model.load_state_dict(...) and optimizer.load_state_dict(...)"
                )
            raise

    # -- fold_statistics="backward" ----------------------------------------------------------------------------
    def _param_members(self) -> dict[int, list[tuple[Bucket, int]]]:
        """The (bucket, row) of every block of every parameter, by the parameter's id."""
        if self._members_by_param is None:
            table: dict[int, list[tuple[Bucket, int]]] = defaultdict(list)
            for (gi, pi, _), (bucket, row) in self._member_index.items():
                table[id(self.param_groups[gi]["params"][pi])].append((bucket, row))
            self._members_by_param = dict(table)
        return self._members_by_param

    def _fold_in_backward(self, param: torch.Tensor) -> None:
        """``param``'s gradient is final: once every block of a bucket has its gradient, the bucket's step is computed
        (`_schedule_precompute`), on the install helper thread while backward goes on. `step` stores it when the
        gradients are still the ones it was computed from, and computes the step itself otherwise (a gradient
        clipped, un-scaled, accumulated by a second backward or all-reduced since), so the numbers never depend on
        where the work ran. A second backward before ``step()`` (gradient accumulation) computes the buckets again
        from the accumulated gradients: the work of the last backward is the one used."""
        _refuse_fold_when_distributed()
        if self._buckets is None or param.grad is None:
            return
        for bucket, row in self._param_members().get(id(param), []):
            ready = self._ready.setdefault(id(bucket), set())
            ready.add(row)
            if len(ready) == bucket.size:
                del self._ready[id(bucket)]
                self._schedule_precompute(bucket)

    def _schedule_precompute(self, bucket: Bucket) -> None:
        if bucket.device.type != "cpu":  # GPU state: step() computes it (a fingerprint would synchronise the device)
            return
        states = self.__dict__["state"]  # (not the property: it would wait for the installs on the helper thread)
        keys = {repr(self._row_key(states[m.param])) for m in bucket.members}
        if len(keys) != 1:  # rows at different steps (a parameter added later): step() computes them
            return
        key = self._row_key(states[bucket.members[0].param])
        group = self.param_groups[bucket.group_index]
        rows = _Rows(bucket, list(range(bucket.size)))
        grads = [(m.param.grad, _fingerprint(m.param.grad)) for m in bucket.members]
        helper = self.runtime.runtime.install_helper() if self._installs_thread_safe() else None
        if helper is not None:  # after the previous step's installs, which run on the same thread (FIFO)
            self._pre[id(bucket)] = _Precomputed(key, grads, helper.submit(self._precompute, bucket, rows, key, group))
        else:  # CUDA or tiered state: here, on the training thread (the work leaves step(), it is not overlapped)
            self._finish_installs()
            with torch.no_grad():
                self._pre[id(bucket)] = _Precomputed(key, grads, None, self._precompute(bucket, rows, key, group))

    def _precompute(self, bucket: Bucket, rows: _Rows, key: Any, group: dict[str, Any]) -> Any:  # pragma: no cover
        """The work of a bucket's step that may run during backward (pure: reads the state, stores nothing)."""
        raise NotImplementedError

    def precomputed(self, bucket: Bucket, rows: _Rows, key: Any) -> Any:
        """What backward computed for ``bucket`` at step key ``key`` (waiting for it), or None when step() must compute
        it: nothing was computed, for other rows or another step, or a gradient changed since."""
        pre = self._pre.pop(id(bucket), None)
        if pre is None:
            return None
        value = pre.future.result() if pre.future is not None else pre.value
        if not rows.full or repr(pre.key) != repr(key) or value is None:
            return None
        for m, (grad, seen) in zip(bucket.members, pre.grads):
            if m.param.grad is not grad or _fingerprint(grad) != seen:
                self._backward_counts["recomputed"] += 1
                return None
        self._backward_counts["used"] += 1
        return value

    def _settle_precomputes(self) -> None:
        """Waits for the work backward started and step() did not use (so none runs into the next step)."""
        for pre in self._pre.values():
            if pre.future is not None:
                pre.future.exception()
        self._pre.clear()
        self._ready.clear()

    def step_statistics(self, bucket: Bucket, rows: _Rows, G: torch.Tensor, group: dict[str, Any],
                        key: Any = None) -> dict[str, torch.Tensor]:
        """The rows' statistics after this step's gradient (not stored, not masked): those computed during backward
        (``fold_statistics="backward"``), else computed now. The caller stores them with `accept_rows` for the
        rows `acceptance` accepts."""
        stats = self.precomputed(bucket, rows, key) if self._pre else None
        if stats is None:
            with ops.compute_dtype(group.get("compute_dtype")):
                stats = self._statistics(bucket, rows, G, group)
        return stats

    @staticmethod
    def acceptance(finite: torch.Tensor, updates: dict[str, torch.Tensor]) -> torch.Tensor:
        """Which rows may store ``updates``: a finite gradient and finite new state (no host sync).

        Checked (`asteria.optim.tensor_ops.finite_blocks`): the diagonal of every ``factor_*`` (the factors are
        PSD, so an off-diagonal entry is bounded by the diagonal: ``|L_ij| ≤ √(L_ii·L_jj)``) and every other
        tensor except the first moments ``filtered_grad``/``exp_avg``: a convex combination of the finite old
        moment and the gradient cannot overflow, and a moment kept in eigenbasis coordinates overflows only
        together with the second moment beside it, which is checked.

        Args:
            finite: ``(B,)`` whether each gradient block was finite.
            updates: New values by state key.

        Returns:
            The ``(B,)`` acceptance mask.
        """
        probes = []
        for key, value in updates.items():
            if key.startswith("factor_"):
                probes.append(torch.diagonal(value, dim1=-2, dim2=-1))
            elif key not in ("filtered_grad", "exp_avg"):
                probes.append(value)
        return ops.finite_blocks(finite, *probes)

    @staticmethod
    def params_ok(rows: _Rows, ok: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Which rows may write the new parameter values ``new`` (stacked, in the state dtype): ``ok`` rows whose
        values are finite and, for a narrower parameter dtype (fp16, bf16), representable in it."""
        ok = ops.finite_blocks(ok, new)
        limits = [torch.finfo(m.param.dtype).max for m in rows.members]
        if min(limits) < torch.finfo(new.dtype).max and new.numel() > 0:
            bound: Any = limits[0]
            if len(set(limits)) > 1:  # parameters of several dtypes in one bucket
                bound = to_device(torch.tensor(limits, dtype=torch.float64), new.device).to(new.dtype)
            ok = ok & (new.flatten(1).abs().amax(dim=1) <= bound)
        return ok

    def accept_rows(self, rows: _Rows, ok: torch.Tensor, updates: dict[str, torch.Tensor]) -> None:
        """Stores ``updates`` for the rows where ``ok`` is True; the other rows keep their state (no host sync).

        Args:
            rows: The rows stepped.
            ok: ``(B,)`` acceptance mask (`acceptance`).
            updates: New values of state tensors of the rows, by state key.
        """
        self._state_touched = True  # (see `step`: an exception from here on leaves the optimizer refusing)
        for key, value in updates.items():
            rows.set(key, ops.masked(ok, value, rows.state[key]))

    @staticmethod
    def count_rejected(rows: _Rows, ok: torch.Tensor) -> None:
        """Adds one to ``nonfinite_steps`` of every row whose step was rejected (``ok`` False)."""
        rows.set("nonfinite_steps", rows.state["nonfinite_steps"] + (~ok).to(torch.int64))

    def write_accepted_params(self, rows: _Rows, ok: torch.Tensor, W: torch.Tensor, W_new: torch.Tensor) -> None:
        """Writes the new parameter values of the rows that may take them; counts the others (no host sync).

        A row takes ``W_new`` when ``ok`` is True and `params_ok` accepts the values; every other row keeps
        ``W`` and adds one to its ``nonfinite_steps`` (`count_rejected`).

        Args:
            rows: The rows stepped.
            ok: ``(B,)`` acceptance mask of the step (`acceptance`).
            W: The rows' parameters before the step (stacked, state dtype).
            W_new: Their new values.
        """
        ok_param = self.params_ok(rows, ok, W_new)
        self.write_params(rows, ops.masked(ok_param, W_new, W))
        self.count_rejected(rows, ok_param)

    def commit_rows(
        self, rows: _Rows, finite: torch.Tensor, updates: dict[str, torch.Tensor], W: torch.Tensor, W_new: torch.Tensor
    ) -> None:
        """Ends a block step: a row whose gradient or new moments/statistics are not all finite keeps its state and
        parameter, one whose new parameter values alone are unusable keeps its parameter (both counted); the rest
        store ``updates`` and ``W_new``. No host sync.

        Args:
            rows: The rows stepped.
            finite: ``(B,)`` rows whose gradient is finite.
            updates: The rows' new state tensors (moments, statistics).
            W: The rows' parameters before the step (stacked, state dtype).
            W_new: Their new values.
        """
        ok = self.acceptance(finite, updates)
        self.write_accepted_params(rows, ok, W, W_new)
        self.accept_rows(rows, ok, updates)
        rows.commit()

    def _statistics(self, bucket: Bucket, rows: _Rows, G: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover
        """The rows' statistics after folding G (pure and unmasked: reads the state, returns new values)."""
        raise NotImplementedError

    def _step_buckets(self, buckets: list[Bucket]) -> None:
        work: list[tuple[Bucket, _Rows, Any]] = []
        touched: dict[int, torch.Tensor] = {}
        for bucket in buckets:
            by_key: dict[Any, list[int]] = defaultdict(list)
            for row, m in enumerate(bucket.members):
                g = m.param.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"{m.label}: sparse gradients are not supported by asteria optimizers; use a dense gradient "
                        "(e.g. nn.Embedding(..., sparse=False)) or optimize this parameter with torch.optim.SparseAdam"
                    )
                if g.shape != m.param.shape:
                    raise RuntimeError(f"{m.label}: gradient shape {tuple(g.shape)} != parameter shape")
                by_key[self._row_key(self.state[m.param])].append(row)
                touched[id(m.param)] = m.param
            rounding = self._rounding(bucket) if bucket.upcast is not None else None
            for key in sorted(by_key, key=repr):
                work.append((bucket, _Rows(bucket, by_key[key], rounding), key))
        if work:
            with torch.profiler.record_function(f"asteria.{type(self).__name__}.step"):
                self._step_rows(work)
            for p in touched.values():
                self._advance_param_state(self.state[p])

    def _advance_param_state(self, pstate: dict[str, Any]) -> None:
        pstate["step"] += 1

    #: Seed of the generators of the stochastic rounding of bfloat16 state (one per device; their states are
    #: checkpointed, so a resumed run draws what the uninterrupted one would have). Apart from torch's global
    #: generator, which bf16 state therefore leaves untouched.
    ROUNDING_SEED = 0x5EED_B16

    def _rounding(self, bucket: Bucket) -> torch.Generator:
        """The generator of the stochastic rounding of ``bucket``'s bfloat16 state (see `_Rows`)."""
        key = str(bucket.device)
        gen = self._rounding_rngs.get(key)
        if gen is None:
            gen = self._rounding_rngs[key] = torch.Generator(device=bucket.device)
            gen.manual_seed(self.ROUNDING_SEED)
        return gen

    # -- helpers for subclasses ------------------------------------------------------------------------------
    @staticmethod
    def stacked_grads(rows: _Rows, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacks the rows' gradient blocks in ``dtype``; returns ``(G, finite)``.

        Non-finite blocks are zeroed in ``G`` (so nothing downstream sees NaN/Inf); ``finite`` is a
        ``(B,)`` bool mask used to discard that step's updates for those blocks (no host sync). The test is a
        block sum (`asteria.optim.tensor_ops.finite_blocks`): a finite block whose sum overflows has an entry
        above ``max/numel``, whose square overflows, so where the step squares G (statistics, second moments)
        the block would be rejected anyway. Where nothing squares G (Shampoo with grafting ``"sgd"`` or
        ``"none"`` and no preconditioned dim) the rejection is conservative: such a block is rejected although
        its step might have stayed finite.
        """
        blocks = []
        for m in rows.members:
            g = m.param.grad.reshape(m.layout.merged_shape)[m.block.slices]
            blocks.append(g.to(dtype))
        G = torch.stack(blocks)
        finite = ops.finite_blocks(None, G)
        G = torch.where(finite.reshape((-1,) + (1,) * (G.dim() - 1)), G, torch.zeros((), dtype=dtype, device=G.device))
        return G, finite

    @staticmethod
    def stacked_params(rows: _Rows, dtype: torch.dtype) -> torch.Tensor:
        """Stacks the rows' parameter blocks in ``dtype`` (a copy)."""
        return torch.stack(
            [m.param.detach().reshape(m.layout.merged_shape)[m.block.slices].to(dtype) for m in rows.members]
        )

    def write_params(self, rows: _Rows, new: torch.Tensor) -> None:
        """Writes stacked new values back into the rows' parameter blocks (from here on, an exception escaping
        `step` leaves the optimizer refusing to continue: see `step`)."""
        self._state_touched = True
        for i, m in enumerate(rows.members):
            p = m.param
            if can_view(p, m.layout):
                p.detach().view(m.layout.merged_shape)[m.block.slices].copy_(new[i])
            else:
                tmp = p.detach().reshape(m.layout.merged_shape).clone()
                tmp[m.block.slices].copy_(new[i])
                p.detach().copy_(tmp.view(p.shape))

    # -- refresh plumbing -----------------------------------------------------------------------------------
    @staticmethod
    def member_keys(rows: _Rows | Sequence[Member]) -> list[tuple[int, int, int]]:
        """Stable ``(group, param, block)`` keys of the blocks of some rows or members (block ids change when
        buckets are rebuilt)."""
        members = rows.members if isinstance(rows, _Rows) else rows
        return [(m.group_index, m.param_index, m.block.index) for m in members]

    def refresh_phases(self) -> dict[str, list[int | None]]:
        """The refresh phase of every block, by parameter name (``param_names`` of the group, else
        ``"param_groups[g]['params'][i]"``), one entry per block: an int in ``[0, precondition_frequency)``
        (always 0 with aligned phases) or None for a block that is never refreshed (the AdamW fallback of 0-D and
        1-D parameters, Shampoo's unpreconditioned blocks). See `RuntimeConfig.refresh_phases`."""
        self._ensure_buckets()
        out: dict[str, list[int | None]] = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                phases: list[int | None] = []
                for blk in self._layout(p, group).blocks:
                    bucket, row = self._member_index[(gi, pi, blk.index)]
                    phases.append(bucket.members[row].phase if bucket.factored else None)
                out[self._param_name(group, gi, pi)] = phases
        return out

    def _refresh_due(self, t: int, group: dict[str, Any], phase: int | None = None, block: Any = None) -> bool:
        """Whether step t snapshots a refresh: of every block (aligned phases, ``phase`` None), or of the block with
        stable key ``block`` and staggered phase ``phase``."""
        raise NotImplementedError

    def refresh_rows(self, rows: _Rows, t: int, group: dict[str, Any]) -> list[int]:
        """The positions in ``rows`` of the blocks whose refresh step t is (all or none with aligned phases; with
        staggered ones, `RuntimeConfig.refresh_phases`, the blocks of the phases due at t)."""
        if not self.runtime.staggered:
            return list(range(len(rows.rows))) if self._refresh_due(t, group) else []
        members = rows.members
        keys = self.member_keys(members)
        return [k for k, (m, key) in enumerate(zip(members, keys)) if self._refresh_due(t, group, m.phase, key)]

    def _locate(self, keys: Sequence[Sequence[int]]) -> tuple[Bucket, list[int]]:
        """Maps stable block keys to their bucket and rows (all in one bucket, as when they were submitted)."""
        self._ensure_buckets()
        found = [self._member_index[tuple(int(x) for x in k)] for k in keys]
        bucket = found[0][0]
        if any(b is not bucket for b, _ in found):  # pragma: no cover - a batch never spans buckets
            raise RuntimeError(f"{type(self).__name__}: a refresh batch spans several buckets")
        return bucket, [r for _, r in found]

    def _install_tagged(self, tag: dict[str, Any], results: Sequence[Any]) -> None:
        """Installs a batch with `_install_batch`, once per bucket its blocks now lie in: a batch submitted before
        the buckets were split otherwise (a checkpoint's pending refresh loaded with other memory budgets) spans
        several. Results are ordered per factor, then per block (``results[i * n + k]``), as the jobs were."""
        self._ensure_buckets()
        keys = [tuple(int(x) for x in k) for k in tag["blocks"]]
        owners = [self._member_index[k][0] for k in keys]
        if all(b is owners[0] for b in owners):
            self._install_batch(tag, results)
            return
        n = len(keys)
        per_block = len(results) // n
        parts: dict[int, list[int]] = {}
        for k, bucket in enumerate(owners):
            parts.setdefault(id(bucket), []).append(k)
        for ks in parts.values():
            sub = dict(tag, blocks=[list(keys[k]) for k in ks])
            self._install_batch(sub, [results[i * n + k] for i in range(per_block) for k in ks])

    def installer(self, tag: dict[str, Any]) -> _WeakInstaller:
        """The installer of the refresh batch described by ``tag`` (see `_install_batch`)."""
        return _WeakInstaller(self, tag)

    #: Whether a step's installs gain from a second thread (``RuntimeConfig.parallel_install``). On the benchmark
    #: GPT (BENCHMARKS.md, ``asteria-bench overhead --no-parallel-install``) SOAP's rotations of the first moment
    #: gain most and Shampoo's root installs a little; KL-Shampoo's installs, which only copy the new bases, were
    #: faster on the training thread alone (handing them over cost more than the copies).
    _parallel_install_pays = True

    def _installs_thread_safe(self) -> bool:
        """Whether installs may run on a helper thread (see `_WeakInstaller.parallel_safe`)."""
        return self._tiers is None and self._buckets is not None and all(b.device.type == "cpu" for b in self._buckets)

    def _install_batch(self, tag: dict[str, Any], results: Sequence[Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def record_refresh_outcome(
        self, bucket: Bucket, row_list: Sequence[int], ok: Sequence[bool], messages: Sequence[str], tolerance: int
    ) -> None:
        """Updates the per-block consecutive-failure counters; raises past the tolerance.

        Args:
            bucket: The bucket refreshed.
            row_list: The bucket rows the refresh was for.
            ok: Per row, whether every job of the row succeeded (and was installed).
            messages: Per row, the failure message ("" when ok).
            tolerance: Consecutive failures tolerated; one more raises.

        Raises:
            RefreshFailureError: Naming the parameter/block, the count and the last message.
        """
        counter = bucket.state["refresh_failures"]
        with _OUTCOME_LOCK:  # batches of one step may be installed on two threads (parallel_install)
            for i, r in enumerate(row_list):
                if ok[i]:
                    counter[r] = 0
                else:
                    counter[r] += 1
                    self._refresh_failure_total += 1
                    if int(counter[r]) > tolerance:
                        m = bucket.members[r]
                        raise RefreshFailureError(
                            f"{type(self).__name__}: refresh of {m.label} failed {int(counter[r])} times in a row "
                            f"(tolerance {tolerance}); last error: {messages[i]}"
                        )

    def _nonfinite_total(self) -> int:
        if not self._buckets:
            return 0
        return int(sum(int(b.state["nonfinite_steps"].sum()) for b in self._buckets if "nonfinite_steps" in b.state))

    def nonfinite_steps(self) -> dict[str, int]:
        """Per block, how many of its steps were rejected or did not write its parameter (synchronises the device).

        A step is counted when the block's gradient holds NaN/Inf or its new statistics or moments would not be
        finite (`acceptance`; the step is rejected and the state kept), or when only its new parameter values
        would not be finite or not be representable in the parameter's dtype (`params_ok`; the parameter is not
        written). The first call of `SOAP`, `KLShampoo` and `KLSOAP`, which updates no parameter, counts the
        factored blocks whose gradient or first statistics were rejected. The total is
        ``runtime.stats()["nonfinite_steps"]``.

        Returns:
            The count per block, keyed by the block's label (parameter name, and the block for a split one).
        """
        out: dict[str, int] = {}
        for bucket in self._buckets or []:
            counts = bucket.state["nonfinite_steps"].tolist()
            for m, c in zip(bucket.members, counts):
                out[m.label] = int(c)
        return out

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Returns the param-keyed state (torch.optim layout) plus an ``"asteria"`` header.

        Per parameter: the scalar state (``step``, ...) and ``"blocks"``, one dict of tensors per block.
        """
        self._finish_installs()
        if self._failed_step is not None:
            raise StepFailedError(self._failed_step)
        self._ensure_buckets()
        out = super().state_dict()
        if self._tiers is not None:  # the offloaded bytes themselves (copies), brought in from every tier
            _fill_blocks(self, out, self._tiers.block_copies(self))
        out["asteria"] = _sd.header(self)
        # In-flight refreshes: waited for and stored with their results, so a resumed run installs the same
        # results at the same steps (bit-identical in deterministic mode).
        out["asteria"]["pending"] = self.runtime.export_pending()
        out["asteria"]["staleness"] = self.runtime.schedule.export()  # the S of each epoch (staleness="auto")
        if self._rounding_rngs:  # bfloat16 state: where the stochastic rounding's draws stand, per device
            out["asteria"]["rounding"] = {dev: gen.get_state() for dev, gen in self._rounding_rngs.items()}
        if self._dist is not None:  # a per-rank state: see asteria.gather_state_dict for a full one
            out["asteria"]["distributed"] = self._dist.header(out["asteria"]["pending"])
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a checkpoint from `state_dict`, refusing one from another optimizer or other shapes.

        Tensors are moved to each parameter's device and cast to this optimizer's ``state_dtype``, which is not taken
        from the checkpoint (unlike the other hyperparameters): a float32 checkpoint loads into a bfloat16 optimizer
        rounded to nearest once, a bfloat16 one into a float32 optimizer exactly.

        Raises:
            ValueError: If the checkpoint does not match this optimizer (type, groups, shapes, keys).
        """
        _dist.check_loadable(self, state_dict)
        if self.runtime.installs_running:  # finished (not cancelled) before the state is replaced; a failure is
            try:  # superseded by the load
                self.runtime.finish_installs()
            except Exception:  # noqa: BLE001 - the state it left is being replaced
                pass
        new_state = _sd.convert_for_load(self, state_dict)
        if self._tiers is not None:  # the current state out of the tiers, so a failed load can roll back to it
            self._detach_tiers()
        old = (self.state, self._buckets, [dict(g) for g in self.param_groups], self._rounding_rngs)
        try:
            for group, saved in zip(self.param_groups, state_dict["param_groups"]):
                for key, value in saved.items():
                    # the state dtype stays this optimizer's: the saved tensors are cast to it (`_sd.restore_block`)
                    if key not in ("params", "param_names", "state_dtype"):
                        group[key] = value
                self._validate_group(group)
            self.state = defaultdict(dict)
            for p, pstate in new_state.items():
                self.state[p] = pstate
            self._buckets = None
            self._ensure_buckets()
            pending = state_dict["asteria"].get("pending", [])
            if self._dist is not None:
                pending = self._dist.restrict_pending(pending)
            self.runtime.import_pending(pending, self.installer)
            self.runtime.schedule.load(state_dict["asteria"].get("staleness"))
            self._rounding_rngs = {}
            for dev, rng_state in (state_dict["asteria"].get("rounding") or {}).items():
                gen = self._rounding_rngs[dev] = torch.Generator(device=dev)
                gen.set_state(rng_state.cpu() if isinstance(rng_state, torch.Tensor) else rng_state)
            self._failed_step = None
        except Exception:
            self.state, self._buckets, self._rounding_rngs = old[0], old[1], old[3]
            for group, saved in zip(self.param_groups, old[2]):
                group.clear()
                group.update(saved)
            raise

    def _detach_tiers(self) -> None:
        """Tiered state: copies every block out of the tiers into ``state[p]["blocks"]`` (the buckets are then
        rebuilt from them) and releases the tiers' space."""
        if self._tiers is not None and self._buckets:
            for p, blocks in self._tiers.detach(self).items():
                self.state[p]["blocks"] = blocks
        self._buckets = None

    def close(self) -> None:
        """Stops the refresh runtime (worker threads) and removes the hooks. The optimizer cannot refresh afterwards."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self.runtime.close()

    def __enter__(self) -> BlockOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fill_blocks(opt: BlockOptimizer, out: dict[str, Any], blocks: dict[Any, list[dict[str, torch.Tensor]]]) -> None:
    """Puts each parameter's block copies into a packed ``state_dict()`` (torch numbers parameters in group order)."""
    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if index in out["state"] and p in blocks:
                out["state"][index] = {**out["state"][index], "blocks": blocks[p]}
            index += 1
