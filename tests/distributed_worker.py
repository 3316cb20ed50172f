"""The process side of tests/test_distributed.py: one rank of a multi-process run on CPU with gloo.

Run as ``python distributed_worker.py SCENARIO RANK WORLD STORE OUT KWARGS_JSON``. The rank joins a gloo
process group through a file store, runs the scenario, writes what it returns to ``OUT/rank<R>.pt`` (an
exception is written as ``{"error": ..., "type": ...}``) and exits at once (``os._exit``, so no teardown of
a broken group can hang). The launcher, with its timeout, is `launch` in tests/test_distributed.py.
"""

from __future__ import annotations

import datetime
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

import asteria  # noqa: E402
from asteria.optim import KLSOAP, SOAP, KLShampoo, Shampoo  # noqa: E402
from asteria.runtime import RefreshPipeline, RuntimeConfig  # noqa: E402
from asteria.train.model import GPT, ModelConfig  # noqa: E402
from models import TinyGPT, lm_loss  # noqa: E402  (tests/ is the script's directory)

F = 2  # precondition_frequency: several refresh rounds in a few steps
BATCH = 8


class SquareMLP(nn.Module):
    """Square weights: every Kronecker factor is full rank with distinct eigenvalues from the first step, so the
    eigenbases are well determined (on TinyGPT's non-square weights a factor's null space has an arbitrary basis,
    and SOAP/KL trajectories then depend on rounding-level differences in the gradients)."""

    def __init__(self, d=6, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x


def build_model(kind, dtype):
    torch.manual_seed(0)
    return (TinyGPT() if kind == "gpt" else SquareMLP()).to(dtype)


def loss_on(kind, net, batch, rows):
    if kind == "gpt":
        return lm_loss(net, batch[rows])
    x, y = batch
    dt = next(net.parameters()).dtype
    return ((net(x[rows].to(dt)) - y[rows].to(dt)) ** 2).mean()


def make_optimizer(name, params, runtime, dtype):
    if name == "Shampoo":
        return Shampoo(params, lr=0.02, epsilon=1e-6, precondition_frequency=F, start_preconditioning_step=F,
                       merge_dims=False, betas=(0.9, 0.99), grafting_epsilon=1e-3, state_dtype=dtype, runtime=runtime)
    if name == "SOAP":
        return SOAP(params, lr=0.01, betas=(0.9, 0.8), shampoo_beta=0.5, eps=1e-3, precondition_frequency=F,
                    state_dtype=dtype, runtime=runtime)
    cls = KLSOAP if name == "KLSOAP" else KLShampoo
    return cls(params, lr=0.01, betas=(0.9, 0.7), eps=1e-3, precondition_frequency=F, state_dtype=dtype, runtime=runtime)


def runtime_for(staleness, shard, group="auto", timeout=30.0):
    """S = 0: the synchronous runtime; S > 0: asynchronous with deterministic installs."""
    refresh = "sync" if staleness == 0 else "async"
    return RuntimeConfig(refresh=refresh, staleness=staleness, workers=1, process_group=group, shard_state=shard,
                         dist_timeout=timeout)


# Refresh jobs submitted in this process: (block id, factor, version, kind), recorded where the pipeline hands a
# job to the workers (`RefreshPipeline._submit_one`, called only for the jobs this rank owns).
SUBMITTED: list[tuple[int, int, int, str]] = []
_ORIGINAL_SUBMIT = RefreshPipeline.__dict__["_submit_one"]


def _submit_through(edit=None):
    """A `_submit_one` that records each job (after ``edit``, which may replace it) and submits it."""

    def submit(*args):
        *head, job = args
        if edit is not None:
            job = edit(job)
        SUBMITTED.append((int(job.block_id), int(job.factor), int(job.version), str(job.kind)))
        if isinstance(_ORIGINAL_SUBMIT, staticmethod):
            return _ORIGINAL_SUBMIT.__func__(*head, job)
        return _ORIGINAL_SUBMIT(*head, job)

    return staticmethod(submit) if isinstance(_ORIGINAL_SUBMIT, staticmethod) else submit


RefreshPipeline._submit_one = _submit_through()


def global_batch(step, kind="gpt"):
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "gpt":
        return torch.randint(0, 16, (BATCH, 7), generator=g)
    x = torch.randn(4 * BATCH, 6, generator=g, dtype=torch.float64)
    return x, torch.sin(x @ torch.randn(6, 6, generator=g, dtype=torch.float64))


def param_digest(model):
    h = hashlib.blake2b(digest_size=16)
    for p in model.parameters():
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_bytes(opt):
    """Bytes of the optimizer's per-step state (every bucket tensor)."""
    return int(sum(v.numel() * v.element_size() for b in opt._buckets or [] for v in b.state.values()))


def train(name, runtime, steps, dtype, rank, world, mode="allreduce", model=None, opt=None, start=0, on_step=None,
          kind="gpt", group=None):
    """Trains a model; each rank takes its rows of the global batch. Returns (model, opt, digests)."""
    if model is None:
        model = build_model(kind, dtype)
    net = model
    if mode == "ddp" and world > 1:
        net = nn.parallel.DistributedDataParallel(model, process_group=group)
    if opt is None:
        opt = make_optimizer(name, list(model.parameters()), runtime, dtype)
    rows_total = BATCH if kind == "gpt" else 4 * BATCH
    per = rows_total // world
    digests = []
    for t in range(start, steps):
        opt.zero_grad(set_to_none=True)
        loss_on(kind, net, global_batch(t, kind), slice(rank * per, (rank + 1) * per)).backward()
        if mode == "allreduce" and world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad, group=group)
                p.grad /= world
        opt.step()
        if world > 1 and group is None:
            digests.append(param_digest(model))
        if on_step is not None:
            on_step(t + 1, model, opt)
    return model, opt, digests


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------------
def equivalence(rank, world, name, dtype="float64", steps=7, configs=(), reference=True, group="auto"):
    """Every configuration ``(staleness, shard_state, gradient mode, model)`` and, on rank 0, the single-process
    run of each ``(staleness, model)`` on the full batch."""
    dt = getattr(torch, dtype)
    out = {"runs": []}
    for staleness, shard, mode, kind in configs:
        SUBMITTED.clear()
        model, opt, digests = train(name, runtime_for(staleness, shard, group=group), steps, dt, rank, world, mode,
                                    kind=kind)
        everyone = [None] * world
        dist.all_gather_object(everyone, digests)
        stats = opt.runtime.stats()
        out["runs"].append({
            "config": (staleness, shard, mode, kind),
            "params": _params(model),
            "replicas_identical": all(d == everyone[0] for d in everyone),
            "steps_compared": len(digests),
            "jobs": list(SUBMITTED),
            "dist": stats["distributed"],
            "jobs_submitted": stats["jobs_submitted"],
            "state_bytes": state_bytes(opt),
        })
        opt.close()
    if reference and rank == 0:
        out["reference"] = {}
        for staleness, kind in sorted({(c[0], c[3]) for c in configs}):
            SUBMITTED.clear()
            model, opt, _ = train(name, runtime_for(staleness, False, group=None), steps, dt, 0, 1, kind=kind)
            out["reference"][(staleness, kind)] = {"params": _params(model), "jobs": list(SUBMITTED),
                                                   "state_bytes": state_bytes(opt),
                                                   "initial": _params(build_model(kind, dt))}
            opt.close()
    return out


