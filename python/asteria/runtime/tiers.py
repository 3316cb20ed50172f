"""Tiered optimizer state: every optimizer tensor has a lifecycle class and lives in a tier chosen from budgets.

**Registry.** Every tensor of every chunk (the stacked state of up to ``K`` same-shape blocks of one bucket, an
`asteria.optim.base.Bucket` itself; see *Chunks*) is registered with its chunk, its lifecycle class, its bytes and
its tier:

* classes: ``step`` (read and written every step: statistics, bases/roots, moments, counters), ``cold`` (only
  touched when a refresh is installed: failure counters and versions), and, held by the refresh runtime,
  ``shadow`` (the snapshots refresh jobs read) and ``result`` (finished results waiting for their install
  step);
* tiers: ``device`` (where the optimizer computes), ``host`` (asteria's page-locked pool), ``nvme`` (a private
  swap file through the io_uring pager), ``pageable`` (ordinary host memory outside the budgets: the small
  host-side counters of GPU buckets, none for CPU buckets) and ``refresh`` for the refresh runtime's own
  buffers (outside the state budgets).

`TierManager.report` (``opt.runtime.memory_report()``) accounts for 100% of these bytes, per tier and per class.

**Chunks.** With tiers, every bucket (all same-shape blocks of a param group, stacked) is split by `split` into
*chunks*: runs of consecutive blocks, the fewest of near-equal length whose packed state fits
``RuntimeConfig.max_chunk_bytes`` (None: ``min(host_budget // 6, device_budget // 4)`` over the budgets set, so
that a ring of three staging buffers takes at most half of ``host_budget``; one block per chunk when the budgets
cannot hold the state in chunks of that size). A chunk holds at least one block, and it starts only where each
of its matrices keeps the memory alignment it has in the whole bucket (`SPLIT_ALIGN`: after any block for dims
that are multiples of 32, after every 32nd block for odd dims), because MKL's batched products give other bits
for an odd-sized matrix at another alignment. The optimizer computes on chunks as it does on buckets: the
per-step math is batched over the chunk's blocks, and a refresh batch belongs to one chunk (a batch of a whole
bucket, from a checkpoint taken with other budgets, is installed chunk by chunk). Without tiers nothing is split.

**Budgets and placement.** ``device_budget`` bounds the state kept where the optimizer computes (GPU memory for
GPU parameters, including the work buffer that host and NVMe state is streamed through; ordinary process
memory for CPU parameters). ``host_budget`` bounds the pinned pool: host-tier state plus the staging buffers of
the NVMe tier. A chunk goes to the device tier if it fits, else to the host tier, else to NVMe (largest
chunks first, so the staging buffers stay small). None means "no limit" for the device and "no host-tier
state" for the host (the NVMe staging buffers are then allocated outside any budget). The chunk is the unit of
placement, so the minimum working set is the largest chunk (one block at the finest): a budget that cannot
hold it fails with the numbers and the smallest budget that works at that granularity.

**Residency.** Device-tier state is always resident. Host-tier state is computed on in place where the platform
allows it (CPU, unified memory) and copied into a device work buffer otherwise (discrete GPU). NVMe-tier state
is read into a ring of pinned staging buffers (registered with io_uring for fixed reads/writes) when it is used,
and written back when the optimizer moves on to another bucket. Accessing ``bucket.state`` makes that bucket
the *current* one (it is brought in, waiting for its read if needed); the previous current bucket becomes
evictable and its write-back starts at once; the next buckets in step order are prefetched into free buffers.
Prefetching also starts from the gradient hooks, while backward still runs. Code must not keep tensors of a
bucket's state across an access to another bucket's state (the optimizers never do: each bucket is processed,
committed and left before the next one).

**Numbers.** Tiers change where bytes are, never the bytes: buffers are 64-byte aligned, dtypes are kept, and a
chunk's blocks are computed at the same alignment as in the whole bucket, so training with any budgets is
bit-identical to training with everything in memory (invariant 4 of docs/design.md; `tests/test_runtime_tiers.py`
checks it at 4x oversubscription for the four optimizers). Measured on torch 2.13 (MKL, 1 and 2 threads): a
sub-stack of a batched matmul gives each matrix the bits it has in the whole stack for dims that are multiples of
8, and the one per-block reduction found whose order changes with the number of blocks (a multi-threaded sum over a
few large blocks) is the finiteness test of `asteria.optim.tensor_ops.finite_blocks`, which only decides
finite or not.

**I/O errors.** Every failed request of the NVMe tier is retried once at once (writes go to a fresh place of
the swap file; a retry that succeeds issues a `TierIOWarning` and is counted in ``movement["io_retries"]``). When
the retry fails too:

* a failed write-back (EIO, ENOSPC, short write) loses nothing: the bucket's bytes stay in their staging buffer
  (and the swap file keeps the previous copy), the write is tried again when the buffer is needed, and the
  OSError names the bucket, the bytes, ``nvme_path`` and the fix (free space there, another ``nvme_path``, a
  larger ``host_budget``). A write-back that fails while its bucket is used again is not even an error: the
  buffer holds the data.
* a failed read (EIO, short read, CRC mismatch) leaves the swap file as it was; nothing wrong is ever used.

What the error means for the optimizer depends on when it happens in ``step()``:

* before any bucket of the step was used (the first bucket's read, the write-backs of the previous step):
  nothing changed, the OSError says so, and ``step()`` may be called again once the cause is fixed;
* after some buckets were updated (their parameters and state) and before others were: parameters and state no
  longer match. The optimizer refuses to go on: the OSError says so, and from then on ``step()``,
  ``state_dict()``, ``acquire()`` and every access to its tiered state during a step raise `StepFailedError`
  (so no inconsistent checkpoint can be saved). ``load_state_dict()`` of the last checkpoint (with the model's own) makes it usable again.

**Swap file lifecycle and threat model.** Optimizer state is derived from the gradients, so it can leak
information about the training data. The swap file is created with mode 0600 in a fresh mode-0700 directory
(O_EXCL, no symlinks followed) and, by default, its name and the directory are removed as soon as the file is
open: the pager's descriptor keeps the storage, nothing else can open it by name, and the kernel frees it when
the process ends — also when it is killed (SIGKILL, the OOM killer), so no state is ever left behind under
``nvme_path``. ``memory_report()["pager"]["directory"]`` still names where the storage lives (a path that no
longer exists). The file is never referenced from a checkpoint (``state_dict()`` holds the bytes themselves).
It is not encrypted: use an encrypted file system for ``nvme_path`` when the drive is not trusted.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import itertools
import math
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import torch

from asteria.runtime import platform as _platform
from asteria.runtime.pinned import acquire as acquire_pinned, pool_report

if TYPE_CHECKING:  # pragma: no cover
    from asteria.runtime.config import RuntimeConfig

__all__ = [
    "ALIGN",
    "BudgetError",
    "CLASSES",
    "DEFAULT_COLD_KEYS",
    "StepFailedError",
    "TIERS",
    "TierIOWarning",
    "TierManager",
    "TieredState",
    "memory_report",
]

TIERS = ("device", "host", "nvme", "pageable", "refresh")
CLASSES = ("step", "cold", "shadow", "result")
DEFAULT_COLD_KEYS = ("refresh_failures", "basis_version", "root_version")
ALIGN = 64
PAGE = 4096
MAX_STAGING_BUFFERS = 3  # a read, the computation and a write-back in flight at once


class BudgetError(MemoryError):
    """The memory budgets cannot hold the optimizer state (the message gives the numbers and the fix)."""


class StepFailedError(RuntimeError):
    """An optimizer step was interrupted midway, by any exception after some parameters or state were updated (an
    I/O error of the NVMe tier, an out-of-memory error, a refresh failure past its tolerance, a KeyboardInterrupt
    the script caught...), so the parameters and the optimizer state no longer match: the optimizer refuses to
    continue until the last checkpoint is loaded (the message says what failed)."""


class TierIOWarning(RuntimeWarning):
    """A request of the NVMe tier failed once and succeeded when retried (the drive may be failing)."""


_NO_SPACE = (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _nb(n: int) -> str:
    return f"{n:,} bytes ({_fmt(n)})"


def _first(e: OSError) -> str:
    """An OSError's message without the ``[Errno N]`` prefix."""
    return str(e.strerror) if e.strerror else str(e)


@dataclasses.dataclass
class _Entry:
    """One tensor of a bucket."""

    key: str
    cls: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int | None  # in the packed buffer; None: kept apart (not on the bucket's device)


class _Slot:
    """A staging buffer (pinned lease) or a device work buffer."""

    __slots__ = ("index", "lease", "buf", "capacity", "rec", "state", "ticket", "last_use")

    def __init__(self, index: int, lease: Any, buf: torch.Tensor, capacity: int) -> None:
        self.index = index
        self.lease = lease
        self.buf = buf
        self.capacity = capacity
        self.rec: _Record | None = None
        self.state = "free"  # free | reading | clean | dirty | writing
        self.ticket: int | None = None
        self.last_use = 0


