"""``asteria-bench memory``: peak memory of training with each optimizer, as users measure it.

Each configuration trains the GPT of `asteria.train.model` for ``--steps`` steps in a fresh child process (so
that one configuration's peak is not another's), on random tokens, and reports:

* peak RSS of the process (``VmHWM``) and its growth over AdamW's (the same model, data and steps), also split
  into the first step's peak and the later steps' own (the peak is reset after the first step);
* on ``--device cuda``: peak GPU memory allocated and reserved by torch's caching allocator
  (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``) and the growth over AdamW's;
* the optimizer's own bytes: for asteria ``memory_report()``'s ``state_bytes`` and ``runtime_bytes`` (pools,
  results, the workers' scratch), for torch's optimizers the bytes of ``optimizer.state``'s tensors; and what
  the measured growth over AdamW leaves unaccounted (``unaccounted``: the growth minus the optimizer's bytes
  beyond AdamW's state: the allocator's retention, per-step temporaries), next to how much larger glibc's heaps
  are than AdamW's at the end of the run (``heap+``: the main thread's arena; ``threads+``: the arenas of other
  threads: refresh workers, the install helper);
* median and p99 step time (forward, backward, ``step()``; on a GPU up to a device synchronisation).

Configurations (``--configs``): ``adamw`` (always run: the baseline), ``muon``, and ``NAME:MODE`` for the four
second-order optimizers with the modes of ``asteria-bench overhead`` (``sync``, ``async``, ``async-gpu``, ...,
optionally ``+bf16``, and ``+bf16state`` for ``state_dtype=torch.bfloat16``). With ``--device-budget`` every
second-order configuration runs a second time with ``RuntimeConfig(device_budget=..., host_budget=--host-budget)``
(the state beyond it in pinned host memory; with ``--nvme-path``, the state beyond both budgets on the NVMe tier, in
a swap file there); the step-time ratio of the two runs is the cost of the budget, the difference of their peaks what it saves. For a budget run the table also
gives the state's oversubscription (state bytes over the two budgets) and checks the peak against
``AdamW's peak + device_budget + host_budget + 64 MiB`` (``bound``); the JSON has, per run, the bytes per tier and
the reservations of the pinned pools (the state's, which the host budget bounds, and the refresh snapshots').
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from .output import write_json

_MIB = 1 << 20


def parse_configs(text: str) -> list[str]:
    """``"muon,soap:async"`` → ``["adamw", "muon", "soap:async"]`` (AdamW first, added when missing); raises
    SystemExit naming the choices for an unknown name or mode."""
    from .overhead import _BASELINES, _NAMES, parse_mode

    out = ["adamw"]
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        name, _, mode = entry.partition(":")
        if name in _BASELINES:
            if mode:
                raise SystemExit(f"asteria-bench memory: {entry!r}: {name} takes no mode")
        elif name in _NAMES:
            parse_mode(mode or "async")
            entry = f"{name}:{mode or 'async'}"
        else:
            raise SystemExit(f"asteria-bench memory: unknown optimizer {name!r}; choose from "
                             f"{', '.join(_BASELINES + tuple(_NAMES))}")
        if entry not in out:
            out.append(entry)
    return out


def _optimizer_bytes(opt: Any) -> dict[str, Any]:
    """The optimizer's own bytes: ``state_bytes`` and ``runtime_bytes`` (asteria: `memory_report`'s, with the
    ``runtime`` split; torch's optimizers: the bytes of ``optimizer.state`` and no runtime)."""
    runtime = getattr(opt, "runtime", None)
    if runtime is not None and hasattr(runtime, "memory_report"):
        rep = runtime.memory_report()
        return {"state_bytes": int(rep["state_bytes"]), "runtime_bytes": int(rep["runtime_bytes"]),
                "runtime": dict(rep["runtime"])}
    from asteria.train.optimizers import optimizer_state_bytes

    return {"state_bytes": optimizer_state_bytes(opt), "runtime_bytes": 0, "runtime": {}}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration's run in this process (the child's side); returns the measurements."""
    import torch

    from asteria.train.model import GPT, ModelConfig
    from asteria.train.rss import allocator_stats, process_peak_rss_bytes, reset_peak

    from .overhead import _build, _summary

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    cfg = ModelConfig(n_layer=spec["layers"], n_head=4, d_model=spec["d_model"], context=spec["context"])
    model = GPT(cfg).to(device)
    name, _, mode = spec["config"].partition(":")
    budgets = ({"device_budget": spec["device_budget"], "host_budget": spec["host_budget"]}
               if spec.get("device_budget") else None)
    if budgets is not None and spec.get("nvme_path"):
        budgets["nvme_path"] = spec["nvme_path"]
    opt = _build(name, mode or "-", model, spec["frequency"], spec["staleness"], None, None, True, budgets=budgets)
    gen = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    first_peak = None
    try:
        for step in range(spec["steps"]):
            if step == 1:  # the peak of the first step (the first bases of SOAP and KL), then the later steps' own
                first_peak = process_peak_rss_bytes()
                reset_peak()
            idx = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["context"] + 1), generator=gen).to(device)
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        later_peak = process_peak_rss_bytes() or 0
        out: dict[str, Any] = {
            "config": label(spec),
            "peak_rss_bytes": max(first_peak or 0, later_peak),
            "first_step_peak_rss_bytes": first_peak if first_peak is not None else later_peak,
            "later_steps_peak_rss_bytes": later_peak if first_peak is not None else None,
            **_optimizer_bytes(opt),
            "allocator": allocator_stats(),
            "loss": float(loss.detach()),
        }
        if budgets is not None:
            rep = opt.runtime.memory_report()
            out["tiers"] = {t: int(n) for t, n in rep["tiers"].items()}
            out["budget_bytes"] = {"device": rep["budgets"]["device"], "host": rep["budgets"]["host"],
                                   "device_peak": rep["budgets"]["device_peak"], "host_peak": rep["budgets"]["host_peak"]}
            out["chunks"] = len(opt._buckets or [])
            out["staging_bytes"] = int(rep["buffers"]["staging_bytes"])
            out["pinned_reserved_bytes"] = {k: int(v["reserved_bytes"]) for k, v in rep["pinned"].items()}
            out["pager_bytes"] = ({"read": rep["pager"]["bytes_read"], "written": rep["pager"]["bytes_written"]}
                                  if "pager" in rep else None)
        if cuda:
            out["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            out["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        steps = _summary(times[spec["warmup"]:] or times)
        out["median_step_s"], out["p99_step_s"] = steps["median"], steps["p99"]
        return out
    finally:
        close = getattr(opt, "close", None)
        if callable(close):
            close()


def label(spec: dict[str, Any]) -> str:
    """A configuration's name in the table: ``soap:async`` or ``soap:async@device_budget=16MiB``."""
    if not spec.get("device_budget"):
        return spec["config"]
    return spec["config"] + f"@device_budget={spec['device_budget']}" + ("+nvme" if spec.get("nvme_path") else "")


