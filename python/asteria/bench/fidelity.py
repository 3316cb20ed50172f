"""``asteria-bench fidelity``: how close a data-parallel run stays to one process, and why.

``--world`` processes (gloo on CPU, ``--threads`` torch threads each) train a GPT (`asteria.train.model.GPT`,
untied output projection; by default 2 layers, d_model 128, 4 heads, context 64) wrapped in
``DistributedDataParallel``, each rank on its share of a global batch of ``--batch`` random sequences, with an
asteria optimizer (by default ``SOAP(lr=3e-3, precondition_frequency=4)``, asynchronous runtime with staleness 2).
Per ``--dtypes`` entry (parameters and optimizer state in that dtype) it reports:

* **replicas**: whether every parameter's bytes agree between the ranks after every step (the first step at which
  each differing parameter differs);
* **W ranks vs 1 process**: the relative displacement ``‖p_W − p_1‖ / ‖p_1 − p_0‖`` of each parameter after
  the steps in ``--at``, between the distributed run and one process on the full batch (same seed, same batches);
* **same batch**: the same, with every rank taking the whole batch, so that DDP's average of equal gradients is
  exact and the optimizer gets the single process's gradients (0 means the distributed optimizer adds nothing);
* **1 ulp**: one process against one process whose first gradients (every matrix) were moved by one ulp: how far
  a rounding-level change of the gradients alone takes the run;
* **null-space rotation** (the eigenbasis optimizers): one process against one process whose first bases were
  rotated, inside the null space of each first factor, by a random orthogonal matrix, which leaves them equally
  valid ``eigh`` results of the same factors;
* the first factors themselves: per weight matrix and side, how many eigenvalues of ``L = G·Gᵀ`` (``Gᵀ·G``) of
  the first gradient are zero up to rounding (below ``d·eps·λ_max``, summed over the blocks) and which share
  ``‖P_null G₁‖ / ‖G₁‖`` of the second gradient lies in that null space;
* the loss of each run's final parameters on a held-out batch.

Matrices and vectors (the AdamW fallback of 0-D/1-D parameters) are summarised apart (largest and median
displacement). Results go to ``fidelity.json`` in ``--out``.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from .output import write_json

NAMES = {"soap": "SOAP", "kl-soap": "KLSOAP", "shampoo": "Shampoo", "kl-shampoo": "KLShampoo"}


def _model(opts: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    from asteria.train.model import GPT, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=opts["layers"], n_head=opts["heads"], d_model=opts["d_model"], context=opts["context"],
                      tie_embeddings=False)
    return GPT(cfg).to(dtype)


def _optimizer(opts: dict[str, Any], params: list[torch.Tensor], dtype: torch.dtype, distributed: bool) -> Any:
    import asteria

    staleness = opts["staleness"]
    runtime = asteria.RuntimeConfig(refresh="sync" if staleness == 0 else "async", staleness=staleness,
                                    shard_state=opts["shard_state"], process_group="auto" if distributed else None,
                                    dist_timeout=600.0)
    kwargs: dict[str, Any] = dict(lr=opts["lr"], precondition_frequency=opts["frequency"], state_dtype=dtype,
                                  runtime=runtime)
    if opts["max_preconditioner_dim"]:
        kwargs["max_preconditioner_dim"] = opts["max_preconditioner_dim"]
    name = NAMES[opts["optimizer"]]
    if name == "Shampoo":
        kwargs["start_preconditioning_step"] = opts["frequency"]
    elif opts["eigh_ridge"] is not None:
        kwargs["eigh_ridge"] = opts["eigh_ridge"]
    return getattr(asteria, name)(params, **kwargs)


def _batch(opts: dict[str, Any], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 256, (opts["batch"], opts["context"] + 1), generator=g)


def _digests(model: torch.nn.Module) -> list[str]:
    return [hashlib.blake2b(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                            digest_size=8).hexdigest() for p in model.parameters()]


def _null_columns(q: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The columns of the basis ``q`` whose Rayleigh quotient on ``factor`` is zero up to rounding."""
    w = torch.diagonal(q.T.double() @ factor.double() @ q.double())
    return (w < w.numel() * torch.finfo(factor.dtype).eps * w.max()).nonzero().flatten()