def failure(rank, world, how="die", at=3, timeout=4.0, steps=12):
    """Rank 1 dies (or stops taking part) at step ``at``; the others must raise a clear error within the timeout."""
    model = build_model("gpt", torch.float64)
    opt = make_optimizer("SOAP", list(model.parameters()), runtime_for(0, False, timeout=timeout), torch.float64)
    idx = global_batch(0)
    for t in range(steps):
        if rank == 1 and t == at:
            if how == "die":
                os._exit(17)
            time.sleep(600)
        opt.zero_grad(set_to_none=True)
        lm_loss(model, idx).backward()  # every rank the same batch: no gradient all-reduce to fail first
        t0 = time.perf_counter()
        try:
            opt.step()
        except asteria.DistributedError as exc:
            return {"error_after_s": time.perf_counter() - t0, "message": str(exc), "step": t}
    return {"finished": True}


def mismatch(rank, world):
    """Ranks build different optimizers; every rank must raise at the first step naming the difference."""
    out = {}
    for what in ("staleness", "params", "lr"):
        model = build_model("gpt", torch.float64)
        params = list(model.parameters())
        staleness = 3 if (what == "staleness" and rank == 1) else 1
        if what == "params" and rank == 1:
            params = params[:-1]
        opt = make_optimizer("SOAP", params, runtime_for(staleness, False, timeout=20.0), torch.float64)
        if what == "lr" and rank == 1:
            opt.param_groups[0]["lr"] = 0.5
        lm_loss(model, global_batch(0)).backward()
        try:
            opt.step()
            out[what] = None
        except asteria.DistributedError as exc:
            out[what] = str(exc)
        opt.close()
    return out


