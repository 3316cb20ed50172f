"""Tiered optimizer state (asteria.runtime.tiers): bit-identical numbers, budgets, accounting, I/O, checkpoints,
errors (invariants 3-5 and 7 of docs/design.md).

The model has many layers of distinct shapes, so its state is many small buckets and budgets several times
smaller than the state spread it over the device, host and NVMe tiers.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import asteria
from asteria.runtime import RuntimeConfig
from asteria.runtime.config import parse_bytes
from asteria.runtime.tiers import CLASSES, TIERS, BudgetError
from helpers import io_uring_expected

DIMS = [32, 40, 24, 36, 28, 44, 20, 30, 16, 38, 26, 42, 22, 34, 18, 46, 27, 33, 21, 39, 10]
STEPS = 6
OPTIMIZERS = {"shampoo": asteria.Shampoo, "soap": asteria.SOAP, "kl-shampoo": asteria.KLShampoo, "kl-soap": asteria.KLSOAP}
MODES = {"sync": dict(refresh="sync"), "async": dict(refresh="async", staleness=1, install="deterministic")}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(DIMS, DIMS[1:])])


def _make(name: str, model: torch.nn.Module, runtime, **extra) -> torch.optim.Optimizer:
    kw = dict(precondition_frequency=2, runtime=runtime, **extra)
    if name == "shampoo":
        kw.update(merge_dims=False, start_preconditioning_step=2)
    return OPTIMIZERS[name](model.parameters(), **kw)


def _batch(step: int) -> torch.Tensor:
    return torch.randn(8, DIMS[0], generator=torch.Generator().manual_seed(100 + step))


def _train(opt, model, steps, start=0, each=None):
    for s in range(start, start + steps):
        torch.tanh(model(_batch(s))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if each is not None:
            each(s)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _blocks(sd):
    return {i: st["blocks"] for i, st in sd["state"].items()}


def _state_bytes(sd) -> int:
    return sum(t.numel() * t.element_size() for blocks in _blocks(sd).values() for b in blocks for t in b.values())


@functools.lru_cache(maxsize=None)
def _reference(name: str, mode: str):
    """Untiered run: final params, state dict, per-step states, the largest bucket's bytes."""
    model = _model()
    opt = _make(name, model, RuntimeConfig(**MODES[mode]))
    history = []
    _train(opt, model, STEPS, each=lambda s: history.append((_params(model), copy.deepcopy(opt.state_dict()))))
    largest = max(sum(t.numel() * t.element_size() for t in b.state.values()) for b in opt._buckets)
    out = (_params(model), copy.deepcopy(opt.state_dict()), history, largest)
    opt.close()
    return out


def _budgets(name: str, mode: str) -> dict[str, int]:
    """Device and host budgets several times smaller than the state; the host budget holds 3 staging buffers."""
    _, sd, _, largest = _reference(name, mode)
    total = _state_bytes(sd)
    page = -(-largest // 4096) * 4096
    return {"device_budget": total // 10, "host_budget": 3 * page + total // 12}


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _assert_same_state(a, b):
    ba, bb = _blocks(a), _blocks(b)
    assert ba.keys() == bb.keys()
    for i in ba:
        assert len(ba[i]) == len(bb[i]), i
        for x, y in zip(ba[i], bb[i]):
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (i, k)


# ----------------------------------------------------------------------------------------------------- the invariant
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tiered_training_is_bit_identical_and_lower_tiers_carry_the_state(tmp_path, name, mode):
    ref_params, ref_sd, _, _ = _reference(name, mode)
    budgets = _budgets(name, mode)
    model = _model()
    opt = _make(name, model, RuntimeConfig(**MODES[mode], **budgets, nvme_path=tmp_path))
    moved = []

    def each(_):
        rep = opt.runtime.memory_report()
        u = rep["budgets"]
        assert u["device_used"] <= budgets["device_budget"] and u["host_used"] <= budgets["host_budget"]
        moved.append((rep["pager"]["bytes_read"], rep["pager"]["bytes_written"]))

    _train(opt, model, STEPS, each=each)
    for p, q in zip(ref_params, model.parameters()):
        assert torch.equal(p, q)
    sd = opt.state_dict()
    _assert_same_state(ref_sd, sd)

    rep = opt.runtime.memory_report()
    total = _state_bytes(ref_sd)
    # the registry accounts for every byte, per tier and per class
    assert rep["state_bytes"] == total == _state_bytes(sd)
    assert sum(rep["tiers"].values()) == rep["total_bytes"] == sum(rep["classes"].values())
    assert sum(rep["bytes"][t][c] for t in TIERS for c in CLASSES) == rep["total_bytes"]
    assert rep["classes"]["cold"] > 0 and rep["classes"]["step"] > 0
    # budgets several times smaller than the state: every tier holds part of it, NVMe the most
    assert budgets["device_budget"] + budgets["host_budget"] < total / 2
    assert rep["tiers"]["device"] > 0 and rep["tiers"]["host"] > 0 and rep["tiers"]["nvme"] > total / 2
    assert rep["budgets"]["device_peak"] <= budgets["device_budget"]
    assert rep["budgets"]["host_peak"] <= budgets["host_budget"]
    # the pager moves bytes at every step, both ways
    deltas = [(b[0] - a[0], b[1] - a[1]) for a, b in zip([(0, 0)] + moved, moved)]
    assert all(r > 0 and w > 0 for r, w in deltas), deltas
    assert rep["movement"]["prefetch_hits"] > 0
    assert rep["pager"]["read_gbps"] > 0 and rep["pager"]["write_gbps"] > 0
    assert "memory" in opt.runtime.stats()
    opt.close()


def test_untiered_report_accounts_for_every_byte():
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="async", staleness=1))
    _train(opt, model, 2)
    rep = opt.runtime.memory_report()
    assert not rep["tiered"]
    assert rep["state_bytes"] == _state_bytes(opt.state_dict()) == rep["tiers"]["device"]
    assert rep["tiers"]["refresh"] == rep["classes"]["shadow"] + rep["classes"]["result"]
    opt.close()


