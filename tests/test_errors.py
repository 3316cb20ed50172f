"""The mapping of asteria::Error categories to Python exceptions."""

import errno

import pytest

import asteria
from asteria import _core


@pytest.mark.parametrize(
    "category, exc",
    [
        ("invalid_argument", ValueError),
        ("budget", MemoryError),
        ("io", OSError),
        ("numerical", asteria.AsteriaError),
        ("cancelled", asteria.AsteriaError),
        ("unavailable", asteria.AsteriaError),
        ("internal", asteria.AsteriaError),
    ],
)
def test_categories_map_to_python_exceptions(category, exc):
    with pytest.raises(exc, match="component says what to do"):
        _core._raise_for_test(category, "[component] component says what to do")


def test_io_errors_carry_errno():
    with pytest.raises(OSError) as info:
        _core._raise_for_test("io", "[pager] disk full", errno.ENOSPC)
    assert info.value.errno == errno.ENOSPC


def test_asteria_error_is_a_runtime_error():
    assert issubclass(asteria.AsteriaError, RuntimeError)


def test_cuda_stub_raises_clear_error():
    if _core.cuda_built():
        pytest.skip("CUDA backend built")
    with pytest.raises(asteria.AsteriaError, match="built without CUDA"):
        _core.cuda_device_count()
