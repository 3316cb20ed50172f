"""Distributed refresh: ownership by cost, batched node-aware exchange of results, optional sharded state.

In a multi-process run (``torch.distributed`` initialised, ``RuntimeConfig.process_group``) every rank
holds the same parameters and, after the user's gradient all-reduce (DDP or by hand), the same
gradients, so every rank would compute the same refreshes. asteria computes each one once:

* **Ownership.** Every block (one parameter block with all its Kronecker factors) gets one owner rank,
  chosen by `assign_owners`, a pure function of a block list sorted the same way on every rank: greedy
  longest-processing-time over a cost model (≈ d³ per factor refresh, plus the bytes of its result
  over the node link and, with sharded state, the per-step update cost and the state bytes), first
  over nodes, then over the ranks of the chosen node. Ownership is sticky: blocks added later
  (``add_param_group``) are placed around the existing ones.
* **Exchange.** A refresh batch is *planned* on every rank (`ResultExchange.plan`: who owns each job and
  how many bytes its result takes), but only the owner submits its jobs. At the install step of the
  install rule (deterministic installs are forced), every rank enters the same *round*: the results of
  every batch due at that step are packed, per owner, in one flat byte buffer (a 16-byte round header,
  then per job a 128-byte header with the ok flag, status, latency and message, then the outputs),
  broadcast inside each node, exchanged between node leaders (each result crosses between two nodes
  once), and broadcast by each leader inside its node. Failed jobs travel as failures, so every rank
  takes the same decision. Every output an install reads travels, the rotation ``R = Q_oldᵀ·Q_new`` of
  SOAP's and KL-SOAP's host refreshes included, and the owner installs the result read back from its
  own buffer, as the other ranks read it: every rank installs the same bytes through the same code.
  The owners' buffers are checked against the round header (step and a hash of the planned jobs), so
  ranks that disagree raise instead of installing garbage. With ``staleness=0``
  this is the synchronous algorithm; with S > 0 the owners compute while training goes on.
* **Sharded state** (``shard_state=True``): each rank keeps the per-step state of its own blocks only
  (its buckets hold only those rows), updates them, and the parameters are all-gathered after every
  step (ZeRO-1 style). Results then never leave their owner.
* **Robustness.** The optimizer's collectives run on dedicated process groups created with
  ``timeout=dist_timeout``; a rank that dies or stops taking part becomes a `DistributedError` on the
  others. At the first step every rank's configuration (hyperparameters, runtime settings, parameter
  shapes, topology, ownership) is all-gathered and a mismatch raises an error naming what differs.
* **Checkpoints.** ``state_dict()`` is per rank and resumes bit-identically on the same rank with the
  same world size; `gather_state_dict` merges the ranks' states into one single-process state that
  loads with any world size (sharded or not).

The dedicated groups are created collectively over the default group at the first step, so with
``process_group="auto"`` every process of the job must step the optimizer. A ``ProcessGroup`` passed
explicitly is used as it is (its own timeout; one node).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from asteria.runtime.pipeline import StoredResult

__all__ = [
    "BatchPlan",
    "BlockCost",
    "DistributedCoordinator",
    "DistributedError",
    "LinkModel",
    "ResultExchange",
    "Topology",
    "assign_owners",
    "gather_state_dict",
    "job_bytes",
    "job_spec",
    "rank_loads",
    "resolve_process_group",
]


class DistributedError(RuntimeError):
    """A distributed run cannot go on: a rank died or timed out, or the ranks disagree on the configuration."""


# --------------------------------------------------------------------------------------------------
# topology
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Topology:
    """Ranks of a process group arranged in nodes of ``local_world_size`` consecutive ranks.

    Attributes:
        world_size: Ranks in the group.
        rank: This process's rank in the group.
        local_world_size: Ranks per node (divides ``world_size``); node k holds ranks
            ``[k·n, (k+1)·n)``, and its leader is rank ``k·n``.
    """

    world_size: int
    rank: int
    local_world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"Topology: rank {self.rank} outside a world of {self.world_size}")
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(
                f"Topology: {self.local_world_size} ranks per node do not divide the world size {self.world_size}; "
                "set RuntimeConfig(local_world_size=...) to the number of ranks on each node"
            )

    @classmethod
    def detect(cls, world_size: int, rank: int, local_world_size: int | None = None) -> Topology:
        """The topology from an explicit ``local_world_size``, else ``LOCAL_WORLD_SIZE`` (torchrun), else one node."""
        lws = local_world_size
        if lws is None:
            env = os.environ.get("LOCAL_WORLD_SIZE")
            lws = int(env) if env and env.isdigit() and int(env) >= 1 else world_size
        return cls(world_size, rank, min(lws, world_size))

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def node(self) -> int:
        return self.node_of(self.rank)

    def node_of(self, rank: int) -> int:
        return rank // self.local_world_size

    def node_ranks(self, node: int) -> range:
        return range(node * self.local_world_size, (node + 1) * self.local_world_size)

    def leader(self, node: int) -> int:
        return node * self.local_world_size

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader(self.node)


# --------------------------------------------------------------------------------------------------
# ownership cost model (pure functions)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LinkModel:
    """Throughputs turning flops and bytes into seconds for the ownership cost model.

    Attributes:
        flops_per_s: Refresh throughput of one rank's workers (LAPACK on a few cores).
        intra_bytes_per_s: Bandwidth inside a node (shared memory, NVLink, PCIe).
        inter_bytes_per_s: Bandwidth between nodes (the network), usually the scarce one.
    """

    flops_per_s: float = 2e10
    intra_bytes_per_s: float = 2e10
    inter_bytes_per_s: float = 2e9


@dataclasses.dataclass(frozen=True)
class BlockCost:
    """What owning one block costs.

    Attributes:
        key: A stable key, identical on every rank (``(group, param, block)``); ties are broken by it.
        refresh_flops: One refresh of the block: ``Σ_i d_i³`` over its factors (0: never refreshed).
        result_bytes: Bytes of one refresh's results in the exchange.
        step_flops: The per-step update (matters with sharded state).
        state_bytes: Per-step optimizer state of the block (matters with sharded state).
        refresh_interval: Steps between refreshes (the refresh cost per step is ``refresh_flops / interval``).
    """

    key: tuple[int, ...]
    refresh_flops: float = 0.0
    result_bytes: int = 0
    step_flops: float = 0.0
    state_bytes: int = 0
    refresh_interval: float = 1.0


def _criteria(block: BlockCost, shard_state: bool, links: LinkModel) -> tuple[list[float], list[float]]:
    """Per block, the cost vectors balanced over nodes and over the ranks of a node."""
    compute = block.refresh_flops / links.flops_per_s
    node = [compute + block.result_bytes / links.inter_bytes_per_s]
    rank = [compute + block.result_bytes / links.intra_bytes_per_s]
    if shard_state:
        per_step = block.refresh_flops / max(block.refresh_interval, 1.0) / links.flops_per_s
        node = [per_step, block.step_flops, float(block.state_bytes)]
        rank = list(node)
    return node, rank


def assign_owners(
    blocks: Sequence[BlockCost],
    topology: Topology,
    *,
    shard_state: bool = False,
    links: LinkModel | None = None,
    fixed: dict[tuple[int, ...], int] | None = None,
) -> list[int]:
    """Chooses the owner rank of every block (deterministic; identical on every rank for the same input).

    Greedy longest-processing-time: blocks in decreasing cost (ties by key) go, one at a time, to the node
    whose load would grow the least (loads are vectors with sharded state: refresh per step, update flops,
    state bytes, each normalised by its total, and the largest component counts), then to the least
    loaded rank of that node. Without sharded state a block's cost is its refresh time plus the time its
    result takes over the node's link (inter-node for the node choice, intra-node for the rank choice).

    Args:
        blocks: The blocks (any order; the result is aligned with it).
        topology: World size and nodes.
        shard_state: Balance per-step cost and memory as well as refresh cost.
        links: Throughputs of the cost model (default `LinkModel()`).
        fixed: Owners already decided (kept; their cost counts in the loads).

    Returns:
        The owner rank of each block, aligned with ``blocks``.
    """
    links = links or LinkModel()
    fixed = fixed or {}
    world, lws = topology.world_size, topology.local_world_size
    nodes = topology.num_nodes
    vecs = [_criteria(b, shard_state, links) for b in blocks]
    m = len(vecs[0][0]) if vecs else 1
    totals_node = [sum(v[0][c] for v in vecs) or 1.0 for c in range(m)]
    totals_rank = [sum(v[1][c] for v in vecs) or 1.0 for c in range(m)]
    norm_node = [[v[0][c] / totals_node[c] for c in range(m)] for v in vecs]
    norm_rank = [[v[1][c] / totals_rank[c] for c in range(m)] for v in vecs]
    node_load = [[0.0] * m for _ in range(nodes)]
    rank_load = [[0.0] * m for _ in range(world)]
    owners: list[int | None] = [None] * len(blocks)

    def add(load: list[float], cost: list[float]) -> None:
        for c in range(m):
            load[c] += cost[c]

    for i, b in enumerate(blocks):
        owner = fixed.get(tuple(b.key))
        if owner is not None and 0 <= owner < world:
            owners[i] = owner
            add(node_load[topology.node_of(owner)], norm_node[i])
            add(rank_load[owner], norm_rank[i])
    order = sorted(
        (i for i in range(len(blocks)) if owners[i] is None), key=lambda i: (-sum(norm_rank[i]), tuple(blocks[i].key))
    )

    def score(load: list[float], cost: list[float], capacity: int) -> tuple[float, float]:
        after = [(load[c] + cost[c]) / capacity for c in range(m)]
        return (max(after), sum(after))

    for i in order:
        node = min(range(nodes), key=lambda n: (score(node_load[n], norm_node[i], lws), n))
        rank = min(topology.node_ranks(node), key=lambda r: (score(rank_load[r], norm_rank[i], 1), r))
        owners[i] = rank
        add(node_load[node], norm_node[i])
        add(rank_load[rank], norm_rank[i])
    return [int(o) for o in owners]  # type: ignore[arg-type]


def rank_loads(blocks: Sequence[BlockCost], owners: Sequence[int], world_size: int) -> dict[str, list[float]]:
    """Per rank, the assigned refresh flops, result bytes, per-step flops and state bytes (for reports and tests)."""
    out = {name: [0.0] * world_size for name in ("refresh_flops", "result_bytes", "step_flops", "state_bytes")}
    for b, r in zip(blocks, owners):
        out["refresh_flops"][r] += b.refresh_flops
        out["result_bytes"][r] += b.result_bytes
        out["step_flops"][r] += b.step_flops
        out["state_bytes"][r] += b.state_bytes
    return out


# --------------------------------------------------------------------------------------------------
# wire format of refresh results
# --------------------------------------------------------------------------------------------------
#: Output arrays of each job kind: (name, rank of the array, dtype or None for the job's dtype, optional).
#: An optional output has its space reserved in the buffer and a bit in the job header saying whether it was
#: written; a result without it is installed without it on every rank.
_OUTPUTS: dict[str, tuple[tuple[str, int, str | None, bool], ...]] = {
    "eigh": (("eigenvalues", 1, None, False), ("eigenvectors", 2, None, False)),
    "inverse_root": (("root", 2, None, False),),
    "eigenbasis_refresh": (("basis", 2, None, False), ("permutation", 1, "int64", False)),
    # a host refresh that also computed R = Q_oldᵀ·Q_new (SOAP, KL-SOAP): R travels with the basis, so that every
    # rank rotates the first moment with the owner's R instead of some ranks recomputing it at install
    "eigenbasis_refresh+rotation": (
        ("basis", 2, None, False), ("permutation", 1, "int64", False), ("rotation", 2, None, True),
    ),
}
_STATUSES = ("ok", "failed", "cancelled")
_ROUND_HEADER = 16  # signature (8 bytes) + step (8 bytes)
_JOB_HEADER = 128  # ok (1), status (1), message length (2), optional outputs written (1), pad (3), latency f64 (8),
# message (112)
_MESSAGE_BYTES = _JOB_HEADER - 16


def _align(n: int) -> int:
    return (n + 7) & ~7


def _output_layout(spec: tuple[str, int, str]) -> list[tuple[str, tuple[int, ...], np.dtype, bool]]:
    kind, n, dtype = spec
    return [(name, (n,) * dims, np.dtype(dt or dtype), optional) for name, dims, dt, optional in _OUTPUTS[kind]]


def job_spec(job: Any) -> tuple[str, int, str]:
    """``(kind, n, dtype)`` of a `RefreshJob`'s result in the exchange (fixes its size in the buffer).

    A host eigenbasis refresh computes the rotation ``R = Q_oldᵀ·Q_new`` unless its options say
    ``rotation=False`` (the scheduler's default is True); device refreshes compute none.
    """
    a = job.a  # a host array, or a CUDA tensor on the device route
    kind = str(job.kind)
    on_device = isinstance(a, torch.Tensor) and a.is_cuda
    if kind == "eigenbasis_refresh" and not on_device and bool(job.options.get("rotation", True)):
        kind = "eigenbasis_refresh+rotation"
    return (kind, int(a.shape[0]), str(a.dtype).replace("torch.", ""))


def job_bytes(spec: tuple[str, int, str]) -> int:
    """Bytes one job takes in an exchange buffer (header plus its outputs, each 8-byte aligned)."""
    return _JOB_HEADER + sum(_align(int(np.prod(shape)) * dt.itemsize) for _, shape, dt, _ in _output_layout(spec))


def _stable_hash(value: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Who computes each job of a refresh batch and what its result looks like (identical on every rank).

    Attributes:
        owners: The owner rank of each job.
        specs: ``(kind, n, dtype)`` of each job (fixes the size of its result in the exchange).
        signature: A hash of the batch (version, deadline, blocks, factors, kinds, sizes), checked in the
            exchange.
    """

    owners: tuple[int, ...]
    specs: tuple[tuple[str, int, str], ...]
    signature: int

    def owned_by(self, rank: int) -> list[bool]:
        return [o == rank for o in self.owners]

    def to_dict(self) -> dict[str, Any]:
        return {"owners": list(self.owners), "specs": [list(s) for s in self.specs], "signature": int(self.signature)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchPlan:
        specs = tuple((str(k), int(n), str(t)) for k, n, t in d["specs"])
        return cls(tuple(int(o) for o in d["owners"]), specs, int(d["signature"]))


def _pack_job(buf: np.ndarray, offset: int, spec: tuple[str, int, str], res: Any) -> tuple[int, StoredResult]:
    """Writes one owned result at ``offset``; returns the next offset and the result every rank will install.

    The owner installs what it wrote, read back from the buffer as every other rank reads it (`_unpack_job`):
    the same outputs, dtypes and layout, whatever else its local result holds. A result whose outputs do not
    match the plan travels (and is installed) as a failure; a missing optional output travels as missing.
    """
    layout = _output_layout(spec)
    ok = bool(res.ok)
    message = str(res.message)
    arrays: list[np.ndarray | None] = []
    if ok:
        outputs = res.outputs
        for name, shape, dt, optional in layout:
            arr = outputs.get(name)
            if isinstance(arr, torch.Tensor):
                arr = arr.detach().cpu().numpy()
            if arr is None and optional:
                arrays.append(None)
                continue
            if arr is None or tuple(np.shape(arr)) != shape or np.asarray(arr).dtype != dt:
                got = None if arr is None else f"{np.asarray(arr).dtype}{tuple(np.shape(arr))}"
                ok, message = False, f"refresh output {name!r} is {got}, expected {dt}{shape}"
                arrays = []
                break
            arrays.append(np.ascontiguousarray(arr, dtype=dt))
    status = "ok" if ok else (str(res.status) if str(res.status) in _STATUSES[1:] else "failed")
    encoded = message.encode("utf-8", "replace")[:_MESSAGE_BYTES]
    head = buf[offset : offset + _JOB_HEADER]
    head[:] = 0
    head[0] = 1 if ok else 0
    head[1] = _STATUSES.index(status)
    head[2:4] = np.frombuffer(np.uint16(len(encoded)).tobytes(), np.uint8)
    head[8:16] = np.frombuffer(np.float64(float(getattr(res, "latency_s", 0.0))).tobytes(), np.uint8)
    head[16 : 16 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    pos = offset + _JOB_HEADER
    written = 0
    for bit, ((name, shape, dt, optional), arr) in enumerate(zip(layout, arrays)):
        nbytes = int(np.prod(shape)) * dt.itemsize
        if arr is not None:
            buf[pos : pos + nbytes] = arr.reshape(-1).view(np.uint8)
            written |= 1 << bit
        pos += _align(nbytes)
    head[4] = written
    return _unpack_job(buf, offset, spec, int(res.version), int(res.deadline))


def _unpack_job(
    buf: np.ndarray, offset: int, spec: tuple[str, int, str], version: int, deadline: int
) -> tuple[int, StoredResult]:
    """Reads the job written by `_pack_job` at ``offset``; returns the next offset and the result."""
    head = buf[offset : offset + _JOB_HEADER]
    ok = bool(head[0])
    status = _STATUSES[int(head[1])] if int(head[1]) < len(_STATUSES) else "failed"
    length = int(np.frombuffer(head[2:4].tobytes(), np.uint16)[0])
    written = int(head[4])
    latency = float(np.frombuffer(head[8:16].tobytes(), np.float64)[0])
    message = head[16 : 16 + length].tobytes().decode("utf-8", "replace")
    outputs: dict[str, np.ndarray] = {}
    pos = offset + _JOB_HEADER
    for bit, (name, shape, dt, _) in enumerate(_output_layout(spec)):
        nbytes = int(np.prod(shape)) * dt.itemsize
        if ok and written >> bit & 1:
            outputs[name] = buf[pos : pos + nbytes].copy().view(dt).reshape(shape)
        pos += _align(nbytes)
    return offset + job_bytes(spec), StoredResult(ok, status, message, outputs, version, deadline, latency_s=latency)


# --------------------------------------------------------------------------------------------------
# communication: dedicated groups, timeouts turned into clear errors, byte counters
# --------------------------------------------------------------------------------------------------
class _Comm:
    """The optimizer's process groups and wrapped collectives.

    Groups (all created with ``timeout=dist_timeout`` when the parent is the default group): ``world``
    (gloo, every rank: configuration check and results), ``local`` (gloo, the ranks of this node),
    ``leaders`` (gloo, one rank per node) and ``params`` (the parent's backend: the sharded-state
    all-gather of parameters, on the device with NCCL).
    """

    def __init__(self, group: Any, topology: Topology, timeout: float) -> None:
        import torch.distributed as dist

        self.topology = topology
        self.timeout = float(timeout)
        self.ranks = list(dist.get_process_group_ranks(group))  # group rank -> global rank
        self.wait_s = 0.0
        td = datetime.timedelta(seconds=self.timeout)
        default = dist.group.WORLD
        self.own_groups = group is default
        backend = str(dist.get_backend(group))
        self.params_on_host = "nccl" not in backend.lower()  # gloo all-gathers host tensors; NCCL on the device
        if not self.own_groups:
            # A group given explicitly is used as it is: one node, its own timeout.
            self.world = self.local = self.params = group
            self.leaders = None
            self.topology = Topology(topology.world_size, topology.rank, topology.world_size)
            return
        self.world = dist.new_group(self.ranks, timeout=td, backend="gloo")
        lws = self._agree_local_world_size(topology)
        self.topology = topology = Topology(topology.world_size, topology.rank, lws)
        self.local = None
        if topology.local_world_size == topology.world_size:
            self.local = self.world
        elif topology.local_world_size > 1:
            for node in range(topology.num_nodes):  # every rank creates every node's group, in order
                g = dist.new_group([self.ranks[r] for r in topology.node_ranks(node)], timeout=td, backend="gloo")
                if node == topology.node:
                    self.local = g
        self.leaders = None
        if topology.num_nodes > 1:
            if topology.local_world_size == 1:
                self.leaders = self.world
            else:
                self.leaders = dist.new_group(
                    [self.ranks[topology.leader(n)] for n in range(topology.num_nodes)], timeout=td, backend="gloo"
                )
        self.params = self.world if backend == "gloo" else dist.new_group(self.ranks, timeout=td, backend=backend)

    def _agree_local_world_size(self, topology: Topology) -> int:
        values = self.all_gather_object(topology.local_world_size, "the topology check")
        if len(set(values)) != 1:
            raise DistributedError(
                "asteria: the ranks disagree on the number of ranks per node (LOCAL_WORLD_SIZE / "
                f"RuntimeConfig.local_world_size): {dict(enumerate(values))}"
            )
        return int(values[0])

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - every backend failure becomes one clear error
            waited = time.perf_counter() - start
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"asteria: rank {self.topology.rank} of {self.topology.world_size}: {what} failed after {waited:.1f} s "
                f"(dist_timeout {self.timeout:g} s): a rank died, stopped taking part, or runs a different optimizer "
                f"configuration. Cause: {cause}"
            ) from exc
        finally:
            self.wait_s += time.perf_counter() - start

    def broadcast(self, tensor: torch.Tensor, src: int, group: Any, what: str) -> None:
        import torch.distributed as dist

        self._call(what, dist.broadcast, tensor, src=self.ranks[src], group=group)

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.topology.world_size
        self._call(what, dist.all_gather_object, out, obj, group=self.world)
        return out

    def gather_object(self, obj: Any, dst: int, what: str) -> list[Any] | None:
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.topology.world_size if self.topology.rank == dst else None
        self._call(what, dist.gather_object, obj, out, dst=self.ranks[dst], group=self.world)
        return out

    def all_gather_tensor(self, out: torch.Tensor, inp: torch.Tensor, what: str) -> None:
        import torch.distributed as dist

        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._call(what, fn, out, inp, group=self.params)


# --------------------------------------------------------------------------------------------------
# the result exchange (the RefreshPipeline's hook)
# --------------------------------------------------------------------------------------------------
class ResultExchange:
    """Plans refresh batches and completes them at their install step (see the module docstring).

    The `RefreshPipeline` calls `plan` at submit (it submits only the jobs `BatchPlan.owned_by` this
    rank) and `complete` at the install step with every due batch of the round.
    """

    def __init__(self, topology: Topology, comm: Callable[[], _Comm]) -> None:
        self.topology = topology
        self._comm = comm
        self._owner_of_block: dict[int, int] = {}
        self.counters: dict[str, Any] = {
            "rounds": 0,
            "jobs_owned": 0,
            "jobs_received": 0,
            "bytes_received_intra": 0,
            "bytes_received_inter": 0,
            "flat_bytes_received_inter": 0,
            "results_received_inter": 0,
            "exchange_s": 0.0,
        }

    @property
    def rank(self) -> int:
        return self.topology.rank

    @staticmethod
    def plan_from_dict(d: dict[str, Any]) -> BatchPlan:
        """A plan saved in a checkpoint (`BatchPlan.to_dict`)."""
        return BatchPlan.from_dict(d)

    def set_owners(self, owner_of_block: dict[int, int]) -> None:
        """Sets the owner rank of every block id (called whenever the optimizer builds its buckets)."""
        self._owner_of_block = dict(owner_of_block)

    def plan(self, jobs: Sequence[Any]) -> BatchPlan:
        """The plan of a batch of `RefreshJob`s (pure: the same on every rank)."""
        owners, specs, ident = [], [], []
        for job in jobs:
            owner = self._owner_of_block.get(int(job.block_id))
            if owner is None:
                raise RuntimeError(f"[ResultExchange.plan] block {job.block_id} has no owner (buckets not partitioned)")
            spec = job_spec(job)
            owners.append(owner)
            specs.append(spec)
            ident.append((int(job.block_id), int(job.factor), spec))
        signature = _stable_hash((int(jobs[0].version), int(jobs[0].deadline), ident))
        self.counters["jobs_owned"] += sum(1 for o in owners if o == self.rank)
        return BatchPlan(tuple(owners), tuple(specs), signature)

    def complete(
        self, step: int, batches: Sequence[tuple[BatchPlan, Sequence[Any]]], versions: Sequence[tuple[int, int]]
    ) -> list[list[Any]]:
        """Runs one exchange round: every rank contributes its owned results and receives all the others.

        Args:
            step: The install step (every rank runs the same rounds at the same steps).
            batches: ``(plan, local results)`` per due batch, in install order; a local result is None
                for a job this rank does not own.
            versions: ``(version, deadline)`` per batch (stamped on the received results).

        Returns:
            Per batch, the results of every job in job order (identical bytes on every rank).

        Raises:
            DistributedError: A rank died, timed out, or planned a different round.
        """
        start = time.perf_counter()
        topo = self.topology
        me = topo.rank
        signature = _stable_hash((int(step), [p.signature for p, _ in batches]))
        sizes = job_spec_sizes([p for p, _ in batches], topo.world_size)
        counts = [0] * topo.world_size
        for plan, _ in batches:
            for owner in plan.owners:
                counts[owner] += 1
        out: list[list[Any]] = [list(local) for _, local in batches]
        mine = np.zeros(sizes[me], np.uint8)
        if sizes[me]:
            mine[:8] = np.frombuffer(np.int64(signature).tobytes(), np.uint8)
            mine[8:16] = np.frombuffer(np.int64(step).tobytes(), np.uint8)
            pos = _ROUND_HEADER
            for b, (plan, local) in enumerate(batches):
                for j, (owner, spec) in enumerate(zip(plan.owners, plan.specs)):
                    if owner != me:
                        continue
                    if local[j] is None:
                        raise RuntimeError(f"[ResultExchange] the result of job {j} of a batch this rank owns is missing")
                    pos, out[b][j] = _pack_job(mine, pos, spec, local[j])
        segments = self._run(sizes, counts, mine, step)
        for q in range(topo.world_size):
            if q == me or not sizes[q]:
                continue
            seg = segments[q]
            got_sig = int(np.frombuffer(seg[:8].tobytes(), np.int64)[0])
            got_step = int(np.frombuffer(seg[8:16].tobytes(), np.int64)[0])
            if got_sig != signature or got_step != step:
                raise DistributedError(
                    f"asteria: rank {me}: the refresh results rank {q} sent for step {got_step} do not match the round "
                    f"this rank expects at step {step}: the ranks disagree on the refresh schedule (different "
                    "parameters, optimizer settings or checkpoints)"
                )
            pos = _ROUND_HEADER
            for b, (plan, _) in enumerate(batches):
                version, deadline = versions[b]
                for j, (owner, spec) in enumerate(zip(plan.owners, plan.specs)):
                    if owner == q:
                        pos, out[b][j] = _unpack_job(seg, pos, spec, version, deadline)
                        self.counters["jobs_received"] += 1
        self.counters["rounds"] += 1
        self.counters["exchange_s"] += time.perf_counter() - start
        return out

    def _run(self, sizes: list[int], counts: list[int], mine: np.ndarray, step: int) -> dict[int, np.ndarray]:
        """Moves every owner's buffer to every rank: inside the node, between leaders, then inside the node again."""
        comm = self._comm()
        topo = comm.topology
        me = topo.rank
        what = f"the exchange of refresh results due at step {step}"
        segs: dict[int, np.ndarray] = {me: mine}
        local = list(topo.node_ranks(topo.node))
        c = self.counters
        c["flat_bytes_received_inter"] += sum(sizes[q] for q in range(topo.world_size) if topo.node_of(q) != topo.node)
        # 1. inside the node: each rank's own buffer
        for q in local:
            if not sizes[q] or len(local) == 1:
                continue
            t = torch.from_numpy(mine) if q == me else torch.empty(sizes[q], dtype=torch.uint8)
            comm.broadcast(t, q, comm.local, what)
            if q != me:
                segs[q] = t.numpy()
                c["bytes_received_intra"] += sizes[q]
        if topo.num_nodes == 1:
            return segs
        # 2. between node leaders: each node's buffers once
        remote = [q for q in range(topo.world_size) if topo.node_of(q) != topo.node]
        if topo.is_leader:
            for node in range(topo.num_nodes):
                ranks = [q for q in topo.node_ranks(node) if sizes[q]]
                total = sum(sizes[q] for q in ranks)
                if not total:
                    continue
                if node == topo.node:
                    t = torch.from_numpy(np.concatenate([segs[q] for q in ranks]))
                else:
                    t = torch.empty(total, dtype=torch.uint8)
                comm.broadcast(t, topo.leader(node), comm.leaders, what)
                if node != topo.node:
                    self._split(t.numpy(), ranks, sizes, segs)
                    c["bytes_received_inter"] += total
                    c["results_received_inter"] += sum(counts[q] for q in ranks)
        # 3. inside the node: what the leader received from the other nodes
        remote_total = sum(sizes[q] for q in remote)
        if len(local) > 1 and remote_total:
            ranks = [q for q in remote if sizes[q]]
            if topo.is_leader:
                t = torch.from_numpy(np.concatenate([segs[q] for q in ranks]))
            else:
                t = torch.empty(remote_total, dtype=torch.uint8)
            comm.broadcast(t, topo.leader(topo.node), comm.local, what)
            if not topo.is_leader:
                self._split(t.numpy(), ranks, sizes, segs)
                c["bytes_received_intra"] += remote_total
        return segs

    @staticmethod
    def _split(buf: np.ndarray, ranks: list[int], sizes: list[int], segs: dict[int, np.ndarray]) -> None:
        pos = 0
        for q in ranks:
            segs[q] = buf[pos : pos + sizes[q]]
            pos += sizes[q]

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)


# --------------------------------------------------------------------------------------------------
# the per-optimizer coordinator
# --------------------------------------------------------------------------------------------------
def resolve_process_group(value: Any) -> Any:
    """The process group a `RuntimeConfig.process_group` value means here, or None for a single-process run."""
    if value is None:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if isinstance(value, str):
        if value != "auto" or not dist.is_initialized() or dist.get_world_size() <= 1:
            return None
        return dist.group.WORLD
    return value if dist.get_world_size(value) > 1 else None


def _param_block(m: Any) -> torch.Tensor:
    """A flat copy of a member's parameter block."""
    return m.param.detach().reshape(m.layout.merged_shape)[m.block.slices].reshape(-1)


def _write_param_block(m: Any, flat: torch.Tensor) -> None:
    p = m.param.detach()
    view = flat.view(m.block.shape)
    try:
        p.view(m.layout.merged_shape)[m.block.slices].copy_(view)
    except RuntimeError:  # not viewable (non-contiguous): write through a copy
        tmp = p.reshape(m.layout.merged_shape).clone()
        tmp[m.block.slices].copy_(view)
        p.copy_(tmp.view(p.shape))


class _ParamSync:
    """The all-gather of updated parameter blocks from their owners (sharded state), one per (device, dtype)."""

    def __init__(self, members: list[tuple[int, Any]], world_size: int) -> None:
        self.world_size = world_size
        table: dict[tuple[str, torch.dtype], list[list[Any]]] = {}
        for owner, m in members:
            key = (str(m.param.device), m.param.dtype)
            table.setdefault(key, [[] for _ in range(world_size)])[owner].append(m)
        self.groups = list(table.values())
        self.bytes_received = 0

    def run(self, comm: _Comm, rank: int, call: int) -> None:
        for per_rank in self.groups:
            sizes = [sum(int(math.prod(m.block.shape)) for m in ms) for ms in per_rank]
            width = max(sizes)
            if width == 0:
                continue
            sample = next(m for ms in per_rank for m in ms).param
            mine = per_rank[rank]
            device = torch.device("cpu") if comm.params_on_host else sample.device  # gloo: CUDA blocks via the host
            local = torch.zeros(width, dtype=sample.dtype, device=device)
            if mine:
                local[: sizes[rank]] = torch.cat([_param_block(m).to(device) for m in mine])
            gathered = torch.empty(width * self.world_size, dtype=sample.dtype, device=device)
            comm.all_gather_tensor(gathered, local, f"the all-gather of sharded parameters after step() call {call}")
            self.bytes_received += (self.world_size - 1) * width * sample.element_size()
            for q, ms in enumerate(per_rank):
                if q == rank:
                    continue
                pos = q * width
                for m in ms:
                    n = int(math.prod(m.block.shape))
                    _write_param_block(m, gathered[pos : pos + n])
                    pos += n


class DistributedCoordinator:
    """The distributed side of one optimizer: ownership, groups, the configuration check, sharded parameters.

    Created by `attach`; the optimizer calls `partition` when it builds its buckets, `before_step` and
    `after_step` around every step, and the checkpoint helpers.
    """

    def __init__(self, opt: Any, group: Any) -> None:
        import torch.distributed as dist

        cfg = opt.runtime.config
        self.group = group
        self.config = cfg
        self.shard_state = bool(cfg.shard_state)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.own_topology = group is dist.group.WORLD  # an explicit group is one node, used as it is
        self.topology = Topology.detect(world, rank, cfg.local_world_size if self.own_topology else world)
        self._comm: _Comm | None = None
        self._checked = False
        self._steps = 0  # step() calls, for messages
        self._owners: dict[tuple[int, ...], int] = {}
        self._param_sync: _ParamSync | None = None
        self.exchange = None if self.shard_state else ResultExchange(self.topology, self.comm)
        self._costs: dict[tuple[int, ...], BlockCost] = {}

    @classmethod
    def attach(cls, opt: Any) -> DistributedCoordinator | None:
        """The coordinator of ``opt`` when its runtime's ``process_group`` means a distributed run, else None."""
        group = resolve_process_group(opt.runtime.config.process_group)
        if group is None:
            return None
        coord = cls(opt, group)
        opt.runtime.distributed = True
        opt.runtime.exchange = coord.exchange
        opt.runtime.agree_max = lambda value: max(coord.comm().all_gather_object(int(value), "choosing the staleness"))
        opt.runtime.add_stats_source("distributed", coord.stats)
        return coord

    def comm(self) -> _Comm:
        """The dedicated groups (created collectively on first use)."""
        if self._comm is None:
            start = time.perf_counter()
            try:
                self._comm = _Comm(self.group, self.topology, self.config.dist_timeout)
            except DistributedError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a rank that never steps this optimizer
                raise DistributedError(
                    f"asteria: rank {self.topology.rank} of {self.topology.world_size}: creating the optimizer's "
                    f"process groups failed after {time.perf_counter() - start:.1f} s. They are created collectively "
                    "at the first step, so every process of the job must step the optimizer; use "
                    f"RuntimeConfig(process_group=None) for an optimizer of one process. Cause: {exc}"
                ) from exc
            if self._comm.topology != self.topology:
                raise DistributedError(
                    f"asteria: rank {self.topology.rank}: the node layout changed while the groups were created"
                )
        return self._comm

    # -- ownership --------------------------------------------------------------------------------
    def _cost(self, opt: Any, bucket: Any, m: Any) -> BlockCost:
        key = (m.group_index, m.param_index, m.block.index)
        group = opt.param_groups[bucket.group_index]
        state = _probe_state(opt, bucket, m, group)
        factors = [int(v.shape[-1]) for k, v in state.items() if k.startswith("factor_") and v.dim() == 3]
        itemsize = torch.empty((), dtype=group.get("state_dtype", torch.float32)).element_size()
        numel = int(math.prod(bucket.shape))
        # a refresh result is one (d, d) matrix and a (d,) vector, plus the rotation R where the refresh computes one
        options = opt._refresh_options() if hasattr(opt, "_refresh_options") else {"rotation": False}
        matrices = 2 if options.get("rotation", True) else 1
        return BlockCost(
            key=key,
            refresh_flops=float(sum(d**3 for d in factors)),
            result_bytes=sum(_JOB_HEADER + matrices * _align(d * d * itemsize) + _align(d * 8) for d in factors),
            step_flops=float(numel * (2 * sum(factors) + 10)),
            state_bytes=int(sum(v.numel() * v.element_size() for v in state.values())),
            refresh_interval=float(group.get("precondition_frequency", 1) or 1),
        )

    def partition(self, opt: Any, buckets: list[Any]) -> list[Any]:
        """Assigns every block an owner; with sharded state, keeps only this rank's rows in the buckets.

        Called by the optimizer right after grouping blocks into buckets and before their state exists.
        """
        members = sorted(
            ((m.group_index, m.param_index, m.block.index), bucket, m) for bucket in buckets for m in bucket.members
        )
        costs = [self._cost(opt, bucket, m) for _, bucket, m in members]
        owners = assign_owners(costs, self.topology, shard_state=self.shard_state, fixed=self._owners)
        for (key, _, _), owner, cost in zip(members, owners, costs):
            self._owners[key] = owner
            self._costs[key] = cost
        if self.exchange is not None:
            self.exchange.set_owners({m.block_id: o for (_, _, m), o in zip(members, owners)})
        if not self.shard_state:
            return buckets
        self._param_sync = _ParamSync([(o, m) for (_, _, m), o in zip(members, owners)], self.topology.world_size)
        me = self.topology.rank
        for bucket in buckets:
            bucket.members = [m for m in bucket.members if self._owners[(m.group_index, m.param_index, m.block.index)] == me]
        return [b for b in buckets if b.members]

    def loads(self) -> dict[str, list[float]]:
        """Per rank, the assigned refresh flops, result bytes, update flops and state bytes."""
        keys = sorted(self._costs)
        return rank_loads([self._costs[k] for k in keys], [self._owners[k] for k in keys], self.topology.world_size)

    # -- steps ----------------------------------------------------------------------------------------------
    def before_step(self, opt: Any) -> None:
        """At the first step: creates the groups and checks that every rank runs the same configuration."""
        if self._checked:
            return
        comm = self.comm()
        mine = _fingerprint(opt, self)
        everyone = comm.all_gather_object(mine, "the configuration check at the first step")
        diffs = []
        for key in sorted(set().union(*everyone), key=lambda k: (k.startswith("ownership"), k)):
            values = [fp.get(key, "<missing>") for fp in everyone]
            if len(set(values)) > 1 and not (diffs and key.startswith("ownership")):  # ownership follows the rest
                diffs.append(f"  {key}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))
        if diffs:
            shown = diffs[:8] + ([f"  ... and {len(diffs) - 8} more"] if len(diffs) > 8 else [])
            raise DistributedError(
                f"asteria: {type(opt).__name__}: the ranks disagree on the optimizer configuration (every rank must "
                "build the same optimizer over the same parameters):\n" + "\n".join(shown)
            )
        self._checked = True

    def after_step(self, opt: Any) -> None:
        """With sharded state: all-gathers the parameter blocks each owner just updated."""
        self._steps += 1
        if self._param_sync is not None:
            self._param_sync.run(self.comm(), self.topology.rank, self._steps)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def header(self, pending: Sequence[dict[str, Any]]) -> dict[str, Any]:
        partial = self.shard_state or any(r is None for e in pending for r in e["results"])
        t = self.topology
        return {"world_size": t.world_size, "rank": t.rank, "local_world_size": t.local_world_size,
                "shard_state": self.shard_state, "partial": bool(partial)}

    def restrict_pending(self, entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """With sharded state: the pending refreshes of a full checkpoint, cut down to this rank's blocks."""
        if not self.shard_state:
            return list(entries)
        me = self.topology.rank
        out = []
        for e in entries:
            keys = [tuple(int(x) for x in k) for k in e["tag"]["blocks"]]
            n = len(keys)
            keep = [k for k in range(n) if self._owners.get(keys[k]) == me]
            if len(keep) == n:
                out.append(e)
            elif keep:
                results = e["results"]
                nf = len(results) // n
                tag = dict(e["tag"], blocks=[list(keys[k]) for k in keep])
                out.append(dict(e, tag=tag, results=[results[i * n + k] for i in range(nf) for k in keep]))
        return out

    def stats(self) -> dict[str, Any]:
        t = self.topology
        out: dict[str, Any] = {
            "world_size": t.world_size,
            "rank": t.rank,
            "local_world_size": t.local_world_size,
            "shard_state": self.shard_state,
            "blocks_owned": sum(1 for o in self._owners.values() if o == t.rank),
            "blocks": len(self._owners),
        }
        loads = self.loads()  # what the cost model gave each rank
        out["assigned_refresh_flops"] = loads["refresh_flops"]
        out["assigned_state_bytes"] = loads["state_bytes"]
        if self.exchange is not None:
            out.update(self.exchange.stats())
        if self._param_sync is not None:
            out["param_bytes_received"] = self._param_sync.bytes_received
        out["collective_wait_s"] = self._comm.wait_s if self._comm is not None else 0.0
        return out


_PROBES: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}


def _probe_state(opt: Any, bucket: Any, m: Any, group: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The per-step state of one block, built on the meta device (shapes and dtypes only, nothing allocated)."""
    from asteria.optim.base import Bucket

    settings = repr(sorted((k, repr(v)) for k, v in group.items() if k != "params"))
    key = (type(opt), bucket.group_index, tuple(bucket.shape), bucket.factored, settings)
    if key not in _PROBES:
        try:
            probe = Bucket(bucket.group_index, tuple(bucket.shape), bucket.factored, torch.device("meta"), [m])
            _PROBES[key] = {k: v for k, v in opt._init_bucket_state(probe, group).items() if isinstance(v, torch.Tensor)}
        except Exception:  # noqa: BLE001 - an estimate is enough for the cost model
            dt = group.get("state_dtype", torch.float32)
            st = {"exp_avg": torch.empty((1,) + tuple(bucket.shape), dtype=dt, device="meta")}
            st["exp_avg_sq"] = st["exp_avg"]
            if bucket.factored:
                for i, d in enumerate(bucket.shape):
                    st[f"factor_{i}"] = torch.empty((1, d, d), dtype=dt, device="meta")
                    st[f"basis_{i}"] = st[f"factor_{i}"]
            _PROBES[key] = st
    return _PROBES[key]


def _fingerprint(opt: Any, coord: DistributedCoordinator) -> dict[str, str]:
    """What must be equal on every rank, as short strings (compared at the first step)."""
    cfg = coord.config
    out = {"optimizer": type(opt).__name__}
    for name in ("refresh", "staleness", "install", "shard_state", "dist_timeout"):
        out[f"runtime.{name}"] = repr(getattr(cfg, name))
    t = coord.topology
    out["world_size"] = repr(t.world_size)
    out["local_world_size"] = repr(t.local_world_size)
    env_local = os.environ.get("LOCAL_RANK", "")
    out["node layout"] = "consecutive ranks per node"
    from_env = coord.own_topology and coord.config.local_world_size is None
    if from_env and env_local.isdigit() and int(env_local) != t.rank % t.local_world_size:
        out["node layout"] = f"rank {t.rank} has LOCAL_RANK {env_local}, not rank % {t.local_world_size}"
    out["param_groups"] = repr(len(opt.param_groups))
    for gi, g in enumerate(opt.param_groups):
        for k, v in sorted(g.items()):
            if k == "params":
                out[f"param_groups[{gi}] parameters"] = repr(len(v))
                for pi, p in enumerate(v):
                    dtype = str(p.dtype).replace("torch.", "")
                    out[f"param_groups[{gi}]['params'][{pi}]"] = f"{tuple(p.shape)} {dtype} {p.device.type}"
            else:
                out[f"param_groups[{gi}].{k}"] = repr(v)
    out["ownership of the blocks"] = f"{_stable_hash(sorted(coord._owners.items())):016x}"
    return out


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def check_loadable(opt: Any, state_dict: dict[str, Any]) -> None:
    """Refuses a per-rank checkpoint that only holds part of the state where that part would be wrong.

    A per-rank checkpoint with sharded state (or with refresh results in flight that only this rank
    computed) loads only on the same rank, with the same world size and the same ``shard_state``.

    Raises:
        ValueError: Naming the saving rank and world size and the way out (`gather_state_dict`).
    """
    hdr = (state_dict.get("asteria") or {}).get("distributed")
    if not hdr or not hdr.get("partial"):
        return
    coord = getattr(opt, "_dist", None)
    here = (
        (coord.topology.world_size, coord.topology.rank, coord.shard_state) if coord is not None else (1, 0, False)
    )
    saved = (int(hdr["world_size"]), int(hdr["rank"]), bool(hdr["shard_state"]))
    if here != saved:
        raise ValueError(
            f"{type(opt).__name__}.load_state_dict: this checkpoint was written by rank {saved[1]} of {saved[0]} "
            f"(shard_state={saved[2]}) and holds only that rank's share of the state; this optimizer is rank "
            f"{here[1]} of {here[0]} (shard_state={here[2]}). Load it on the same rank with the same world size, or "
            "write a full state with asteria.gather_state_dict(opt), which loads with any world size"
        )


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu(v) for v in obj)
    return obj


def merge_state_dicts(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merges the per-rank ``state_dict()``s of one distributed optimizer into one single-process state.

    Per block, the state of the rank that holds it (with sharded state, its owner); per parameter, the
    scalar state of a rank that holds one of its blocks; the refreshes in flight with every owner's results; with
    staggered phases, every rank's last refresh steps of its blocks.
    """
    base = states[0]
    out: dict[str, Any] = {"param_groups": base["param_groups"], "state": {}}
    for pid in sorted({pid for s in states for pid in s["state"]}, key=lambda x: (str(type(x)), x)):
        entries = [s["state"].get(pid) for s in states]
        holders = [e for e in entries if e is not None]
        blocks_n = max(len(e.get("blocks", [])) for e in holders)
        blocks: list[dict[str, Any]] = []
        scalars_from = None
        for b in range(blocks_n):
            found = {}
            for e in holders:
                blk = e.get("blocks", [])
                if b < len(blk) and blk[b]:
                    found = blk[b]
                    scalars_from = scalars_from or e
                    break
            blocks.append(found)
        src = scalars_from or holders[0]
        merged = {k: v for k, v in src.items() if k != "blocks"}
        merged["blocks"] = blocks
        out["state"][pid] = merged
    header = {k: v for k, v in base["asteria"].items() if k not in ("distributed", "pending")}
    sharded = bool((base["asteria"].get("distributed") or {}).get("shard_state"))
    pending: list[dict[str, Any]] = []
    if sharded:
        for s in states:
            pending.extend(s["asteria"].get("pending", []))
        pending.sort(key=lambda e: (int(e["deadline"]), int(e["version"])))
    else:
        for i, e in enumerate(base["asteria"].get("pending", [])):
            results = list(e["results"])
            for s in states[1:]:
                other = s["asteria"]["pending"][i]["results"]
                results = [r if r is not None else o for r, o in zip(results, other)]
            if any(r is None for r in results):
                raise ValueError("asteria.gather_state_dict: a refresh result in flight is missing on every rank")
            pending.append({k: v for k, v in e.items() if k != "plan"} | {"results": results})
    header["pending"] = pending
    if header.get("staleness") is not None:  # staggered phases: each rank's last refresh steps of the blocks it held
        taken = {tuple(k): t for st in states for k, t in (st["asteria"].get("staleness") or {}).get("last_taken", [])}
        header["staleness"] = dict(header["staleness"], last_taken=[[list(k), t] for k, t in sorted(taken.items())])
    out["asteria"] = header
    return out


def gather_state_dict(opt: Any, dst: int | None = 0) -> dict[str, Any] | None:
    """A full single-process ``state_dict`` of a distributed asteria optimizer (a collective: every rank calls it).

    The result loads into the same optimizer in a single process or with any world size, sharded or not
    (each rank then keeps its own blocks). Tensors are moved to the CPU.

    Args:
        opt: An asteria optimizer (a non-distributed one simply returns its ``state_dict()``).
        dst: The rank that receives the merged state (others get None); None: every rank gets it.

    Returns:
        The merged state dict on ``dst`` (every rank with ``dst=None``), else None.

    Raises:
        DistributedError: A rank died or timed out.
    """
    coord = getattr(opt, "_dist", None)
    state = opt.state_dict()
    if coord is None:
        return state
    comm = coord.comm()
    state = _cpu(state)
    if dst is None:
        states = comm.all_gather_object(state, "asteria.gather_state_dict")
    else:
        states = comm.gather_object(state, int(dst), "asteria.gather_state_dict")
        if states is None:
            return None
    return merge_state_dicts(states)


def job_spec_sizes(plans: Sequence[BatchPlan], world_size: int) -> list[int]:
    """Bytes each rank contributes to a round of these plans (tests and reports)."""
    sizes = [0] * world_size
    for plan in plans:
        for owner, spec in zip(plan.owners, plan.specs):
            sizes[owner] += job_bytes(spec)
    return [s + _ROUND_HEADER if s else 0 for s in sizes]

