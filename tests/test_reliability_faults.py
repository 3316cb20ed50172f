"""Fault injection into the runtime under real optimizers: every fault is detected, reported with what failed and
how to fix it, the training state stays intact, and training either goes on (where the policy says so) or stops
cleanly (the optimizer refuses to continue until the last checkpoint is loaded).

* NVMe-tier I/O (``Pager.set_test_fault``, a corrupted swap file, a full and a read-only file system), with every
  bucket of the optimizer state on the NVMe tier (``device_budget=0`` and no host-tier state);
* refresh jobs (``RefreshScheduler.set_test_fault``): a solver failure, an exception in the job body
  (``std::runtime_error``, ``std::bad_alloc``) and a result holding NaN;
* a training process killed with SIGKILL leaves no swap file or directory behind.

Runtime on the 2-core CI machine: about 13 s (a third of it the killed subprocess, which imports torch).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import pytest
import torch

import asteria
from asteria import _core
from asteria.runtime import RefreshFailureWarning, RuntimeConfig, StepFailedError, TierIOWarning
from helpers import stop

DIMS = [24, 32, 20, 28, 16, 36, 12]  # six weight matrices of distinct shapes: six buckets
STEPS = 8
OPTIMIZERS = {"soap": asteria.SOAP, "shampoo": asteria.Shampoo, "kl-shampoo": asteria.KLShampoo}
FOREVER = 1 << 40  # a fault that never stops


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These small matrices run fastest on one thread (and the machine's cores stay with the workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(a, b, bias=False) for a, b in zip(DIMS, DIMS[1:])])


def _backward(model, step: int) -> None:
    x = torch.randn(8, DIMS[0], generator=torch.Generator().manual_seed(100 + step))
    torch.tanh(model(x)).square().mean().backward()


def _train(opt, model, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        _backward(model, s)
        opt.step()
        opt.zero_grad()


def _kwargs(name: str) -> dict:
    kw = dict(precondition_frequency=2)
    if name == "shampoo":
        kw.update(merge_dims=False, start_preconditioning_step=2)
    return kw


def _make(name: str, model, nvme, refresh: str = "sync", host_budget: int | None = None):
    """An optimizer whose every bucket lives on the NVMe tier (no device tier; without ``host_budget`` no host-tier
    state and three staging buffers carry each step's buckets through the swap file)."""
    mode = dict(refresh="async", staleness=1, workers=1) if refresh == "async" else dict(refresh="sync")
    rt = RuntimeConfig(**mode, device_budget=0, host_budget=host_budget, nvme_path=nvme)
    return OPTIMIZERS[name](model.parameters(), runtime=rt, **_kwargs(name))


def _one_staging_buffer(name: str, nvme: str) -> int:
    """A host budget that holds one staging buffer and nothing else: no bucket is read ahead of its use."""
    model = _model()
    opt = _make(name, model, nvme)
    _train(opt, model, 1)
    out = opt.runtime.memory_report()["buffers"]["staging_buffer_bytes"]
    opt.close()
    return out


@contextlib.contextmanager
def _tier_warnings(pattern: str):
    """Records the TierIOWarnings of the block (how many depends on I/O timing); each must match ``pattern``."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", TierIOWarning)
        yield record
    for w in record:
        assert issubclass(w.category, TierIOWarning) and re.search(pattern, str(w.message)), w


@functools.lru_cache(maxsize=None)
def _reference(name: str):
    """An untiered run: per step, the parameters and the state dict after it."""
    model = _model()
    opt = OPTIMIZERS[name](model.parameters(), runtime=RuntimeConfig(refresh="sync"), **_kwargs(name))
    history = []
    for s in range(STEPS):
        _train(opt, model, 1, start=s)
        history.append(([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())))
    opt.close()
    return history


def _assert_matches(model, opt, name: str, after: int) -> None:
    """Parameters and optimizer state equal the reference after ``after`` steps, bit for bit."""
    params, sd = _reference(name)[after - 1]
    current = list(model.parameters())
    assert len(params) == len(current)
    for p, q in zip(params, current):
        assert torch.equal(p, q)
    got = opt.state_dict()
    assert sd["state"].keys() == got["state"].keys()
    for i, blocks in sd["state"].items():
        assert len(blocks["blocks"]) == len(got["state"][i]["blocks"]), i
        for b, c in zip(blocks["blocks"], got["state"][i]["blocks"]):
            assert b.keys() == c.keys()
            for k in b:
                assert torch.equal(b[k], c[k]), (i, k)


def _checkpoint(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_refuses_until_reloaded(model, opt, ck, name: str, start: int) -> None:
    """After a step failed midway: step() and state_dict() refuse; loading the checkpoint makes the optimizer
    usable again, and training then ends bit-identical to a run that never failed."""
    assert opt._tiers.failure(opt) is not None
    opt._tiers.pager.set_test_fault("none")
    _backward(model, start)
    with pytest.raises(StepFailedError, match="failed midway.*reload the last checkpoint"):
        opt.step()
    with pytest.raises(StepFailedError, match="failed midway"):
        opt.state_dict()
    opt.zero_grad()
    bad = copy.deepcopy(ck[1])
    first = next(iter(bad["state"]))
    bad["state"][first]["blocks"][0]["surprise"] = torch.zeros(1)
    with pytest.raises(ValueError, match="surprise"):  # a failed load rolls back to ... no state at all:
        opt.load_state_dict(bad)
    _backward(model, start)
    with pytest.raises(StepFailedError, match="no state left to continue from"):  # never a silent fresh start
        opt.step()
    opt.zero_grad()
    model.load_state_dict(ck[0])
    opt.load_state_dict(ck[1])
    _train(opt, model, STEPS - start, start=start)
    _assert_matches(model, opt, name, STEPS)


def _swap_fd(opt) -> str:
    """/proc/self/fd/N of the optimizer's swap file (it has no name: it was unlinked once open)."""
    swap = opt._tiers.pager.swap_path + " (deleted)"
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == swap:
                return f"/proc/self/fd/{fd}"
        except OSError:
            continue
    raise AssertionError("the pager holds no descriptor on its swap file")


# ------------------------------------------------------------------------------------------------ NVMe-tier reads
@pytest.mark.parametrize("kind,text", [("eio", "Input/output error"), ("short", "short read")])
def test_read_fault_before_any_update_changes_nothing_and_the_step_can_be_retried(tmp_path, kind, text):
    """The first bucket of a step cannot be read (also when retried): nothing was updated, the error says so, and
    calling step() again once the drive answers continues the run exactly. (One staging buffer, so the first
    bucket is never read ahead during the previous step.)"""
    model = _model()
    opt = _make("soap", model, tmp_path, host_budget=_one_staging_buffer("soap", str(tmp_path)))
    _train(opt, model, 3)
    assert opt.runtime.memory_report()["buffers"]["staging_buffers"] == 1
    opt._tiers.pager.set_test_fault(kind, op="read", count=FOREVER)  # before backward: its hooks start the reads
    _backward(model, 3)
    with pytest.raises(OSError, match=rf"also when retried.*{text}.*Nothing was changed by this step") as info:
        opt.step()
    msg = str(info.value)
    assert str(tmp_path) in msg and "reading bucket" in msg and "Fix: check the drive" in msg
    assert opt._tiers.failure(opt) is None
    opt._tiers.pager.set_test_fault("none")
    with _tier_warnings("succeeded when retried"):  # prefetches that failed are read again
        _assert_matches(model, opt, "soap", 3)  # parameters and state as before the step
        opt.step()  # the same step again
    opt.zero_grad()
    _train(opt, model, STEPS - 4, start=4)
    _assert_matches(model, opt, "soap", STEPS)
    opt.close()


@pytest.mark.parametrize("name,kind,text", [("soap", "eio", "Input/output error"), ("kl-shampoo", "short", "short read")])
def test_read_fault_midway_refuses_to_continue_until_the_checkpoint_is_loaded(tmp_path, name, kind, text):
    """A bucket of the middle of a step cannot be read: the buckets before it were updated, so parameters and state
    no longer match. The step raises saying so, the optimizer refuses step() and state_dict() (no inconsistent
    checkpoint), and loading the last checkpoint resumes the run bit-identically."""
    model = _model()
    opt = _make(name, model, tmp_path)
    _train(opt, model, 3)
    ck = _checkpoint(model, opt)
    opt._tiers.pager.set_test_fault(kind, op="read", skip=3, count=FOREVER)  # the fourth bucket of the step
    _backward(model, 3)
    with pytest.raises(OSError, match=rf"also when retried.*{text}.*had already updated other buckets") as info:
        opt.step()
    assert "refuses to continue" in str(info.value) and "reload the last checkpoint" in str(info.value)
    before, _ = _reference(name)[2]
    after, _ = _reference(name)[3]
    now = list(model.parameters())
    assert any(torch.equal(q, a) and not torch.equal(q, b) for q, a, b in zip(now, after, before))  # updated
    assert any(torch.equal(q, b) and not torch.equal(q, a) for q, a, b in zip(now, after, before))  # not updated
    opt.zero_grad()
    _assert_refuses_until_reloaded(model, opt, ck, name, 3)
    opt.close()


def test_corrupted_swap_file_is_detected_and_the_checkpoint_restores_the_run(tmp_path):
    """Bytes of the swap file flipped behind the optimizer's back: the CRC check refuses them (nothing wrong is
    ever used), the error names the corruption and the fix, and the run resumes from the last checkpoint."""
    model = _model()
    opt = _make("shampoo", model, tmp_path)
    _train(opt, model, 3)
    ck = _checkpoint(model, opt)
    opt._tiers.flush()  # every bucket's bytes on the drive
    size = opt.runtime.memory_report()["pager"]["file_bytes"]
    with open(_swap_fd(opt), "r+b") as f:  # the file has no name: through the pager's own descriptor
        for offset in range(100, size, 1024):
            f.seek(offset)
            f.write(b"\xa5\x5a")
    _backward(model, 3)
    with pytest.raises(OSError, match=r"also when retried.*CRC32C check.*swap file was corrupted") as info:
        opt.step()
    assert "no wrong data was used" in str(info.value) and "reload the last checkpoint" in str(info.value)
    assert opt.runtime.memory_report()["pager"]["io_errors"] == 0  # a checksum failure, not an I/O error
    opt.zero_grad()
    model.load_state_dict(ck[0])
    opt.load_state_dict(ck[1])  # the unreadable state is discarded, the checkpoint's takes its place
    _train(opt, model, STEPS - 3, start=3)
    _assert_matches(model, opt, "shampoo", STEPS)
    opt.close()


# ----------------------------------------------------------------------------------------------- NVMe-tier writes
@pytest.mark.parametrize(
    "name,kind,text",
    [("soap", "eio", "Input/output error"), ("shampoo", "enospc", "No space left on device"), ("kl-shampoo", "short", "short write")],
)
def test_failed_write_back_loses_nothing_and_training_goes_on(tmp_path, name, kind, text):
    """A write-back fails, also when retried: its bytes stay in their staging buffer, a warning says so, the write
    succeeds later, and the run ends bit-identical to one without the fault. (Four failing requests: with up to
    three write-backs in flight, at least one bucket's write and its retry both fail.)"""
    model = _model()
    opt = _make(name, model, tmp_path)
    _train(opt, model, 3)
    opt._tiers.pager.set_test_fault(kind, op="write", skip=2, count=4)
    with _tier_warnings(rf"also when retried.*{text}.*Nothing is lost|{text}.*succeeded when retried") as record:
        _train(opt, model, STEPS - 3, start=3)
    lost_nothing = [str(w.message) for w in record if "Nothing is lost" in str(w.message)]
    assert lost_nothing and all(str(tmp_path) in m for m in lost_nothing)
    _assert_matches(model, opt, name, STEPS)
    assert opt.runtime.memory_report()["pager"]["io_errors"] == 4
    opt.close()


@pytest.mark.parametrize("name,kind,text", [("soap", "enospc", "No space left on device"), ("shampoo", "eio", "Input/output error")])
def test_persistent_write_failure_midway_refuses_to_continue(tmp_path, name, kind, text):
    """No write-back succeeds any more: once every staging buffer holds bytes that cannot be written, the next
    bucket cannot come in; the step fails midway with the fix, and the checkpoint resumes the run exactly."""
    model = _model()
    opt = _make(name, model, tmp_path)
    _train(opt, model, 3)
    ck = _checkpoint(model, opt)
    opt._tiers.pager.set_test_fault(kind, op="write", count=FOREVER)
    _backward(model, 3)
    with _tier_warnings(rf"also when retried.*{text}.*Nothing is lost"):
        with pytest.raises(OSError, match=rf"also when retried.*{text}.*had already updated other buckets") as info:
            opt.step()
    msg = str(info.value)
    assert str(tmp_path) in msg and "Nothing is lost" in msg and "refuses to continue" in msg
    if kind == "enospc":
        assert re.search(r"needed \d+ bytes", msg) and f"Fix: free space in '{tmp_path}'" in msg
        assert "choose another nvme_path" in msg and "raise host_budget" in msg
    opt.zero_grad()
    _assert_refuses_until_reloaded(model, opt, ck, name, 3)
    opt.close()


# -------------------------------------------------------------------------------------- real full / read-only drives
@pytest.fixture()
def tmpfs(tmp_path):
    """Mounts tmpfs file systems under tmp_path (root only); always unmounted."""
    mounted = []

    def mount(name: str, options: str):
        d = tmp_path / name
        d.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {out.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_full_drive_is_a_clear_error_and_the_step_works_once_there_is_room(tmpfs):
    """nvme_path on a tmpfs far smaller than the optimizer's NVMe-tier state: the first step cannot place the state
    and says so (ENOSPC, the bytes needed, nvme_path, the fix), nothing was changed, and once the file system has
    room the same step() goes through and the run ends bit-identical. The pager reserves the swap file's space when
    it allocates an extent, so the full drive is found there, before any byte is written."""
    nvme = tmpfs("full", "size=16k,mode=0700")
    model = _model()
    opt = _make("soap", model, nvme)
    _backward(model, 0)
    try:
        with _tier_warnings("No space left on device"):
            with pytest.raises(OSError, match=r"No space left on device: needed \d+ bytes") as info:
                opt.step()
        msg = str(info.value)
        assert "[pager::allocate]" in msg and f"Free space in '{nvme}', choose another nvme_path" in msg
        assert "Nothing was changed (the optimizer had no state yet)" in msg
        for p, q in zip(_model().parameters(), model.parameters()):
            assert torch.equal(p, q)
        subprocess.run(["mount", "-o", "remount,size=4m", str(nvme)], check=True)
        opt.step()
        opt.zero_grad()
        _train(opt, model, STEPS - 1, start=1)
        _assert_matches(model, opt, "soap", STEPS)
    finally:
        opt.close()  # the swap file's descriptor, before the unmount


def test_read_only_nvme_path_is_refused_with_the_fix(tmpfs):
    nvme = tmpfs("ro", "ro,size=1m")
    where = re.escape(f"'{nvme}'")
    with pytest.raises(PermissionError, match=rf"nvme_path {where} is not writable.*read-only.*choose a writable"):
        RuntimeConfig(device_budget=0, nvme_path=nvme)
    with pytest.raises(OSError, match=rf"private swap directory in {where}: Read-only file system; choose a writable nvme_path"):
        _core.Pager(directory=str(nvme))
    assert os.listdir(nvme) == []


# ------------------------------------------------------------------------------------------------ killed process
_KILLED_CHILD = textwrap.dedent(
    """
    import sys, torch, asteria
    torch.set_num_threads(1)
    nvme = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(48, 40 + 8 * i, bias=False) for i in range(4)])
    rt = asteria.RuntimeConfig(refresh="async", staleness=1, device_budget=0, nvme_path=nvme)
    opt = asteria.SOAP(model.parameters(), precondition_frequency=2, runtime=rt)
    step = 0
    while True:
        sum(layer(torch.randn(4, 48)).square().mean() for layer in model).backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if step == 3:
            rep = opt.runtime.memory_report()
            print(f"training {rep['tiers']['nvme']} {rep['pager']['bytes_written']}", flush=True)
    """
)


def test_sigkilled_training_leaves_no_swap_file_behind(tmp_path):
    """A process training with state on the NVMe tier is SIGKILLed mid-run: nothing is left under nvme_path (the
    swap file never had a name there after it was opened; the kernel frees its space with the process)."""
    nvme = tmp_path / f"nvme-{uuid.uuid4().hex[:8]}"
    nvme.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    with subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(nvme)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as child:
        try:
            if not select.select([child.stdout], [], [], 60)[0]:
                _, err, _ = stop(child, signal.SIGKILL)
                pytest.fail(f"the training process printed nothing in 60 s; its stderr: {err[-4000:]}")
            line = child.stdout.readline()
            assert line.startswith("training"), child.stderr.read()
            nvme_bytes, written = map(int, line.split()[1:])
            assert nvme_bytes > 0 and written > 0
            # while it trains: the swap file is open in the child, and nothing is visible under nvme_path
            links = []
            for fd in os.listdir(f"/proc/{child.pid}/fd"):
                try:
                    links.append(os.readlink(f"/proc/{child.pid}/fd/{fd}"))
                except OSError:
                    continue
            assert any(link.startswith(str(nvme)) and link.endswith("(deleted)") for link in links), links
            assert os.listdir(nvme) == []
            time.sleep(0.2)  # mid-step, with I/O in flight
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert os.listdir(nvme) == []


# ------------------------------------------------------------------------------------------------- refresh jobs
def _version_key(name: str) -> str:
    return "root_version" if name == "shampoo" else "basis_version"


def _blocks(sd) -> list[dict]:
    return [b for st in sd["state"].values() for b in st["blocks"]]


@pytest.mark.parametrize(
    "kind,name,text",
    [
        ("solver", "soap", r"\[linalg::eigenbasis_refresh\] QR factorisation failed"),
        ("exception", "shampoo", "a runtime_error thrown by the job body"),
        ("bad_alloc", "kl-shampoo", r"out of memory on the worker \(std::bad_alloc\)"),
        ("nonfinite", "soap", r"the output 'basis' holds NaN or Inf"),
        ("nonfinite", "shampoo", r"the output 'root' holds NaN or Inf"),
        ("solver", "kl-shampoo", r"QR factorisation failed"),
    ],
)
def test_failed_refresh_keeps_the_previous_preconditioner_warns_and_is_counted(tmp_path, kind, name, text):
    """A refresh job fails on a worker (injected, of each kind): training goes on with the block's previous
    preconditioner, a RefreshFailureWarning names the job, runtime.stats() counts it, the block's failure counter
    says so, and the block's next refresh installs normally (the worker kept serving)."""
    model = _model()
    opt = _make(name, model, tmp_path, refresh="async")
    _train(opt, model, 3)
    opt.runtime.runtime.scheduler.set_test_fault(kind, count=1)  # the next job a worker starts
    before = opt.state_dict()
    step = 3
    with pytest.warns(RefreshFailureWarning, match=rf"previous preconditioner is kept.*block \d+, version \d+\) failed: .*{text}"):
        while opt.runtime.stats()["jobs_failed"] == 0:
            assert step < 3 + 6, "the failed job was never installed"
            before = opt.state_dict()
            _train(opt, model, 1, start=step)
            step += 1
    stats = opt.runtime.stats()
    assert stats["jobs_failed"] == 1 and re.search(text, stats["failures"][-1])
    assert stats["scheduler"]["faults_injected"] == 1 and stats["scheduler"]["failed"] == 1
    after = opt.state_dict()
    key = _version_key(name)
    failed = [i for i, b in enumerate(_blocks(after)) if int(b["refresh_failures"]) == 1]
    assert len(failed) == 1, "exactly the block of the failed job counts a failure"
    i = failed[0]
    old, new = _blocks(before)[i], _blocks(after)[i]
    assert int(new[key]) == int(old[key]) < max(int(b[key]) for b in _blocks(after))  # not installed; others were
    for k in new:
        if k.startswith(("basis_", "root_")) and k != key:
            assert torch.equal(new[k], old[k]), k  # the previous preconditioner, untouched
    assert all(torch.isfinite(t).all() for b in _blocks(after) for t in b.values() if t.is_floating_point())
    _train(opt, model, 4, start=step)  # the block's next refresh succeeds
    again = _blocks(opt.state_dict())[i]
    assert int(again["refresh_failures"]) == 0 and int(again[key]) > int(new[key])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.runtime.stats()["jobs_failed"] == 1
    opt.close()
