"""Tests of asteria.train.config: run configuration, --compare parsing, schedule."""

import pytest

from asteria.train.config import RunConfig, parse_compare


def test_parse_compare():
    assert parse_compare("adamw,soap:sync,soap:async,kl-soap") == [
        ("adamw", "adamw", ""),
        ("soap:sync", "soap", "sync"),
        ("soap:async", "soap", "async"),
        ("kl-soap", "kl-soap", ""),
    ]
    assert parse_compare(" AdamW , shampoo ") == [("adamw", "adamw", ""), ("shampoo", "shampoo", "")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adamw,sop", "unknown optimizer 'sop'"),
        ("soap:later", "unknown refresh mode 'later'"),
        ("adamw:async", "adamw has no preconditioner refresh"),
        ("adamw,,soap", "no empty entries"),
        ("", "comma-separated"),
        ("soap,soap", "listed twice"),
    ],
)
def test_parse_compare_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_compare(text)


def test_run_config_defaults_and_names():
    cfg = RunConfig()
    assert cfg.name == "adamw" and cfg.effective_lr > 0 and cfg.effective_weight_decay >= 0
    assert RunConfig(optimizer="soap", refresh="async").name == "soap:async"
    assert RunConfig(optimizer="soap", lr=0.5).effective_lr == 0.5
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(optimizer="sgd"), "unknown optimizer"),
        (dict(optimizer="adamw", refresh="async"), "only to"),
        (dict(model="huge"), "unknown model"),
        (dict(steps=0), "steps must be"),
        (dict(steps=None), "give steps, time_budget"),
        (dict(lr=-1.0), "lr must be"),
        (dict(batch_size=0), "batch_size"),
        (dict(device="tpu"), "device"),
    ],
)
def test_run_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown run configuration keys: colour"):
        RunConfig.from_dict({"colour": "red"})


def test_schedule_warmup_then_cosine():
    cfg = RunConfig(lr=1.0, steps=110, warmup=10)
    assert cfg.lr_at(1) == pytest.approx(0.1)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.55)
    assert cfg.lr_at(110) == pytest.approx(0.1)
    rates = [cfg.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    budget = RunConfig(lr=1.0, steps=None, time_budget=5.0, warmup=10)
    assert budget.lr_at(1000) == 1.0
