"""``asteria-bench``: speed measurements with a baseline measured side by side in the same run.

Subcommands:
    linalg     eigh / inverse root / eigenbasis refresh against torch.linalg and scipy.linalg
    scheduler  refresh-job throughput with 1 and 2 workers
    optimizer  per-step optimizer time against torch.optim.AdamW on GPT layer shapes
    overhead   training step time of sync vs async refresh vs no refresh (how much is hidden)
    distributed  DDP on several processes: AdamW vs SOAP sync/async/sharded (step time, bytes, memory)
    fidelity   DDP replicas bit for bit, and the distance of a DDP run to one process on the full batch
    transfer   host<->device bandwidth of the runtime's pinned copies vs torch's (CUDA)
    pager      swap-file bandwidth of the pager (io_uring, threads) against fio, 1-16 MiB extents, QD 1/8/32
    reference  step-by-step agreement with third-party implementations (the README's cross-check table)
    race       wall-clock to a target loss: AdamW, Muon and the second-order optimizers side by side
    memory     peak RSS (and GPU memory) per optimizer and mode, each in a fresh process, against AdamW

Each speed measurement prints ratios against its baseline; absolute times drift on shared machines, ratios hold.
"""

from __future__ import annotations

import argparse
import os
import sys


def _model_arguments(p: argparse.ArgumentParser, *, d_model: int, context: int,
                     batch_help: str = "sequences per step") -> None:
    """``--layers`` (2), ``--d-model``, ``--context`` and ``--batch`` (8) of the GPT a benchmark trains."""
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default: %(default)s)")
    p.add_argument("--d-model", type=int, default=d_model, help="width (default: %(default)s)")
    p.add_argument("--context", type=int, default=context, help="sequence length (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help=f"{batch_help} (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    # Single-threaded BLAS everywhere unless asked otherwise, set before numpy/scipy load.
    threads = os.environ.get("ASTERIA_BENCH_THREADS", "1")
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    parser = argparse.ArgumentParser(prog="asteria-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("linalg", help="matrix functions vs torch.linalg and scipy.linalg")
    p.add_argument("--sizes", default="256,512,1024,2048", help="comma-separated n (default: %(default)s)")
    p.add_argument("--dtypes", default="float32,float64", help="default: %(default)s")
    p.add_argument("--providers", default="auto", help="openblas,mkl or auto (every installed one)")
    p.add_argument("--repeats", type=int, default=7, help="median of this many runs (default: %(default)s)")
    p = sub.add_parser("scheduler", help="refresh throughput with 1 and 2 workers")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p = sub.add_parser("optimizer", help="per-step optimizer time vs torch.optim.AdamW")
    p.add_argument("--d-model", default="256,512,1024", help="comma-separated widths (default: %(default)s)")
    p.add_argument("--optimizers", default="shampoo,soap,kl-shampoo,kl-soap")
    p.add_argument("--steps", type=int, default=21, help="steps per optimizer, at least 2 refresh intervals (default: %(default)s)")
    p = sub.add_parser("overhead", help="training step time: sync vs async refresh vs refresh disabled")
    p.add_argument("--optimizers", default="shampoo,soap,kl-shampoo,kl-soap")
    p.add_argument("--steps", type=int, default=200, help="training steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the statistics (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds, medians reported (default: %(default)s)")
    p.add_argument("--frequency", type=int, default=10, help="precondition_frequency (default: %(default)s)")
    _model_arguments(p, d_model=128, context=32)
    p.add_argument("--staleness", type=int, default=5, help="S of the async modes (default: %(default)s)")
    p.add_argument("--modes", default="sync,async,floor",
                   help="comma-separated among sync, async, eager, floor, sync-gpu, async-gpu, each optionally with "
                        "'+bf16' (compute_dtype=torch.bfloat16) (default: %(default)s)")
    p.add_argument("--baselines", default="adamw",
                   help="first-order baselines, comma-separated among adamw (always run) and muon (default: %(default)s)")
    p.add_argument("--muon-lr", type=float, default=6e-3, help="Muon's learning rate unless --lr (default: %(default)s)")
    p.add_argument("--target", default="adamw",
                   help="smoothed training loss each configuration's time to target is measured to, or 'adamw': "
                        "AdamW's at its last step (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training loop (default: %(default)s)")
    p.add_argument("--data", choices=("corpus", "random"), default="corpus",
                   help="train on asteria-train's corpus (the validation loss of each run is reported and S=5 is "
                        "checked against the spread of the synchronous seeds) or on random tokens (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of every configuration (default: AdamW and SOAP/Shampoo 1e-3, KL 1e-4)")
    p.add_argument("--eval-batches", type=int, default=16,
                   help="validation batches evaluated after each run, outside the timed steps (default: %(default)s)")
    p.add_argument("--pin", action="store_true",
                   help="pin the training thread to the first CPU of this process and the refresh workers to the "
                        "others (RuntimeConfig.worker_cpus), so that neither migrates onto the other's core")
    p.add_argument("--no-parallel-install", dest="parallel_install", action="store_false",
                   help="install every refresh batch on the training thread (RuntimeConfig.parallel_install=False), "
                        "to compare the 'install' column with the default")
    p.add_argument("--out", default="bench-overhead", help="folder for overhead.json and the PNG (default: %(default)s)")
    p = sub.add_parser("memory", help="peak RSS and GPU memory per optimizer and mode, each in a fresh process")
    p.add_argument("--configs", default="muon,soap:sync,soap:async,kl-soap:async",
                   help="NAME[:MODE] as in overhead (a '+bf16state' suffix: state_dtype=torch.bfloat16); AdamW always "
                        "runs first (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--device-budget", default=None,
                   help="also run every second-order configuration with RuntimeConfig(device_budget=...), e.g. 16MiB")
    p.add_argument("--host-budget", default="1GiB",
                   help="the host_budget (pinned memory) of the --device-budget runs (default: %(default)s)")
    p.add_argument("--nvme-path", default=None,
                   help="an existing directory: the --device-budget runs put the state beyond both budgets on the NVMe "
                        "tier there (default: none, no NVMe tier)")
    p.add_argument("--steps", type=int, default=30, help="training steps per configuration (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the step times (default: %(default)s)")
    p.add_argument("--frequency", type=int, default=10, help="precondition_frequency (default: %(default)s)")
    p.add_argument("--staleness", type=int, default=5, help="S of the async modes (default: %(default)s)")
    _model_arguments(p, d_model=256, context=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration (default: %(default)s)")
    p.add_argument("--out", default="bench-memory", help="folder for memory.json (default: %(default)s)")
    p = sub.add_parser("transfer", help="host<->device copy bandwidth: runtime leases vs torch pinned memory (CUDA)")
    p.add_argument("--sizes", default="4,16,64,256", help="comma-separated MiB (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=9, help="median of this many alternated runs (default: %(default)s)")
    p = sub.add_parser("distributed", help="DDP on several processes: AdamW vs SOAP sync, async, async + sharded state")
    p.add_argument("--world", type=int, default=2, help="processes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    p.add_argument("--configs", default="adamw,soap:sync,soap:async,soap:async+shard", help="default: %(default)s")
    p.add_argument("--steps", type=int, default=100, help="training steps per configuration (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the statistics (default: %(default)s)")
    p.add_argument("--frequency", type=int, default=10, help="precondition_frequency (default: %(default)s)")
    _model_arguments(p, d_model=128, context=32, batch_help="sequences per step and rank")
    p.add_argument("--out", default="bench-distributed", help="folder for distributed.json (default: %(default)s)")
    p = sub.add_parser("fidelity", help="DDP replicas bit for bit, and the distance of a DDP run to one process")
    p.add_argument("--world", type=int, default=2, help="processes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    p.add_argument("--optimizer", default="soap", help="soap, kl-soap, shampoo or kl-shampoo (default: %(default)s)")
    p.add_argument("--dtypes", default="float32,float64", help="parameter and state dtypes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="training steps (default: %(default)s)")
    p.add_argument("--at", default="2,5,20", help="steps after which distances are reported (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="default: %(default)s")
    p.add_argument("--frequency", type=int, default=4, help="precondition_frequency (default: %(default)s)")
    p.add_argument("--staleness", type=int, default=2, help="0: synchronous refresh (default: %(default)s)")
    p.add_argument("--shard-state", action="store_true", help="RuntimeConfig(shard_state=True)")
    p.add_argument("--eigh-ridge", type=float, default=None, help="eigh_ridge of the eigenbasis optimizers")
    p.add_argument("--max-preconditioner-dim", type=int, default=None, help="block size (default: the optimizer's)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--d-model", type=int, default=128, help="width (default: %(default)s)")
    p.add_argument("--context", type=int, default=64, help="sequence length (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="sequences in the global batch (default: %(default)s)")
    p.add_argument("--out", default="bench-fidelity", help="folder for fidelity.json (default: %(default)s)")
    p = sub.add_parser("pager", help="pager read/write bandwidth vs fio (same files system, sizes and depths)")
    p.add_argument("--dir", help="directory on the drive to measure (default: $ASTERIA_BENCH_DIR or the temp dir)")
    p.add_argument("--sizes", default="1,4,16", help="extent sizes in MiB (default: %(default)s)")
    p.add_argument("--depths", default="1,8,32", help="queue depths (default: %(default)s)")
    p.add_argument("--backends", default="io_uring,threads", help="default: %(default)s")
    p.add_argument("--patterns", default="seq,rand", help="default: %(default)s")
    p.add_argument("--total-mib", type=int, default=256, help="bytes per run, at least 2 x size x depth (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds, medians compared (default: %(default)s)")
    p.add_argument("--layout", choices=("rewrite", "fresh"), default="rewrite",
                   help="write over blocks written before (the NVMe tier's steady state) or into a new file each run "
                        "(default: %(default)s)")
    p.add_argument("--no-fio", action="store_true", help="skip the fio comparison")
    sub.add_parser("reference", help="agreement with pytorch-optimizer, heavyball and the ASTERIA_REF_* references")
    p = sub.add_parser("race", help="time to a target loss: AdamW, Muon and the second-order optimizers in lockstep")
    p.add_argument("--configs", default="adamw,muon,soap:sync,soap:async,soap:backward,kl-soap:async",
                   help="NAME[:MODE], modes sync, async, aligned, async5, backward, bf16, bf16state (default: %(default)s)")
    p.add_argument("--lr", action="append", metavar="NAME=LR",
                   help="learning rate of a configuration or optimizer, e.g. muon=2.4e-2 (repeatable; AdamW 1e-3)")
    p.add_argument("--lr-default", type=float, default=3e-3, help="every other configuration (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="default: %(default)s")
    p.add_argument("--heads", type=int, default=4, help="default: %(default)s")
    p.add_argument("--d-model", type=int, default=256, help="default: %(default)s")
    p.add_argument("--context", type=int, default=128, help="default: %(default)s")
    p.add_argument("--batch", type=int, default=16, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=300, help="default: %(default)s")
    p.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps (default: %(default)s)")
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the step times (default: %(default)s)")
    p.add_argument("--frequency", type=int, default=10, help="precondition_frequency (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="default: %(default)s")
    p.add_argument("--target", type=float, default=1.8, help="smoothed training loss to reach (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every configuration (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches at the end (default: %(default)s)")
    p.add_argument("--emulate-bf16", action="store_true",
                   help="the bf16 mode's products with bf16 rounding at fp32 speed (loss studies on CPUs without bf16)")
    p.add_argument("--out", default="bench-race", help="folder for race.json (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "reference":
        from .reference import run
    elif args.command == "race":
        from .race import run
    elif args.command == "pager":
        from .pager import run
    elif args.command == "linalg":
        from .linalg import run
    elif args.command == "scheduler":
        from .scheduler import run
    elif args.command == "overhead":
        from .overhead import run
    elif args.command == "distributed":
        from .distributed import run
    elif args.command == "fidelity":
        from .fidelity import run
    elif args.command == "transfer":
        from .transfer import run
    elif args.command == "memory":
        from .memory import run
    else:
        from .optimizer import run
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
