"""asteria.runtime.platform: CPU / discrete GPU / unified memory detection, and how it feeds the tier policy."""

from __future__ import annotations

import pytest
import torch

import asteria
import asteria.runtime.platform as platform
from asteria.runtime import RuntimeConfig
from asteria.runtime.platform import Platform, classify, detect

from test_runtime_tiers import MODES, STEPS, _assert_same_state, _budgets, _make, _model, _reference, _train


@pytest.fixture()
def fresh_cache(monkeypatch):
    monkeypatch.setattr(platform, "_CACHE", {})
    monkeypatch.setattr(platform, "_BANDWIDTH", {})


def test_cpu_platform_computes_host_state_in_place():
    p = detect("cpu")
    assert p.kind == "cpu" and p.host_state_in_place and p.host_to_device_gbps() is None
    assert detect(None) is p  # cached
    assert p.as_dict()["kind"] == "cpu"


@pytest.mark.parametrize(
    "attrs,kind",
    [
        ({}, "discrete"),
        ({"integrated": True}, "unified"),
        ({"pageable_memory_access": True, "pageable_memory_access_uses_host_page_tables": True}, "unified"),
        ({"pageable_memory_access": True}, "discrete"),  # HMM: software coherence moves pages on faults
        ({"can_use_host_pointer_for_registered_mem": True, "concurrent_managed_access": True}, "discrete"),
    ],
)
def test_classify(attrs, kind):
    assert classify(attrs) == kind
    assert Platform(kind, torch.device("cuda", 0), "x").host_state_in_place == (kind == "unified")


def test_cuda_attributes_come_from_asteria_when_its_cuda_backend_is_built(fresh_cache, monkeypatch):
    from asteria import _core

    info = {"name": "Coherent GPU", "integrated": False, "pageable_memory_access": True,
            "pageable_memory_access_uses_host_page_tables": True, "concurrent_managed_access": True,
            "can_use_host_pointer_for_registered_mem": True}
    monkeypatch.setattr(_core, "cuda_built", lambda: True, raising=False)
    monkeypatch.setattr(_core, "cuda_device_info", lambda device=0: dict(info, device=device), raising=False)
    p = detect("cuda:0")
    assert p.kind == "unified" and p.name == "Coherent GPU" and p.attributes["source"] == "asteria"
    assert p.host_state_in_place


def test_cuda_attributes_fall_back_to_torch(fresh_cache, monkeypatch):
    from asteria import _core

    class Props:
        name = "Discrete GPU"
        is_integrated = False
        total_memory = 80 << 30

    monkeypatch.setattr(_core, "cuda_built", lambda: False, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    p = detect("cuda:0")
    assert p.kind == "discrete" and p.attributes["source"] == "torch" and not p.host_state_in_place
    Props.is_integrated = True
    platform._CACHE.clear()
    assert detect("cuda:0").kind == "unified"


def test_bandwidth_is_measured_once_and_lazily(fresh_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(platform, "_measure_h2d", lambda device: calls.append(device) or 25.0)
    p = Platform("discrete", torch.device("cuda", 0), "gpu")
    assert "host_to_device_gbps" not in p.as_dict() and calls == []
    assert p.host_to_device_gbps() == 25.0 and p.host_to_device_gbps() == 25.0
    assert len(calls) == 1
    assert p.as_dict()["host_to_device_gbps"] == 25.0


# ---------------------------------------------------------------------- the platform feeds the placement policy
def _forced(kind):
    return lambda device=None: Platform(kind, torch.device("cpu" if device is None else device), f"forced {kind}")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_discrete_platform_streams_host_and_nvme_state_through_a_device_buffer(tmp_path, monkeypatch, name, mode):
    """On a discrete GPU, host and NVMe state is copied into a device work buffer (charged to device_budget)
    for the step and back after it. Simulated on the CPU: the numbers stay bit-identical."""
    ref_params, ref_sd, _, largest = _reference(name, mode)
    monkeypatch.setattr(platform, "detect", _forced("discrete"))
    budgets = _budgets(name, mode)
    budgets["device_budget"] += largest  # room for the work buffer
    model = _model()
    opt = _make(name, model, RuntimeConfig(**MODES[mode], **budgets, nvme_path=tmp_path))
    _train(opt, model, STEPS)
    for p, q in zip(ref_params, model.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(ref_sd, opt.state_dict())
    rep = opt.runtime.memory_report()
    assert rep["platform"][0]["kind"] == "discrete"
    assert rep["buffers"]["work_buffer_bytes"] > 0
    assert rep["movement"]["h2d_bytes"] > 0 and rep["movement"]["d2h_bytes"] > 0
    assert rep["tiers"]["host"] > 0 and rep["tiers"]["nvme"] > 0
    assert rep["budgets"]["device_peak"] <= budgets["device_budget"]
    assert rep["budgets"]["host_peak"] <= budgets["host_budget"]
    opt.close()


def test_discrete_platform_needs_device_budget_for_the_work_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "detect", _forced("discrete"))
    with pytest.raises(MemoryError, match="device work buffer.*smallest device_budget that works"):
        _make("soap", _model(), RuntimeConfig(device_budget=100, host_budget="16MiB", nvme_path=tmp_path))


def test_cpu_platform_copies_nothing(tmp_path):
    model = _model()
    opt = _make("kl-soap", model, RuntimeConfig(refresh="sync", **_budgets("kl-soap", "sync"), nvme_path=tmp_path))
    _train(opt, model, 2)
    rep = opt.runtime.memory_report()
    assert rep["platform"][0]["kind"] == "cpu"
    assert rep["movement"]["h2d_bytes"] == 0 and rep["buffers"]["work_buffers"] == 0
    opt.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiered_training_on_the_gpu_is_bit_identical(tmp_path):
    def run(runtime):
        torch.manual_seed(0)
        model = _model().cuda()
        # no refresh in these steps: the tiers' copies are what is tested (refreshes have their own GPU tests)
        opt = asteria.Shampoo(model.parameters(), merge_dims=False, precondition_frequency=10,
                              start_preconditioning_step=10, runtime=runtime)
        for s in range(4):
            x = torch.randn(8, 32, generator=torch.Generator().manual_seed(s)).cuda()
            torch.tanh(model(x)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        out = [p.detach().cpu() for p in model.parameters()], opt.runtime.memory_report()
        opt.close()
        return out

    ref, _ = run(RuntimeConfig(refresh="sync"))
    got, rep = run(RuntimeConfig(refresh="sync", **_budgets("shampoo", "sync"), nvme_path=tmp_path))
    assert rep["platform"][0]["kind"] in ("discrete", "unified")
    assert rep["tiers"]["nvme"] > 0 and rep["tiers"]["pageable"] > 0  # host-side counters of GPU buckets
    for p, q in zip(ref, got):
        assert torch.equal(p, q)
