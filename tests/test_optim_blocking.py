"""Tests of asteria.optim.blocking (pure shape functions) and of the bucketed layout the optimizers use."""

from __future__ import annotations

import math

import pytest
import torch

from asteria.optim import SOAP, Shampoo
from asteria.optim.blocking import (
    block_views,
    merge_small_dims,
    merge_trailing_dims,
    shampoo_layout,
    soap_layout,
    split_blocks,
)


@pytest.mark.parametrize(
    "shape,threshold,target,expected",
    [
        ((1, 2, 5, 1), 10, 1, (10,)),
        ((1, 2, 5, 1), 1, 1, (2, 5)),
        ((32, 3, 64, 64), 8192, 1, (96, 4096)),
        ((32, 3, 64, 64), 1_000_000, 2, (32, 12288)),
        ((16, 32), 1024, 1, (512,)),
        ((16, 32), 100, 1, (16, 32)),
        ((1, 1), 10, 1, (1,)),
        ((), 10, 1, (1,)),
        ((3, 0, 2), 10, 1, (0,)),
        ((1, 4, 1), 10, math.inf, (1, 4, 1)),
    ],
)
def test_merge_small_dims_matches_distributed_shampoo_examples(shape, threshold, target, expected):
    assert merge_small_dims(shape, threshold, target) == expected


def test_merge_trailing_dims():
    assert merge_trailing_dims((64, 32, 3, 3)) == (64, 32, 9)
    assert merge_trailing_dims((2, 3, 4, 5, 6)) == (2, 3, 120)
    assert merge_trailing_dims((5, 6)) == (5, 6)


def test_split_blocks_row_major():
    blocks = split_blocks((5, 3), 2)
    assert [b.shape for b in blocks] == [(2, 2), (2, 1), (2, 2), (2, 1), (1, 2), (1, 1)]
    assert [b.offsets for b in blocks] == [(0, 0), (0, 2), (2, 0), (2, 2), (4, 0), (4, 2)]
    assert split_blocks((0, 3), 2) == ()
    assert [b.shape for b in split_blocks((7,), math.inf)] == [(7,)]


def test_layouts():
    lay = shampoo_layout((4, 8, 3), 2048)
    assert lay.merged_shape == (96,) and len(lay.blocks) == 1
    lay = shampoo_layout((4, 8, 3), 2048, merge_dims=False)
    assert lay.merged_shape == (4, 8, 3)
    assert shampoo_layout((), 10).merged_shape == (1,)
    # SOAP/KL: never merge a 2-D weight down to 1-D; 1-D/0-D are unfactored
    lay = soap_layout((1, 16), 2048)
    assert lay.merged_shape == (1, 16) and lay.factored
    assert not soap_layout((7,), 2048).factored and not soap_layout((), 2048).factored
    lay = soap_layout((6, 3, 2, 2), 4)
    assert lay.merged_shape == (6, 3, 4) and [b.shape for b in lay.blocks] == [(4, 3, 4), (2, 3, 4)]


def test_block_views_share_memory():
    t = torch.arange(30.0).reshape(5, 6)
    lay = soap_layout((5, 6), 4)
    views = block_views(t, lay)
    views[0].zero_()
    assert t[:4, :4].abs().sum() == 0 and t[4:, 4:].abs().sum() > 0


def test_same_shape_blocks_share_one_bucket():
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(8, 4))]
    opt = SOAP(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sizes = sorted((b.shape, b.size) for b in opt._buckets)
    assert sizes == [((8, 4), 1), ((8, 8), 3)]
    # the per-parameter state is a view of the stacked bucket storage
    bucket = next(b for b in opt._buckets if b.shape == (8, 8))
    assert opt.state[params[1]]["blocks"][0]["factor_0"].data_ptr() == bucket.state["factor_0"][1].data_ptr()


def test_params_without_grad_are_skipped_inside_a_bucket():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = Shampoo([a, b], merge_dims=False, precondition_frequency=1, start_preconditioning_step=1)
    a.grad = torch.randn(4, 4)
    opt.step()
    b_before = b.detach().clone()
    a.grad, b.grad = torch.randn(4, 4), None
    opt.step()
    assert torch.equal(b.detach(), b_before)
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 0
    b.grad = torch.randn(4, 4)
    a.grad = torch.randn(4, 4)
    opt.step()  # rows with different step counts are processed separately
    assert opt.state[a]["step"] == 3 and opt.state[b]["step"] == 1
    assert not torch.equal(b.detach(), b_before)


def test_add_param_group_keeps_existing_state():
    a = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([a])
    for _ in range(2):
        a.grad = torch.randn(4, 4)
        opt.step()
    m_before = opt.state[a]["blocks"][0]["exp_avg"].clone()
    b = torch.nn.Parameter(torch.randn(4, 4))
    opt.add_param_group({"params": [b], "lr": 1e-3})
    a.grad = torch.zeros(4, 4)
    b.grad = torch.randn(4, 4)
    opt.step()
    torch.testing.assert_close(opt.state[a]["blocks"][0]["exp_avg"], 0.95 * m_before)
    assert opt.state[b]["initialized"] and opt.state[a]["step"] == 2