def refresh_failure(rank, world, name="SOAP", staleness=1):
    """A refresh that fails on its owner (asynchronous runtime, S = 1): every rank keeps the old basis, counts the
    failure and warns alike."""
    bad_block = {"id": None}

    def poison(job):
        if job.version == 2 and job.block_id == bad_block["id"]:
            return dataclasses.replace(job, a=np.full_like(np.asarray(job.a), np.nan))
        return job

    RefreshPipeline._submit_one = _submit_through(poison)
    try:
        model = build_model("mlp", torch.float64)
        opt = make_optimizer(name, list(model.parameters()), runtime_for(staleness, False), torch.float64)
        opt._ensure_buckets()
        bad_block["id"] = next(m.block_id for b in opt._buckets if b.factored for m in b.members)
        counts = []

        def record(t, model, opt):
            counts.append(sorted(int(x) for b in opt._buckets if "refresh_failures" in b.state
                                 for x in b.state["refresh_failures"]))

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, opt, digests = train(name, None, 5, torch.float64, rank, world, model=model, opt=opt, on_step=record,
                                    kind="mlp")
        everyone = [None] * world
        dist.all_gather_object(everyone, digests)
        stats = opt.runtime.stats()
        return {"replicas_identical": all(d == everyone[0] for d in everyone), "jobs_failed": stats["jobs_failed"],
                "failure_counts": counts, "warnings": [str(w.message) for w in caught if "refresh" in str(w.message)]}
    finally:
        RefreshPipeline._submit_one = _submit_through()


def checkpoint(rank, world, name="SOAP", staleness=2, steps=8, save_at=4, kind="mlp", resume_world=None,
               dtype="float64", shards=(False, True)):
    """Per shard mode: state_dict at ``save_at`` (a refresh in flight) resumed in fresh objects (bit-identical with
    the same world size); the gathered full state resumed in a single process on the full batch (rank 0) and, with
    ``resume_world``, by the first ``resume_world`` ranks with sharded state."""
    dt = getattr(torch, dtype)
    out = {}
    for shard in shards:
        saved = {}

        def grab(t, model, opt):
            if t == save_at:
                saved["model"] = roundtrip(model.state_dict())
                saved["opt"] = roundtrip(opt.state_dict())  # through bytes, as a checkpoint file would be
                saved["full"] = roundtrip(asteria.gather_state_dict(opt, dst=None))

        model, opt, _ = train(name, runtime_for(staleness, shard), steps, dt, rank, world, on_step=grab, kind=kind)
        straight = _params(model)
        opt.close()
        res = {"params": straight, "pending_saved": len(saved["opt"]["asteria"]["pending"]),
               "header": saved["opt"]["asteria"].get("distributed"),
               "full_pending": len(saved["full"]["asteria"]["pending"])}
        model2 = build_model(kind, dt)
        model2.load_state_dict(saved["model"])
        opt2 = make_optimizer(name, list(model2.parameters()), runtime_for(staleness, shard), dt)
        opt2.load_state_dict(saved["opt"])
        train(name, None, steps, dt, rank, world, model=model2, opt=opt2, start=save_at, kind=kind)
        res["identical"] = all(torch.equal(a, b) for a, b in zip(straight, _params(model2)))
        opt2.close()
        if rank == 0:  # the full state in one process, on the full batch
            model3 = build_model(kind, dt)
            model3.load_state_dict(saved["model"])
            opt3 = make_optimizer(name, list(model3.parameters()), runtime_for(staleness, False, group=None), dt)
            opt3.load_state_dict(saved["full"])
            train(name, None, steps, dt, 0, 1, model=model3, opt=opt3, start=save_at, kind=kind)
            res["single_process_resume"] = _params(model3)
            opt4 = make_optimizer(name, list(model3.parameters()), runtime_for(staleness, False, group=None), dt)
            try:  # a per-rank state cannot load in another world
                opt4.load_state_dict(saved["opt"])
                res["per_rank_refused"] = None
            except ValueError as exc:
                res["per_rank_refused"] = str(exc)
        if resume_world:
            sub = dist.new_group(list(range(resume_world)))  # every rank takes part in creating it
            if rank < resume_world:
                model5 = build_model(kind, dt)
                model5.load_state_dict(saved["model"])
                opt5 = make_optimizer(name, list(model5.parameters()), runtime_for(staleness, True, group=sub), dt)
                opt5.load_state_dict(saved["full"])
                train(name, None, steps, dt, rank, resume_world, model=model5, opt=opt5, start=save_at, kind=kind,
                      group=sub)
                res["smaller_world_resume"] = _params(model5)
                res["smaller_world_state_bytes"] = state_bytes(opt5)
                opt5.close()
            dist.barrier()
        out[shard] = res
    if rank == 0:
        out["initial"] = _params(build_model(kind, dt))
    return out


