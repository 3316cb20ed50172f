"""asteria._core's CUDA backend from Python: the cuSOLVER refresh engine against the CPU linalg
functions, failure reporting, stream ordering, non-blocking completion checks, host registration.

Tests marked ``gpu`` skip unless this build has the CUDA backend and torch sees a device. The
tests of a build without CUDA run everywhere else.
"""

import time

import numpy as np
import pytest
import torch

from asteria import _core

HAS_GPU = _core.cuda_built() and torch.cuda.is_available() and _core.cuda_device_count() > 0
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA build of asteria and a visible CUDA device")

F64_TOL = 1e-9
F32_TOL = 2e-3


def spd(n, seed=0, rank=None, shift=0.5):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, rank or n))
    return g @ g.T / (rank or n) + shift * np.eye(n)


def cuda(x, dtype):
    return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device="cuda")


def np_dtype(dtype):
    return np.float32 if dtype == torch.float32 else np.float64


def max_diff_up_to_sign(a, b):
    """Max difference of the columns of b and a, each column of b flipped to match a."""
    signs = np.where(np.sum(a * b, axis=-2, keepdims=True) < 0, -1.0, 1.0)
    return float(np.max(np.abs(a - signs * b)))


# ----- a build without CUDA --------------------------------------------------------------------
@pytest.mark.skipif(_core.cuda_built(), reason="this build has the CUDA backend")
def test_build_without_cuda_says_how_to_get_it():
    assert _core.cuda_built() is False
    with pytest.raises(_core.AsteriaError, match="ASTERIA_ENABLE_CUDA"):
        _core.CudaRefreshEngine()
    with pytest.raises(_core.AsteriaError, match="ASTERIA_ENABLE_CUDA"):
        _core.cuda_device_count()
    with pytest.raises(_core.AsteriaError, match="built without CUDA"):
        _core.cuda_host_register(1 << 20, 4096)
    with pytest.raises(_core.AsteriaError, match="built without CUDA"):
        _core.cuda_device_info(0)


@pytest.mark.skipif(not _core.cuda_built() or HAS_GPU, reason="needs a CUDA build on a machine without a GPU")
def test_cuda_build_without_a_device_raises_clearly():
    assert _core.cuda_device_count() == 0
    with pytest.raises(_core.AsteriaError, match="no CUDA device"):
        _core.CudaRefreshEngine()


# ----- agreement with the CPU path -------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("batch", "n"), [(None, 48), (3, 40), (5, 16), (4, 32)])
@pytest.mark.parametrize("descending", [False, True])
def test_eigh_matches_cpu(dtype, batch, n, descending):
    mats = [spd(n, seed=10 + k).astype(np_dtype(dtype)) for k in range(batch or 1)]
    a = cuda(np.stack(mats) if batch else mats[0], dtype)
    w = torch.empty(a.shape[:-1], dtype=dtype, device="cuda")
    v = torch.empty_like(a)
    ridge = 1e-3
    with _core.CudaRefreshEngine() as engine:
        r = engine.wait(engine.submit_eigh(1, 2, 3, a, w, v, ridge=ridge, descending=descending))
    assert r.ok and r.status == "ok" and r.failed == [] and r.message == ""
    assert (r.block_id, r.version, r.deadline) == (1, 2, 3)
    assert r.latency_s >= r.run_s > 0
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    ws, vs = w.cpu().numpy().reshape(-1, n), v.cpu().numpy().reshape(-1, n, n)
    for k, m in enumerate(mats):
        wc, vc = _core.linalg.eigh(m, ridge=ridge, descending=descending)
        np.testing.assert_allclose(ws[k], wc, atol=tol * np.abs(wc).max(), rtol=0)
        assert max_diff_up_to_sign(vc, vs[k]) < 10 * tol


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("batch", "n", "rank"), [(None, 48, 48), (2, 40, 10), (3, 24, 24), (4, 16, 5)])
def test_inverse_root_matches_cpu(dtype, batch, n, rank):
    mats = [spd(n, seed=20 + k, rank=rank, shift=0.0).astype(np_dtype(dtype)) for k in range(batch or 1)]
    a = cuda(np.stack(mats) if batch else mats[0], dtype)
    out = torch.empty_like(a)
    root, eps = 4.0, 1e-4
    with _core.CudaRefreshEngine() as engine:
        r = engine.wait(engine.submit_inverse_root(5, 6, 7, a, out, root=root, epsilon=eps))
    assert r.ok, r.message
    xs = out.cpu().numpy().reshape(-1, n, n)
    tol = F64_TOL if dtype == torch.float64 else 5 * F32_TOL
    for k, m in enumerate(mats):
        xc = _core.linalg.inverse_root(m, root=root, epsilon=eps)
        np.testing.assert_allclose(xs[k], xc, atol=tol * np.abs(xc).max(), rtol=0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("batch", "n"), [(None, 48), (2, 40), (4, 16)])
