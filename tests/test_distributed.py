"""Distributed training (invariant 8 of docs/design.md): ownership by cost, batched node-aware exchange, sharded state.

The pure functions (topology, ownership balance, the wire format) are tested in this process. The
multi-process tests (marked ``distributed``) start 2 or 4 ranks on CPU with gloo through `launch`, which runs
tests/distributed_worker.py once per rank with a file store and kills every rank that outlives its timeout,
so a bug fails the test instead of hanging CI. What they check, per optimizer: parameters after N steps equal
a single-process run on the full batch (float64 to rtol 1e-8, float32 to 1e-3 relative displacement) at
staleness 0 and 2, with and without sharded state, with DDP and with a manual all-reduce; the replicas are
bit-identical after every step, also for a GPT of real shapes under DDP with one rank's memory layout perturbed; on
the same batch everywhere that GPT's parameters equal the single process's bit for bit; every refresh is computed by exactly one rank; with 2 nodes x 2 ranks the
inter-node bytes are half those of a flat exchange and each result enters each other node once; per-rank
optimizer memory with sharded state is at most 1.25 x total / world size; a dead or silent rank is a clear
error within the timeout; a configuration mismatch is reported at the first step; failed refreshes reach
every rank; checkpoints resume bit-identically, and a gathered sharded checkpoint resumes elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import asteria
from asteria.optim.blocking import soap_layout
from asteria.runtime import RuntimeConfig
from asteria.runtime.distributed import (
    BatchPlan,
    BlockCost,
    DistributedCoordinator,
    ResultExchange,
    Topology,
    assign_owners,
    check_loadable,
    job_bytes,
    job_spec,
    rank_loads,
)
from asteria.runtime.distributed import _pack_job, _unpack_job  # noqa: PLC2701 - the wire format itself

WORKER = Path(__file__).with_name("distributed_worker.py")
NAMES = ["Shampoo", "SOAP", "KLShampoo", "KLSOAP"]

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def launch(scenario: str, world: int, *, timeout: float = 150.0, wait_for=None, env=None, **kwargs):
    """Runs ``scenario`` on ``world`` ranks; returns each rank's result (None for a rank not waited for).

    Ranks in ``wait_for`` (default: all) must finish within ``timeout`` seconds; every process still alive
    afterwards is killed. A rank that fails to report fails the test with the tail of its output.
    """
    wait_for = list(range(world)) if wait_for is None else list(wait_for)
    with tempfile.TemporaryDirectory(prefix="asteria-dist-") as tmp:
        store = os.path.join(tmp, "store")
        child_env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **(env or {}))
        procs, logs = [], []
        for rank in range(world):
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            cmd = [sys.executable, str(WORKER), scenario, str(rank), str(world), store, tmp, json.dumps(kwargs)]
            procs.append(subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        try:
            for rank in wait_for:
                try:
                    procs[rank].wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        results = []
        for rank in range(world):
            path = os.path.join(tmp, f"rank{rank}.pt")
            if rank not in wait_for:
                results.append(None)
                continue
            if not os.path.exists(path):
                logs[rank].seek(0)
                tail = logs[rank].read()[-4000:]
                for log in logs:
                    log.close()
                pytest.fail(f"rank {rank} of {scenario!r} reported nothing within {timeout:.0f} s; its output:\n{tail}")
            res = torch.load(path, weights_only=False)
            if isinstance(res, dict) and "error" in res:
                for log in logs:
                    log.close()
                pytest.fail(f"rank {rank} of {scenario!r} failed: {res['error']}\n{res.get('traceback', '')}")
            results.append(res)
        for log in logs:
            log.close()
        return results


# --------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------
def gpt_like_blocks(n_layer=12, d=768, vocab=50257, max_dim=2048):
    """The blocks of a GPT-2-small-like model (SOAP layout, blocks of at most 2048), with their refresh cost."""
    shapes = [(vocab, d), (1024, d)]
    for _ in range(n_layer):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,), (3 * d,), (d,), (4 * d,), (d,)]
    blocks = []
    for pi, shape in enumerate(shapes):
        layout = soap_layout(shape, max_dim)
        for blk in layout.blocks:
            dims = blk.shape if layout.factored else ()
            numel = int(np.prod(blk.shape))
            blocks.append(BlockCost(
                key=(0, pi, blk.index),
                refresh_flops=float(sum(x**3 for x in dims)),
                result_bytes=sum(job_bytes(("eigenbasis_refresh", x, "float32")) for x in dims),
                step_flops=float(numel * (2 * sum(dims) + 10)),
                state_bytes=4 * (2 * numel + 2 * sum(x * x for x in dims)),
                refresh_interval=10.0,
            ))
    return blocks


def balance(values):
    return max(values) / (sum(values) / len(values))


def test_topology_from_explicit_size_and_environment(monkeypatch):
    t = Topology.detect(4, 3, 2)
    assert (t.num_nodes, t.node, t.leader(1), t.is_leader, list(t.node_ranks(1))) == (2, 1, 2, False, [2, 3])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert Topology.detect(4, 2).local_world_size == 2 and Topology.detect(4, 2).is_leader
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert Topology.detect(4, 2).num_nodes == 1
    with pytest.raises(ValueError, match="do not divide"):
        Topology.detect(4, 0, 3)


@pytest.mark.parametrize("local_world_size", [4, 2, 1])
def test_ownership_balances_refresh_cost_on_a_gpt_like_model(local_world_size):
    blocks = gpt_like_blocks()
    owners = assign_owners(blocks, Topology(4, 0, local_world_size))
    loads = rank_loads(blocks, owners, 4)
    assert balance(loads["refresh_flops"]) <= 1.25, loads["refresh_flops"]
    nodes = [sum(loads["refresh_flops"][r] for r in range(n * local_world_size, (n + 1) * local_world_size))
             for n in range(4 // local_world_size)]
    assert balance(nodes) <= 1.25


def test_sharded_ownership_balances_memory_and_compute_together():
    blocks = gpt_like_blocks()
    owners = assign_owners(blocks, Topology(4, 0, 2), shard_state=True)
    loads = rank_loads(blocks, owners, 4)
    for what in ("state_bytes", "step_flops", "refresh_flops"):
        assert balance(loads[what]) <= 1.25, (what, loads[what])


def test_ownership_is_a_pure_function_of_the_sorted_blocks_and_is_sticky():
    blocks = gpt_like_blocks(n_layer=4)
    topo = Topology(4, 1, 2)
    owners = assign_owners(blocks, topo)
    perm = np.random.default_rng(0).permutation(len(blocks))
    shuffled = assign_owners([blocks[i] for i in perm], topo)
    assert [owners[i] for i in perm] == shuffled  # ties are broken by key, never by position
    assert assign_owners(blocks, Topology(4, 3, 2)) == owners  # every rank computes the same answer
    fixed = {blocks[0].key: 3, blocks[1].key: 3}
    again = assign_owners(blocks, topo, fixed=fixed)
    assert again[0] == 3 and again[1] == 3


class _Result:
    def __init__(self, ok, outputs, message="", status=None):
        self.ok, self.outputs, self.message = ok, outputs, message
        self.status = status or ("ok" if ok else "failed")
        self.version, self.deadline, self.block_id, self.latency_s = 4, 7, 2, 0.25


def test_wire_format_round_trip_failures_and_mismatched_outputs():
    rng = np.random.default_rng(0)
    specs = [("eigenbasis_refresh", 5, "float32"), ("inverse_root", 3, "float64"), ("eigh", 4, "float64"),
             ("eigenbasis_refresh", 2, "float64"), ("inverse_root", 3, "float64")]
    results = [
        _Result(True, {"basis": rng.standard_normal((5, 5)).astype(np.float32), "permutation": np.arange(5)[::-1].copy()}),
        _Result(False, {}, "[linalg::inverse_root] input matrix contains NaN or Inf"),
        _Result(True, {"eigenvalues": rng.standard_normal(4), "eigenvectors": rng.standard_normal((4, 4))}),
        _Result(True, {"basis": np.eye(3), "permutation": np.arange(3)}),  # not the planned size
        _Result(True, {"root": rng.standard_normal((3, 3)).astype(np.float32)}),  # not the planned dtype
    ]
    buf = np.zeros(sum(job_bytes(s) for s in specs), np.uint8)
    pos, installed = 0, []
    for spec, res in zip(specs, results):
        pos, canonical = _pack_job(buf, pos, spec, res)
        installed.append(canonical)
    assert pos == buf.size
    pos, received = 0, []
    for spec in specs:
        pos, res = _unpack_job(buf, pos, spec, 4, 7)
        received.append(res)
    assert [r.ok for r in received] == [True, False, True, False, False] == [bool(r.ok) for r in installed]
    for name in ("basis", "permutation"):
        got, want = received[0].outputs[name], results[0].outputs[name]
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert np.array_equal(received[2].outputs["eigenvectors"], results[2].outputs["eigenvectors"])
    assert received[1].message == results[1].message and received[1].status == "failed"
    assert "expected float64(2, 2)" in received[3].message and received[3].message == installed[3].message
    assert "expected float64(3, 3)" in received[4].message
    assert received[0].latency_s == 0.25 and received[0].version == 4 and received[0].deadline == 7
    for got, owner in zip(received, installed):  # the owner installs the bytes every other rank receives
        assert type(owner) is type(got) and owner.ok == got.ok and owner.message == got.message
        assert sorted(owner.outputs) == sorted(got.outputs)
        assert all(np.array_equal(owner.outputs[k], got.outputs[k]) for k in got.outputs)


def test_wire_format_carries_the_rotation_and_the_owner_installs_what_it_sent():
    rng = np.random.default_rng(1)
    spec = ("eigenbasis_refresh+rotation", 4, "float32")
    basis = rng.standard_normal((4, 4)).astype(np.float32)
    rotation = np.asfortranarray(rng.standard_normal((4, 4)).astype(np.float32))  # any layout: travels C-contiguous
    results = [
        _Result(True, {"basis": basis, "permutation": np.arange(4), "rotation": rotation}),
        _Result(True, {"basis": basis, "permutation": np.arange(4)}),  # computed no rotation: installed with none
        _Result(True, {"basis": basis, "permutation": np.arange(4), "rotation": np.eye(3, dtype=np.float32)}),
    ]
    assert job_bytes(spec) == job_bytes(("eigenbasis_refresh", 4, "float32")) + 4 * 4 * 4
    buf = np.zeros(len(results) * job_bytes(spec), np.uint8)
    pos, installed = 0, []
    for res in results:
        pos, canonical = _pack_job(buf, pos, spec, res)
        installed.append(canonical)
    pos, received = 0, []
    for _ in results:
        pos, res = _unpack_job(buf, pos, spec, 4, 7)
        received.append(res)
    assert [r.ok for r in received] == [True, True, False] == [r.ok for r in installed]
    assert np.array_equal(received[0].outputs["rotation"], rotation) and received[0].outputs["rotation"].flags.c_contiguous
    assert "rotation" not in received[1].outputs and "rotation" not in installed[1].outputs
    assert "'rotation' is float32(3, 3)" in received[2].message
    for got, owner in zip(received, installed):
        assert sorted(owner.outputs) == sorted(got.outputs)
        assert all(np.array_equal(owner.outputs[k], got.outputs[k]) for k in got.outputs)


def test_job_spec_names_the_rotation_a_host_refresh_computes():
    from asteria.runtime.pipeline import RefreshJob

    a = np.zeros((5, 5), np.float64)
    soap = RefreshJob("eigenbasis_refresh", 1, 0, 4, 7, a, a, {"sort": True})
    kl = RefreshJob("eigenbasis_refresh", 1, 0, 4, 7, a, a, {"sort": False, "rotation": False})
    eigh = RefreshJob("eigh", 1, 0, 0, 1, a, None, {"ridge": 0.0})
    assert job_spec(soap) == ("eigenbasis_refresh+rotation", 5, "float64")
    assert job_spec(kl) == ("eigenbasis_refresh", 5, "float64")
    assert job_spec(eigh) == ("eigh", 5, "float64")


def test_plan_names_one_owner_per_block_and_a_signature():
    ex = ResultExchange(Topology(2, 1, 2), comm=lambda: None)
    ex.set_owners({10: 0, 11: 1})

    class Job:
        def __init__(self, block_id, factor, n):
            self.kind, self.block_id, self.factor, self.version, self.deadline = "eigh", block_id, factor, 3, 4
            self.a = np.zeros((n, n), np.float32)

    plan = ex.plan([Job(10, 0, 4), Job(11, 0, 4), Job(10, 1, 2), Job(11, 1, 2)])
    assert plan.owners == (0, 1, 0, 1) and plan.owned_by(1) == [False, True, False, True]
    assert BatchPlan.from_dict(plan.to_dict()) == plan
    assert ex.plan([Job(10, 0, 4), Job(11, 0, 5)]).signature != plan.signature


def test_single_process_runs_are_not_distributed():
    from asteria.optim import SOAP

    p = torch.nn.Parameter(torch.randn(4, 3))
    for group in ("auto", None):
        opt = SOAP([p], runtime=RuntimeConfig(refresh="sync", process_group=group, shard_state=True))
        assert opt._dist is None and not opt.runtime.distributed
        p.grad = torch.randn(4, 3)
        opt.step()
        assert "distributed" not in opt.state_dict()["asteria"]
        opt.close()
    assert DistributedCoordinator.attach(opt) is None


def test_a_per_rank_checkpoint_is_refused_elsewhere_with_the_way_out():
    from asteria.optim import SOAP

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SOAP([p], runtime=RuntimeConfig(refresh="sync"))
    partial = {"asteria": {"distributed": {"world_size": 2, "rank": 1, "local_world_size": 2, "shard_state": True,
                                           "partial": True}}}
    with pytest.raises(ValueError, match="rank 1 of 2.*gather_state_dict"):
        check_loadable(opt, partial)
    check_loadable(opt, {"asteria": {"distributed": dict(partial["asteria"]["distributed"], partial=False)}})
    opt.close()


# --------------------------------------------------------------------------------------------------
# multi-process runs
# --------------------------------------------------------------------------------------------------
CONFIGS = [(0, False, "ddp", "mlp"), (2, False, "allreduce", "mlp"), (0, True, "allreduce", "mlp"), (2, True, "ddp", "mlp")]


def check_runs(results, *, rtol=None, displacement=None):
    """The common assertions of an equivalence launch; returns the runs of rank 0."""
    world = len(results)
    reference = results[0]["reference"]
    for i, run in enumerate(results[0]["runs"]):
        staleness, shard, mode, kind = run["config"]
        ref = reference[(staleness, kind)]
        label = f"config {run['config']}"
        assert all(r["runs"][i]["replicas_identical"] for r in results), f"{label}: replicas diverged"
        assert run["steps_compared"] >= 6
        # every refresh computed by exactly one rank, and the same refreshes as the single-process run
        jobs = [r["runs"][i]["jobs"] for r in results]
        union = [j for js in jobs for j in js]
        assert len(union) == len(set(union)), f"{label}: a refresh was computed twice"
        assert sorted(union) == sorted(ref["jobs"]), f"{label}: not the refreshes of the single-process run"
        assert sum(r["runs"][i]["jobs_submitted"] for r in results) == len(ref["jobs"])
        for got, want, start in zip(run["params"], ref["params"], ref["initial"]):
            if rtol is not None:
                torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()), msg=label)
            else:
                moved = float((want - start).norm())
                assert float((got - want).norm()) <= displacement * moved, label
        if shard:
            per_rank = [r["runs"][i]["state_bytes"] for r in results]
            assert max(per_rank) <= 1.25 * ref["state_bytes"] / world, (label, per_rank, ref["state_bytes"])
            assert sum(per_rank) == ref["state_bytes"]
        else:
            assert all(r["runs"][i]["state_bytes"] == ref["state_bytes"] for r in results)
    return results[0]["runs"]


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_equal_one_process_on_the_full_batch(name):
    configs = list(CONFIGS)
    if name == "SOAP":  # a GPT-like model with DDP: replicas, ownership and the sharded memory bound
        configs.append((2, True, "ddp", "gpt"))
    results = launch("equivalence", 2, name=name, configs=configs, steps=7, dtype="float64")
    if name == "SOAP":
        assert all(r["runs"][4]["replicas_identical"] for r in results)
        per_rank = [r["runs"][4]["state_bytes"] for r in results]
        total = results[0]["reference"][(2, "gpt")]["state_bytes"]
        assert max(per_rank) <= 1.25 * total / 2 and sum(per_rank) == total, (per_rank, total)
        assert results[0]["runs"][4]["dist"]["param_bytes_received"] > 0
        results = [dict(r, runs=r["runs"][:4]) for r in results]
    runs = check_runs(results, rtol=1e-8)
    exchanged = [r["dist"] for r in runs if not r["config"][1]]
    assert all(d["rounds"] > 0 and d["jobs_received"] > 0 for d in exchanged)


# the GPT of tests/distributed_worker.py (GPT_CONFIG): 2 layers, d_model 128, 4 heads, context 64, untied output
# projection, a global batch of 8 sequences split over the ranks. Its 512 x 128 and 128 x 512 MLP weights, 384 x 128 QKV
# weights and 64 x 128 position embedding are blocks whose bucket can be owned entirely by one rank.
GPT_CONFIGS = {  # (staleness, shard_state): 0 is the synchronous runtime
    "SOAP": [(0, False), (2, False), (2, True)],
    "KLSOAP": [(0, False), (2, False)],
    "Shampoo": [(2, False)],
    "KLShampoo": [(0, False), (2, True)],
}


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("name", NAMES)
def test_replicas_of_a_ddp_gpt_are_bit_identical_after_every_step_whatever_the_memory_layout(name):
    # rank 1 keeps odd-sized allocations alive, holds its parameters at odd offsets of one flat buffer and its
    # gradients at odd offsets of fresh buffers; rank 0 does not: every parameter's bytes must still agree every step
    results = launch("gpt_replicas", 2, name=name, configs=GPT_CONFIGS[name], steps=6, perturb=True)
    differ = {}
    for runs in zip(*results):
        staleness, shard = runs[0]["config"]
        assert all(r["steps"] == 6 for r in runs)
        if runs[0]["differ"]:
            differ[f"staleness={staleness} shard_state={shard}"] = runs[0]["differ"]
        assert sum(r["jobs_submitted"] for r in runs) > 0
        if not shard:  # refresh results crossed between the ranks in both directions
            assert all(r["dist"]["rounds"] > 0 and r["dist"]["jobs_received"] > 0 for r in runs)
    assert not differ, f"{name}: parameters differ between the ranks (first differing step per parameter): {differ}"


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("name", ["SOAP", "KLSOAP"])
def test_on_the_same_batch_a_ddp_gpt_equals_one_process_bit_for_bit(name):
    # every rank the whole batch: DDP's average of equal gradients is exact, so the distributed optimizer (ownership,
    # exchange, sharded state) gets the single process's gradients and must produce its parameters, bit for bit; what
    # separates a run on split batches from one process is the gradients' rounding alone (README, "Distributed
    # training")
    configs = [(2, False), (0, True)] if name == "SOAP" else [(2, False)]
    results = launch("gpt_same_batch", 2, name=name, configs=configs, steps=6)
    assert all(run["steps"] == 6 for run in results[0])
    differ = {str(run["config"]): run["differ"] for run in results[0] if run["differ"]}
    assert not differ, f"{name}: first step per parameter that differs from one process, per (staleness, " \
        f"shard_state): {differ}"


@pytest.mark.distributed
@needs_gloo
def test_four_ranks_on_two_nodes_exchange_between_nodes_once():
    configs = [(0, False, "allreduce", "mlp"), (2, False, "ddp", "mlp"), (0, True, "ddp", "mlp"),
               (2, True, "allreduce", "mlp")]
    results = launch("four_ranks", 4, name="SOAP", configs=configs, steps=7, dtype="float32",
                     env={"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": ""}, timeout=240)
    runs = check_runs(results, displacement=1e-3)
    for i, run in enumerate(runs):
        if run["config"][1]:
            continue
        stats = [r["runs"][i]["dist"] for r in results]
        assert all(s["local_world_size"] == 2 for s in stats)
        inter = sum(s["bytes_received_inter"] for s in stats)
        flat = sum(s["flat_bytes_received_inter"] for s in stats)
        assert 0 < inter <= 0.5 * flat, (inter, flat)
        # only the leaders (ranks 0 and 2) receive between nodes, and every result enters the other node once
        assert stats[1]["bytes_received_inter"] == 0 and stats[3]["bytes_received_inter"] == 0
        exchanged = sum(s["jobs_received"] for s in stats) / (len(stats) - 1)  # each result reaches 3 other ranks
        assert sum(s["results_received_inter"] for s in stats) == exchanged
        assert all(s["rounds"] == stats[0]["rounds"] > 0 for s in stats)
    # a sharded checkpoint of the 4 ranks, gathered, resumes on 2 ranks (and in one process)
    ck = [r["checkpoint"][True] for r in results]
    final = ck[0]["params"]
    start = results[0]["checkpoint"]["initial"]
    for got in (ck[0]["smaller_world_resume"], ck[0]["single_process_resume"]):
        for a, b, s in zip(got, final, start):
            assert float((a - b).norm()) <= 1e-3 * float((b - s).norm())
    assert all(c["identical"] for c in ck)
    assert ck[0]["smaller_world_state_bytes"] > 0


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("how", ["die", "stall"])
def test_a_dead_or_silent_rank_is_a_clear_error_within_the_timeout(how):
    timeout = 4.0
    results = launch("failure", 2, how=how, timeout=90, wait_for=[0], **{"at": 3})
    res = results[0]
    assert "finished" not in res, "rank 0 went on although rank 1 was gone"
    assert "rank 0 of 2" in res["message"] and "died, stopped taking part" in res["message"]
    assert "exchange of refresh results" in res["message"]
    assert res["error_after_s"] <= timeout + 5.0
    if how == "stall":
        assert res["error_after_s"] >= 0.5 * timeout


@pytest.mark.distributed
@needs_gloo
def test_a_configuration_mismatch_is_reported_at_the_first_step():
    results = launch("mismatch", 2)
    for res in results:  # every rank raises, naming the difference and each rank's value
        assert "runtime.staleness: rank 0: 1, rank 1: 3" in res["staleness"]
        assert "param_groups[0] parameters: rank 0: 15, rank 1: 14" in res["params"]
        assert "param_groups[0].lr: rank 0: 0.01, rank 1: 0.5" in res["lr"]


@pytest.mark.distributed
@needs_gloo
def test_a_failed_refresh_reaches_every_rank():
    results = launch("refresh_failure", 2)
    assert all(r["replicas_identical"] for r in results)
    assert results[0]["jobs_failed"] == results[1]["jobs_failed"] == 2  # both factors of the poisoned block
    assert results[0]["failure_counts"] == results[1]["failure_counts"]
    assert any(1 in counts for counts in results[0]["failure_counts"])
    assert results[0]["warnings"] == results[1]["warnings"] and len(results[0]["warnings"]) == 1


@pytest.mark.distributed
@needs_gloo
def test_checkpoints_resume_bit_identically_and_a_gathered_one_anywhere():
    results = launch("checkpoint", 2, name="SOAP", staleness=2, steps=8, save_at=4)
    for shard in (False, True):
        per_rank = [r[shard] for r in results]
        assert all(c["identical"] for c in per_rank), f"shard_state={shard}: resume is not bit-identical"
        assert all(c["pending_saved"] >= 1 for c in per_rank)  # a refresh was in flight at the checkpoint
        assert all(c["header"]["partial"] and c["header"]["world_size"] == 2 for c in per_rank)
        ck = per_rank[0]
        assert "gather_state_dict" in ck["per_rank_refused"]
        for a, b in zip(ck["single_process_resume"], ck["params"]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * float(b.abs().max()))


@pytest.mark.distributed
@needs_gloo
def test_asteria_train_under_torchrun_writes_one_report_and_a_checkpoint_any_world_size_resumes(tmp_path):
    common = ["--optimizer", "soap", "--refresh", "async", "--steps", "6", "--batch-size", "2", "--context", "16",
              "--eval-every", "0", "--eval-batches", "1", "--corpus-bytes", "65536", "--threads", "1", "--no-plots",
              "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "asteria.train",
           *common, "--stop-at", "3", "--save", str(tmp_path / "run.pt"), "--report", str(tmp_path / "a")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 3 and done.stdout.count("report written") == 1  # rank 0 alone reports
    payload = asteria.load_checkpoint(tmp_path / "run.pt")  # an asteria checkpoint file (crash-safe container)
    assert "distributed" not in payload["optimizer"]["asteria"]  # the full state, gathered from both ranks
    # the 2-process checkpoint resumes in one process
    resumed = subprocess.run([sys.executable, "-m", "asteria.train", "--resume", str(tmp_path / "run.pt"), "--quiet",
                              "--no-plots", "--report", str(tmp_path / "b")], env=env, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 6


@needs_gloo
@pytest.mark.distributed
def test_ranks_agree_on_the_staleness_they_choose():
    """Each rank times its own refresh jobs (rank 1's worker is slowed to 0.2 s per job): all take the largest S, at
    the same step, so they keep installing at the same steps and the replicas stay bit-identical."""
    r0, r1 = launch("auto_staleness", 2, timeout=240.0)
    assert r0["chosen"] is not None and r1["chosen"] is not None
    assert r0["chosen"]["staleness"] == r1["chosen"]["staleness"] == r0["staleness"] == r1["staleness"]
    assert r0["chosen"]["at_step"] == r1["chosen"]["at_step"]
    assert r1["chosen"]["latency_s"] >= 0.2 and r0["staleness"] >= 2  # rank 1's slow jobs decided it
    assert r0["identical"] and r1["identical"]