def test_runtime_bytes_count_pools_results_and_worker_scratch_once():
    """``runtime`` lists what the runtime holds beyond the state; the results the jobs write over their snapshots
    are counted once, in the shadow pool, and ``footprint_bytes`` is state plus runtime."""
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="async", staleness=2))
    seen = []

    def each(_):
        opt.runtime.runtime.collect()
        rep = opt.runtime.memory_report()
        seen.append(rep)
        assert rep["runtime_bytes"] == sum(rep["runtime"].values())
        assert rep["footprint_bytes"] == rep["state_bytes"] + rep["runtime_bytes"]
        assert rep["runtime"]["shadow_pool"] >= rep["bytes"]["refresh"]["shadow"]

    _train(opt, model, 6, each=each)
    pending = [r for r in seen if r["bytes"]["refresh"]["shadow"] > 0]
    assert pending, "no refresh was pending after any step"
    for rep in pending:
        # bases and rotations are in the pool, over the snapshots: outside it only the permutations
        assert 0 < rep["bytes"]["refresh"]["result"] < rep["bytes"]["refresh"]["shadow"] / 8
    assert all(r["runtime"]["worker_scratch"] > 0 for r in seen[-2:])
    assert seen[-1]["runtime"]["state_pool"] == 0 and seen[-1]["runtime"]["results"] >= 0
    opt.close()


def test_refresh_buffers_are_reported_in_async_mode(tmp_path):
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="async", staleness=1, **_budgets("soap", "async"), nvme_path=tmp_path))
    seen = []
    _train(opt, model, 3, each=lambda s: seen.append(opt.runtime.memory_report()["tiers"]["refresh"]))
    assert max(seen) > 0  # snapshots / results of the pending refresh
    opt.close()


def test_the_nvme_tier_runs_on_io_uring_where_the_platform_has_it(tmp_path):
    """The NVMe tier's pager picks io_uring (O_DIRECT, registered staging buffers and fixed reads/writes); only a
    platform declared to lack io_uring (ASTERIA_NO_IO_URING, or a build without liburing) may use the threads."""
    expected, why = io_uring_expected()
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="sync", **_budgets("soap", "sync"), nvme_path=tmp_path))
    _train(opt, model, 3)
    pager = opt.runtime.memory_report()["pager"]
    opt.close()
    assert pager["bytes_written"] > 0 and pager["bytes_read"] > 0
    if not expected:
        pytest.skip(why)
    assert pager["backend"] == "io_uring"
    assert pager["registered_buffers"] > 0 and pager["fixed_ops"] > 0


# ------------------------------------------------------------------------------------------------ prefetch in backward
def test_gradient_hooks_prefetch_the_first_nvme_buckets(tmp_path):
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="sync", **_budgets("soap", "sync"), nvme_path=tmp_path))
    _train(opt, model, 2)
    opt._tiers.flush()  # the last write-backs done, so that the first hook finds free staging buffers
    before = opt.runtime.memory_report()["movement"]["prefetch_reads"]
    torch.tanh(model(_batch(2))).square().mean().backward()  # hooks run; no step yet
    assert opt.runtime.memory_report()["movement"]["prefetch_reads"] > before
    opt.step()
    opt.close()