@pytest.mark.parametrize("sort", [True, False])
def test_eigenbasis_refresh_matches_cpu(dtype, batch, n, sort):
    ls, qs = [], []
    for k in range(batch or 1):
        old = spd(n, seed=30 + k).astype(np_dtype(dtype))
        _, q = _core.linalg.eigh(old)  # ascending: the SOAP sort really permutes
        ls.append((old + 0.2 * spd(n, seed=60 + k)).astype(np_dtype(dtype)))
        qs.append(q)
    a, q = (cuda(np.stack(x) if batch else x[0], dtype) for x in (ls, qs))
    basis = torch.empty_like(a)
    perm = torch.empty(a.shape[:-1], dtype=torch.int64, device="cuda")
    with _core.CudaRefreshEngine() as engine:
        r = engine.wait(engine.submit_eigenbasis_refresh(9, 1, 2, a, q, basis, perm, sort=sort))
    assert r.ok, r.message
    bs, ps = basis.cpu().numpy().reshape(-1, n, n), perm.cpu().numpy().reshape(-1, n)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    for k in range(len(ls)):
        qc, pc = _core.linalg.eigenbasis_refresh(ls[k], qs[k], sort=sort)
        np.testing.assert_array_equal(ps[k], pc)
        # Same Householder convention as LAPACK: the signs agree too.
        np.testing.assert_allclose(bs[k], qc, atol=tol, rtol=0)


# ----- failures and validation -------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
def test_non_finite_input_fails_only_that_matrix_and_the_engine_goes_on():
    n = 24
    mats = np.stack([spd(n, seed=k) for k in range(3)])
    mats[2, 4, 1] = np.nan
    a = cuda(mats, torch.float64)
    w, v = torch.empty((3, n), dtype=torch.float64, device="cuda"), torch.empty_like(a)
    with _core.CudaRefreshEngine() as engine:
        r = engine.wait(engine.submit_eigh(11, 40, 45, a, w, v))
        assert not r.ok and r.status == "failed" and r.failed == [2]
        assert "block 11" in r.message and "version 40" in r.message and "matrix 2" in r.message
        np.testing.assert_allclose(w[0].cpu().numpy(), np.linalg.eigvalsh(mats[0]), rtol=1e-10)
        a[2, 4, 1] = 0.0
        r = engine.wait(engine.submit_eigh(11, 41, 46, a, w, v))
        assert r.ok, r.message
        assert engine.stats()["failed"] == 1


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("batch", "n"), [(None, 40), (3, 40), (4, 16)])  # per-matrix syevd; batched solver
def test_failed_fp32_decompositions_are_retried_in_fp64(batch, n):
    """The engine's test hook fails fp32 solves (never fp64 ones): each failed matrix is redone in fp64 and
    equals the same engine's fp64 result on the same (fp32) values, rounded to fp32."""
    mats = [spd(n, seed=70 + k).astype(np.float32) for k in range(batch or 1)]
    a = cuda(np.stack(mats) if batch else mats[0], torch.float32)
    w, v, x = torch.empty(a.shape[:-1], dtype=torch.float32, device="cuda"), torch.empty_like(a), torch.empty_like(a)
    k = min(2, batch or 1)
    eps32 = float(np.finfo(np.float32).eps)
    with _core.CudaRefreshEngine() as engine:
        before = engine.test_fp32_failures_injected()
        try:
            engine.set_test_fp32_failures(2)
            r = engine.wait(engine.submit_eigh(1, 2, 3, a, w, v, ridge=1e-3, descending=True))
            engine.set_test_fp32_failures(2)
            rx = engine.wait(engine.submit_inverse_root(1, 2, 3, a, x, root=2.0, epsilon=0.1))
        finally:
            engine.set_test_fp32_failures(0)
        assert engine.test_fp32_failures_injected() == before + 2 * k
        assert r.ok and r.failed == [] and r.retried == list(range(k)), r.message
        assert rx.ok and rx.failed == [] and rx.retried == list(range(k)), rx.message
        assert engine.stats()["fp64_retries"] == 2 * k
        ws, vs, xs = w.cpu().numpy().reshape(-1, n), v.cpu().numpy().reshape(-1, n, n), x.cpu().numpy().reshape(-1, n, n)
        for j, m in enumerate(mats):
            # the fp64 reference: the same engine, one matrix per job (per-matrix syevd, like the retry)
            a64 = cuda(m.astype(np.float64), torch.float64)
            w64, v64, x64 = torch.empty(n, dtype=torch.float64, device="cuda"), torch.empty_like(a64), torch.empty_like(a64)
            assert engine.wait(engine.submit_eigh(0, 0, 0, a64, w64, v64, ridge=1e-3, descending=True)).ok
            assert engine.wait(engine.submit_inverse_root(0, 0, 0, a64, x64, root=2.0, epsilon=0.1)).ok
            w32, v32 = w64.cpu().numpy().astype(np.float32), v64.cpu().numpy().astype(np.float32)
            x64 = x64.cpu().numpy()
            if j < k:  # retried: the fp64 decomposition rounded to fp32 (a few ulps at most)
                np.testing.assert_allclose(ws[j], w32, atol=4 * eps32 * np.abs(w32).max(), rtol=0)
                assert max_diff_up_to_sign(v32, vs[j]) < 1e-6
            else:
                np.testing.assert_allclose(ws[j], w32, atol=F32_TOL * np.abs(w32).max(), rtol=0)
            assert np.all(np.diff(ws[j]) <= 0)  # descending
            np.testing.assert_allclose(xs[j], x64, atol=5 * F32_TOL * np.abs(x64).max(), rtol=0)


