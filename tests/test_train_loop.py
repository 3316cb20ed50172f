"""Tests of asteria.train.loop: a short run, checkpoints and exact resumption."""

import dataclasses

import sys

import pytest
import torch

from asteria.train.config import RunConfig
from asteria.train.corpus import load_corpus
from asteria.train.loop import (
    config_for_resume,
    load_checkpoint,
    resolve_device,
    train,
)
from helpers import assert_same_bits, default_signal_dispositions

SMALL = 200_000


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=SMALL)


def _cfg(**kw):
    base = dict(model="tiny", steps=8, batch_size=2, context=32, warmup=2, eval_every=4,
                eval_batches=1, corpus_bytes=SMALL, threads=1)
    base.update(kw)
    return RunConfig(**base)


def test_short_adamw_run(corpus):
    seen = []
    result = train(_cfg(), corpus, on_record=seen.append, progress=False)
    assert result.status == "ok"
    assert [r["step"] for r in result.records] == list(range(1, 9))
    assert seen == result.records
    assert [v["step"] for v in result.val_history] == [0, 4, 8]
    assert result.records[3]["val_loss"] == result.val_history[1]["val_loss"]
    assert "val_loss" not in result.records[0]
    walls = [r["wall"] for r in result.records]
    assert walls == sorted(walls) and all(r["step_time"] > 0 for r in result.records)
    assert result.records[-1]["loss"] < result.records[0]["loss"]
    assert result.val_history[-1]["val_loss"] < result.val_history[0]["val_loss"]
    assert result.state_bytes > 2 * 4 * result.num_parameters
    assert not any(r["refresh"] for r in result.records)
    if sys.platform.startswith("linux"):  # the run's own peak is recorded (how much above its start depends on
        mem = result.memory                   # what the allocator already held: see tests/test_train_rss.py)
        assert mem["peak_rss_bytes"] >= mem["start_rss_bytes"] > 0


def test_runs_are_reproducible(corpus):
    a = train(_cfg(steps=4), corpus, progress=False)
    b = train(_cfg(steps=4), corpus, progress=False)
    assert [r["loss"] for r in a.records] == [r["loss"] for r in b.records]


def _resume_matches(corpus, tmp_path, **kw):
    full = train(_cfg(**kw), corpus, progress=False)
    path = tmp_path / "ckpt.pt"
    first = train(_cfg(**kw), corpus, progress=False, save=path, stop_at=5)
    assert len(first.records) == 5
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 5
    cfg = config_for_resume(ckpt, {"threads": 1})
    rest = train(cfg, corpus, progress=False, checkpoint=ckpt)
    assert [r["loss"] for r in rest.records] == [r["loss"] for r in full.records]
    assert [v["val_loss"] for v in rest.val_history] == [v["val_loss"] for v in full.val_history]
    assert rest.records[-1]["step"] == 8


def test_resume_is_bit_identical_adamw(corpus, tmp_path):
    _resume_matches(corpus, tmp_path)


@pytest.fixture
def micro(monkeypatch):
    """A "micro" model preset, smaller than "tiny": keeps the eigendecompositions (and the tests) fast."""
    from asteria.train.model import PRESETS

    monkeypatch.setitem(PRESETS, "micro", dict(n_layer=2, n_head=2, d_model=32))
    return "micro"


@pytest.mark.parametrize("name", ["soap", "shampoo", "kl-soap", "kl-shampoo"])
def test_resume_is_bit_identical_second_order(corpus, tmp_path, name, micro):
    _resume_matches(corpus, tmp_path, optimizer=name, precondition_frequency=2, model="micro")


def test_resume_is_bit_identical_muon(corpus, tmp_path, micro):
    _resume_matches(corpus, tmp_path, optimizer="muon", model="micro")


def test_resume_rejects_conflicting_settings(corpus, tmp_path):
    path = tmp_path / "ckpt.pt"
    train(_cfg(steps=2), corpus, progress=False, save=path)
    ckpt = load_checkpoint(path)
    with pytest.raises(ValueError, match="--lr 0.5 conflicts with the checkpoint"):
        config_for_resume(ckpt, {"lr": 0.5})
    cfg = config_for_resume(ckpt, {"steps": 4, "eval_every": 1, "lr": None})
    assert cfg.steps == 4 and cfg.eval_every == 1
    other = dataclasses.replace(cfg, corpus_bytes=SMALL * 2)
    with pytest.raises(ValueError, match="different corpus"):
        train(other, load_corpus(max_bytes=SMALL * 2), progress=False, checkpoint=ckpt)