def four_ranks(rank, world, **kwargs):
    """The 2 nodes x 2 ranks run: equivalence plus a sharded checkpoint resumed by 2 ranks."""
    out = equivalence(rank, world, **kwargs)
    out["checkpoint"] = checkpoint(rank, world, name=kwargs["name"], dtype=kwargs.get("dtype", "float64"),
                                   shards=(True,), resume_world=2, steps=6, save_at=3)
    return out


# ------------------------------------------------------------------------------------------------
# a real model shape: the GPT of the replica report (2 layers, d_model 128, 4 heads, context 64, untied)
# ------------------------------------------------------------------------------------------------
GPT_CONFIG = ModelConfig(n_layer=2, n_head=4, d_model=128, context=64, tie_embeddings=False)
GPT_BATCH = 8  # sequences in the global batch, split over the ranks


def gpt_batch(step):
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randint(0, GPT_CONFIG.vocab_size, (GPT_BATCH, GPT_CONFIG.context + 1), generator=g)


def gpt_optimizer(name, params, staleness, shard, group="auto"):
    """The reported settings (lr 3e-3, asynchronous runtime with staleness S), refreshing every 2 steps so that a few
    steps install several refreshes."""
    runtime = RuntimeConfig(refresh="sync" if staleness == 0 else "async", staleness=staleness, workers=1,
                            process_group=group, shard_state=shard, dist_timeout=60.0)
    if name == "Shampoo":
        return Shampoo(params, lr=3e-3, precondition_frequency=2, start_preconditioning_step=2, runtime=runtime)
    cls = {"SOAP": SOAP, "KLSOAP": KLSOAP, "KLShampoo": KLShampoo}[name]
    return cls(params, lr=3e-3, precondition_frequency=2, runtime=runtime)


def move_parameters(model, offset):
    """Moves every parameter into one flat buffer, each at an odd element offset (``offset`` first): storage no longer
    64-byte aligned, at addresses unlike another rank's. Returns the buffer."""
    params = list(model.parameters())
    flat = torch.empty(sum(p.numel() + 3 for p in params) + offset, dtype=params[0].dtype)
    pos = offset
    for p in params:
        view = flat[pos : pos + p.numel()].view(p.shape)
        view.copy_(p.detach())
        p.data = view
        pos += p.numel() + 3
    return flat


def misalign_grads(model, shift):
    """Replaces every gradient by a copy at an element offset ``shift`` into a fresh buffer (the same values)."""
    for p in model.parameters():
        buf = torch.empty(p.grad.numel() + shift, dtype=p.grad.dtype)
        view = buf[shift:].view(p.grad.shape)
        view.copy_(p.grad)
        p.grad = view


def param_digests(model):
    return [hashlib.blake2b(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                            digest_size=8).digest() for p in model.parameters()]


