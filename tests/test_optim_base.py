"""`asteria.optim.base`: the staggered refresh phases of the blocks (`assign_phases`, `RuntimeConfig.refresh_phases`)
and what they bound: the bytes of the snapshots in flight."""

from __future__ import annotations

import pytest
import torch

import asteria
from asteria import RuntimeConfig
from asteria.optim.base import assign_phases, contiguous_rows


def _model():
    torch.manual_seed(0)
    # ten 32x32 weights (one bucket), two 48x16 ones (another) and biases (unrefreshed)
    layers = [torch.nn.Linear(32, 32) for _ in range(10)] + [torch.nn.Linear(16, 48), torch.nn.Linear(48, 16)]
    return torch.nn.ModuleList(layers)


def _train(opt, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_phases_split_the_refresh_work_evenly_and_keep_a_buckets_phase_rows_contiguous():
    model = _model()
    f = 5
    opt = asteria.SOAP(model.parameters(), precondition_frequency=f, runtime=RuntimeConfig(staleness=1))
    phases = opt.refresh_phases()
    weights: dict[int, int] = {}
    for (name, blocks), p in zip(phases.items(), model.parameters()):
        if p.ndim == 1:
            assert blocks == [None]
            continue
        (phase,) = blocks
        assert 0 <= phase < f
        weights[phase] = weights.get(phase, 0) + sum(d * d for d in p.shape)
    total, largest = sum(weights.values()), 48 * 48 + 16 * 16
    assert sorted(weights) == list(range(f))
    assert all(abs(w - total / f) <= largest for w in weights.values())  # each phase holds ~1/f of the work
    for bucket in opt._buckets:
        row_phases = [m.phase for m in bucket.members]
        assert row_phases == sorted(row_phases)  # non-decreasing: a phase's rows are contiguous
    opt.close()


def test_phases_are_a_function_of_the_layout_only():
    """The same phases with aligned buckets split into chunks by memory tiers and for a second optimizer, and all 0
    with aligned phases."""
    model = _model()
    a = asteria.SOAP(model.parameters(), runtime=RuntimeConfig(staleness=2))
    b = asteria.SOAP(model.parameters(), runtime=RuntimeConfig(staleness=2, device_budget="1GiB", max_chunk_bytes=1))
    c = asteria.SOAP(model.parameters(), runtime=RuntimeConfig(staleness=2, refresh_phases="aligned"))
    assert len(b._ensure_buckets()) > len(a._ensure_buckets())  # one block per chunk
    assert a.refresh_phases() == b.refresh_phases()
    assert {x for blocks in c.refresh_phases().values() for x in blocks} == {0, None}
    for opt in (a, b, c):
        opt.close()


def test_assign_phases_of_an_empty_or_unfactored_layout_is_a_no_op():
    assign_phases([], [])


def test_contiguous_rows_are_a_view_and_others_a_copy():
    x = torch.arange(24.0).reshape(6, 2, 2)
    assert contiguous_rows(x, list(range(6))) is x
    view = contiguous_rows(x, [2, 3, 4])
    assert view.data_ptr() == x[2].data_ptr() and torch.equal(view, x[2:5])
    gathered = contiguous_rows(x, [0, 5])
    assert gathered.data_ptr() != x.data_ptr() and torch.equal(gathered, x[[0, 5]])


@pytest.mark.parametrize("name", ["Shampoo", "SOAP", "KLSOAP"])
def test_staggered_phases_snapshot_a_fraction_of_a_round(name):
    """Each step snapshots only the blocks of its phases, so the snapshot pool holds about (o + S + 1)/f of a round:
    with ten equal blocks, f = 10 and S = 1, well under half of what aligned phases hold."""
    def pool(phases):
        torch.manual_seed(0)
        model = torch.nn.ModuleList([torch.nn.Linear(64, 64, bias=False) for _ in range(10)])
        kw = dict(start_preconditioning_step=10) if name == "Shampoo" else {}
        opt = getattr(asteria, name)(model.parameters(), precondition_frequency=10,
                                     runtime=RuntimeConfig(staleness=1, refresh_phases=phases), **kw)
        _train(opt, model, 35)
        stats = opt.runtime.stats()
        reserved = opt.runtime.memory_report()["runtime"]["shadow_pool"]
        opt.close()
        return reserved, stats["jobs_submitted"]

    aligned, aligned_jobs = pool("aligned")
    staggered, staggered_jobs = pool("staggered")
    assert staggered_jobs >= aligned_jobs - 2 * 10 * 2  # the same refresh work, up to the partial last round
    assert 0 < staggered < 0.5 * aligned, (staggered, aligned)