def _rotate_null_spaces(opt: Any, seed: int = 7) -> int:
    """Rotates every installed basis inside the null space of its factor by a random orthogonal matrix (the
    factors are unchanged, and the rotated bases are as valid an eigendecomposition of them); returns how
    many bases were rotated."""
    gen = torch.Generator().manual_seed(seed)
    opt.runtime.finish_installs()  # the first bases may be being installed on the helper thread
    rotated = 0
    for bucket in opt._buckets or []:
        if not bucket.factored:
            continue
        for i in range(len(bucket.shape)):
            bases, factors = bucket.state[f"basis_{i}"], bucket.state[f"factor_{i}"]
            for k in range(bases.shape[0]):
                null = _null_columns(bases[k], factors[k])
                if len(null) < 2:
                    continue
                o, _ = torch.linalg.qr(torch.randn(len(null), len(null), generator=gen, dtype=torch.float64))
                bases[k][:, null] = (bases[k][:, null].double() @ o).to(bases.dtype)
                rotated += 1
    return rotated


def _train(opts: dict[str, Any], dtype: torch.dtype, rank: int, world: int, *, same_batch: bool = False,
           nudge: bool = False, rotate_null: bool = False) -> dict[str, Any]:
    """One run; the parameters after each step in ``opts["at"]``, per-step digests and the last loss."""
    model = _model(opts, dtype)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = _optimizer(opts, list(model.parameters()), dtype, world > 1)
    per = opts["batch"] // world
    rows = slice(0, opts["batch"]) if same_batch else slice(rank * per, (rank + 1) * per)
    out: dict[str, Any] = {"params": {}, "digests": [], "initial": [p.detach().clone() for p in model.parameters()]}
    try:
        for t in range(opts["steps"]):
            idx = _batch(opts, t)[rows]
            opt.zero_grad(set_to_none=True)
            _, loss = net(idx[:, :-1], idx[:, 1:])
            loss.backward()
            if nudge and t == 0:  # one ulp up, every matrix entry of the first gradients
                for p in model.parameters():
                    if p.ndim >= 2:
                        p.grad.copy_(torch.nextafter(p.grad, torch.full_like(p.grad, float("inf"))))
            opt.step()
            if rotate_null and t == 0:
                out["rotated_bases"] = _rotate_null_spaces(opt)
            out["digests"].append(_digests(model))
            if t + 1 in opts["at"]:
                out["params"][t + 1] = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():  # every run on the same held-out batch (a rank's training loss is of its rows only)
            idx = _batch(opts, -1)
            out["loss"] = float(model(idx[:, :-1], idx[:, 1:])[1])
    finally:
        opt.close()
    out["names"] = [n for n, _ in model.named_parameters()]
    return out