# ---------------------------------------------------------------------------------------------- checkpoints (invariant 7)
@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_checkpoint_with_state_on_nvme_resumes_bit_identically(tmp_path, name):
    mode = "async"
    ref_params, ref_sd, _, _ = _reference(name, mode)
    budgets = _budgets(name, mode)
    model = _model()
    opt = _make(name, model, RuntimeConfig(**MODES[mode], **budgets, nvme_path=tmp_path))
    _train(opt, model, 3)
    sd = opt.state_dict()
    swap_dir = opt.runtime.memory_report()["pager"]["directory"]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd}, buf)
    opt.close()
    assert not os.path.exists(swap_dir), "the swap directory is removed on close"
    # the checkpoint holds the bytes themselves: nothing refers to the swap directory
    assert swap_dir.encode() not in buf.getvalue()
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed_dir = tmp_path / "resume"
    resumed_dir.mkdir()
    model2 = _model()
    model2.load_state_dict(ck["model"])
    opt2 = _make(name, model2, RuntimeConfig(**MODES[mode], **budgets, nvme_path=resumed_dir))
    opt2.load_state_dict(ck["opt"])
    _train(opt2, model2, STEPS - 3, start=3)
    for p, q in zip(ref_params, model2.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(ref_sd, opt2.state_dict())
    assert opt2.runtime.memory_report()["tiers"]["nvme"] > 0
    opt2.close()


def test_tiered_checkpoint_loads_into_an_untiered_optimizer_and_back(tmp_path):
    ref_params, ref_sd, _, _ = _reference("kl-soap", "sync")
    model = _model()
    opt = _make("kl-soap", model, RuntimeConfig(refresh="sync", **_budgets("kl-soap", "sync"), nvme_path=tmp_path))
    _train(opt, model, 2)
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    plain = _make("kl-soap", model2, RuntimeConfig(refresh="sync"))
    plain.load_state_dict(opt.state_dict())
    _train(plain, model2, STEPS - 2, start=2)
    for p, q in zip(ref_params, model2.parameters()):
        assert torch.equal(p, q)
    opt.close()
    plain.close()


def test_failed_load_rolls_back_and_training_continues(tmp_path):
    _, _, history, _ = _reference("soap", "sync")
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="sync", **_budgets("soap", "sync"), nvme_path=tmp_path))
    _train(opt, model, 2)
    bad = opt.state_dict()
    first = next(iter(bad["state"]))
    bad["state"][first] = {**bad["state"][first], "blocks": [{**b, "surprise": torch.zeros(1)} for b in bad["state"][first]["blocks"]]}
    with pytest.raises(ValueError, match="surprise"):
        opt.load_state_dict(bad)
    _train(opt, model, 2, start=2)
    params, sd = history[3]
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(sd, opt.state_dict())
    opt.close()


def test_add_param_group_keeps_tiered_state(tmp_path):
    def run(runtime):
        model = _model()
        params = list(model.parameters())
        opt = asteria.SOAP(params[:20], precondition_frequency=2, runtime=runtime)
        _train(opt, model, 2)
        opt.add_param_group({"params": params[20:]})
        _train(opt, model, 2, start=2)
        out = _params(model), opt.state_dict()
        opt.close()
        return out

    ref = run(RuntimeConfig(refresh="sync"))
    got = run(RuntimeConfig(refresh="sync", **_budgets("soap", "sync"), nvme_path=tmp_path))
    for p, q in zip(ref[0], got[0]):
        assert torch.equal(p, q)
    _assert_same_state(ref[1], got[1])


def test_optimizers_sharing_a_runtime_share_its_budgets(tmp_path):
    """One Runtime, one pager and one set of budgets for two optimizers (the second has larger buckets, so the
    staging buffers grow when it is placed)."""

    def run(runtime):
        model = _model()
        params = list(model.parameters())
        small = [p for p in params if p.numel() < 900]
        large = [p for p in params if p.numel() >= 900]
        a = asteria.SOAP(small, precondition_frequency=2, runtime=runtime)
        b = asteria.KLShampoo(large, precondition_frequency=2, runtime=runtime)
        for s in range(4):
            torch.tanh(model(_batch(s))).square().mean().backward()
            a.step()
            b.step()
            a.zero_grad()
            b.zero_grad()
        return model, a, b

    ref_model, ra, rb = run(asteria.Runtime(RuntimeConfig(refresh="sync")))
    budgets = _budgets("soap", "sync")
    rt = asteria.Runtime(RuntimeConfig(refresh="sync", **budgets, nvme_path=tmp_path))
    model, a, b = run(rt)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(ra.state_dict(), a.state_dict())
    _assert_same_state(rb.state_dict(), b.state_dict())
    ta, tb = a.runtime.memory_report(), b.runtime.memory_report()
    assert ta["tiers"]["nvme"] > 0 and tb["tiers"]["nvme"] > 0
    assert ta["budgets"]["host_peak"] <= budgets["host_budget"] and ta["budgets"]["device_peak"] <= budgets["device_budget"]
    assert a._tiers is b._tiers
    rt.close()


