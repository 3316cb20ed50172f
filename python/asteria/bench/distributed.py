"""``asteria-bench distributed``: data-parallel training on several processes (gloo on CPU).

``--world`` processes (2 by default, ``--threads`` torch threads each) train the same small GPT
(`asteria.train.model.GPT`) wrapped in ``DistributedDataParallel``, each on its own random tokens, with:

* ``adamw``: ``torch.optim.AdamW`` (the baseline);
* ``soap:sync``: SOAP, synchronous refresh: each block's refresh runs on its owner rank and the results are
  exchanged at the refresh step;
* ``soap:async``: SOAP with the default asynchronous runtime (staleness 5, deterministic installs): owners
  compute while training goes on, the results are exchanged at the install step;
* ``soap:async+shard``: the same with ``shard_state=True`` (each rank keeps and updates its own blocks'
  state; the parameters are all-gathered after every step).

Reported per configuration: the step time (forward, backward, ``opt.step()``; per step the slowest rank,
which is what data-parallel training waits for) as median, p99 and max over the steps after ``--warmup``;
the bytes the optimizer exchanges per step (summed over ranks: refresh results received plus, with sharded
state, parameters received) next to DDP's gradient all-reduce (ring estimate: ``2·(W−1)/W`` of the gradient
bytes per rank); and the optimizer memory of each rank (tensors in ``opt.state``). Results go to
``distributed.json`` in ``--out``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .output import write_json

CONFIGS = ("adamw", "soap:sync", "soap:async", "soap:async+shard")


def _build(name: str, model: torch.nn.Module, frequency: int) -> torch.optim.Optimizer:
    import asteria

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    refresh = "sync" if name == "soap:sync" else "async"
    runtime = asteria.RuntimeConfig(refresh=refresh, shard_state=name.endswith("+shard"), dist_timeout=300.0)
    return asteria.SOAP(model.parameters(), lr=1e-3, precondition_frequency=frequency, runtime=runtime)


def _run_config(name: str, rank: int, world: int, opts: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    from asteria.train.model import GPT, ModelConfig
    from asteria.train.optimizers import optimizer_state_bytes

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=opts["layers"], n_head=4, d_model=opts["d_model"], context=opts["context"])
    model = GPT(cfg)
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = _build(name, model, opts["frequency"])
    gen = torch.Generator().manual_seed(1000 + rank)
    times = []
    try:
        for _ in range(opts["steps"]):
            idx = torch.randint(0, cfg.vocab_size, (opts["batch"], opts["context"] + 1), generator=gen)
            dist.barrier()  # every rank starts the step together: the time is the step, not the skew
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            _, loss = net(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        out: dict[str, Any] = {"times": times, "loss": float(loss.detach()), "state_bytes": optimizer_state_bytes(opt)}
        out["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        runtime = getattr(opt, "runtime", None)
        if runtime is not None:
            st = runtime.stats()
            d = st.get("distributed", {})
            out["exchanged_bytes"] = int(d.get("bytes_received_intra", 0) + d.get("bytes_received_inter", 0)
                                         + d.get("param_bytes_received", 0))
            out["jobs_submitted"] = st["jobs_submitted"]
            out["stall_s"] = sum(st["timeline"]["stall_s"][opts["warmup"]:])
            out["collective_wait_s"] = d.get("collective_wait_s", 0.0)
        else:
            out["exchanged_bytes"] = 0
    finally:
        close = getattr(opt, "close", None)
        if callable(close):
            close()
    return out


@contextlib.contextmanager
def gloo_group(rank: int, world: int, store: str, threads: int) -> Iterator[None]:
    """A benchmark rank's process: ``threads`` torch threads and a gloo group through the file ``store``."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, store: str, opts: dict[str, Any], out_dir: str) -> None:
    with gloo_group(rank, world, store, opts["threads"]):
        results = {name: _run_config(name, rank, world, opts) for name in opts["configs"]}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


def run(args: Any) -> dict[str, Any]:
    import torch.multiprocessing as mp

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"asteria-bench distributed: unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    if args.steps <= args.warmup:
        raise SystemExit("asteria-bench distributed: --steps must exceed --warmup")
    opts = {"configs": configs, "steps": args.steps, "warmup": args.warmup, "layers": args.layers,
            "d_model": args.d_model, "context": args.context, "batch": args.batch, "frequency": args.frequency,
            "threads": args.threads}
    world = args.world
    print(f"asteria-bench distributed: {world} processes x {args.threads} torch thread(s), gloo on CPU; GPT "
          f"{args.layers} layers, d_model {args.d_model}, context {args.context}, batch {args.batch} per rank, DDP; "
          f"{args.steps} steps (first {args.warmup} excluded), refresh every {args.frequency}", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory(prefix="asteria-bench-") as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), opts, tmp), nprocs=world,
                           start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    table: dict[str, Any] = {}
    for name in configs:
        per_rank = [r[name] for r in ranks]
        steps = [max(r["times"][i] for r in per_rank) for i in range(args.warmup, args.steps)]
        param_bytes = per_rank[0]["param_bytes"]
        row = {
            "median_s": statistics.median(steps),
            "p99_s": _pct(steps, 0.99),
            "max_s": max(steps),
            "optimizer_bytes_per_step": sum(r["exchanged_bytes"] for r in per_rank) / args.steps,
            "ddp_gradient_bytes_per_step": world * 2 * (world - 1) / world * param_bytes,
            "state_bytes_per_rank": [r["state_bytes"] for r in per_rank],
            "loss": per_rank[0]["loss"],
        }
        if "stall_s" in per_rank[0]:
            row["stall_s"] = max(r["stall_s"] for r in per_rank)
            row["jobs_per_rank"] = [r["jobs_submitted"] for r in per_rank]
        table[name] = row
    print()
    print(f"{'configuration':<18}{'median ms':>10}{'p99 ms':>10}{'max ms':>10}{'opt KiB/step':>14}"
          f"{'DDP KiB/step':>14}{'opt MiB/rank':>14}{'jobs/rank':>12}")
    for name in configs:
        row = table[name]
        mem = "/".join(f"{b / 2**20:.2f}" for b in row["state_bytes_per_rank"])
        jobs = "/".join(str(j) for j in row.get("jobs_per_rank", [])) or "-"
        print(f"{name:<18}{row['median_s'] * 1e3:10.1f}{row['p99_s'] * 1e3:10.1f}{row['max_s'] * 1e3:10.1f}"
              f"{row['optimizer_bytes_per_step'] / 1024:14.1f}{row['ddp_gradient_bytes_per_step'] / 1024:14.1f}"
              f"{mem:>14}{jobs:>12}")
    path = write_json(args.out, "distributed.json", {"args": vars(args), "table": table,
                                                     "timelines": {n: [r[n]["times"] for r in ranks] for n in configs}})
    print(f"\nwrote {path}")
    return table