class _Record:
    """The registry entry of one bucket: its tensors, home tier and residency."""

    def __init__(self, owner: Any, bucket: Any, label: str, device: torch.device, entries: list[_Entry], seq: int) -> None:
        self.owner_id = id(owner)
        self.owner_name = type(owner).__name__
        self.bucket_ref = weakref.ref(bucket)
        self.label = label
        self.device = device
        self.entries = entries
        self.keys = [e.key for e in entries]
        self.packed = _packed_size(entries)
        self.seq = seq
        self.home: str | None = None
        self.copies = False  # computed through a device work buffer (discrete GPU)
        self.buffer: torch.Tensor | None = None  # device tier
        self.lease: Any = None  # host tier
        self.host_buf: torch.Tensor | None = None  # the lease as the tensor the views are cut from
        self.extent: int | None = None  # nvme tier
        self.apart: dict[str, torch.Tensor] = {}
        self.stage: _Slot | None = None
        self.work: _Slot | None = None
        self.views: dict[str, torch.Tensor] | None = None
        self.pins = 0
        self.adopted = False
        self.alive = True


def _packed_size(entries: list[_Entry]) -> int:
    end = 0
    for e in entries:
        if e.offset is not None:
            end = max(end, e.offset + e.nbytes)
    return max(end, 1)


def _layout(items: list[tuple[str, torch.dtype, tuple[int, ...], bool]], cold: set[str]) -> list[_Entry]:
    entries, offset = [], 0
    for key, dtype, shape, on_device in items:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        cls = "cold" if key in cold else "step"
        if on_device:
            entries.append(_Entry(key, cls, dtype, tuple(shape), nbytes, offset))
            offset = _align(offset + nbytes, ALIGN)
        else:
            entries.append(_Entry(key, cls, dtype, tuple(shape), nbytes, None))
    return entries