# ---------------------------------------------------------------------------------------- faults: clear error, no loss
# (persistent faults, CRC errors, failures midway through a step and full or read-only drives: test_reliability_faults.py)
@pytest.mark.parametrize("kind,op,match", [("enospc", "write", "No space left on device"), ("eio", "read", "Input/output error"), ("short", "write", "short write")])
def test_transient_pager_fault_is_retried_with_a_warning_and_changes_nothing(tmp_path, kind, op, match):
    ref_params, ref_sd, _, _ = _reference("soap", "sync")
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="sync", **_budgets("soap", "sync"), nvme_path=tmp_path))
    _train(opt, model, 3)
    opt._tiers.pager.set_test_fault(kind, op=op, skip=3)
    with pytest.warns(asteria.runtime.TierIOWarning, match=f"{match}.*succeeded when retried"):
        _train(opt, model, 1, start=3)
    _train(opt, model, STEPS - 4, start=4)
    for p, q in zip(ref_params, model.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(ref_sd, opt.state_dict())
    rep = opt.runtime.memory_report()
    assert rep["pager"]["io_errors"] == 1 and rep["movement"]["io_retries"] == 1
    opt.close()


def test_failed_write_back_keeps_the_data_in_its_buffer_and_retries(tmp_path):
    model = _model()
    opt = _make("kl-shampoo", model, RuntimeConfig(refresh="sync", **_budgets("kl-shampoo", "sync"), nvme_path=tmp_path))
    _train(opt, model, 2)
    tiers = opt._tiers
    nvme = [b for b in opt._buckets if b.state._rec.home == "nvme"]
    bucket = nvme[0]
    for v in bucket.state.values():  # a new value, dirty in its staging buffer
        v.add_(1)
    expected = {k: v.clone() for k, v in bucket.state.items()}
    tiers.pager.set_test_fault("eio", op="write", count=2)  # the write and its immediate retry
    with pytest.raises(OSError, match=r"Input/output error.*Nothing is lost.*Fix: check the drive") as info:
        tiers.flush()
    assert str(tmp_path) in str(info.value) and bucket.state._rec.label in str(info.value)
    assert bucket.state._rec.stage.state == "dirty"  # still in its staging buffer
    tiers.flush()  # the next attempt succeeds
    for b in nvme[1:]:  # push the bucket out of its buffer, then read it back from the swap file
        b.state.items()
    tiers.flush()
    for k, v in bucket.state.items():
        assert torch.equal(v, expected[k]), k
    opt.close()


# ------------------------------------------------------------------------------------------------ budgets and errors
def test_too_small_budget_fails_at_construction_with_the_numbers(tmp_path):
    model = _model()
    with pytest.raises(BudgetError) as info:
        _make("soap", model, RuntimeConfig(refresh="sync", device_budget=1000, host_budget=5000, nvme_path=tmp_path))
    msg = str(info.value)
    assert "needs" in msg and "staging buffers" in msg and "smallest host_budget that works" in msg
    smallest = int(msg.split("smallest host_budget that works with device_budget=1,000 bytes (1000 B) is ")[1].split(" bytes")[0].replace(",", ""))
    opt = _make("soap", _model(), RuntimeConfig(refresh="sync", device_budget=1000, host_budget=smallest, nvme_path=tmp_path))
    _train(opt, _model(), 0)
    opt.close()
    with pytest.raises(BudgetError):
        _make("soap", _model(), RuntimeConfig(refresh="sync", device_budget=1000, host_budget=smallest - 1, nvme_path=tmp_path))


def test_too_small_budget_without_nvme_path_names_the_fix():
    with pytest.raises(MemoryError, match="nvme_path is not set.*smallest device_budget that works.*or set nvme_path"):
        _make("shampoo", _model(), RuntimeConfig(refresh="sync", device_budget=10_000))


def test_budget_check_at_first_step_when_state_grows(tmp_path):
    model = _model()
    params = list(model.parameters())
    total = _state_bytes(_reference("soap", "sync")[1])
    opt = asteria.SOAP(params[:4], precondition_frequency=2, runtime=RuntimeConfig(refresh="sync", device_budget=total // 3))
    opt.add_param_group({"params": params[4:]})
    with pytest.raises(BudgetError, match="smallest device_budget that works"):
        _train(opt, model, 1)
    opt.close()


def test_device_budget_alone_keeps_everything_that_fits_on_the_device():
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="sync", device_budget="1GiB"))
    _train(opt, model, 2)
    rep = opt.runtime.memory_report()
    assert rep["tiered"] and rep["tiers"]["device"] == rep["state_bytes"] and "pager" not in rep
    opt.close()


def test_nvme_path_must_exist_and_be_writable(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        RuntimeConfig(nvme_path=tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        RuntimeConfig(nvme_path=f)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    # a read-only directory (for root, who ignores mode bits: /proc/self, where nothing can be created)
    target = "/proc/self" if os.access(ro, os.W_OK) else str(ro)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            RuntimeConfig(nvme_path=target)
        # past the configuration's check, the pager itself refuses it when the optimizer is built
        import asteria.runtime.config as config_module

        monkeypatch.setattr(config_module.os, "access", lambda *a, **k: True)
        with pytest.raises(OSError, match="cannot create a private swap directory.*choose a writable nvme_path"):
            _make("soap", _model(), RuntimeConfig(nvme_path=target))
    finally:
        ro.chmod(0o700)


def test_budget_values_are_parsed_and_validated():
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("1.5 MB") == 1_500_000 and parse_bytes(4096) == 4096
    cfg = RuntimeConfig(device_budget="512MiB", host_budget="1kib")
    assert cfg.device_budget == 512 << 20 and cfg.host_budget == 1024 and cfg.tiered
    assert not RuntimeConfig().tiered
    for bad in ("2 GB extra", "-1", "lots", -5, 1.5, True):
        with pytest.raises(ValueError, match="device_budget"):
            RuntimeConfig(device_budget=bad)


def test_swap_file_is_private_and_has_no_name(tmp_path):
    """The swap file is unlinked as soon as it is open: nothing is visible under nvme_path while training runs (so
    nothing can be left behind), and the storage itself is private (0600) and freed on close."""
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="sync", **_budgets("soap", "sync"), nvme_path=tmp_path))
    _train(opt, model, 1)
    rep = opt.runtime.memory_report()
    d = rep["pager"]["directory"]
    assert os.path.dirname(d) == str(tmp_path) and not os.path.exists(d)
    assert os.listdir(tmp_path) == [] and rep["tiers"]["nvme"] > 0 and rep["pager"]["bytes_written"] > 0
    swap = opt._tiers.pager.swap_path
    fds = [f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd") if _readlink(f"/proc/self/fd/{fd}") == swap + " (deleted)"]
    assert fds, "the pager holds no descriptor on its swap file"
    st = os.stat(fds[0])
    assert st.st_nlink == 0 and st.st_mode & 0o777 == 0o600 and st.st_size >= rep["pager"]["file_bytes"]
    # the disk space the report names is what the file really holds (its space is reserved ahead of writes)
    assert rep["pager"]["reserved_bytes"] >= rep["pager"]["file_bytes"]
    if not opt._tiers.pager.stats()["preallocation_error"]:  # a file system with fallocate
        assert st.st_blocks * 512 >= rep["pager"]["file_bytes"] and st.st_size == rep["pager"]["reserved_bytes"]
    opt.close()
    assert os.listdir(tmp_path) == []
    assert all(_readlink(f"/proc/self/fd/{fd}") != swap + " (deleted)" for fd in os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="closed"):
        opt._buckets[0].state.items()


def test_acquire_pins_a_bucket(tmp_path):
    model = _model()
    opt = _make("soap", model, RuntimeConfig(refresh="sync", **_budgets("soap", "sync"), nvme_path=tmp_path))
    _train(opt, model, 1)
    tiers = opt._tiers
    nvme = [b for b in opt._buckets if b.state._rec.home == "nvme"]
    views = tiers.acquire(nvme[0])
    keep = {k: v.clone() for k, v in views.items()}
    for b in nvme[1:]:  # many other buckets pass through the staging buffers
        b.state.items()
    assert nvme[0].state._rec.stage is not None
    assert all(torch.equal(views[k], keep[k]) for k in keep)
    tiers.release(nvme[0])
    with pytest.raises(RuntimeError, match="without acquire"):
        tiers.release(nvme[0])
    opt.close()


# --------------------------------------------------------------------------------------------------------- peak RSS
def _rss_child(script: str, mode: str, tmp_path) -> dict:
    """Runs a peak-RSS child script (``mode``: "adamw" or "tiered", the NVMe tier in ``tmp_path``); its last line's
    JSON. A fixed mmap threshold, so that freed temporaries do not stay in the heap and blur the peaks."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script, mode, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=240)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_RSS_CHILD = textwrap.dedent(
    """
    import json, resource, sys, torch, asteria
    torch.set_num_threads(1)
    mode, nvme = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    # tall blocks: Shampoo's left factor and root (2048 x 2048) dwarf the parameters
    model = torch.nn.Sequential(*[torch.nn.Linear(48 + 4 * i, 2048 - 8 * i, bias=False) for i in range(6)])
    if mode == "adamw":
        opt = torch.optim.AdamW(model.parameters())
        extra = {}
    else:
        rt = asteria.RuntimeConfig(refresh="sync", device_budget=8 << 20, host_budget=40 << 20, nvme_path=nvme)
        opt = asteria.Shampoo(model.parameters(), merge_dims=False, start_preconditioning_step=100,
                              precondition_frequency=100, runtime=rt)
    inputs = [torch.randn(4, layer.in_features) for layer in model]
    for step in range(3):
        sum(layer(x).square().mean() for layer, x in zip(model, inputs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if mode != "adamw":
        rep = opt.runtime.memory_report()
        extra = {"state": rep["state_bytes"], "tiers": rep["tiers"], "staging": rep["buffers"]["staging_bytes"],
                 "device_peak": rep["budgets"]["device_peak"], "host_peak": rep["budgets"]["host_peak"]}
    print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **extra}))
    """
)


@pytest.mark.slow
def test_peak_rss_is_bounded_by_the_budgets(tmp_path):
    """State over 4x the budgets: the peak RSS stays within AdamW's peak + the budgets + 64 MiB (the staging
    buffers are part of host_budget)."""
    adamw = _rss_child(_RSS_CHILD, "adamw", tmp_path)
    tiered = _rss_child(_RSS_CHILD, "tiered", tmp_path)
    budgets = (8 << 20) + (40 << 20)
    assert tiered["state"] >= 4 * budgets, tiered
    assert tiered["tiers"]["nvme"] > tiered["state"] / 2
    assert tiered["device_peak"] <= 8 << 20 and tiered["host_peak"] <= 40 << 20
    assert tiered["staging"] <= 40 << 20
    bound = adamw["maxrss"] + budgets + (64 << 20)
    assert tiered["maxrss"] <= bound, (tiered["maxrss"] - adamw["maxrss"]) / 2**20


_RSS_CHUNK_CHILD = textwrap.dedent(
    """
    import json, sys, torch, asteria
    from asteria.train.rss import process_peak_rss_bytes
    torch.set_num_threads(1)
    mode, nvme = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    # one bucket of six 1024 x 1024 blocks, ~4x the budgets: whole, it could not be staged through host_budget
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(6)])
    if mode == "adamw":
        opt = torch.optim.AdamW(model.parameters())
        extra = {}
    else:
        rt = asteria.RuntimeConfig(refresh="sync", device_budget=8 << 20, host_budget=28 << 20, nvme_path=nvme)
        opt = asteria.Shampoo(model.parameters(), merge_dims=False, start_preconditioning_step=100,
                              precondition_frequency=100, runtime=rt)
    x = torch.randn(4, 1024)
    for step in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if mode != "adamw":
        rep = opt.runtime.memory_report()
        extra = {"state": rep["state_bytes"], "tiers": rep["tiers"], "chunks": [b.size for b in opt._buckets],
                 "device_peak": rep["budgets"]["device_peak"], "host_peak": rep["budgets"]["host_peak"]}
    print(json.dumps({"maxrss": process_peak_rss_bytes(), **extra}))
    """
)


@pytest.mark.slow
def test_peak_rss_of_chunked_state_is_bounded_by_the_budgets(tmp_path):
    """A bucket 4x larger than both budgets together, staged one block at a time: the peak RSS stays within AdamW's
    peak + the budgets + 64 MiB."""
    adamw = _rss_child(_RSS_CHUNK_CHILD, "adamw", tmp_path)
    tiered = _rss_child(_RSS_CHUNK_CHILD, "tiered", tmp_path)
    budgets = (8 << 20) + (28 << 20)
    assert tiered["chunks"] == [1] * 6 and tiered["state"] >= 4 * budgets, tiered
    assert tiered["tiers"]["nvme"] > tiered["state"] / 2
    assert tiered["device_peak"] <= 8 << 20 and tiered["host_peak"] <= 28 << 20
    bound = adamw["maxrss"] + budgets + (64 << 20)
    assert tiered["maxrss"] <= bound, (tiered["maxrss"] - adamw["maxrss"]) / 2**20


# ---------------------------------------------------------------------------------------------------- asteria-train
def test_asteria_train_memory_options(tmp_path):
    from asteria.train.cli import build_parser, plan_runs
    from asteria.train.config import RunConfig
    from asteria.train.optimizers import RuntimeProbe, build_optimizer, optimizer_state_bytes

    args = build_parser().parse_args(
        ["--optimizer", "soap", "--device-budget", "16KiB", "--host-budget", "120KiB", "--nvme-path", str(tmp_path)]
    )
    (cfg,) = plan_runs(args, "cpu")
    assert (cfg.device_budget, cfg.host_budget, cfg.nvme_path) == ("16KiB", "120KiB", str(tmp_path))
    with pytest.raises(ValueError, match="--device-budget"):
        RunConfig(optimizer="soap", device_budget="64 apples")
    model = _model()
    opt = build_optimizer("soap", [{"params": list(model.parameters())}], lr=1e-3, weight_decay=0.0,
                          memory={"device_budget": cfg.device_budget, "host_budget": cfg.host_budget,
                                  "nvme_path": cfg.nvme_path})
    probe = RuntimeProbe(opt)
    _train(opt, model, 2)
    tiers = probe.tier_bytes()
    assert tiers["tiered"] == 1.0 and tiers["nvme"] > 0 and tiers["pager_written"] > 0
    assert optimizer_state_bytes(opt) == tiers["state"] == opt.runtime.memory_report()["state_bytes"]
    opt.close()


# ------------------------------------------------------------------------------------ chunks: the unit of placement
# Same-shape blocks (dims multiples of 32, as in transformers) make buckets of several blocks, which budgets 4x
# smaller than the state can only hold when they are placed and staged a chunk of blocks at a time.
CHUNK_DIMS = [32] * 7 + [64, 32, 64, 32]


def _chunk_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(CHUNK_DIMS, CHUNK_DIMS[1:])])


def _chunk_batch(step: int) -> torch.Tensor:
    return torch.randn(8, CHUNK_DIMS[0], generator=torch.Generator().manual_seed(200 + step))


def _chunk_train(opt, model, steps, start=0):
    for s in range(start, start + steps):
        torch.tanh(model(_chunk_batch(s))).square().mean().backward()
        opt.step()
        opt.zero_grad()


@functools.lru_cache(maxsize=None)
def _chunk_reference(name: str, mode: str):
    """Untiered run of the chunk model: final params, state dict, the buckets' sizes and the bytes of one (32, 32)
    block's state."""
    model = _chunk_model()
    opt = _make(name, model, RuntimeConfig(**MODES[mode]))
    _chunk_train(opt, model, STEPS)
    sizes = [b.size for b in opt._buckets]
    square = next(b for b in opt._buckets if tuple(b.shape) == (32, 32))
    block = sum(t[0].numel() * t.element_size() for t in square.state.values())
    out = (_params(model), copy.deepcopy(opt.state_dict()), sizes, block)
    opt.close()
    return out


