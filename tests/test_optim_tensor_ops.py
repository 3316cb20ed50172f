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


def test_stochastic_rounding_keeps_representable_values_and_is_unbiased_between_neighbours():
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(1000).to(torch.bfloat16).float()
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])
    assert torch.equal(ops.round_stochastic(exact, gen).float(), exact)
    out = ops.round_stochastic(specials, gen).float()
    assert torch.equal(out[:4], specials[:4]) and torch.signbit(out[1]) and torch.isnan(out[4])
    # 1 + 0.3 ulp (ulp = 2^-7 at 1), and its negative: each draw is one of the two neighbours, up 30% of the time
    for x in (1.0 + 0.3 * 2.0**-7, -(1.0 + 0.3 * 2.0**-7)):
        draws = ops.round_stochastic(torch.full((20000,), x), gen).float()
        lo, hi = sorted((round(x * 2**7) / 2**7, (round(x * 2**7) + (1 if x > 0 else -1)) / 2**7))
        assert set(draws.unique().tolist()) == {lo, hi}
        assert abs(draws.double().mean().item() - x) < 4 * 2.0**-7 * (0.3 * 0.7 / 20000) ** 0.5
    with pytest.raises(TypeError, match="float32"):
        ops.round_stochastic(exact.double(), gen)


@pytest.mark.parametrize("beta", [0.999, 0.95])
def test_a_bf16_ema_stalls_under_round_to_nearest_and_follows_float32_with_stochastic_rounding(beta):
    """The bf16-state pitfall (docs/algorithms.md §5.5): ``v ← β·v + (1−β)·y`` stored in bf16 after every step. With
    β = 0.999, (1−β) is below half a bf16 step, so under round to nearest neither the decay towards a smaller y nor
    the growth towards a larger one is ever stored; with β = 0.95 round to nearest moves. Stochastic rounding follows
    the float32 EMA in expectation for both."""
    gen = torch.Generator().manual_seed(1)
    steps = 1000 if beta == 0.999 else 60
    targets = torch.tensor([0.25, 1.8])  # from v = 1: a decay and a growth
    v32 = torch.ones(2)
    nearest = torch.ones(2, dtype=torch.bfloat16)
    stochastic = torch.ones(4096, 2, dtype=torch.bfloat16)
    for _ in range(steps):
        v32 = beta * v32 + (1 - beta) * targets
        nearest = (beta * nearest.float() + (1 - beta) * targets).to(torch.bfloat16)
        stochastic = ops.round_stochastic(beta * stochastic.float() + (1 - beta) * targets, gen)
    moved = (v32 - 1).abs()
    assert (moved > 0.3).all()  # the float32 EMA went most of the way
    if beta == 0.999:
        assert torch.equal(nearest.float(), torch.ones(2))  # stuck at the start
    else:
        assert ((nearest.float() - v32).abs() < 0.1 * moved).all()
    mean = stochastic.float().mean(dim=0)
    assert ((mean - v32).abs() < 0.02 * moved).all(), (mean, v32)
