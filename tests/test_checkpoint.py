"""asteria.save_checkpoint / load_checkpoint / checkpoint_info: round trips, bit-identical optimizer resume
(tiered state included), hostile and damaged files, real full and read-only file systems, injected faults,
symbolic links, a process killed in the middle of a write, and the memory a save and a load take."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import asteria
from asteria import CheckpointError, checkpoint_info, load_checkpoint, save_checkpoint
from asteria.checkpoint import _save
from asteria.runtime import RuntimeConfig
from helpers import assert_same_bits, has_o_tmpfile


def _sample() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=g)
    return {
        "weights": base,
        "view": base[3:7],  # shares storage with "weights"
        "half": torch.randn(17, generator=g).to(torch.bfloat16),
        "ints": torch.arange(-5, 5, dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "nested": {"step": 12, "lr": 3e-3, "name": "soap", "history": [1.5, 2.5], "pair": (1, "x")},
        "empty": torch.empty(0, 3),
    }


def _only(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------------------------------------- round trips
def test_round_trip_metadata_info_and_private_file(tmp_path):
    obj = _sample()
    path = tmp_path / "run.ckpt"
    save_checkpoint(obj, path, metadata={"step": "12", "note": "grüße, € 😀"})
    assert _only(tmp_path) == ["run.ckpt"], "no temporary file is left"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    back = load_checkpoint(path)
    assert_same_bits(obj, back)
    assert back["view"].untyped_storage().data_ptr() == back["weights"].untyped_storage().data_ptr()
    info = checkpoint_info(path)
    assert info["metadata"]["step"] == "12" and info["metadata"]["note"] == "grüße, € 😀"
    assert info["metadata"]["asteria.version"] == asteria.__version__
    assert info["metadata"]["asteria.torch_version"] == str(torch.__version__)
    assert info["file_bytes"] == os.path.getsize(path)
    assert info["file_bytes"] == info["header_bytes"] + info["metadata_bytes"] + info["payload_bytes"]
    assert info["format_version"] == 1 and info["verified"] is False
    assert checkpoint_info(str(path), verify=True)["verified"] is True
    with open(path, "rb") as f:
        assert f.read(8) == b"ASTERIA\x1a"
        f.seek(info["header_bytes"] + info["metadata_bytes"])
        assert f.read(4) == b"PK\x03\x04", "the payload is torch.save's zip archive"


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"v": torch.zeros(3)}, path)
    save_checkpoint({"v": torch.ones(3)}, path)
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(3))
    assert _only(tmp_path) == ["c.pt"]


def test_metadata_is_validated(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(ValueError, match="'asteria.version'.*written by asteria itself"):
        save_checkpoint({}, path, metadata={"asteria.version": "9"})
    with pytest.raises(TypeError, match="str to str"):
        save_checkpoint({}, path, metadata={"step": 3})
    with pytest.raises(CheckpointError, match=r"outside \[A-Za-z0-9_.-\]") as info:
        save_checkpoint({}, path, metadata={"bad key": "v"})
    assert info.value.reason == "invalid_metadata"
    with pytest.raises(CheckpointError, match="control character"):
        save_checkpoint({}, path, metadata={"k": "two\nlines"})
    with pytest.raises(CheckpointError, match="at most 4096"):
        save_checkpoint({}, path, metadata={"k": "x" * 4097})
    assert _only(tmp_path) == []


def test_a_key_that_is_not_utf8_in_a_crafted_file_is_a_checkpoint_error(tmp_path):
    """A file whose CRCs are right but whose metadata key holds a byte that is not UTF-8 (crafted, or written by
    something else): CheckpointError("invalid_metadata") with the byte escaped, never a UnicodeDecodeError."""
    from asteria import _core

    block = bytearray(_core.checkpoint.encode_header(0, _core.crc32c(b""), {"ka": "1"}))
    header = _core.checkpoint.HEADER_BYTES
    at = bytes(block).index(b"ka", header)
    block[at + 1] = 0xFF  # the key becomes b"k\xff"
    block[32:36] = _core.crc32c(bytes(block[header:])).to_bytes(4, "little")  # reseal the metadata CRC,
    block[60:64] = _core.crc32c(bytes(block[:60])).to_bytes(4, "little")  # then the header CRC
    path = tmp_path / "crafted.pt"
    path.write_bytes(bytes(block))
    with pytest.raises(CheckpointError, match=r"key 'k\\xff' has a character outside") as info:
        load_checkpoint(path)
    assert info.value.reason == "corrupted"


def test_an_error_while_pickling_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"v": torch.arange(4)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="lambda|pickle"):
        save_checkpoint({"big": torch.zeros(1 << 18), "f": lambda: 0}, path)
    assert path.read_bytes() == before and _only(tmp_path) == ["c.pt"]


# ------------------------------------------------------------------------------ optimizer state, tiers included
DIMS = [32, 40, 24, 36, 28, 20]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(DIMS, DIMS[1:])])


def _train(model, opt, start: int, steps: int) -> None:
    for s in range(start, start + steps):
        x = torch.randn(8, DIMS[0], generator=torch.Generator().manual_seed(100 + s))
        torch.tanh(model(x)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _tiered(tmp: Path) -> RuntimeConfig:
    # Budgets far below the state (about 120 KB; the host budget is mostly staging buffers): the
    # buckets live on the NVMe tier.
    return RuntimeConfig(refresh="sync", device_budget=4096, host_budget=64 * 1024, nvme_path=tmp)


def test_tiered_optimizer_state_resumes_bit_identically(tmp_path):
    """SOAP with state on the NVMe tier: the checkpoint holds the bytes themselves (nothing refers to
    the swap file), and a run resumed from it ends bit-identical to one that was never interrupted."""
    (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    ref_model = _model()  # the reference keeps its state in memory: tiers never change the numbers
    ref = asteria.SOAP(ref_model.parameters(), precondition_frequency=2, runtime=RuntimeConfig(refresh="sync"))
    _train(ref_model, ref, 0, 4)
    ref_state = ref.state_dict()

    model = _model()
    opt = asteria.SOAP(model.parameters(), precondition_frequency=2, runtime=_tiered(tmp_path / "b"))
    _train(model, opt, 0, 2)
    report = opt.runtime.memory_report()
    assert report["tiers"]["nvme"] > 0, "the state really is on the NVMe tier"
    swap_dir = report["pager"]["directory"]
    path = tmp_path / "opt.ckpt"
    save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    opt.close()
    data = path.read_bytes()
    assert swap_dir.encode() not in data and b"extents.swap" not in data
    del model, opt

    model = _model()
    opt = asteria.SOAP(model.parameters(), precondition_frequency=2, runtime=_tiered(tmp_path / "c"))
    ck = load_checkpoint(path)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    _train(model, opt, 2, 2)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert_same_bits(ref_state["state"], opt.state_dict()["state"])
    ref.close()
    opt.close()


# ----------------------------------------------------------------------------------------- hostile and damaged
def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "evil.ckpt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "x": Evil()}, path)
    checkpoint_info(path, verify=True)  # a well-formed container: only weights_only stands in the way
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)
    assert not marker.exists(), "code from the checkpoint ran"


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint({"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(1))}, path)
    return path


@pytest.mark.parametrize("keep", [0, 5, 63, 64, 100, -4096, -1])
def test_a_torn_file_is_refused(saved, keep):
    size = os.path.getsize(saved)
    os.truncate(saved, keep if keep >= 0 else size + keep)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    msg = str(info.value)
    assert str(saved) in msg
    if keep == 0:
        assert info.value.reason == "not_a_checkpoint"
    else:
        assert info.value.reason == "torn" and "is torn" in msg and "resume from an earlier checkpoint" in msg


def test_appended_bytes_are_refused(saved):
    with open(saved, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="appended") as info:
        load_checkpoint(saved)
    assert info.value.reason == "torn"


@pytest.mark.parametrize("where", ["header", "metadata", "payload-start", "payload-middle", "payload-end"])
def test_a_flipped_bit_is_refused(saved, where):
    info = checkpoint_info(saved)
    offset = {"header": 20, "metadata": 70, "payload-start": info["header_bytes"] + info["metadata_bytes"],
              "payload-middle": info["file_bytes"] // 2, "payload-end": info["file_bytes"] - 1}[where]
    with open(saved, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x08]))
    with pytest.raises(CheckpointError, match="is corrupted.*CRC32C.*resume from an earlier checkpoint") as exc:
        load_checkpoint(saved)
    assert exc.value.reason == "corrupted" and str(saved) in str(exc.value)
    if where.startswith("payload"):
        checkpoint_info(saved)  # the header alone is intact
        with pytest.raises(CheckpointError, match="payload's CRC32C"):
            checkpoint_info(saved, verify=True)


def test_a_plain_torch_save_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match=r"is not an asteria checkpoint.*torch\.load") as info:
        load_checkpoint(path)
    assert info.value.reason == "not_a_checkpoint" and isinstance(info.value, ValueError)
    with pytest.raises(FileNotFoundError, match="No such file"):
        load_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------ real file systems (root)
@contextlib.contextmanager
def _tmpfs(directory: Path, options: str):
    """A tmpfs mounted at ``directory`` for the duration (skips when mounting is not permitted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {proc.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_a_full_file_system_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    with _tmpfs(tmp_path / "small", "size=1m,mode=0700") as small:
        path = small / "c.ckpt"
        save_checkpoint({"w": torch.ones(50_000)}, path)  # 200 KB: fits
        before = path.read_bytes()
        with pytest.raises(OSError) as info:
            save_checkpoint({"w": torch.ones(500_000)}, path)  # 2 MB: does not
        e = info.value
        assert e.errno == errno.ENOSPC
        msg = str(e)
        assert "No space left on device" in msg and str(path) in msg
        assert "needs about 2,000," in msg and "bytes reached the file" in msg
        assert "free space" in msg and "previous file at the target is untouched" in msg
        assert _only(small) == ["c.ckpt"], "the temporary file was removed"
        assert path.read_bytes() == before
        assert torch.equal(load_checkpoint(path)["w"], torch.ones(50_000))


def test_a_read_only_directory_is_a_clear_error(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(OSError) as info:
            save_checkpoint({"w": torch.ones(3)}, ro / "c.ckpt")
        assert info.value.errno == errno.EROFS
        assert str(ro) in str(info.value) and "save to a directory you can write to" in str(info.value)
        assert _only(ro) == []


def test_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="create the directory first"):
        save_checkpoint({}, tmp_path / "no" / "c.ckpt")


# ---------------------------------------------------------------------------------------- injected faults
@pytest.mark.parametrize("fault,after,code,says", [
    ("enospc", 0, errno.ENOSPC, "free space"),
    ("enospc", 100_000, errno.ENOSPC, "needs about"),
    ("eio", 300_000, errno.EIO, "check the device"),
    ("fsync", 0, errno.EIO, "fsync of the finished file failed"),
    ("rename", 0, errno.EIO, "renaming the finished file"),
])
def test_every_fault_point_keeps_the_previous_checkpoint(tmp_path, fault, after, code, says):
    path = tmp_path / "c.ckpt"
    save_checkpoint({"step": 1, "w": torch.zeros(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(OSError, match=says) as info:
        # 2.4 MB: the payload faults strike while torch.save is still streaming (past the 1 MiB buffer)
        _save({"step": 2, "w": torch.ones(600_000)}, path, None, test_fault=fault, fault_after_bytes=after)
    assert info.value.errno == code and str(path) in str(info.value)
    assert _only(tmp_path) == ["c.ckpt"] and path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1


# --------------------------------------------------------------------------------------------- symbolic links
def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "latest.ckpt"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link") as info:  # never read through a link
        load_checkpoint(link)
    assert info.value.errno == errno.ELOOP
    save_checkpoint({"w": torch.ones(2)}, link)
    assert not link.is_symlink() and link.is_file()
    assert victim.read_text() == "keep me"
    assert torch.equal(load_checkpoint(link)["w"], torch.ones(2))


# ---------------------------------------------------------------------------------- a crash in the middle
def _unnamed_temp_size(pid: int, directory: Path) -> int:
    """Bytes of the unnamed (O_TMPFILE) file process ``pid`` holds open in ``directory``, or -1."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(f"{directory}/#") and target.endswith("(deleted)"):
                return os.stat(fd).st_size
        except OSError:
            continue
    return -1


@pytest.mark.parametrize("temp", ["unnamed", "named"])
def test_a_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path, temp):
    """SIGKILL in the middle of a write (the test hook slows every chunk down): the target still holds
    the previous checkpoint. An unnamed temporary file (O_TMPFILE, the default) leaves nothing behind;
    a named one stays, and is never taken for a checkpoint."""
    if temp == "unnamed" and not has_o_tmpfile(tmp_path):
        pytest.skip("this file system has no O_TMPFILE: the writer uses a named temporary file")
    path = tmp_path / "c.ckpt"
    save_checkpoint({"step": 1, "w": torch.zeros(10)}, path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import torch
        from asteria.checkpoint import _save
        state = {{"step": 2, **{{f"w{{i}}": torch.full((16384,), float(i)) for i in range(40)}}}}
        _save(state, {str(path)!r}, None, named_temp={temp == "named"}, chunk_delay_s=0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        written = -1
        while time.monotonic() < deadline and proc.poll() is None and written <= 0:
            if temp == "named":
                names = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
                written = names[0].stat().st_size if names else -1
            else:
                written = _unnamed_temp_size(proc.pid, tmp_path)
            time.sleep(0.01)
        assert written > 0 and proc.poll() is None, "the writer did not start in time"
        time.sleep(0.1)  # inside the write: 1 MiB of the 2.6 MB payload is in the file, 200 chunks at 10 ms each
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    if temp == "unnamed":
        assert _only(tmp_path) == ["c.ckpt"], "nothing is left behind"
        return
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != "c.ckpt"]
    assert leftover.name.startswith(".c.ckpt.") and leftover.name.endswith(".tmp")
    assert stat.S_IMODE(leftover.stat().st_mode) == 0o600
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(leftover)
    assert info.value.reason == "not_a_checkpoint"  # the header is written last


# ----------------------------------------------------------------------------------------------------- memory
def test_save_and_load_hold_no_second_copy_of_the_payload(tmp_path):
    """Peak resident memory: a save adds less than a quarter of the payload (nothing is copied), a load
    about one payload (the tensors themselves, read straight into their storage)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("/proc/self/clear_refs (resetting the peak RSS) is not available")
    script = textwrap.dedent(f"""
        import torch, asteria
        def kib(field):
            return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
        def reset():
            open("/proc/self/clear_refs", "w").write("5")
        t = torch.ones(16 << 20)  # 64 MiB
        path = {str(tmp_path / "big.ckpt")!r}
        base = kib("VmRSS"); reset()
        asteria.save_checkpoint({{"t": t}}, path)
        save = kib("VmHWM") - base
        del t
        base = kib("VmRSS"); reset()
        back = asteria.load_checkpoint(path)
        load = kib("VmHWM") - base
        assert back["t"].sum().item() == 16 << 20
        print(save, load)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    save_kib, load_kib = map(int, out.stdout.split())
    payload_kib = 64 << 10
    assert save_kib < payload_kib // 4, (save_kib, load_kib)
    assert load_kib < payload_kib * 5 // 4, (save_kib, load_kib)