@pytest.mark.parametrize("chunk", ["auto", "two blocks"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_chunked_state_at_4x_oversubscription_is_bit_identical(tmp_path, name, mode, chunk):
    """State 4x the budgets, on the NVMe tier a chunk of blocks at a time: the same bits as in memory (invariant 4)."""
    ref_params, ref_sd, ref_sizes, block = _chunk_reference(name, mode)
    total = _state_bytes(ref_sd)
    budgets = {"device_budget": total // 16, "host_budget": total * 3 // 16}
    if chunk == "two blocks":  # chunks of two (32, 32) blocks: sub-stacks of the bucket, at offsets 0, 2, 4
        budgets["max_chunk_bytes"] = 2 * block + 1024  # (+ the alignment of the stacked tensors)
    model = _chunk_model()
    opt = _make(name, model, RuntimeConfig(**MODES[mode], **budgets, nvme_path=tmp_path))
    _chunk_train(opt, model, STEPS)
    for p, q in zip(ref_params, model.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(ref_sd, opt.state_dict())
    # the buckets really were split, into chunks of several blocks where the bound allows it
    sizes = [b.size for b in opt._buckets]
    assert sum(sizes) == sum(ref_sizes) and len(sizes) > len(ref_sizes)
    if chunk == "two blocks":
        assert [b.size for b in opt._buckets if tuple(b.shape) == (32, 32)] == [2, 2, 2]
    rep = opt.runtime.memory_report()
    assert total >= 4 * (budgets["device_budget"] + budgets["host_budget"])
    assert rep["tiers"]["nvme"] > total / 2 and rep["pager"]["bytes_read"] > 0
    assert rep["budgets"]["device_peak"] <= budgets["device_budget"]
    assert rep["budgets"]["host_peak"] <= budgets["host_budget"]
    opt.close()


def test_a_host_budget_of_one_block_and_its_staging_buffer_is_enough(tmp_path):
    """One bucket of eight blocks: the NVMe tier needs room for one block, not the bucket, and the refusal names it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False) for _ in range(8)])
    cfg = dict(refresh="sync", device_budget=0, nvme_path=tmp_path)
    with pytest.raises(BudgetError) as info:
        _make("soap", model, RuntimeConfig(**cfg, host_budget=4096))
    msg = str(info.value)
    assert "one block per chunk" in msg and "staging buffers" in msg
    smallest = int(msg.split("smallest host_budget that works with device_budget=0 bytes (0 B) is ")[1].split(" bytes")[0].replace(",", ""))
    block = 6 * 64 * 64 * 4  # SOAP: two factors, two bases, two moments of a 64 x 64 block
    assert smallest == -(-(block + 256) // 4096) * 4096  # one page-rounded block (+ its counters) in one buffer
    opt = _make("soap", model, RuntimeConfig(**cfg, host_budget=smallest))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    rep = opt.runtime.memory_report()
    assert [b.size for b in opt._buckets] == [1] * 8 and rep["tiers"]["nvme"] == rep["state_bytes"]
    assert rep["buffers"]["staging_buffers"] == 1 and rep["budgets"]["host_peak"] <= smallest
    opt.close()
    with pytest.raises(BudgetError):
        _make("soap", model, RuntimeConfig(**cfg, host_budget=smallest - 1))


def test_odd_block_dims_are_split_only_where_their_alignment_is_kept(tmp_path):
    """MKL's batched products give other bits for an odd-sized matrix at another alignment; a bucket of such blocks
    is therefore split only in runs of 32 blocks, and Shampoo's (33,) and (33, 33) blocks keep their bits."""
    from asteria.runtime.tiers import _split_quantum

    assert _split_quantum((768, 2048)) == 1 and _split_quantum((32,)) == 1 and _split_quantum((48, 16)) == 2
    assert _split_quantum((33, 17)) == 32 and _split_quantum((24,)) == 4
    dims = [33] * 6

    def run(runtime):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:])])
        opt = _make("shampoo", model, runtime)
        for s in range(STEPS):
            torch.tanh(model(torch.randn(8, 33, generator=torch.Generator().manual_seed(s)))).square().mean().backward()
            opt.step()
            opt.zero_grad()
        out = _params(model), opt.state_dict(), [b.size for b in opt._buckets]
        opt.close()
        return out

    ref = run(RuntimeConfig(refresh="sync"))
    got = run(RuntimeConfig(refresh="sync", device_budget="1GiB", max_chunk_bytes=1, nvme_path=tmp_path))
    assert got[2] == ref[2] == [5, 5]  # five (33, 33) weights and five (33,) biases: not split
    for p, q in zip(ref[0], got[0]):
        assert torch.equal(p, q)
    _assert_same_state(ref[1], got[1])


