"""asteria.optim.tensor_ops: the compute dtype of the per-step products."""

from __future__ import annotations

import threading

import pytest
import torch

from asteria.optim import tensor_ops as ops


def test_products_run_in_the_compute_dtype_and_come_back_in_the_operands_dtype():
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(3, 8, 5, generator=g), torch.randn(3, 5, 5, generator=g)
    plain = ops.contract(x, q, 1)
    with ops.compute_dtype(None):
        assert torch.equal(ops.contract(x, q, 1), plain)
    with ops.compute_dtype(torch.float32):  # the operands' own dtype: the same kernels, the same bits
        assert torch.equal(ops.contract(x, q, 1), plain) and torch.equal(ops.mode_gram(x, 0), ops.mode_gram(x, 0))
    with ops.compute_dtype(torch.float64):
        y = ops.contract(x, q, 1)
        assert y.dtype == torch.float32
        assert torch.equal(y, torch.matmul(x.double(), q.double()).float())
    with ops.compute_dtype(torch.bfloat16):
        z = ops.project_in(x, [None, q])
        assert z.dtype == torch.float32
        assert torch.equal(z, torch.matmul(x.bfloat16(), q.bfloat16()).float())
        assert not torch.equal(z, plain)  # really rounded
        torch.testing.assert_close(z, plain, rtol=0.05, atol=0.05)
    assert torch.equal(ops.contract(x, q, 1), plain)  # restored


def test_the_compute_dtype_belongs_to_the_thread_that_set_it():
    x = torch.randn(2, 4, 4)
    seen = []
    with ops.compute_dtype(torch.float64):
        worker = threading.Thread(target=lambda: seen.append(ops.matmul(x, x)))
        worker.start()
        worker.join()
    assert torch.equal(seen[0], torch.matmul(x, x))


def test_nested_blocks_restore_the_outer_dtype():
    x = torch.randn(2, 3, 3)
    with ops.compute_dtype(torch.float64):
        with ops.compute_dtype(None):
            assert torch.equal(ops.matmul(x, x), torch.matmul(x, x))
        assert torch.equal(ops.matmul(x, x), torch.matmul(x.double(), x.double()).float())
    with pytest.raises(RuntimeError):
        with ops.compute_dtype(torch.float64):
            raise RuntimeError("unwinds")
    assert torch.equal(ops.matmul(x, x), torch.matmul(x, x))