def gpt_run(name, staleness, shard, steps, rank, world, *, perturb=False, same_batch=False, group="auto"):
    """Trains the GPT under DDP (plain, ``world`` 1) for ``steps`` steps; returns the per-step parameter digests and
    the optimizer's stats. ``perturb`` changes this process's memory layout first (odd-sized allocations kept alive,
    parameters at odd offsets, misaligned gradients); ``same_batch``: every rank takes the whole batch."""
    junk = [torch.empty(n) for n in (1, 3, 17, 1001, 4099)] if perturb else []
    torch.manual_seed(0)
    model = GPT(GPT_CONFIG)
    flat = move_parameters(model, 1 + rank) if perturb else None
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = gpt_optimizer(name, list(model.parameters()), staleness, shard, group=group if world > 1 else None)
    per = GPT_BATCH // world
    rows = slice(0, GPT_BATCH) if same_batch else slice(rank * per, (rank + 1) * per)
    digests = []
    for t in range(steps):
        idx = gpt_batch(t)[rows]
        opt.zero_grad(set_to_none=True)
        _, loss = net(idx[:, :-1], idx[:, 1:])
        loss.backward()
        if perturb:
            misalign_grads(model, 1 + (t + rank) % 3)
        opt.step()
        digests.append(param_digests(model))
    stats = opt.runtime.stats()
    opt.close()
    del junk, flat
    return digests, stats


def first_differences(everyone, names):
    """Per parameter that differs between the ranks' digests, the first step (1-based) it differs at."""
    out = {}
    for t, per_rank in enumerate(zip(*everyone)):
        for i, name in enumerate(names):
            if len({d[i] for d in per_rank}) > 1 and name not in out:
                out[name] = t + 1
    return out


def gpt_replicas(rank, world, name, configs, steps=8, perturb=True):
    """Per configuration ``(staleness, shard_state)``: the GPT under DDP, rank 1's memory layout perturbed; returns the
    first step at which each parameter's bytes differ between the ranks (empty: bit-identical after every step)."""
    names = [n for n, _ in GPT(GPT_CONFIG).named_parameters()]
    out = []
    for staleness, shard in configs:
        digests, stats = gpt_run(name, staleness, shard, steps, rank, world, perturb=perturb and rank == 1)
        everyone = [None] * world
        dist.all_gather_object(everyone, digests)
        out.append({"config": (staleness, shard), "differ": first_differences(everyone, names), "steps": len(digests),
                    "dist": stats["distributed"], "jobs_submitted": stats["jobs_submitted"]})
    return out


def gpt_same_batch(rank, world, name, configs, steps=6):
    """Every rank trains on the whole batch (DDP's average of equal gradients is exact), rank 0 also alone: the
    distributed run must equal the single process bit for bit after every step."""
    names = [n for n, _ in GPT(GPT_CONFIG).named_parameters()]
    out = []
    for staleness, shard in configs:
        digests, _ = gpt_run(name, staleness, shard, steps, rank, world, same_batch=True)
        single = gpt_run(name, staleness, False, steps, 0, 1)[0] if rank == 0 else None
        out.append({"config": (staleness, shard), "steps": len(digests),
                    "differ": first_differences([digests, single], names) if rank == 0 else None})
    return out


def auto_staleness(rank, world, name="SOAP", steps=24, delays=(0.0, 0.2)):
    """staleness="auto" with a refresh worker slowed differently on each rank (each measures its own jobs): every
    rank must choose the same S, the largest, at the same step, and the replicas stay identical."""
    from asteria import _core

    sched = _core.RefreshScheduler(workers=1, test_delay_s=float(delays[rank % len(delays)]))
    runtime = asteria.Runtime(RuntimeConfig(staleness="auto", workers=1, dist_timeout=60.0), scheduler=sched)
    model, opt, digests = train(name, runtime, steps, torch.float64, rank, world, kind="mlp")
    stats = opt.runtime.stats()
    everyone = [None] * world
    dist.all_gather_object(everyone, digests)
    opt.close()
    runtime.close()
    return {"chosen": stats["staleness_auto"]["chosen"], "staleness": stats["staleness"],
            "identical": all(d == everyone[0] for d in everyone)}


SCENARIOS = {f.__name__: f for f in (equivalence, failure, mismatch, refresh_failure, checkpoint, four_ranks,
                                     gpt_replicas, gpt_same_batch, auto_staleness)}


def main() -> None:
    scenario, rank, world, store, out_dir, kwargs = sys.argv[1:7]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = SCENARIOS[scenario](rank, world, **json.loads(kwargs))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    tmp = os.path.join(out_dir, f"rank{rank}.pt.tmp")
    torch.save(result, tmp)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