def test_refreshes_in_flight_of_whole_buckets_install_into_chunks(tmp_path):
    """A checkpoint taken without budgets holds refresh batches of whole buckets; loaded with budgets that split the
    buckets, each batch is installed chunk by chunk, at the same step and with the same bits."""
    mode = "async"
    ref_params, ref_sd, _, block = _chunk_reference("soap", mode)
    model = _chunk_model()
    plain = _make("soap", model, RuntimeConfig(**MODES[mode]))
    _chunk_train(plain, model, 3)
    sd = plain.state_dict()
    assert any(len(e["tag"]["blocks"]) == 6 for e in sd["asteria"]["pending"])  # the (32, 32) bucket's batch in flight
    model2 = _chunk_model()
    model2.load_state_dict(model.state_dict())
    plain.close()
    total = _state_bytes(ref_sd)
    opt = _make("soap", model2, RuntimeConfig(**MODES[mode], device_budget=total // 16, host_budget=total * 3 // 16,
                                              max_chunk_bytes=block, nvme_path=tmp_path))
    opt.load_state_dict(sd)
    assert [b.size for b in opt._buckets if tuple(b.shape) == (32, 32)] == [1] * 6
    _chunk_train(opt, model2, STEPS - 3, start=3)
    for p, q in zip(ref_params, model2.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(ref_sd, opt.state_dict())
    opt.close()


def test_max_chunk_bytes_is_validated():
    assert RuntimeConfig(device_budget="1MiB", max_chunk_bytes="64KiB").max_chunk_bytes == 64 << 10
    assert RuntimeConfig(host_budget=1 << 20).max_chunk_bytes is None
    with pytest.raises(ValueError, match="max_chunk_bytes.*at least 1 byte"):
        RuntimeConfig(device_budget="1MiB", max_chunk_bytes=0)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        RuntimeConfig(device_budget="1MiB", max_chunk_bytes="big")
    with pytest.raises(ValueError, match="applies to tiered state only: set device_budget, host_budget or nvme_path"):
        RuntimeConfig(max_chunk_bytes="1MiB")
def test_bf16_state_is_tiered_bit_identically_in_half_the_bytes(tmp_path):
    """bf16 state on the device, host and NVMe tiers (asynchronous refreshes, S = 1): the same bits as untiered bf16
    state, and the tiers hold and account half the floating bytes of float32 state."""
    name = "shampoo"

    def make(model, runtime):
        return _make(name, model, runtime, state_dtype=torch.bfloat16)

    model = _model()
    opt = make(model, RuntimeConfig(**MODES["async"]))
    _train(opt, model, STEPS)
    ref_params, ref_sd = _params(model), copy.deepcopy(opt.state_dict())
    largest = max(sum(t.numel() * t.element_size() for t in b.state.values()) for b in opt._buckets)
    opt.close()
    total = _state_bytes(ref_sd)
    _, sd32, _, _ = _reference(name, "async")
    floating32 = sum(t.numel() * t.element_size() for b in _blocks(sd32).values() for x in b for t in x.values()
                     if t.is_floating_point())
    assert total == _state_bytes(sd32) - floating32 // 2

    page = -(-largest // 4096) * 4096
    budgets = {"device_budget": total // 10, "host_budget": 3 * page + total // 12}
    model = _model()
    opt = make(model, RuntimeConfig(**MODES["async"], **budgets, nvme_path=tmp_path))
    try:
        _train(opt, model, STEPS)
        for p, q in zip(ref_params, model.parameters()):
            assert torch.equal(p, q)
        _assert_same_state(ref_sd, opt.state_dict())
        rep = opt.runtime.memory_report()
        assert rep["state_bytes"] == total and rep["tiers"]["nvme"] > 0 and rep["pager"]["bytes_read"] > 0
    finally:
        opt.close()
