"""Tests of asteria.runtime.config.RuntimeConfig and the synchronous RefreshPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asteria.optim import SOAP, Shampoo
from asteria.runtime import RefreshJob, RefreshPipeline, RuntimeConfig


def test_defaults():
    cfg = RuntimeConfig()
    assert (cfg.refresh, cfg.staleness, cfg.install, cfg.workers, cfg.hooks) == ("async", "auto", "deterministic", None, True)
    assert cfg.device_budget is None and cfg.host_budget is None and cfg.nvme_path is None
    assert cfg.process_group == "auto"
    assert 1 <= cfg.resolved_workers() <= 8
    assert RuntimeConfig(workers=3).resolved_workers() == 3
    assert RuntimeConfig(refresh="sync").staleness == 0
    assert RuntimeConfig(refresh="async", staleness=0).staleness == 0
    # refresh phases: staggered for the asynchronous runtime; the reference algorithm (sync, or S = 0) aligned
    assert cfg.refresh_phases == "staggered" and cfg.staggered
    assert RuntimeConfig(staleness=3).refresh_phases == "staggered"
    assert RuntimeConfig(refresh="sync").refresh_phases == "aligned"
    assert RuntimeConfig(staleness=0).refresh_phases == "aligned"
    assert RuntimeConfig(staleness=0, refresh_phases="staggered").staggered
    assert not RuntimeConfig(refresh_phases="aligned").staggered


def test_default_workers_use_the_cores_training_leaves_free(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert RuntimeConfig().resolved_workers() == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert RuntimeConfig().resolved_workers() == 1  # never 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert RuntimeConfig().resolved_workers() == 8  # capped


def test_worker_cpus_pin_the_workers_and_set_their_number():
    import os
    import threading

    from asteria.runtime import Runtime

    cpu = max(os.sched_getaffinity(0))
    cfg = RuntimeConfig(worker_cpus=[cpu])
    assert cfg.worker_cpus == (cpu,) and cfg.resolved_workers() == 1
    assert RuntimeConfig(worker_cpus=[cpu], workers=3).resolved_workers() == 3
    before = set(os.listdir("/proc/self/task"))
    rt = Runtime(RuntimeConfig(worker_cpus=[cpu], workers=2))
    try:
        assert rt.scheduler.workers == 2
        new = [int(t) for t in set(os.listdir("/proc/self/task")) - before]
        assert len(new) == 2 and all(os.sched_getaffinity(t) == {cpu} for t in new)
        assert os.sched_getaffinity(threading.get_native_id()) != {cpu} or len(os.sched_getaffinity(0)) == 1
    finally:
        rt.close()
    rt = Runtime(RuntimeConfig(worker_cpus=[1023]))
    try:
        with pytest.raises(ValueError, match="cannot pin the workers to CPUs 1023"):
            rt.scheduler  # noqa: B018 - starts the workers
    finally:
        rt.close()


def test_keyword_only():
    with pytest.raises(TypeError):
        RuntimeConfig("sync")  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(refresh="later"), "refresh"),
        (dict(staleness=-1), "staleness"),
        (dict(staleness=1.5), "staleness"),
        (dict(install="lazy"), "install"),
        (dict(workers=0), "workers"),
        (dict(workers=True), "workers"),
        (dict(hooks=1), "hooks"),
        (dict(worker_cpus=[]), "worker_cpus"),
        (dict(worker_cpus=[-1]), "worker_cpus"),
        (dict(worker_cpus=[0, 0]), "twice"),
        (dict(worker_cpus="01"), "worker_cpus"),
        (dict(worker_cpus=[True]), "worker_cpus"),
        (dict(parallel_install=1), "parallel_install"),
        (dict(refresh="sync", staleness=5), "staleness"),
        (dict(refresh="sync", install="eager"), "eager"),
        (dict(refresh_phases="random"), "refresh_phases"),
        (dict(refresh="sync", refresh_phases="staggered"), "aligned"),
    ],
)
def test_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        RuntimeConfig(**kw)


def test_distributed_options():
    cfg = RuntimeConfig()
    assert (cfg.shard_state, cfg.dist_timeout, cfg.local_world_size) == (False, 600.0, None)
    assert RuntimeConfig(process_group=None, shard_state=True, dist_timeout=5, local_world_size=2).process_group is None


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(process_group="world"), "process_group"),
        (dict(process_group=3), "process_group"),
        (dict(shard_state=1), "shard_state"),
        (dict(dist_timeout=0), "dist_timeout"),
        (dict(dist_timeout=float("inf")), "dist_timeout"),
        (dict(dist_timeout=True), "dist_timeout"),
        (dict(local_world_size=0), "local_world_size"),
        (dict(local_world_size=2.0), "local_world_size"),
    ],
)
def test_bad_distributed_values(kw, match):
    with pytest.raises(ValueError, match=match):
        RuntimeConfig(**kw)


def test_optimizer_rejects_non_config_runtime():
    with pytest.raises(TypeError, match="RuntimeConfig"):
        SOAP([torch.nn.Parameter(torch.randn(2, 2))], runtime={"refresh": "sync"})


def test_pipeline_installs_at_the_deadline_only():
    with RefreshPipeline(RuntimeConfig(refresh="sync", workers=2), offset=1) as pipe:
        assert pipe.deadline(7) == 8
        a = np.diag([3.0, 1.0, 2.0])
        got = []
        pipe.submit([RefreshJob("eigh", 0, 0, 7, pipe.deadline(7), a, options=dict(descending=True))], got.extend)
        assert pipe.install_due(7) == 0 and pipe.pending() == 1 and not got
        assert pipe.install_due(8) == 1 and pipe.pending() == 0
        np.testing.assert_allclose(got[0].outputs["eigenvalues"], [3.0, 2.0, 1.0])
        assert got[0].version == 7 and got[0].deadline == 8
        stats = pipe.stats()
        assert stats["jobs_submitted"] == 1 and stats["jobs_ok"] == 1 and stats["batches_installed"] == 1
        assert stats["wait_s"] >= 0.0 and "scheduler" in stats


def test_pipeline_rejects_mixed_deadlines_and_unknown_kinds():
    with RefreshPipeline(offset=0) as pipe:
        a = np.eye(2)
        with pytest.raises(ValueError, match="deadline"):
            pipe.submit([RefreshJob("eigh", 0, 0, 1, 1, a), RefreshJob("eigh", 0, 1, 1, 2, a)], lambda r: None)
        with pytest.raises(ValueError, match="unknown job kind"):
            pipe.submit([RefreshJob("svd", 0, 0, 1, 1, a)], lambda r: None)


def test_failed_job_reaches_the_installer_with_ok_false():
    with RefreshPipeline(RuntimeConfig(refresh="sync"), offset=0) as pipe:
        got = []
        bad = np.array([[np.nan, 0.0], [0.0, 1.0]])
        pipe.submit([RefreshJob("inverse_root", 3, 0, 1, 1, bad, options=dict(root=2.0, epsilon=1e-6))], got.extend)
        pipe.install_due(1)
        assert not got[0].ok and got[0].status == "failed" and got[0].message
        assert pipe.stats()["jobs_failed"] == 1


def test_optimizer_runtime_stats():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Shampoo([p], precondition_frequency=1, start_preconditioning_step=1, merge_dims=False,
                  runtime=RuntimeConfig(refresh="sync"))
    for _ in range(3):
        p.grad = torch.randn(4, 3)
        opt.step()
    stats = opt.runtime.stats()
    assert stats["jobs_submitted"] == 6 and stats["jobs_ok"] == 6 and stats["nonfinite_steps"] == 0
    opt.close()
    with pytest.raises(RuntimeError, match="closed"):
        opt.runtime.scheduler