def _first_factors(opts: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Per weight matrix and side: eigenvalues of the first factors zero up to rounding (summed over the blocks of
    the optimizer's layout), the factor dims, and the share of the second gradient in their null spaces."""
    from asteria.optim.blocking import soap_layout

    model = _model(opts, dtype)
    grads = []
    for t in (0, 1):  # the first two batches at the initial parameters (SOAP's first call moves none)
        idx = _batch(opts, t)
        model.zero_grad(set_to_none=True)
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    max_dim = opts["max_preconditioner_dim"] or 2048
    out = {}
    for (name, p), g0, g1 in zip(model.named_parameters(), *grads):
        if p.ndim != 2:
            continue
        layout = soap_layout(p.shape, max_dim)
        null, dims, inside, total = [0, 0], [0, 0], [0.0, 0.0], [0.0, 0.0]
        for blk in layout.blocks:
            a = g0.reshape(layout.merged_shape)[blk.slices].double()
            b = g1.reshape(layout.merged_shape)[blk.slices].double()
            for side, (x, y) in enumerate(((a, b), (a.T, b.T))):
                w, q = torch.linalg.eigh(x @ x.T)
                cols = q[:, w < w.numel() * torch.finfo(dtype).eps * w.max()]
                null[side] += cols.shape[1]
                dims[side] += w.numel()
                inside[side] += float((cols.T @ y).norm()) ** 2
                total[side] += float(y.norm()) ** 2
        out[name] = {"null": null, "dims": dims,
                     "share": [(inside[s] / total[s]) ** 0.5 if total[s] else 0.0 for s in (0, 1)]}
    return out


def _worker(rank: int, world: int, store: str, opts: dict[str, Any], out_dir: str) -> None:
    from asteria.bench.distributed import gloo_group

    with gloo_group(rank, world, store, opts["threads"]):
        for dtype_name in opts["dtypes"]:
            dtype = getattr(torch, dtype_name)
            for same in (False, True):
                res = _train(opts, dtype, rank, world, same_batch=same)
                keep = res if rank == 0 else {"digests": res["digests"]}
                torch.save(keep, Path(out_dir, f"{dtype_name}-{'same' if same else 'split'}-rank{rank}.pt"))


def _displacements(a: dict[str, Any], b: dict[str, Any], step: int) -> list[float]:
    """Per parameter, ``‖a − b‖ / ‖b − p_0‖`` after ``step`` (nan for a parameter that did not move)."""
    out = []
    for x, y, p0 in zip(a["params"][step], b["params"][step], b["initial"]):
        moved = float((y - p0).double().norm())
        out.append(float((x - y).double().norm()) / moved if moved > 0 else float("nan"))
    return out


def _summary(values: list[float], matrices: list[bool], want: bool) -> tuple[float, float]:
    vs = [v for v, m in zip(values, matrices) if m == want and v == v]
    return (max(vs), statistics.median(vs)) if vs else (float("nan"), float("nan"))


def _first_differences(per_rank: list[list[list[str]]], names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t, digests in enumerate(zip(*per_rank)):
        for i, name in enumerate(names):
            if name not in out and len({d[i] for d in digests}) > 1:
                out[name] = t + 1
    return out


def run(args: Any) -> dict[str, Any]:
    import torch.multiprocessing as mp

    if args.optimizer not in NAMES:
        raise SystemExit(f"asteria-bench fidelity: unknown optimizer {args.optimizer!r}; "
                         f"choose from {', '.join(NAMES)}")
    at = sorted({int(x) for x in args.at.split(",") if x.strip()})
    if not at or at[0] < 1 or at[-1] > args.steps:
        raise SystemExit("asteria-bench fidelity: --at must name steps between 1 and --steps")
    if args.batch % args.world:
        raise SystemExit("asteria-bench fidelity: --batch must be a multiple of --world")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    opts = {"optimizer": args.optimizer, "steps": args.steps, "at": at, "layers": args.layers, "heads": args.heads,
            "d_model": args.d_model, "context": args.context, "batch": args.batch, "lr": args.lr,
            "frequency": args.frequency, "staleness": args.staleness, "shard_state": args.shard_state,
            "eigh_ridge": args.eigh_ridge, "max_preconditioner_dim": args.max_preconditioner_dim,
            "threads": args.threads, "dtypes": dtypes}
    world = args.world
    print(f"asteria-bench fidelity: {world} processes x {args.threads} torch thread(s), gloo on CPU, DDP; GPT "
          f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads, context {args.context}, untied; a global "
          f"batch of {args.batch} sequences split over the ranks; {NAMES[args.optimizer]}(lr={args.lr:g}, "
          f"precondition_frequency={args.frequency}"
          + (f", eigh_ridge={args.eigh_ridge:g}" if args.eigh_ridge is not None else "")
          + (f", max_preconditioner_dim={args.max_preconditioner_dim}" if args.max_preconditioner_dim else "")
          + f"), staleness {args.staleness}{', shard_state' if args.shard_state else ''}; {args.steps} steps",
          flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    report: dict[str, Any] = {"args": vars(args), "dtypes": {}}
    with tempfile.TemporaryDirectory(prefix="asteria-bench-") as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), opts, tmp), nprocs=world,
                           start_method="spawn")
        torch.set_num_threads(args.threads)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            split = [torch.load(Path(tmp, f"{dtype_name}-split-rank{r}.pt"), weights_only=False) for r in range(world)]
            same = [torch.load(Path(tmp, f"{dtype_name}-same-rank{r}.pt"), weights_only=False) for r in range(world)]
            single = _train(opts, dtype, 0, 1)
            nudged = _train(opts, dtype, 0, 1, nudge=True)
            eigenbasis = NAMES[args.optimizer] != "Shampoo"
            rotated = _train(opts, dtype, 0, 1, rotate_null=True) if eigenbasis else None
            names = single["names"]
            matrices = [p.ndim >= 2 for p in single["initial"]]
            entry: dict[str, Any] = {
                "replicas_differ": _first_differences([r["digests"] for r in split], names),
                "replicas_differ_same_batch": _first_differences([r["digests"] for r in same], names),
                "same_batch_vs_single_differ": _first_differences([same[0]["digests"], single["digests"]], names),
                "loss": {"world": split[0]["loss"], "same_batch": same[0]["loss"], "single": single["loss"],
                         "ulp": nudged["loss"]},
                "first_factors": _first_factors(opts, dtype),
                "rotated_bases": rotated["rotated_bases"] if rotated else 0,
                "steps": {},
            }
            if rotated:
                entry["loss"]["null_rotation"] = rotated["loss"]
            for step in at:
                rows = {"world": _displacements(split[0], single, step), "ulp": _displacements(nudged, single, step),
                        "same_batch": _displacements(same[0], single, step)}
                if rotated:
                    rows["null_rotation"] = _displacements(rotated, single, step)
                entry["steps"][step] = {"per_parameter": {k: dict(zip(names, v)) for k, v in rows.items()},
                                        "matrices": {k: _summary(v, matrices, True) for k, v in rows.items()},
                                        "vectors": {k: _summary(v, matrices, False) for k, v in rows.items()}}
            report["dtypes"][dtype_name] = entry
            _print(dtype_name, entry, world, at, names, matrices, args.steps)
    print(f"\nwrote {write_json(args.out, 'fidelity.json', report)}")
    return report


def _print(dtype_name: str, entry: dict[str, Any], world: int, at: list[int], names: list[str],
           matrices: list[bool], steps: int) -> None:
    differ = entry["replicas_differ"]
    print(f"\n{dtype_name}: replicas bit-identical after every step: "
          + ("yes" if not differ and not entry["replicas_differ_same_batch"] else f"NO, first differing step {differ}"))
    same = entry["same_batch_vs_single_differ"]
    print(f"{dtype_name}: {world} ranks on the same batch equal 1 process bit for bit after every step: "
          + ("yes" if not same else f"NO, first differing step {same}"))
    print("relative displacement to 1 process on the full batch, largest / median over the weight matrices "
          "(vectors: over the 0-D/1-D parameters)")
    cols = [("world", f"{world} ranks"), ("ulp", "1 ulp"), ("null_rotation", "null rotation"),
            ("same_batch", "same batch")]
    cols = [(k, label) for k, label in cols if k in entry["steps"][at[0]]["matrices"]]
    print(f"{'step':>6}" + "".join(f"{label:>20}" for _, label in cols) + f"{'vectors: ' + str(world) + ' ranks':>24}")
    for step in at:
        m, v = entry["steps"][step]["matrices"], entry["steps"][step]["vectors"]
        print(f"{step:>6}" + "".join(f"{m[k][0]:>11.3g} / {m[k][1]:<6.2g}" for k, _ in cols)
              + f"{v['world'][0]:>15.3g} / {v['world'][1]:<6.2g}")
    last = entry["steps"][at[-1]]["per_parameter"]
    print(f"per weight matrix: first factors' null-space dims / size and the share of the 2nd gradient in them "
          f"(left, right); displacement after step {at[-1]}: " + ", ".join(label for _, label in cols[:-1]))
    for name, is_matrix in zip(names, matrices):
        if is_matrix:
            f = entry["first_factors"][name]
            sides = "  ".join(f"{f['null'][i]:>4}/{f['dims'][i]:<4} {100 * f['share'][i]:3.0f}%" for i in (0, 1))
            print(f"  {name:<28}{sides}" + "".join(f"{last[k][name]:>10.3g}" for k, _ in cols[:-1]))
    loss = entry["loss"]
    extra = f", null rotation {loss['null_rotation']:.5f}" if "null_rotation" in loss else ""
    print(f"held-out loss after step {steps}: {world} ranks {loss['world']:.5f}, 1 process {loss['single']:.5f}, "
          f"1 ulp {loss['ulp']:.5f}{extra}, same batch {loss['same_batch']:.5f}")