def _views(buf: torch.Tensor, entries: list[_Entry], apart: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state tensors of a bucket: views of its packed buffer, and the tensors kept apart (in entry order)."""
    out = {}
    for e in entries:
        if e.offset is None:
            if apart is not None:
                out[e.key] = apart[e.key]
            continue
        out[e.key] = buf[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
    return out


class TieredState(MutableMapping):
    """``bucket.state`` of a tiered bucket: reading it makes the bucket resident and current (see the module)."""

    __slots__ = ("_mgr", "_rec")

    def __init__(self, manager: TierManager, record: _Record) -> None:
        self._mgr = manager
        self._rec = record

    def _v(self) -> dict[str, torch.Tensor]:
        rec = self._rec
        if rec is self._mgr._current and rec.views is not None and rec.owner_id not in self._mgr._failed:
            return rec.views
        return self._mgr._use(rec)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._v()[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        views = self._v()
        if key not in views:
            raise KeyError(f"{key!r}: the state of a tiered bucket has a fixed set of tensors")
        views[key].copy_(value)

    def __delitem__(self, key: str) -> None:
        raise TypeError("the state of a tiered bucket has a fixed set of tensors")

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._rec.keys))

    def __len__(self) -> int:
        return len(self._rec.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._rec.keys

    def items(self):  # type: ignore[override]
        return self._v().items()

    def values(self):  # type: ignore[override]
        return self._v().values()

    def __repr__(self) -> str:
        return f"TieredState({self._rec.label}, tier={self._rec.home})"


class TierManager:
    """Registry, placement and residency of tiered optimizer state (see the module docstring).

    Created by `asteria.Runtime` when the configuration sets ``device_budget``, ``host_budget`` or
    ``nvme_path`` and shared by the optimizers using that runtime (one pager, one pinned pool, one set of
    budgets). Thread safety: every method may be called from the training thread and from autograd hooks.

    Args:
        config: The `RuntimeConfig` with the budgets.
        staging_buffers: Most staging buffers of the NVMe tier (1..3; fewer when the host budget is small).
        pager_options: Keyword options for ``_core.Pager`` (``backend``, ``queue_depth``, ...).

    Raises:
        OSError: ``nvme_path`` is not writable (the swap directory cannot be created there).
    """

    def __init__(self, config: RuntimeConfig, *, staging_buffers: int = MAX_STAGING_BUFFERS, pager_options: dict[str, Any] | None = None) -> None:
        from asteria import _core  # noqa: PLC0415

        if not 1 <= staging_buffers <= MAX_STAGING_BUFFERS:
            raise ValueError(f"staging_buffers must be in 1..{MAX_STAGING_BUFFERS}, got {staging_buffers!r}")
        self._core = _core
        self.config = config
        self.device_budget: int | None = config.device_budget
        self.host_budget: int | None = config.host_budget
        self.nvme_path = config.nvme_path
        self._max_stage = staging_buffers
        self._lock = threading.RLock()
        self._pool: Any = None
        self._pager: Any = None
        if self.nvme_path is not None:
            opts = dict(pager_options or {})
            self._pager = _core.Pager(directory=str(self.nvme_path), **opts)  # OSError for a bad path, at once
        self._records: list[_Record] = []
        self._stage: list[_Slot] = []
        self._stage_bytes = 0
        self._work: dict[str, _Slot] = {}
        self._work_bytes = 0
        self._current: _Record | None = None
        self._clock = itertools.count(1)
        self._seq = itertools.count()
        self._dead: list[_Record] = []
        self._closed = False
        self._registered = False
        self._cuda_register = False  # register the pinned pool with CUDA (GPU buckets, CUDA build)
        self._prefetch_armed = True
        # failures (see the module docstring): a step in progress, whether it used a bucket yet, and per owner
        # (optimizer id) why it refuses to continue / why its tiered state was discarded
        self._in_step = False
        self._step_used = False
        self._failed: dict[int, str] = {}
        self._discarded: dict[int, str] = {}
        self._watched: set[int] = set()  # owners whose death clears their entries (ids are reused)
        self._peak = {"device": 0, "host": 0}
        self._counters = {
            "h2d_bytes": 0,
            "d2h_bytes": 0,
            "demand_reads": 0,
            "prefetch_reads": 0,
            "prefetch_hits": 0,
            "write_backs": 0,
            "io_retries": 0,
            "io_wait_s": 0.0,
            "budget_checks": 0,
        }

    # -- registry ------------------------------------------------------------------------------------
    @property
    def pager(self) -> Any:
        """The ``_core.Pager`` of the NVMe tier (None without ``nvme_path``)."""
        return self._pager

    @property
    def closed(self) -> bool:
        return self._closed

    def _owner_records(self, owner: Any) -> list[_Record]:
        return [r for r in self._records if r.owner_id == id(owner) and r.alive]

    def _describe(self, opt: Any, bucket: Any) -> list[_Entry]:
        """The tensors ``opt`` would create for ``bucket``, from a dry run on the meta device (nothing allocated)."""
        meta = dataclasses.replace(bucket, device=torch.device("meta"), state={})
        group = opt.param_groups[bucket.group_index]
        st = opt._init_bucket_state(meta, group)
        items = []
        for key, t in st.items():
            on_device = t.device.type == "meta" or t.device == bucket.device
            items.append((key, t.dtype, tuple(t.shape), on_device))
        return _layout(items, set(getattr(opt, "_cold_state_keys", DEFAULT_COLD_KEYS)))

    def check_construction(self, opt: Any) -> None:
        """Plans the state of ``opt`` from its parameters without allocating it; raises `BudgetError` early."""
        from asteria.optim.base import Bucket, Member  # noqa: PLC0415

        table: dict[tuple[Any, ...], Any] = {}
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                layout = opt._layout(p, group)
                for blk in layout.blocks:
                    key = (gi, blk.shape, p.device, layout.factored)
                    if key not in table:
                        table[key] = Bucket(gi, blk.shape, layout.factored, p.device, [])
                    table[key].members.append(Member(p, gi, pi, layout, blk, "", 0))
        buckets = list(table.values())
        if not buckets:
            return
        with self._lock:
            self._process_dead()
            chunks = self.split(opt, buckets)
            self._check_fits(opt, chunks, raise_error=True)

    # -- chunks ---------------------------------------------------------------------------------------------
    def chunk_cap(self) -> int | None:
        """The most bytes of one chunk: ``max_chunk_bytes``, else ``min(host_budget // 6, device_budget // 4)`` over
        the budgets that are set; None when neither is set (the buckets stay whole)."""
        explicit = getattr(self.config, "max_chunk_bytes", None)
        if explicit is not None:
            return int(explicit)
        caps = []
        if self.host_budget is not None:  # a ring of MAX_STAGING_BUFFERS such chunks takes at most half of it
            caps.append(self.host_budget // (2 * MAX_STAGING_BUFFERS))
        if self.device_budget is not None:
            caps.append(self.device_budget // 4)
        return min(caps) if caps else None

    def split(self, opt: Any, buckets: list[Any]) -> list[Any]:
        """Splits ``opt``'s buckets into the chunks that are placed and staged as units (see the module docstring).

        Each bucket becomes the fewest runs of consecutive blocks, of near-equal length, whose packed state fits
        `chunk_cap` (at least one block each). With the automatic bound, when the budgets cannot hold the state in
        such chunks, every chunk is one block (the smallest working set). The blocks' order is kept, so the step
        visits them in the same order.

        Returns:
            The chunks (`asteria.optim.base.Bucket` objects; a bucket that fits the bound is returned as it is).
        """
        with self._lock:
            cap = self.chunk_cap()
            if cap is None:
                return list(buckets)
            chunks = [c for b in buckets for c in self._split_bucket(opt, b, cap)]
            if getattr(self.config, "max_chunk_bytes", None) is None and any(c.size > 1 for c in chunks):
                if not self._check_fits(opt, chunks, raise_error=False):
                    chunks = [c for b in buckets for c in self._split_bucket(opt, b, 0)]
            return chunks

    def _split_bucket(self, opt: Any, bucket: Any, cap: int) -> list[Any]:
        n = bucket.size
        q = _split_quantum(bucket.shape)
        units = -(-n // q)  # runs of q blocks (the last one may be shorter)
        if units <= 1:
            return [bucket]

        def packed(u: int) -> int:
            k = min(u * q, n)
            return _packed_size(self._describe(opt, dataclasses.replace(bucket, members=bucket.members[:k], state={})))

        if packed(units) <= cap:
            return [bucket]
        lo, hi = 1, units - 1  # the most runs whose packed state fits cap (at least 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if packed(mid) <= cap:
                lo = mid
            else:
                hi = mid - 1
        count = -(-units // lo)
        out, start = [], 0
        for i in range(count):  # near-equal numbers of runs, each <= lo
            length = (units // count + (1 if i < units % count else 0)) * q
            out.append(dataclasses.replace(bucket, members=bucket.members[start:start + length], state={}))
            start += length
        return out

    def _check_fits(self, opt: Any, chunks: list[Any], *, raise_error: bool) -> bool:
        """Whether the budgets hold ``chunks`` of ``opt`` next to the other optimizers' state (moving theirs if
        needed, as `begin` would); raises the `BudgetError` of the last attempt when ``raise_error``."""
        sizes = [_packed_size(self._describe(opt, c)) for c in chunks]
        copies = [not self._in_place(c.device) for c in chunks]
        note = _granularity(chunks, self.chunk_cap(), getattr(self.config, "max_chunk_bytes", None) is not None)
        try:
            self._plan(type(opt).__name__, sizes, copies, exclude=id(opt), note=note)
            return True
        except BudgetError:  # fits if the other optimizers' buckets move (as begin() would do)
            pass
        live = [r for r in self._records if r.alive and r.owner_id != id(opt)]
        try:
            self._plan(type(opt).__name__, [r.packed for r in live] + sizes,
                       [not self._in_place(r.device) for r in live] + copies, fresh=True, note=note)
            return True
        except BudgetError:
            if raise_error:
                raise
            return False

    def begin(self, opt: Any, buckets: list[Any]) -> None:
        """Registers the (new) buckets of ``opt`` and decides their tiers; call `adopt` for each after creating its state.

        Records of ``opt`` from earlier buckets are discarded first (`detach` them before when their state must
        be kept).

        Raises:
            BudgetError: The budgets cannot hold the state (numbers and the smallest budgets that work).
        """
        with self._lock:
            self._check_open()
            self._process_dead()
            for rec in self._owner_records(opt):
                self._unregister(rec)
            if id(opt) not in self._watched:
                self._watched.add(id(opt))
                weakref.finalize(opt, self._forget_owner, id(opt))
            self._check_recovered(opt, buckets)
            if not buckets:
                return
            descs = [self._describe(opt, b) for b in buckets]
            sizes = [_packed_size(d) for d in descs]
            copies = [not self._in_place(b.device) for b in buckets]
            if self._pool is None and any(b.device.type == "cuda" for b in buckets):
                self._cuda_register = self._can_alias(torch.device("cuda"))
            note = _granularity(buckets, self.chunk_cap(), getattr(self.config, "max_chunk_bytes", None) is not None)
            try:  # the new buckets in the room the others leave
                homes, stage_bytes, stage_n, work_bytes = self._plan(type(opt).__name__, sizes, copies, note=note)
                moves: dict[_Record, str] = {}
            except BudgetError:  # every bucket of the runtime placed again, moving some of the others
                live = [r for r in self._records if r.alive]
                homes_all, stage_bytes, stage_n, work_bytes = self._plan(
                    type(opt).__name__, [r.packed for r in live] + sizes,
                    [not self._in_place(r.device) for r in live] + copies, fresh=True, note=note,
                )
                moves = {r: h for r, h in zip(live, homes_all) if h != r.home}
                homes = homes_all[len(live):]
            work_devices = [b.device for b, c in zip(buckets, copies) if c]
            work_devices += [r.device for r in self._records if r.alive and not self._in_place(r.device)]
            try:
                saved = self._take_out(moves) if moves else {}
            except OSError as e:  # nothing moved yet
                raise self._rebuild_error(opt, e) from e
            pending = dict(moves)
            try:
                self._resize_work(work_bytes, work_devices, exact=bool(moves))
                self._resize_stage(stage_bytes, stage_n, exact=bool(moves))
                for rec, home in moves.items():
                    rec.home = home
                    rec.copies = not self._in_place(rec.device) and home != "device"
                    self._place(rec, saved[rec])
                    del pending[rec]
            except OSError as e:  # the buckets taken out and not placed again exist only in `saved`: lost
                for rec in pending:
                    self._fail_owner(rec.owner_id, rec.owner_name, f"its state was being moved between tiers: {_first(e)}")
                    self._unregister(rec)
                raise self._rebuild_error(opt, e) from e
            for bucket, desc, home, cp in zip(buckets, descs, homes, copies):
                label = _bucket_label(bucket)
                rec = _Record(opt, bucket, label, bucket.device, desc, next(self._seq))
                rec.home = home
                rec.copies = cp and home != "device"
                self._records.append(rec)
                weakref.finalize(bucket, self._dead.append, rec)
            self._register_staging()

    def adopt(self, opt: Any, bucket: Any) -> None:
        """Moves the freshly created ``bucket.state`` (a dict of tensors) into its tier and replaces it by a
        `TieredState`. The original tensors are released (so the whole state never exists in memory at once)."""
        with self._lock:
            rec = next((r for r in self._records if r.alive and r.bucket_ref() is bucket), None)
            if rec is None:
                raise RuntimeError(f"{type(opt).__name__}: tiers.adopt() of a bucket that begin() did not register")
            state: dict[str, torch.Tensor] = bucket.state
            got = [(k, t.dtype, tuple(t.shape)) for k, t in state.items()]
            want = [(e.key, e.dtype, e.shape) for e in rec.entries]
            if got != want:  # pragma: no cover - _init_bucket_state must not depend on the device
                raise RuntimeError(f"{rec.label}: the state created ({got}) differs from its dry run ({want})")
            for e in rec.entries:
                if e.offset is None:
                    rec.apart[e.key] = state[e.key]
            try:
                self._place(rec, state)
            except OSError as e:
                raise self._rebuild_error(opt, e) from e
            rec.adopted = True
            state.clear()
            bucket.state = TieredState(self, rec)
            self._note_usage()

    def _take_out(self, moves: dict[_Record, str]) -> dict[_Record, dict[str, torch.Tensor]]:
        """Copies the state of buckets changing tier out of their tiers (into ordinary memory) and frees those
        homes. Every copy is taken before any home is freed, so an I/O error leaves every bucket where it was."""
        self.flush()
        saved = {}
        for rec in moves:
            saved[rec] = {k: v.clone() for k, v in self._make_current(rec).items()}
            self._current = None
        for rec in moves:
            self._free_home(rec)
        return saved

    def _free_home(self, rec: _Record) -> None:
        """Releases what holds a bucket's data (buffer, lease, extent, staging and work buffers)."""
        if self._current is rec:
            self._current = None
        if rec.stage is not None:
            slot = rec.stage
            if slot.ticket is not None:
                try:
                    self._pager.wait(slot.ticket)
                except OSError:
                    pass  # the data is elsewhere (being moved) or being discarded
                slot.ticket = None
            slot.rec, rec.stage = None, None
            slot.state = "free"
        if rec.work is not None:
            rec.work.rec, rec.work = None, None
        if rec.extent is not None and self._pager is not None and not self._pager.closed:
            self._pager.release(rec.extent)
        rec.extent = None
        rec.lease = rec.host_buf = rec.buffer = None
        rec.views = None

    def _place(self, rec: _Record, state: dict[str, torch.Tensor]) -> None:
        """Puts a bucket's tensors into its (new) home tier."""
        if rec.home == "device":
            rec.buffer = torch.empty(rec.packed, dtype=torch.uint8, device=rec.device)
            rec.views = _views(rec.buffer, rec.entries, rec.apart)
            self._fill(rec.views, state)
        elif rec.home == "host":
            rec.lease = self._pool_acquire(_align(rec.packed, PAGE))
            rec.host_buf = self._host_tensor(rec.lease, rec)
            if rec.copies:
                self._fill(_views(rec.host_buf, rec.entries), state)
                self._counters["d2h_bytes"] += rec.packed
            else:
                rec.views = _views(rec.host_buf, rec.entries, rec.apart)
                self._fill(rec.views, state)
        else:
            rec.extent = self._pager.allocate(rec.packed)
            slot = self._claim_stage(rec, blocking=True)
            self._fill(_views(slot.buf, rec.entries), state)
            slot.rec, rec.stage = rec, slot
            slot.state = "dirty"
            slot.last_use = next(self._clock)
            self._start_write(slot)

    def detach(self, opt: Any) -> dict[Any, list[dict[str, torch.Tensor]]]:
        """Copies every block's state of ``opt`` out of the tiers and unregisters its buckets.

        An optimizer whose step failed midway has no consistent state to copy, and one whose state cannot be read
        back (an I/O error, also when retried) has none: its tiered state is discarded (nothing is returned), and
        the next `begin` accepts only buckets whose state is restored from a checkpoint (``load_state_dict``);
        otherwise it raises `StepFailedError`.

        Returns:
            Per parameter, its blocks' tensors (copies), in the layout of ``optimizer.state[p]["blocks"]``.
        """
        with self._lock:
            if id(opt) in self._failed:
                self._discarded[id(opt)] = self._failed.pop(id(opt))
                for rec in self._owner_records(opt):
                    self._unregister(rec)
                return {}
            try:
                out = self.block_copies(opt)
            except OSError as e:  # a bucket cannot be read back (it failed twice): its state is gone
                self._discarded[id(opt)] = (
                    f"asteria tiers: the state of this {type(opt).__name__} could not be read back from the NVMe tier "
                    f"({_first(e)}) and was discarded; reload the last checkpoint: model.load_state_dict(...) and "
                    "optimizer.load_state_dict(...)"
                )
                for rec in self._owner_records(opt):
                    self._unregister(rec)
                return {}
            for rec in self._owner_records(opt):
                self._unregister(rec)
            return out

    def block_copies(self, opt: Any) -> dict[Any, list[dict[str, torch.Tensor]]]:
        """Per parameter of ``opt``, copies of its blocks' state tensors (brought in from every tier).

        Raises:
            StepFailedError: A step of ``opt`` failed midway (no consistent state exists to copy).
            OSError: The NVMe tier cannot be read (nothing changed; the call may be repeated).
        """
        self._refuse(id(opt))
        out: dict[Any, list[dict[str, torch.Tensor]]] = {}
        for bucket in opt._buckets or []:
            state = bucket.state
            views = dict(state.items())
            for row, m in enumerate(bucket.members):
                blocks = out.setdefault(m.param, [{} for _ in m.layout.blocks])
                blocks[m.block.index] = {k: v[row].clone() for k, v in views.items()}
        return out

    # -- residency ---------------------------------------------------------------------------------------
    def _use(self, rec: _Record) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._in_step or not rec.alive:  # outside a step, reading (e.g. for stats) is harmless
                self._refuse(rec.owner_id)
            if not rec.alive or self._closed:
                raise RuntimeError(
                    f"{rec.label}: this tiered state was discarded (its optimizer's buckets were rebuilt, or the "
                    "runtime was closed, which removes the NVMe swap file)"
                )
            if self._current is rec and rec.views is not None:
                return rec.views
            try:
                views = self._make_current(rec)
            except OSError as e:
                raise self._step_error(rec, e) from e
            if self._in_step:
                self._step_used = True
            return views

    def _make_current(self, rec: _Record) -> dict[str, torch.Tensor]:
        """Brings ``rec`` in and makes it the current bucket (the previous one starts its write-back)."""
        prev, self._current = self._current, None
        if prev is not None and prev.alive:
            self._leave(prev)
        self._process_dead()
        self._bring_in(rec)
        self._current = rec
        self._prefetch_after(rec)
        return rec.views  # type: ignore[return-value]

    def acquire(self, bucket: Any) -> dict[str, torch.Tensor]:
        """Pins ``bucket`` (never evicted until `release`) and returns its resident state tensors.

        Raises:
            StepFailedError: A step of the bucket's optimizer failed midway.
        """
        with self._lock:
            rec = bucket.state._rec
            self._refuse(rec.owner_id)
            views = self._use(rec)
            rec.pins += 1
            return views

    def release(self, bucket: Any) -> None:
        """Undoes one `acquire`; the bucket's write-back starts when it is no longer pinned or current."""
        with self._lock:
            rec = bucket.state._rec
            if rec.pins <= 0:
                raise RuntimeError(f"{rec.label}: release() without acquire()")
            rec.pins -= 1

    def _leave(self, rec: _Record) -> None:
        """``rec`` stops being the current bucket: an NVMe bucket's write-back starts at once."""
        if rec.pins:
            return
        if rec.stage is not None and rec.work is None and rec.stage.state == "dirty":
            self._start_write(rec.stage)

    def _bring_in(self, rec: _Record) -> None:
        if rec.home == "device" or (rec.home == "host" and not rec.copies):
            return
        if rec.copies:
            if rec.work is not None:
                rec.work.last_use = next(self._clock)
                return
            slot = self._claim_work(rec)
            if rec.home == "host":
                slot.buf[: rec.packed].copy_(rec.host_buf[: rec.packed], non_blocking=True)
            else:
                stage = self._stage_in(rec)
                slot.buf[: rec.packed].copy_(stage.buf[: rec.packed])
                stage.rec, rec.stage = None, None  # the work buffer holds the current data now
                stage.state = "free"
            self._counters["h2d_bytes"] += rec.packed
            slot.rec, rec.work = rec, slot
            slot.state = "dirty"
            slot.last_use = next(self._clock)
            rec.views = _views(slot.buf, rec.entries, rec.apart)
            return
        self._stage_in(rec)
        rec.views = _views(rec.stage.buf, rec.entries, rec.apart)  # type: ignore[union-attr]

    def _stage_in(self, rec: _Record) -> _Slot:
        """Makes ``rec``'s data present in a staging buffer (waiting for a prefetch, or reading now)."""
        slot = rec.stage
        if slot is not None:
            if slot.state == "reading":
                self._counters["prefetch_hits"] += 1
                self._wait(slot)  # raises when the read failed twice (the slot is freed; the swap file is intact)
            elif slot.state == "writing":
                try:
                    self._wait(slot)  # the buffer holds the data whatever the write-back's outcome
                except OSError as e:  # the bytes stay in the buffer (dirty) and are written back later
                    slot.state = "dirty"
                    slot.last_use = next(self._clock)
                    self._report_kept([e])
            slot.state = "dirty"
            slot.last_use = next(self._clock)
            return slot
        slot = self._claim_stage(rec, blocking=True)
        self._start_read(slot, rec)
        self._counters["demand_reads"] += 1
        self._wait(slot)
        slot.state = "dirty"
        return slot

    def _claim_stage(self, rec: _Record, *, blocking: bool) -> _Slot | None:
        """A staging buffer for ``rec``: a free one, else the least recently used evictable one (a dirty one is
        written back first). Non-blocking: only buffers free now (a finished write-back counts)."""
        if not self._stage:
            raise RuntimeError("asteria tiers: the NVMe tier has no staging buffers (internal error)")
        kept: list[OSError] = []  # write-backs that failed for good; their bytes stay in their buffers (dirty)
        for slot in self._stage:
            if slot.ticket is not None and slot.state == "writing" and self._pager.ready(slot.ticket):
                try:
                    self._wait(slot)  # completes without blocking (a failure is retried at once)
                except OSError as e:
                    kept.append(e)
        free = [s for s in self._stage if s.state == "free"]
        if not free:
            free = [s for s in self._stage if s.state == "clean" and self._evictable(s.rec)]
        if free:
            slot = min(free, key=lambda s: s.last_use)
        elif not blocking:
            for s in self._stage:  # start write-backs so that a later prefetch finds room
                if s.state == "dirty" and self._evictable(s.rec):
                    self._start_write(s)
            self._report_kept(kept)
            return None
        else:
            busy = [s for s in self._stage if s.state in ("writing", "dirty", "reading") and self._evictable(s.rec)]
            if not busy:
                raise BudgetError(
                    f"asteria tiers: every staging buffer is in use (pinned buckets); {rec.label} cannot be brought "
                    "in. Raise host_budget so that more staging buffers fit."
                )
            found = None
            for cand in sorted(busy, key=lambda s: s.last_use):
                if cand.state == "dirty":
                    self._start_write(cand)
                try:
                    self._wait(cand, retry=cand.state == "writing")
                except OSError as e:
                    if cand.state != "free":  # a failed write-back: the bytes stay in this buffer; try another
                        kept.append(e)
                        continue
                    # a failed prefetch: the bucket stays in the swap file, the buffer is free
                found = cand
                break
            if found is None:  # every buffer holds bytes that cannot be written back: the bucket cannot come in
                raise kept[-1]
            slot = found
        if slot.rec is not None:
            slot.rec.stage = None
            if slot.rec.views is not None and slot.rec.work is None and slot.rec.home == "nvme":
                slot.rec.views = None
            slot.rec = None
        slot.state = "free"
        slot.last_use = next(self._clock)
        self._report_kept(kept)
        return slot

    @staticmethod
    def _report_kept(kept: list[OSError]) -> None:
        """Warns about write-backs that failed for good but lost nothing (their bytes stay in their buffers and
        are written back again later); an error is raised only when a bucket cannot be brought in."""
        for e in kept:
            warnings.warn(_first(e), TierIOWarning, stacklevel=4)

    def _evictable(self, rec: _Record | None) -> bool:
        return rec is None or (rec is not self._current and rec.pins == 0)

    def _claim_work(self, rec: _Record) -> _Slot:
        key = str(rec.device)
        slot = self._work.get(key)
        if slot is None:
            raise RuntimeError(f"asteria tiers: no device work buffer on {key} (internal error)")
        other = slot.rec
        if other is not None:
            if not self._evictable(other):
                raise BudgetError(
                    f"asteria tiers: the device work buffer on {key} holds the pinned {other.label}; {rec.label} "
                    "cannot be brought in. Raise device_budget."
                )
            self._evict_work(other)
        return slot

    def _evict_work(self, rec: _Record) -> None:
        """Copies a bucket out of the device work buffer to its home (the host lease, or NVMe via staging)."""
        slot = rec.work
        assert slot is not None
        if rec.home == "host":
            rec.host_buf[: rec.packed].copy_(slot.buf[: rec.packed])
        else:
            stage = self._claim_stage(rec, blocking=True)
            stage.buf[: rec.packed].copy_(slot.buf[: rec.packed])
            stage.rec, rec.stage = rec, stage
            stage.state = "dirty"
            stage.last_use = next(self._clock)
            self._start_write(stage)
        self._counters["d2h_bytes"] += rec.packed
        slot.rec, rec.work = None, None
        slot.state = "free"
        rec.views = None

    # -- I/O ----------------------------------------------------------------------------------------------------
    def _start_read(self, slot: _Slot, rec: _Record) -> None:
        slot.ticket = self._pager.read(rec.extent, slot.lease)
        slot.rec, rec.stage = rec, slot
        slot.state = "reading"
        slot.last_use = next(self._clock)

    def _start_write(self, slot: _Slot) -> None:
        rec = slot.rec
        assert rec is not None and slot.state == "dirty"
        slot.ticket = self._pager.write(rec.extent, slot.lease, _align(rec.packed, 1))
        slot.state = "writing"
        self._counters["write_backs"] += 1

    def _wait(self, slot: _Slot, *, retry: bool = True) -> None:
        """Completes the slot's request; a failed one is retried once at once (``retry``).

        When it fails for good, a failed write keeps the data (the slot stays dirty) and a failed read frees the
        slot (the swap file still holds the data); both raise an OSError naming the bucket, ``nvme_path`` and
        the fix (the pager's own error when ``retry`` is False). A retry that succeeds warns (`TierIOWarning`).
        """
        ticket, slot.ticket = slot.ticket, None
        if ticket is None:
            return
        t0 = time.perf_counter()
        retried = None
        try:
            try:
                self._pager.wait(ticket)
            except OSError as first:
                if not retry or slot.rec is None:
                    raise
                retried = self._retry_io(slot, first)
        except OSError:
            if slot.state == "writing":
                slot.state = "dirty"
            else:
                if slot.rec is not None:
                    slot.rec.stage = None
                    slot.rec.views = None
                slot.rec = None
                slot.state = "free"
            raise
        finally:
            self._counters["io_wait_s"] += time.perf_counter() - t0
        slot.state = "clean"  # a finished write-back, or a read: the buffer equals the swap file
        if retried is not None:
            warnings.warn(retried, TierIOWarning, stacklevel=2)

    def _retry_io(self, slot: _Slot, first: OSError) -> str:
        """Repeats the slot's failed request (a write goes to a fresh place of the swap file) and waits for it.

        Returns:
            The warning text when the retry succeeded.

        Raises:
            OSError: The retry failed too (see `_io_error`).
        """
        rec = slot.rec
        assert rec is not None and rec.extent is not None
        write = slot.state == "writing"
        try:
            if write:
                ticket = self._pager.write(rec.extent, slot.lease, rec.packed)
            else:
                ticket = self._pager.read(rec.extent, slot.lease)
            self._pager.wait(ticket)
        except OSError as second:
            raise self._io_error(rec, write, second) from first
        self._counters["io_retries"] += 1
        why = (
            f"{self.nvme_path!r} may be running out of space" if first.errno in _NO_SPACE
            else f"the drive holding {self.nvme_path!r} may be failing"
        )
        return (
            f"asteria tiers: {'writing back' if write else 'reading'} {rec.label} failed ({_first(first)}) and "
            f"succeeded when retried; {why}"
        )

    def _io_error(self, rec: _Record, write: bool, err: OSError) -> OSError:
        """The OSError of a request of ``rec`` that failed twice: what failed, what is kept, and the fix."""
        path = self.nvme_path
        if write:
            what = f"writing back {rec.label} ({_nb(rec.packed)}) to the NVMe tier in {path!r}"
            keep = (
                "Nothing is lost: the bucket's bytes stay in their staging buffer (the swap file keeps its previous "
                "copy) and are written back again when the buffer is needed."
            )
            if err.errno in _NO_SPACE:
                held = self._pager.stats()["file_bytes"] if not self._pager.closed else 0
                fix = (
                    f"Fix: free space in {path!r} (the swap file holds {_nb(held)} and needs {_nb(_align(rec.packed, PAGE))} "
                    "more for this bucket), choose another nvme_path with more room, or raise host_budget so that less "
                    "state goes to the NVMe tier."
                )
            else:
                fix = (
                    f"Fix: check the drive holding {path!r} (the kernel log names the failing device), choose another "
                    "nvme_path, or raise host_budget so that less state goes to the NVMe tier."
                )
        else:
            what = f"reading {rec.label} ({_nb(rec.packed)}) from the NVMe tier in {path!r}"
            keep = "The swap file is left as it was, and no wrong data was used."
            fix = (
                f"Fix: check the drive holding {path!r} (the kernel log names the failing device); if reads keep "
                "failing, this bucket's state is lost: reload the last checkpoint, with another nvme_path."
            )
        return OSError(err.errno, f"asteria tiers: {what} failed, also when retried: {_first(err)}. {keep} {fix}")

    def _prefetch(self, rec: _Record) -> bool:
        """Starts reading an NVMe bucket into a free staging buffer; False when no buffer is free now."""
        if rec.home != "nvme" or rec.stage is not None or rec.work is not None or not rec.adopted:
            return True
        slot = self._claim_stage(rec, blocking=False)
        if slot is None:
            return False
        self._start_read(slot, rec)
        self._counters["prefetch_reads"] += 1
        return True

    def _prefetch_after(self, rec: _Record) -> None:
        if not self._stage:
            return
        order = [r for r in self._records if r.owner_id == rec.owner_id and r.alive]
        try:
            i = order.index(rec)
        except ValueError:  # pragma: no cover
            return
        ahead = max(1, len(self._stage) - 1)
        for k in range(1, len(order)):
            nxt = order[(i + k) % len(order)]
            if nxt is rec:
                break
            if nxt.home != "nvme":
                continue
            if not self._prefetch(nxt) or ahead <= 1:
                break
            ahead -= 1

    def on_grad_ready(self) -> None:
        """From the gradient hooks: starts reading the first NVMe buckets of the coming step (once per step).

        Never raises an I/O error into backward: a failed request is seen again (and reported) by ``step()``."""
        if not self._prefetch_armed or not self._stage or self._closed:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            owners: dict[int, list[_Record]] = {}
            for r in self._records:
                if r.alive and r.home == "nvme" and r.owner_id not in self._failed:
                    owners.setdefault(r.owner_id, []).append(r)
            budget = len(self._stage)
            for recs in owners.values():
                for r in recs[:budget]:
                    if not self._prefetch(r):
                        return  # no free buffer yet (write-backs in flight): the next hook call retries
                budget -= min(budget, len(recs))
            self._prefetch_armed = False
        except OSError:
            pass  # the bytes of a failed write-back stay in their buffer; step() meets the error again
        finally:
            self._lock.release()

    def begin_step(self) -> None:
        """At the start of an optimizer step: an I/O error after a bucket of the step was used fails the step
        midway (the optimizer then refuses to continue; see the module docstring)."""
        with self._lock:
            self._in_step = True
            self._step_used = False

    def end_step(self) -> None:
        """At the end of an optimizer step (also one that raised): the current bucket's write-back starts, the
        budgets are checked."""
        with self._lock:
            try:
                cur, self._current = self._current, None
                if cur is not None and cur.alive and cur.owner_id not in self._failed:
                    self._leave(cur)
                self._prefetch_armed = True
                self._check_budgets()
            finally:
                self._in_step = False
                self._step_used = False

    def flush(self) -> None:
        """Writes every staged NVMe bucket back and waits (used before the staging ring changes).

        Raises:
            OSError: A write-back failed, also when retried; its bytes stay in their staging buffer.
        """
        with self._lock:
            self._current = None
            for rec in [r for r in self._records if r.work is not None]:
                self._evict_work(rec)
            for slot in self._stage:
                if slot.state == "dirty":
                    self._start_write(slot)
            failure: OSError | None = None
            for slot in self._stage:
                if slot.ticket is not None:
                    writing = slot.state == "writing"
                    try:
                        self._wait(slot, retry=writing)
                    except OSError as e:
                        if writing:  # (a failed prefetch read only freed its buffer)
                            failure = failure or e
            if failure is not None:
                raise failure

    # -- failures ------------------------------------------------------------------------------------------------
    def failure(self, opt: Any) -> str | None:
        """Why ``opt`` refuses to continue (a step of it failed midway), or None."""
        return self._failed.get(id(opt))

    def _forget_owner(self, owner_id: int) -> None:
        self._failed.pop(owner_id, None)
        self._discarded.pop(owner_id, None)
        self._watched.discard(owner_id)

    def _refuse(self, owner_id: int) -> None:
        msg = self._failed.get(owner_id)
        if msg is not None:
            raise StepFailedError(msg)

    def _fail_owner(self, owner_id: int, owner_name: str, cause: str) -> None:
        """Marks an optimizer as failed midway: its ``step()``, ``state_dict()``, ``acquire()`` and accesses to its tiered
        state during a step raise `StepFailedError` (reads outside a step stay allowed)."""
        self._failed.setdefault(
            owner_id,
            f"asteria tiers: a step of this {owner_name} failed midway ({cause}); its parameters and optimizer state "
            "no longer match, so it refuses to continue (step(), state_dict() and its state raise). Fix the cause, "
            "then reload the last checkpoint: model.load_state_dict(...) and optimizer.load_state_dict(...).",
        )
        if self._current is not None and self._current.owner_id == owner_id:
            self._current = None

    def _step_error(self, rec: _Record, e: OSError) -> OSError:
        """``e`` (an I/O error while bringing ``rec`` in) with what it means for the optimizer's step."""
        if not self._in_step:
            note = " Nothing was changed: the optimizer state is as it was, and the call may be repeated."
        elif self._step_used:
            self._fail_owner(rec.owner_id, rec.owner_name, _first(e))
            note = (
                " This step had already updated other buckets (their parameters and state), so parameters and state "
                f"no longer match: the {rec.owner_name} refuses to continue (step() and state_dict() raise "
                "StepFailedError). Fix the cause and reload the last checkpoint (model and optimizer)."
            )
        else:
            note = (
                " Nothing was changed by this step (no parameter or state was updated yet): fix the cause and call "
                "step() again."
            )
        return OSError(e.errno, _first(e) + note)

    def _at_risk(self, opt: Any) -> bool:
        """Whether ``opt`` holds state from earlier steps (a rebuild that fails midway may lose it)."""
        return any(p in opt.state and opt.state[p].get("step", 0) > 0 for g in opt.param_groups for p in g["params"])

    def _rebuild_error(self, opt: Any, e: OSError) -> OSError:
        """``e`` (an I/O error while placing ``opt``'s buckets) with what it means for the optimizer."""
        if self._at_risk(opt):
            self._fail_owner(id(opt), type(opt).__name__, f"placing its state in the tiers: {_first(e)}")
            note = (
                f" The {type(opt).__name__}'s state was being placed in the tiers and is not complete: it refuses to "
                "continue (step() and state_dict() raise StepFailedError). Fix the cause and reload the last "
                "checkpoint (model and optimizer)."
            )
        else:
            note = " Nothing was changed (the optimizer had no state yet): fix the cause and call step() again."
        return OSError(e.errno, _first(e) + note)

    def _check_recovered(self, opt: Any, buckets: list[Any]) -> None:
        """``begin`` of an optimizer that failed midway: accepted only when every block that had stepped is
        restored from a checkpoint (``load_state_dict``); then the optimizer may continue."""
        owner = id(opt)
        if owner not in self._failed and owner not in self._discarded:
            return
        for bucket in buckets:
            for m in bucket.members:
                pstate = opt.state[m.param]
                restore = pstate.get("_restore")
                restored = restore is not None and m.block.index < len(restore) and bool(restore[m.block.index])
                if pstate.get("step", 0) > 0 and not restored:
                    msg = self._failed.get(owner) or self._discarded[owner]
                    raise StepFailedError(f"{msg} ({m.label} has no state left to continue from)")
        self._failed.pop(owner, None)

    # -- buffers ------------------------------------------------------------------------------------------------
    def _in_place(self, device: torch.device) -> bool:
        return _platform.detect(device).host_state_in_place and (device.type == "cpu" or self._can_alias(device))

    def _can_alias(self, device: torch.device) -> bool:
        return device.type == "cuda" and bool(getattr(self._core, "cuda_built", lambda: False)())

    def _pool_acquire(self, nbytes: int) -> Any:
        if self._pool is None:
            budget = self.host_budget if self.host_budget is not None else 0
            budget = max(budget, 1)
            kwargs: dict[str, Any] = dict(budget_bytes=budget if self.host_budget is not None else (1 << 62), lock=True, cache_released=False)
            if self._cuda_register:  # copies to and from the GPU are DMA; unified memory reads it in place
                kwargs["cuda_register"] = True
            self._pool = self._core.PinnedPool(**kwargs)
        return acquire_pinned(self._pool, nbytes, "the host tier and the NVMe staging buffers")

    def pinned_report(self) -> dict[str, Any]:
        """`asteria.runtime.pinned.pool_report` of the host tier's pool (zeros before it exists)."""
        return pool_report(self._pool)

    def _host_tensor(self, lease: Any, rec: _Record) -> torch.Tensor:
        buf = torch.frombuffer(lease, dtype=torch.uint8)
        if rec.device.type == "cuda" and not rec.copies:  # unified memory: the GPU computes on the lease in place
            return _cuda_alias(lease, rec.device)
        return buf

    def _resize_stage(self, slot_bytes: int, count: int, exact: bool = False) -> None:
        """Makes the staging ring ``count`` buffers of ``slot_bytes`` (grows it; ``exact``: also shrinks it)."""
        slot_bytes = _align(slot_bytes, PAGE) if slot_bytes else 0
        if exact:
            if slot_bytes == self._stage_bytes and count == len(self._stage):
                return
        elif slot_bytes <= self._stage_bytes and (count <= len(self._stage) or not slot_bytes):
            return
        self.flush()
        for slot in self._stage:
            if slot.rec is not None:
                slot.rec.stage = None
                slot.rec.views = None
        self._stage = []
        if self._registered and self._pager is not None:
            self._pager.register_buffers([])
            self._registered = False
        self._stage_bytes = slot_bytes
        for i in range(count if slot_bytes else 0):
            lease = self._pool_acquire(slot_bytes)
            self._stage.append(_Slot(i, lease, torch.frombuffer(lease, dtype=torch.uint8), lease.capacity))

    def _register_staging(self) -> None:
        if self._pager is not None and self._stage and not self._registered:
            # Registration needs an idle pager: the write-backs of buckets just placed or moved may be in flight.
            for slot in self._stage:
                if slot.ticket is not None:
                    self._wait(slot, retry=slot.state == "writing")
            self._registered = bool(self._pager.register_buffers([s.lease for s in self._stage]))

    def _resize_work(self, nbytes: int, devices: list[torch.device], exact: bool = False) -> None:
        """One device work buffer of ``nbytes`` per device computing through copies (grows; ``exact``: also shrinks)."""
        if exact:
            if nbytes == self._work_bytes and {str(d) for d in devices} == set(self._work):
                return
        elif nbytes <= self._work_bytes and all(str(d) in self._work for d in devices):
            return
        for rec in [r for r in self._records if r.work is not None]:
            self._evict_work(rec)
        self._work_bytes = nbytes if exact else max(nbytes, self._work_bytes)
        if not self._work_bytes:
            self._work = {}
            return
        keys = {str(d): d for d in devices} if exact else {str(d): d for d in devices} | {k: s.buf.device for k, s in self._work.items()}
        self._work = {}
        for key, dev in keys.items():
            buf = torch.empty(self._work_bytes, dtype=torch.uint8, device=dev)
            self._work[key] = _Slot(0, None, buf, self._work_bytes)

    @staticmethod
    def _fill(views: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        for key, view in views.items():
            if view is not state[key]:
                view.copy_(state[key])

    # -- placement ---------------------------------------------------------------------------------------------
    def _usage(self, exclude: int | None = None, fresh: bool = False) -> tuple[int, int]:
        """(device bytes, host lease bytes) of the registered state, without the buffers (0 when ``fresh``)."""
        dev = host = 0
        for r in [] if fresh else self._records:
            if not r.alive or r.owner_id == exclude:
                continue
            if r.home == "device":
                dev += r.packed
            elif r.home == "host":
                host += _align(r.packed, PAGE)
        return dev, host

    def _try(self, sizes: list[int], copies: list[bool], dev_budget: int | None, host_budget: int | None, slots: int, exclude: int | None, fresh: bool = False) -> tuple[Any, ...]:
        """One placement attempt: ``(homes, stage_bytes, work_bytes)``, or ``(None, reason, need)``.

        ``fresh``: every bucket of the runtime is in ``sizes`` (a placement from scratch, no buffers kept)."""
        n = len(sizes)
        used_dev, used_host = self._usage(exclude, fresh)
        inf = float("inf")
        dcap = inf if dev_budget is None else dev_budget - used_dev
        hcap = inf if host_budget is None else host_budget - used_host
        order = sorted(range(n), key=lambda i: (-sizes[i], i))
        w0 = 0 if fresh else self._work_bytes
        w = w0
        homes: list[str | None] = [None] * n
        for _ in range(n + 2):  # the work buffer grows with what it must hold: a fixed point
            cap = dcap - w
            if cap < 0:
                return None, "device", w
            homes = [None] * n
            used = 0
            for i in order:
                if used + sizes[i] <= cap:
                    homes[i] = "device"
                    used += sizes[i]
            need = max([w0] + [sizes[i] for i in range(n) if homes[i] is None and copies[i]])
            if need <= w:
                break
            w = need
        rest = [i for i in order if homes[i] is None]
        s0 = 0 if fresh else self._stage_bytes
        s = s0
        host_state = self.host_budget is not None
        for _ in range(n + 2):
            ring = slots * _align(s, PAGE) if s else 0
            cap = (hcap - ring) if host_state else 0
            if host_state and cap < 0:
                return None, "host", ring
            used = 0
            for i in rest:
                homes[i] = None
                if host_state and used + _align(sizes[i], PAGE) <= cap:
                    homes[i] = "host"
                    used += _align(sizes[i], PAGE)
            nvme = [i for i in rest if homes[i] is None]
            if nvme and self._pager is None:
                return None, "nvme", sum(_align(sizes[i], PAGE) for i in nvme)
            need = max([s0] + [sizes[i] for i in nvme])
            if need <= s:
                break
            s = need
        for i in rest:
            if homes[i] is None:
                homes[i] = "nvme"
        return homes, s, w

    def _plan(self, who: str, sizes: list[int], copies: list[bool], exclude: int | None = None, fresh: bool = False,
              note: str = "") -> tuple[list[str], int, int, int]:
        """Decides the tier of each new chunk; returns ``(homes, stage_bytes, stage_buffers, work_bytes)``.

        Args:
            fresh: ``sizes`` are every chunk of the runtime, placed from scratch (the others may move).
            note: What the unit of placement is, for the error message (`_granularity`).

        Raises:
            BudgetError: With the numbers and the smallest budgets that work.
        """
        counts = [len(self._stage)] if self._stage and not fresh else list(range(self._max_stage, 0, -1))
        failure: tuple[Any, ...] = ()
        for slots in counts:
            out = self._try(sizes, copies, self.device_budget, self.host_budget, slots, exclude, fresh)
            if out[0] is not None:
                homes, s, w = out
                return homes, s, (slots if s else 0), w
            failure = out
        raise BudgetError(self._budget_message(who, sizes, copies, failure, counts[-1], exclude, fresh, note))

    def _smallest(self, which: str, sizes: list[int], copies: list[bool], slots: int, exclude: int | None, fresh: bool = False) -> int | None:
        hi = sum(_align(x, PAGE) for x in sizes) * 2 + (slots + 1) * _align(max(sizes), PAGE) + (1 << 20)
        if which == "host" and self.host_budget is None:
            return None

        def works(b: int) -> bool:
            d = b if which == "device" else self.device_budget
            h = b if which == "host" else self.host_budget
            return self._try(sizes, copies, d, h, slots, exclude, fresh)[0] is not None

        if not works(hi):
            return None
        lo = 0
        while lo < hi:
            mid = (lo + hi) // 2
            if works(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _budget_message(self, who: str, sizes: list[int], copies: list[bool], failure: tuple[Any, ...], slots: int,
                        exclude: int | None, fresh: bool = False, note: str = "") -> str:
        _, reason, need = failure
        total = sum(sizes)
        dev = "None (no limit)" if self.device_budget is None else _nb(self.device_budget)
        host = "None (no host tier)" if self.host_budget is None else _nb(self.host_budget)
        head = (
            f"asteria tiers: {who}'s optimizer state needs {_nb(total)} in {len(sizes)} chunks (the largest "
            f"{_nb(max(sizes))}; {note or 'a chunk of same-shape blocks is the unit of placement'}), but "
            f"device_budget={dev} and host_budget={host} "
        )
        used_dev, used_host = self._usage(exclude, fresh)
        if fresh and len(sizes) > 0 and any(r.alive for r in self._records):
            head += "(with the other optimizers of this runtime) "
        if used_dev or used_host:
            head += f"(of which other optimizers of this runtime use {_nb(used_dev)} and {_nb(used_host)}) "
        if reason == "device":
            why = (
                f"cannot hold the device work buffer that host and NVMe state is computed in ({_nb(need)}, the "
                "largest such chunk). "
            )
        elif reason == "host":
            why = (
                f"cannot hold the staging buffers of the NVMe tier ({_nb(need)}: {slots} of the largest NVMe "
                "chunk, page-rounded). "
            )
        else:
            why = f"cannot hold it and nvme_path is not set ({_nb(need)} do not fit). "
        fixes = []
        sd = self._smallest("device", sizes, copies, slots, exclude, fresh)
        if sd is not None:
            fixes.append(f"the smallest device_budget that works with host_budget={host} is {_nb(sd)}")
        sh = self._smallest("host", sizes, copies, slots, exclude, fresh)
        if sh is not None:
            fixes.append(f"the smallest host_budget that works with device_budget={dev} is {_nb(sh)}")
        if self._pager is None:
            fixes.append("or set nvme_path to a directory on a fast drive")
        if not fixes:
            fixes.append("raise device_budget")
        return head + why + "Fix: " + "; ".join(fixes) + "."

    # -- accounting ----------------------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        """Bytes charged to each budget now: ``device`` (device-tier state + work buffers) and ``host``
        (host-tier leases + staging buffers)."""
        dev, host = self._usage()
        dev += self._work_bytes * len(self._work)
        host += sum(s.capacity for s in self._stage)
        return {"device": dev, "host": host}

    def _note_usage(self) -> dict[str, int]:
        u = self.usage()
        for k in ("device", "host"):
            self._peak[k] = max(self._peak[k], u[k])
        return u

    def _check_budgets(self) -> None:
        u = self._note_usage()
        self._counters["budget_checks"] += 1
        if self.device_budget is not None and u["device"] > self.device_budget:
            raise RuntimeError(f"asteria tiers: device tier holds {_nb(u['device'])} > device_budget {_nb(self.device_budget)} (internal error)")
        if self.host_budget is not None and u["host"] > self.host_budget:
            raise RuntimeError(f"asteria tiers: host tier holds {_nb(u['host'])} > host_budget {_nb(self.host_budget)} (internal error)")

    def report(self, opt: Any) -> dict[str, Any]:
        """Bytes of ``opt``'s state per tier and class (see `memory_report`), with budgets, buffers and pager I/O."""
        with self._lock:
            self._process_dead()
            table = _empty_table()
            per_bucket = []
            for r in self._owner_records(opt):
                counts = {c: 0 for c in CLASSES}
                for e in r.entries:
                    tier = r.home if e.offset is not None else "pageable"
                    table[tier][e.cls] += e.nbytes
                    counts[e.cls] += e.nbytes
                per_bucket.append(
                    {
                        "bucket": r.label,
                        "tier": r.home,
                        "bytes": sum(e.nbytes for e in r.entries),
                        "packed_bytes": r.packed,
                        "resident": r.home != "nvme" or r.stage is not None or r.work is not None,
                    }
                )
            out: dict[str, Any] = {"tiered": True, "bytes": table, "buckets": per_bucket}
            u = self.usage()
            out["budgets"] = {
                "device": self.device_budget,
                "host": self.host_budget,
                "nvme_path": None if self.nvme_path is None else str(self.nvme_path),
                "device_used": u["device"],
                "host_used": u["host"],
                "device_peak": self._peak["device"],
                "host_peak": self._peak["host"],
            }
            out["buffers"] = {
                "staging_buffers": len(self._stage),
                "staging_buffer_bytes": self._stage_bytes,
                "staging_bytes": sum(s.capacity for s in self._stage),
                "work_buffer_bytes": self._work_bytes,
                "work_buffers": len(self._work),
            }
            out["movement"] = dict(self._counters)
            if self._pager is not None and not self._pager.closed:
                ps = self._pager.stats()
                out["pager"] = {
                    "backend": ps["backend"],
                    "direct_io": ps["direct_io"],
                    "directory": ps["directory"],
                    "registered_buffers": ps["registered_buffers"],
                    "fixed_ops": ps["fixed_ops"],
                    "bytes_read": ps["bytes_read"],
                    "bytes_written": ps["bytes_written"],
                    "reads": ps["reads"],
                    "writes": ps["writes"],
                    "file_bytes": ps["file_bytes"],
                    # disk space the swap file holds: its extents' space, reserved a little ahead (fallocate)
                    "reserved_bytes": max(ps["file_bytes"], ps["preallocated_bytes"]),
                    "read_gbps": ps["bytes_read"] / ps["read_busy_s"] / 1e9 if ps["read_busy_s"] > 0 else 0.0,
                    "write_gbps": ps["bytes_written"] / ps["write_busy_s"] / 1e9 if ps["write_busy_s"] > 0 else 0.0,
                    "io_errors": ps["io_errors"],
                }
            devices = {str(r.device) for r in self._owner_records(opt)}
            out["platform"] = [_platform.detect(d).as_dict() for d in sorted(devices)]
            return out

    # -- lifecycle --------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("asteria tiers: the runtime was closed")

    def _process_dead(self) -> None:
        while self._dead:
            rec = self._dead.pop()
            if rec.alive:
                self._unregister(rec)

    def _unregister(self, rec: _Record) -> None:
        rec.alive = False
        self._free_home(rec)
        rec.apart = {}
        if rec in self._records:
            self._records.remove(rec)

    def close(self) -> None:
        """Waits for I/O, removes the swap directory and frees the buffers (idempotent). Tiered state not saved
        with ``state_dict()`` before is gone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for slot in self._stage:
                if slot.ticket is not None:
                    try:
                        self._pager.wait(slot.ticket)
                    except OSError:
                        pass
                    slot.ticket = None
            for rec in list(self._records):
                rec.alive = False
                rec.views = None
            self._records = []
            self._stage = []
            self._work = {}
            if self._pager is not None:
                self._pager.close()


def _empty_table() -> dict[str, dict[str, int]]:
    return {t: {c: 0 for c in CLASSES} for t in TIERS}


SPLIT_ALIGN = 32
"""A bucket is split only after ``k`` blocks where ``k·g`` is a multiple of this many elements (``g``: the gcd of the
block's dims), so that every stacked tensor of a chunk keeps the alignment its blocks have in the whole bucket."""


def _split_quantum(shape: tuple[int, ...]) -> int:
    """The fewest blocks of ``shape`` a chunk boundary may fall after (see `SPLIT_ALIGN`).

    MKL's batched products compute a matrix whose size is not a multiple of the SIMD width differently when its
    address is aligned differently (measured on torch 2.13: in a ``(4, 9, 8) @ (4, 8, 9)`` product the matrices of
    the sub-stack ``[1:4]`` get other bits than in the whole stack, and so does the whole stack written to an output
    shifted by one float), so a chunk may start only where each of its matrices has the alignment it has in the
    whole bucket: after any block when the gcd ``g`` of the block's dims is a multiple of 32 (every dimension of
    the usual models), after every ``32 / gcd(32, g)``-th block otherwise (every 32nd for odd dims).
    """
    g = 0
    for d in shape:
        g = math.gcd(g, int(d))
    g = g or 1
    return SPLIT_ALIGN // math.gcd(SPLIT_ALIGN, g)


def _granularity(chunks: list[Any], cap: int | None, explicit: bool) -> str:
    """What the unit of placement of ``chunks`` is, for `BudgetError` messages."""
    if cap is None:
        return "a bucket, every same-shape block of a param group, is the unit of placement"
    held = any(c.size > 1 and _split_quantum(c.shape) > 1 for c in chunks)
    odd = (
        f"; a bucket of blocks whose dims' gcd g is not a multiple of {SPLIT_ALIGN} is split only after multiples of "
        f"{SPLIT_ALIGN}/gcd({SPLIT_ALIGN}, g) blocks, which keeps the batched products' bits" if held else ""
    )
    if all(c.size == 1 for c in chunks):
        return "one block per chunk: the smallest unit of placement" + odd
    where = f"max_chunk_bytes={_nb(cap)}" if explicit else _nb(cap)
    return f"a chunk of same-shape blocks within {where} (at least one block) is the unit of placement" + odd


def _bucket_label(bucket: Any) -> str:
    first = bucket.members[0].name if bucket.members else "?"
    more = f" and {len(bucket.members) - 1} more blocks" if len(bucket.members) > 1 else ""
    return f"bucket {tuple(bucket.shape)} of param group {bucket.group_index} ({first}{more})"


def _cuda_alias(lease: Any, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over a CUDA-registered pinned lease (unified memory: the GPU reads it in place)."""

    class _Array:
        def __init__(self) -> None:
            self.__cuda_array_interface__ = {
                "shape": (lease.capacity,),
                "typestr": "|u1",
                "data": (int(lease.address), False),
                "version": 3,
                "strides": None,
            }

    t = torch.as_tensor(_Array(), device=device)
    t._asteria_lease = lease  # type: ignore[attr-defined] - keeps the memory alive with the tensor
    return t


def memory_report(opt: Any) -> dict[str, Any]:
    """Bytes of ``opt``'s state per tier and per lifecycle class (``opt.runtime.memory_report()``).

    Returns:
        ``{"bytes": {tier: {class: n}}, "tiers": {tier: n}, "classes": {class: n}, "state_bytes": n,
        "total_bytes": n, ...}``. Tiers ``device``, ``host``, ``nvme`` hold the state (classes ``step`` and
        ``cold``); ``refresh`` holds the refresh runtime's buffers (``shadow`` snapshots in its pinned pool and
        ``result``\\ s waiting for their install step). ``state_bytes`` equals the bytes of every state tensor
        (what ``state_dict()`` holds per block); ``total_bytes`` adds the refresh buffers. With budgets it
        also has ``budgets`` (limits, use and peaks), ``buffers`` (staging and work buffers), ``movement``
        (copies, reads, prefetch hits) and ``pager`` (bytes read/written and GB/s, ``file_bytes`` used by the
        extents, ``reserved_bytes`` of disk space the swap file holds). ``pinned`` has, for the pool of shadow
        snapshots and for the host tier's pool (``"shadow"``, ``"state"``), the bytes mapped, page-locked and not
        (``unlocked_bytes``: memory meant to be pinned that is pageable, see `PinnedMemoryWarning`) and the pool's
        warning. ``runtime`` splits the memory the runtime holds beyond the state (``shadow_pool``, ``state_pool``,
        ``results``, ``worker_scratch``, see `_runtime_bytes`), ``runtime_bytes`` is its sum and
        ``footprint_bytes`` = ``state_bytes`` + ``runtime_bytes``: what the optimizer adds to the process's memory,
        the figure to compare with a measured growth of RSS (pools count what they have mapped, not only what is
        in use).
    """
    tiers = getattr(opt, "_tiers", None)
    if tiers is not None:
        out = tiers.report(opt)
    else:
        table = _empty_table()
        cold = set(getattr(opt, "_cold_state_keys", DEFAULT_COLD_KEYS))
        for bucket in getattr(opt, "_buckets", None) or []:
            for key, t in bucket.state.items():
                tier = "device" if t.device == bucket.device else "pageable"
                table[tier]["cold" if key in cold else "step"] += t.numel() * t.element_size()
        out = {"tiered": False, "bytes": table}
    refresh = opt.runtime.refresh_buffer_bytes() if hasattr(opt.runtime, "refresh_buffer_bytes") else {}
    for cls in ("shadow", "result"):
        out["bytes"]["refresh"][cls] += int(refresh.get(cls, 0))
    table = out["bytes"]
    out["tiers"] = {t: sum(table[t].values()) for t in TIERS}
    out["classes"] = {c: sum(table[t][c] for t in TIERS) for c in CLASSES}
    out["state_bytes"] = out["classes"]["step"] + out["classes"]["cold"]
    out["total_bytes"] = sum(out["tiers"].values())
    runtime = getattr(opt.runtime, "runtime", None)
    out["pinned"] = {
        "shadow": runtime.pinned_report() if hasattr(runtime, "pinned_report") else pool_report(None),
        "state": tiers.pinned_report() if tiers is not None else pool_report(None),
    }
    out["runtime"] = _runtime_bytes(out, tiers is not None)
    out["runtime_bytes"] = sum(out["runtime"].values())
    out["footprint_bytes"] = out["state_bytes"] + out["runtime_bytes"]
    return out


def _runtime_bytes(report: dict[str, Any], tiered: bool) -> dict[str, int]:
    """The memory the runtime holds beyond the state itself, as the process sees it (mapped, not only in use).

    * ``shadow_pool``: the shadow pool's mappings (snapshots, the results the jobs write over them, and the free
      arenas the pool keeps for the next round);
    * ``state_pool``: the host tier's pool beyond the host-tier state it holds (staging and work buffers, free
      arenas);
    * ``results``: refresh results waiting for their install step outside the pool;
    * ``worker_scratch``: the refresh workers' LAPACK and BLAS working memory (per thread, its largest job's;
      process-wide, shared by every optimizer of the process).
    """
    from asteria import _core  # noqa: PLC0415 - the pure-Python paths of this module need no extension

    host_state = sum(report["bytes"]["host"].values()) if tiered else 0
    return {
        "shadow_pool": int(report["pinned"]["shadow"]["reserved_bytes"]),
        "state_pool": max(int(report["pinned"]["state"]["reserved_bytes"]) - host_state, 0),
        "results": int(report["bytes"]["refresh"]["result"]),
        "worker_scratch": int(_core.linalg.scratch_bytes()),
    }

