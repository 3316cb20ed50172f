"""`asteria-bench race`: its configurations, what each mode builds, and one tiny lockstep run end to end (the race
itself, at full size, is a benchmark script, not a test)."""

import json
import types

import pytest
import torch

from asteria.bench import main
from asteria.bench.race import _build, parse_configs
from asteria.train.model import GPT, ModelConfig


def test_configurations_parse_with_async_as_the_default_mode():
    assert parse_configs("adamw, muon,soap,kl-soap:bf16state,shampoo:sync") == [
        ("adamw", ""), ("muon", ""), ("soap", "async"), ("kl-soap", "bf16state"), ("shampoo", "sync")]


@pytest.mark.parametrize("text, message", [
    ("adamw:sync", "takes no mode"),
    ("soap:fast", "mode must be one of"),
    ("lion", "unknown optimizer"),
])
def test_a_bad_configuration_is_refused_naming_the_problem(text, message):
    with pytest.raises(SystemExit, match=message):
        parse_configs(text)


def _args(**kw):
    return types.SimpleNamespace(**dict(dict(frequency=2, weight_decay=0.1), **kw))


@pytest.mark.parametrize("mode, state_dtype, compute_dtype, refresh, phases", [
    ("sync", torch.float32, None, "sync", "aligned"),
    ("async", torch.float32, None, "async", "staggered"),
    ("aligned", torch.float32, None, "async", "aligned"),
    ("bf16", torch.float32, torch.bfloat16, "async", "staggered"),
    ("bf16state", torch.bfloat16, None, "async", "staggered"),
])
def test_each_mode_builds_the_optimizer_it_names(mode, state_dtype, compute_dtype, refresh, phases):
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, context=8))
    opt = _build("soap", mode, model, 1e-3, _args())
    try:
        assert {g["state_dtype"] for g in opt.param_groups} == {state_dtype}
        assert {g["compute_dtype"] for g in opt.param_groups} == {compute_dtype}
        assert opt.runtime.config.refresh == refresh and opt.runtime.config.refresh_phases == phases
    finally:
        opt.close()


def test_a_tiny_race_reports_every_configuration(tmp_path, capsys):
    main(["race", "--configs", "adamw,soap:sync,soap:bf16state", "--layers", "1", "--heads", "2", "--d-model", "16",
          "--context", "8", "--batch", "2", "--steps", "4", "--warmup", "1", "--skip", "1", "--frequency", "2",
          "--target", "100", "--eval-batches", "1", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "race.json").read_text())["results"]
    assert [r["config"] for r in results] == ["adamw", "soap:sync", "soap:bf16state"]
    for r in results:
        assert len(r["losses"]) == 4 and all(x == x for x in r["losses"]) and r["val_loss"] == r["val_loss"]
        assert r["target_step"] is not None  # a target of 100 is reached at once
    assert "soap:bf16state" in capsys.readouterr().out
