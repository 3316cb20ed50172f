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


@pytest.mark.parametrize("category", ["invalid_argument", "io", "budget", "internal"])
def test_messages_with_bytes_that_are_not_utf8_keep_their_exception(category):
    """A message may carry a file name or a key read from a damaged file: bytes that are not UTF-8 are shown
    as \\xNN escapes, and the exception stays the one the category maps to (not a UnicodeDecodeError)."""
    exc = {"invalid_argument": ValueError, "io": OSError, "budget": MemoryError, "internal": asteria.AsteriaError}
    with pytest.raises(exc[category]) as info:
        _core._raise_for_test(category, b"[pager] cannot open '/data/\xff\xfe.swap'", errno.EIO)
    assert "'/data/\\xff\\xfe.swap'" in str(info.value)


def test_asteria_error_is_a_runtime_error():
    assert issubclass(asteria.AsteriaError, RuntimeError)


def test_cuda_stub_raises_clear_error():
    if _core.cuda_built():
        pytest.skip("CUDA backend built")
    with pytest.raises(asteria.AsteriaError, match="built without CUDA"):
        _core.cuda_device_count()