def test_not_a_checkpoint(tmp_path):
    import asteria

    plain = tmp_path / "old.pt"
    torch.save({"format": "asteria-train-checkpoint/1"}, plain)  # what older versions wrote
    with pytest.raises(ValueError, match="not an asteria-train checkpoint: it is a plain torch.save file.*"
                                         "asteria.save_checkpoint"):
        load_checkpoint(plain)
    foreign = tmp_path / "foreign.pt"
    asteria.save_checkpoint({"hello": 1}, foreign)
    with pytest.raises(ValueError, match="its payload is None, not 'asteria-train-checkpoint/1'"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not an asteria checkpoint file at all"):
        load_checkpoint(text)


def test_torn_and_corrupted_checkpoints_are_refused(corpus, tmp_path):
    import asteria

    path = tmp_path / "ckpt.pt"
    train(_cfg(steps=2), corpus, progress=False, save=path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(asteria.CheckpointError, match="is torn.*resume from an earlier checkpoint"):
        load_checkpoint(path)
    flipped = bytearray(good)
    flipped[-100] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(asteria.CheckpointError, match="is corrupted"):
        load_checkpoint(path)


class _Crash(Exception):
    pass


def _resume_from_periodic(corpus, tmp_path, **kw):
    """8 steps straight vs. a run saving every 3 steps that crashes during step 5 and resumes from
    the step-3 checkpoint: model and optimizer tensors end bit-identical."""
    straight = tmp_path / "straight.pt"
    full = train(_cfg(**kw), corpus, progress=False, save=straight)
    assert full.checkpoints_written == 1
    path = tmp_path / "periodic.pt"

    def crash_at_5(record):
        if record["step"] == 5:
            raise _Crash("killed")

    with pytest.raises(_Crash):
        train(_cfg(**kw), corpus, progress=False, save=path, save_every=3, on_record=crash_at_5)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and len(ckpt["records"]) == 3
    rest = train(config_for_resume(ckpt, {"threads": 1}), corpus, progress=False, checkpoint=ckpt,
                 save=path, save_every=3)
    assert rest.checkpoints_written == 2  # step 6, then the end (step 8)
    assert [r["loss"] for r in rest.records] == [r["loss"] for r in full.records]
    a, b = load_checkpoint(straight), load_checkpoint(path)
    assert a["step"] == b["step"] == 8
    assert_same_bits(a["model"], b["model"])
    assert_same_bits(a["optimizer"], b["optimizer"])
    assert_same_bits(a["rng"], b["rng"])


def test_periodic_checkpoint_resumes_bit_identically_adamw(corpus, tmp_path):
    _resume_from_periodic(corpus, tmp_path)


def test_periodic_checkpoint_resumes_bit_identically_soap_async(corpus, tmp_path, micro):
    # Refreshes every 2 steps installed 2 steps later: the step-3 checkpoint holds one in flight.
    _resume_from_periodic(corpus, tmp_path, optimizer="soap", refresh="async", staleness=1,
                          precondition_frequency=2, model="micro")


def test_save_every_is_validated(corpus):
    with pytest.raises(ValueError, match="save_every must be an integer >= 0"):
        train(_cfg(), corpus, progress=False, save_every=-1)


def test_sigterm_stops_at_a_step_boundary_and_a_second_signal_aborts(corpus, tmp_path):
    import os
    import signal

    path = tmp_path / "ckpt.pt"

    def term_at_step_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a job scheduler does

    first = train(_cfg(), corpus, progress=False, save=path, on_record=term_at_step_3)
    assert first.status == "interrupted" and first.stop_signal == signal.SIGTERM
    assert first.message == "stopped by SIGTERM after step 3"
    assert load_checkpoint(path)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored

    def twice_at_step_4(record):
        if record["step"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the second aborts at once

    second = train(_cfg(), corpus, progress=False, save=path, save_every=2, on_record=twice_at_step_4)
    assert second.status == "interrupted" and "aborted by SIGTERM" in second.message
    assert "no checkpoint written" in second.message
    assert load_checkpoint(path)["step"] == 2  # the last periodic checkpoint, intact
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_unavailable_optimizer_is_a_status(corpus, monkeypatch):
    import asteria.train.loop as loop_mod
    from asteria.train.optimizers import OptimizerUnavailable

    def unavailable(*args, **kwargs):
        raise OptimizerUnavailable("not built")

    monkeypatch.setattr(loop_mod, "build_optimizer", unavailable)
    result = train(_cfg(optimizer="soap"), corpus, progress=False)
    assert result.status == "unavailable" and result.message == "not built"
    assert result.records == []


def test_time_budget_stops_the_run(corpus):
    result = train(_cfg(steps=None, time_budget=0.05, eval_every=0), corpus, progress=False)
    assert result.status == "ok" and 1 <= len(result.records) < 1000
    assert result.val_history[-1]["step"] == len(result.records)


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_resume_is_bit_identical_async(corpus, tmp_path, micro):
    # Refresh every 2 steps, installed 3 steps later: the checkpoint at step 5 holds a
    # refresh still in flight.
    _resume_matches(corpus, tmp_path, optimizer="soap", refresh="async", staleness=2,
                    precondition_frequency=2, model="micro")


@pytest.mark.signals
def test_ctrl_c_stops_at_a_step_boundary_and_resumes(corpus, tmp_path):
    import os
    import signal

    def interrupt_at_step_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C

    full = train(_cfg(), corpus, progress=False)
    path = tmp_path / "ckpt.pt"
    with default_signal_dispositions():  # as in an interactive shell, whatever disposition pytest inherited
        first = train(_cfg(), corpus, progress=False, save=path, on_record=interrupt_at_step_3)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert first.status == "interrupted" and "after step 3" in first.message
    assert len(first.records) == 3 and first.checkpoint_path == str(path)
    ckpt = load_checkpoint(path)
    rest = train(config_for_resume(ckpt, {}), corpus, progress=False, checkpoint=ckpt)
    assert [r["loss"] for r in rest.records] == [r["loss"] for r in full.records]