def _child(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Runs `measure` in a fresh interpreter; a failure becomes ``{"config": ..., "error": ...}``."""
    try:
        proc = subprocess.run([sys.executable, "-m", "asteria.bench.memory", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": label(spec), "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"config": label(spec), "error": tail[0]}
    return json.loads(lines[-1])


def _mib(n: int | None) -> str:
    return f"{n / _MIB:9.1f}" if n is not None else f"{'':>9}"


def run(args: Any) -> list[dict[str, Any]]:
    configs = parse_configs(args.configs)
    base = dict(device=args.device, layers=args.layers, d_model=args.d_model, context=args.context, batch=args.batch,
                steps=args.steps, warmup=args.warmup, frequency=args.frequency, staleness=args.staleness,
                threads=args.threads)
    specs = [dict(base, config=c) for c in configs]
    if args.device_budget:
        nvme = getattr(args, "nvme_path", None)
        specs += [dict(base, config=c, device_budget=args.device_budget, host_budget=args.host_budget, nvme_path=nvme)
                  for c in configs if c.split(":")[0] not in ("adamw", "muon")]
    print(f"asteria-bench memory: GPT {args.layers} layers, d_model {args.d_model}, context {args.context}, batch "
          f"{args.batch} on {args.device}; {args.steps} steps per configuration, each in a fresh process", flush=True)
    results = []
    for spec in specs:
        res = _child(spec, args.timeout)
        results.append(res)
        print(f"  {res['config']}: " + (f"ERROR {res['error']}" if "error" in res else
                                        f"peak RSS {res['peak_rss_bytes'] / _MIB:.1f} MiB"), flush=True)
    ok = {r["config"]: r for r in results if "error" not in r}
    adamw = ok.get("adamw")
    for r in ok.values():
        r["optimizer_bytes"] = r["state_bytes"] + r["runtime_bytes"]
        if adamw is not None:
            r["rss_over_adamw_bytes"] = r["peak_rss_bytes"] - adamw["peak_rss_bytes"]
            # what the optimizer's own accounting says it adds over AdamW, and what the measurement leaves over
            r["accounted_over_adamw_bytes"] = r["state_bytes"] + r["runtime_bytes"] - adamw["state_bytes"]
            r["unaccounted_bytes"] = r["rss_over_adamw_bytes"] - r["accounted_over_adamw_bytes"]
            mine, base = r.get("allocator"), adamw.get("allocator")
            if mine and base:  # where the rest is: the allocator's heaps at the end of the run, against AdamW's
                r["main_heap_over_adamw_bytes"] = mine["main_arena_bytes"] - base["main_arena_bytes"]
                r["thread_heaps_over_adamw_bytes"] = mine["thread_arena_bytes"] - base["thread_arena_bytes"]
            if "gpu_peak_allocated_bytes" in r:
                r["gpu_over_adamw_bytes"] = r["gpu_peak_allocated_bytes"] - adamw["gpu_peak_allocated_bytes"]
        plain = ok.get(r["config"].split("@")[0]) if "@" in r["config"] else None
        if plain is not None:
            r["step_vs_no_budget"] = r["median_step_s"] / plain["median_step_s"]
        if adamw is not None and "budget_bytes" in r:
            r["bound_bytes"] = (adamw["peak_rss_bytes"] + (r["budget_bytes"]["device"] or 0)
                                + (r["budget_bytes"]["host"] or 0) + 64 * _MIB)
            r["oversubscription"] = r["state_bytes"] / max((r["budget_bytes"]["device"] or 0)
                                                           + (r["budget_bytes"]["host"] or 0), 1)
    print(f"\n{'configuration':<34}{'step ms':>9}{'vs plain':>9}{'RSS MiB':>9}{'+AdamW':>9}{'GPU MiB':>9}{'+AdamW':>9}"
          f"{'state':>9}{'runtime':>9}{'unacc.':>9}{'heap+':>9}{'threads+':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['config']:<34}  failed: {r['error']}")
            continue
        ratio = f"{r['step_vs_no_budget']:8.2f}x" if "step_vs_no_budget" in r else f"{'':>9}"
        print(f"{r['config']:<34}{r['median_step_s'] * 1e3:9.2f}{ratio}{_mib(r['peak_rss_bytes'])}"
              f"{_mib(r.get('rss_over_adamw_bytes'))}{_mib(r.get('gpu_peak_allocated_bytes'))}"
              f"{_mib(r.get('gpu_over_adamw_bytes'))}{_mib(r['state_bytes'])}{_mib(r['runtime_bytes'])}"
              f"{_mib(r.get('unaccounted_bytes'))}{_mib(r.get('main_heap_over_adamw_bytes'))}"
              f"{_mib(r.get('thread_heaps_over_adamw_bytes'))}")
    tiered = [r for r in results if "bound_bytes" in r]
    if tiered:
        print(f"\n{'budget run':<34}{'state MiB':>10}{'over':>7}{'device':>9}{'host':>9}{'nvme':>9}{'RSS MiB':>9}"
              f"{'step 1':>9}{'later':>9}{'bound':>9}{'margin':>9}{'shadow':>9}")
        for r in tiered:
            t = r["tiers"]
            print(f"{r['config']:<34}{r['state_bytes'] / _MIB:10.1f}{r['oversubscription']:6.1f}x{_mib(t['device'])}"
                  f"{_mib(t['host'])}{_mib(t['nvme'])}{_mib(r['peak_rss_bytes'])}"
                  f"{_mib(r['first_step_peak_rss_bytes'])}{_mib(r.get('later_steps_peak_rss_bytes'))}"
                  f"{_mib(r['bound_bytes'])}{_mib(r['bound_bytes'] - r['peak_rss_bytes'])}"
                  f"{_mib(r['pinned_reserved_bytes']['shadow'])}")
    path = write_json(args.out, "memory.json", {"args": vars(args), "results": results}, default=str)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