@pytest.mark.gpu
@needs_gpu
def test_without_the_fp64_retry_a_failed_fp32_decomposition_is_reported():
    n = 16
    a = cuda(np.stack([spd(n, seed=80 + k) for k in range(3)]), torch.float32)
    w, v = torch.empty((3, n), dtype=torch.float32, device="cuda"), torch.empty_like(a)
    with _core.CudaRefreshEngine(fp64_retry=False) as engine:
        engine.set_test_fp32_failures(1)
        try:
            r = engine.wait(engine.submit_eigh(3, 4, 5, a, w, v))
        finally:
            engine.set_test_fp32_failures(0)
        assert not r.ok and r.failed == [0] and r.retried == []
        assert "matrix 0: the solver reported info != 0" in r.message
        assert engine.test_fp32_failures_injected() == 1 and engine.stats()["fp64_retries"] == 0
        # fp64 jobs never take the hook
        a64, w64 = a.double(), w.double()  # named: the engine keeps no reference to its arrays
        v64 = torch.empty_like(a64)
        engine.set_test_fp32_failures(1)
        try:
            r = engine.wait(engine.submit_eigh(3, 5, 6, a64, w64, v64))
        finally:
            engine.set_test_fp32_failures(0)
        assert r.ok, r.message
        assert engine.test_fp32_failures_injected() == 1
        with pytest.raises(ValueError, match="count"):
            engine.set_test_fp32_failures(-1)


@pytest.mark.gpu
@needs_gpu
def test_arguments_are_validated():
    n = 8
    a = cuda(spd(n), torch.float64)
    w, v = torch.empty(n, dtype=torch.float64, device="cuda"), torch.empty_like(a)
    with _core.CudaRefreshEngine() as engine:
        with pytest.raises(ValueError, match="CUDA array"):
            engine.submit_eigh(0, 0, 0, a.cpu(), w, v)
        with pytest.raises(ValueError, match="shape"):
            engine.submit_eigh(0, 0, 0, a[:, :4], w, v)
        with pytest.raises(ValueError, match="contiguous"):
            engine.submit_eigh(0, 0, 0, a.t(), w, v)
        with pytest.raises(ValueError, match="typestr"):
            engine.submit_eigh(0, 0, 0, a, w.float(), v)
        with pytest.raises(ValueError, match="float32 or float64"):
            engine.submit_eigh(0, 0, 0, a.half(), w, v)
        with pytest.raises(ValueError, match="perm_out"):
            engine.submit_eigenbasis_refresh(0, 0, 0, a, a, v, torch.empty(n, device="cuda"))
        with pytest.raises(ValueError, match="root"):
            engine.submit_inverse_root(0, 0, 0, a, v, root=0.0, epsilon=0.0)
        with pytest.raises(ValueError, match="never submitted"):
            engine.wait(999)
    with pytest.raises(_core.AsteriaError, match="closed"):
        engine.submit_eigh(0, 0, 0, a, w, v)


# ----- streams and non-blocking behaviour --------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
def test_wait_stream_orders_the_job_after_the_producer():
    n = 64
    good = cuda(spd(n, seed=3), torch.float64)
    a = torch.full((n, n), float("nan"), dtype=torch.float64, device="cuda")
    w, v = torch.empty(n, dtype=torch.float64, device="cuda"), torch.empty_like(a)
    producer = torch.cuda.Stream()
    torch.cuda.synchronize()
    with _core.CudaRefreshEngine() as engine, torch.cuda.stream(producer):
        torch.cuda._sleep(200_000_000)  # ~0.1 s or more: the copy below lands late
        a.copy_(good)
        r = engine.wait(engine.submit_eigh(0, 0, 0, a, w, v, wait_stream=producer))
        assert r.ok, r.message
        # An int handle works the same way.
        r = engine.wait(engine.submit_eigh(0, 0, 0, a, w, v, wait_stream=producer.cuda_stream))
        assert r.ok, r.message


