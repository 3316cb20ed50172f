"""The bookkeeping of `asteria-bench fidelity` (the benchmark itself is a script, not a test)."""

import math

import torch

from asteria.bench.fidelity import _displacements, _first_differences, _summary


def test_first_differences_name_the_first_step_each_parameter_differs_at():
    rank0 = [["a", "b", "c"], ["a2", "b2", "c2"], ["a3", "b3", "c3"]]
    rank1 = [["a", "b", "c"], ["a2", "x", "c2"], ["y", "x3", "c3"]]
    assert _first_differences([rank0, rank1], ["w", "v", "u"]) == {"v": 2, "w": 3}
    assert _first_differences([rank0, rank0], ["w", "v", "u"]) == {}


def test_displacements_are_relative_to_how_far_the_reference_moved():
    p0 = [torch.zeros(3), torch.ones(2)]
    ref = {"params": {5: [torch.tensor([3.0, 4.0, 0.0]), torch.ones(2)]}, "initial": p0}
    run = {"params": {5: [torch.tensor([3.0, 4.0, 1.0]), torch.ones(2)]}}
    d = _displacements(run, ref, 5)
    assert d[0] == 1.0 / 5.0 and math.isnan(d[1])  # the second parameter did not move: no ratio


def test_summary_splits_matrices_from_vectors_and_skips_nan():
    values = [0.5, 0.1, float("nan"), 0.3, 2e-6]
    matrices = [True, True, True, True, False]
    assert _summary(values, matrices, True) == (0.5, 0.3)
    assert _summary(values, matrices, False) == (2e-6, 2e-6)
    assert all(math.isnan(x) for x in _summary([float("nan")], [True], True))
