"""`asteria-bench memory`'s configuration parsing and its child-process measurement."""

import pytest

from asteria.bench.memory import _child, label, parse_configs


def test_adamw_always_runs_first_and_a_mode_defaults_to_async():
    assert parse_configs("muon,soap,kl-soap:sync+bf16") == ["adamw", "muon", "soap:async", "kl-soap:sync+bf16"]
    assert parse_configs("adamw,soap:async,soap") == ["adamw", "soap:async"]


@pytest.mark.parametrize(("text", "message"), [("lion", "unknown optimizer"), ("muon:sync", "takes no mode"),
                                               ("soap:fast", "unknown mode")])
def test_bad_configurations_are_refused_with_the_choices(text, message):
    with pytest.raises(SystemExit, match=message):
        parse_configs(text)


def test_a_configuration_is_measured_in_a_child_and_a_failure_is_reported():
    spec = dict(device="cpu", layers=1, d_model=32, context=8, batch=2, steps=4, warmup=1, frequency=2, staleness=1,
                threads=1, config="soap:async")
    res = _child(spec, timeout=240)
    assert res["config"] == "soap:async" and res["peak_rss_bytes"] > 0 and res["state_bytes"] > 0
    # the runtime's own bytes, split: the shadow pool holds the snapshots, the workers their scratch
    assert res["runtime_bytes"] == sum(res["runtime"].values()) > 0
    assert res["runtime"]["shadow_pool"] > 0 and res["runtime"]["worker_scratch"] > 0
    assert res["median_step_s"] > 0 and "gpu_peak_allocated_bytes" not in res
    tight = dict(spec, device_budget="1KiB", host_budget=None)  # no host tier, no NVMe: refused clearly
    assert label(tight) == "soap:async@device_budget=1KiB"
    res = _child(tight, timeout=240)
    assert res["config"] == "soap:async@device_budget=1KiB" and "BudgetError" in res["error"]


def test_a_budget_run_on_the_nvme_tier_reports_where_the_state_is(tmp_path):
    spec = dict(device="cpu", layers=1, d_model=64, context=16, batch=2, steps=3, warmup=1, frequency=2, staleness=1,
                threads=1, config="soap:sync", device_budget="64KiB", host_budget="1MiB", nvme_path=str(tmp_path))
    assert label(spec) == "soap:sync@device_budget=64KiB+nvme"
    res = _child(spec, timeout=240)
    assert res["config"] == label(spec), res
    tiers = res["tiers"]
    assert res["state_bytes"] == tiers["device"] + tiers["host"] + tiers["nvme"] and tiers["nvme"] > tiers["device"]
    assert res["budget_bytes"]["device"] == 64 << 10 and res["budget_bytes"]["host_peak"] <= 1 << 20
    assert res["pager_bytes"]["written"] > 0 and res["pager_bytes"]["read"] > 0
    assert res["pinned_reserved_bytes"]["state"] <= 1 << 20


def test_a_bf16state_configuration_reports_half_the_state_bytes():
    spec = dict(device="cpu", layers=1, d_model=32, context=8, batch=2, steps=3, warmup=1, frequency=2, staleness=1,
                threads=1)
    fp32 = _child(dict(spec, config="kl-soap:sync"), timeout=240)
    bf16 = _child(dict(spec, config="kl-soap:sync+bf16state"), timeout=240)
    assert bf16["config"] == "kl-soap:sync+bf16state" and "error" not in bf16, bf16
    # the floating state halves; the int64 counters (a few per block) do not
    assert 0.5 * fp32["state_bytes"] < bf16["state_bytes"] < 0.52 * fp32["state_bytes"], (fp32, bf16)