@pytest.mark.gpu
@needs_gpu
def test_the_engine_stream_has_the_lowest_priority():
    info = _core.cuda_device_info(0)
    with _core.CudaRefreshEngine() as engine:
        assert torch.cuda.ExternalStream(engine.stream).priority == info["stream_priority_least"]
        assert engine.priority == info["stream_priority_least"] and engine.device == 0
    with _core.CudaRefreshEngine(0, low_priority=False) as engine:
        assert torch.cuda.ExternalStream(engine.stream).priority == info["stream_priority_greatest"]


@pytest.mark.gpu
@needs_gpu
def test_a_long_job_blocks_neither_the_host_nor_the_training_stream():
    n, batch = 4096, 4
    a = cuda(spd(n, seed=5), torch.float64).expand(batch, n, n).contiguous()
    w = torch.empty((batch, n), dtype=torch.float64, device="cuda")
    v = torch.empty_like(a)
    x = torch.randn(2048, 2048, device="cuda")

    def training_work():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = x
        for _ in range(20):
            y = torch.tanh(y @ x) * 0.5
        end.record()
        return start, end

    torch.cuda.synchronize()
    s, e = training_work()
    e.synchronize()
    alone_ms = s.elapsed_time(e)
    with _core.CudaRefreshEngine() as engine:
        t0 = time.perf_counter()
        jid = engine.submit_eigh(0, 0, 0, a, w, v, wait_stream=torch.cuda.current_stream())
        submit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        polled = engine.poll()
        done_early = engine.is_done(jid)
        poll_s = time.perf_counter() - t0
        s, e = training_work()
        e.synchronize()
        shared_ms = s.elapsed_time(e)
        training_done_first = not engine.is_done(jid)
        r = engine.wait(jid)
    assert r.ok, r.message
    assert submit_s < 0.25, f"submit took {submit_s:.3f} s"
    assert poll_s < 0.05, f"poll/is_done took {poll_s:.3f} s"
    assert polled == [] and not done_early
    # The training stream ran while the refresh was still in flight (it was not queued behind it).
    assert training_done_first, f"the refresh ({r.run_s:.3f} s) finished before the training work ({shared_ms:.1f} ms)"
    assert shared_ms < 1000 * r.run_s, (alone_ms, shared_ms, r.run_s)


# ----- host registration, events, device info ----------------------------------------------------
@pytest.mark.gpu
@needs_gpu
def test_host_register_round_trip():
    host = torch.zeros(1 << 20, dtype=torch.uint8)
    assert not host.is_pinned()
    _core.cuda_host_register(host.data_ptr(), host.numel())
    try:
        assert host.is_pinned()
        dev = torch.arange(host.numel(), device="cuda").to(torch.uint8)
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(host, dev.cpu())
        with pytest.raises(ValueError, match="bytes"):
            _core.cuda_host_register(host.data_ptr(), host.numel())
    finally:
        _core.cuda_host_unregister(host.data_ptr())
    assert not host.is_pinned()
    with pytest.raises(ValueError):
        _core.cuda_host_unregister(host.data_ptr())


@pytest.mark.gpu
@needs_gpu
def test_event_query_and_synchronize():
    ev = torch.cuda.Event()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(400_000_000)
        ev.record()
    t0 = time.perf_counter()
    assert _core.cuda_event_query(ev.cuda_event) is False
    assert time.perf_counter() - t0 < 0.05
    _core.cuda_event_synchronize(ev.cuda_event)
    assert _core.cuda_event_query(ev.cuda_event) is True


@pytest.mark.gpu
@needs_gpu
def test_device_info_has_what_platform_detection_needs():
    info = _core.cuda_device_info(0)
    assert info["name"] == torch.cuda.get_device_name(0)
    assert info["compute_capability"] == torch.cuda.get_device_capability(0)
    assert info["total_memory"] == torch.cuda.get_device_properties(0).total_memory
    for key in ("integrated", "pageable_memory_access", "pageable_memory_access_uses_host_page_tables",
                "concurrent_managed_access", "can_use_host_pointer_for_registered_mem",
                "host_native_atomic_supported"):
        assert isinstance(info[key], bool)
    with pytest.raises(ValueError, match="device"):
        _core.cuda_device_info(_core.cuda_device_count())
