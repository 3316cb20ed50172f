"""A training process for the kill-and-resume tests (tests/test_reliability_kill.py).

It trains a small model with an asteria optimizer whose state is spread over the device, host and NVMe
tiers (so every step reads and writes the swap file) and whose refreshes run asynchronously with
deterministic installs, writes a checkpoint with ``asteria.save_checkpoint`` every ``--save-every`` steps
and resumes from it when it exists. The batch of a step depends only on ``(seed, step)``, so a run that is
killed and resumed any number of times must end with exactly the parameters and optimizer state of a run
that was never interrupted.

It prints one line per event, flushed at once, which the parent uses to aim its signals:
``START <step>``, ``STEP <step>``, ``SAVE-BEGIN <step>``, ``SAVE-END <step>``, ``DONE``.

``--serve`` turns it into a fork server: it imports torch and asteria once, then reads one command line
per training run from stdin (the arguments of a run, JSON-encoded), forks a child for it, prints
``PID <pid>``, waits for the child and prints ``EXIT <pid> <status>`` (the negative signal number when a
signal ended it). Each run is still a process of its own that can be killed at any point; the server only
saves the two seconds of importing torch per run, so a kill campaign can afford many kills.
The server starts no thread of its own and no intra-op thread pool (one torch thread), and the libraries'
threads (OpenBLAS) have fork handlers, so forking it is safe.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

import asteria
from asteria.runtime import RuntimeConfig

DIMS = [24, 40, 20, 36, 28, 44, 16, 32, 12]
OPTIMIZERS = {"shampoo": asteria.Shampoo, "soap": asteria.SOAP, "kl-shampoo": asteria.KLShampoo, "kl-soap": asteria.KLSOAP}
# Budgets several times smaller than the state (about 175 KB for SOAP with these dims), so most buckets
# live on the NVMe tier and each step pages them in and out.
BUDGETS = {"device_budget": 8 * 1024, "host_budget": 48 * 1024}
# Slows checkpoint writes down (a sleep per written chunk, the writer's test hook) so that the parent can aim
# a kill inside one.
SAVE_DELAY_S = float(os.environ.get("ASTERIA_KILL_WORKER_SAVE_DELAY", "0"))


def build(name: str, swap: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(DIMS, DIMS[1:])])
    runtime = RuntimeConfig(refresh="async", staleness=2, install="deterministic", nvme_path=swap, **BUDGETS)
    kw = dict(precondition_frequency=3, runtime=runtime)
    if name == "shampoo":
        kw.update(merge_dims=False, start_preconditioning_step=3)
    return model, OPTIMIZERS[name](model.parameters(), **kw)


def batch(seed: int, step: int) -> torch.Tensor:
    return torch.randn(16, DIMS[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


def say(*words: object) -> None:
    """Prints one event line with a single write (atomic on a pipe): a process killed while printing leaves no
    partial line to run into the server's next one (stdout may be unbuffered, e.g. PYTHONUNBUFFERED=1, when
    print() writes each word separately)."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (" ".join(str(w) for w in words) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--optimizer", default="soap", choices=sorted(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    swap = args.workdir / "swap"
    swap.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "ckpt.pt"
    model, opt = build(args.optimizer, swap)
    start = 0
    if ckpt.exists():
        payload = asteria.load_checkpoint(ckpt)
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        start = int(payload["step"])
    say("START", start)
    for step in range(start, args.steps):
        torch.tanh(model(batch(args.seed, step))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        done = step + 1
        say("STEP", done)
        if done % args.save_every == 0 or done == args.steps:
            say("SAVE-BEGIN", done)
            payload = {"step": done, "model": model.state_dict(), "optimizer": opt.state_dict()}
            if SAVE_DELAY_S > 0:
                asteria.checkpoint._save(payload, ckpt, None, chunk_delay_s=SAVE_DELAY_S)
            else:
                asteria.save_checkpoint(payload, ckpt)
            say("SAVE-END", done)
    opt.close()
    say("DONE")
    return 0


def serve() -> int:
    """The fork server (see the module docstring)."""
    global SAVE_DELAY_S
    # What every run would otherwise load or initialise first: torch.optim's lazy import of torch._dynamo
    # and the first matrix products (with one thread, so no intra-op thread pool exists when it forks).
    torch.set_num_threads(1)
    importlib.import_module("torch._dynamo")
    torch.randn(8, 8) @ torch.randn(8, 8)
    for line in sys.stdin:
        command = json.loads(line)
        argv, SAVE_DELAY_S = command["argv"], float(command.get("save_delay", 0.0))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the training run
            code = 1
            try:
                code = main(argv)
            except KeyboardInterrupt:
                import signal
                import traceback

                traceback.print_exc()
                sys.stdout.flush()
                sys.stderr.flush()
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # die by the signal, as the interpreter does
                os.kill(os.getpid(), signal.SIGINT)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        say("PID", pid)
        _, status = os.waitpid(pid, 0)
        say("EXIT", pid, -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
