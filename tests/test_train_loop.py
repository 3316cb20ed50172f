"""Tests of asteria.train.loop: a short run, checkpoints and exact resumption."""

import dataclasses

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


@pytest.mark.parametrize("name", ["soap", "shampoo", "kl-soap", "kl-shampoo"])
def test_resume_is_bit_identical_second_order(corpus, tmp_path, name, monkeypatch):
    asteria = pytest.importorskip("asteria")
    from asteria.train.model import PRESETS
    from asteria.train.optimizers import ASTERIA_CLASSES

    if not hasattr(asteria, ASTERIA_CLASSES[name]):
        pytest.skip(f"asteria.{ASTERIA_CLASSES[name]} is not available yet")
    # A smaller model than "tiny" keeps the eigendecompositions (and the test) fast.
    monkeypatch.setitem(PRESETS, "micro", dict(n_layer=2, n_head=2, d_model=32))
    _resume_matches(corpus, tmp_path, optimizer=name, precondition_frequency=2, model="micro")


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
    path = tmp_path / "x.pt"
    torch.save({"hello": 1}, path)
    with pytest.raises(ValueError, match="not an asteria-train checkpoint"):
        load_checkpoint(path)


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


def test_resume_is_bit_identical_async(corpus, tmp_path, monkeypatch):
    asteria = pytest.importorskip("asteria")
    from asteria.train.model import PRESETS

    if not hasattr(asteria, "SOAP"):
        pytest.skip("asteria.SOAP is not available yet")
    monkeypatch.setitem(PRESETS, "micro", dict(n_layer=2, n_head=2, d_model=32))
    # Refresh every 2 steps, installed 3 steps later: the checkpoint at step 5 holds a
    # refresh still in flight.
    _resume_matches(corpus, tmp_path, optimizer="soap", refresh="async", staleness=2,
                    precondition_frequency=2, model="micro")


def test_ctrl_c_stops_at_a_step_boundary_and_resumes(corpus, tmp_path):
    import os
    import signal

    def interrupt_at_step_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C

    full = train(_cfg(), corpus, progress=False)
    path = tmp_path / "ckpt.pt"
    first = train(_cfg(), corpus, progress=False, save=path, on_record=interrupt_at_step_3)
    assert first.status == "interrupted" and "after step 3" in first.message
    assert len(first.records) == 3 and first.checkpoint_path == str(path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    ckpt = load_checkpoint(path)
    rest = train(config_for_resume(ckpt, {}), corpus, progress=False, checkpoint=ckpt)
    assert [r["loss"] for r in rest.records] == [r["loss"] for r in full.records]
