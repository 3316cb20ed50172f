"""Loads the native core with its OpenBLAS, and selects the LAPACK provider.

The extension ``asteria._core`` links the OpenBLAS of the PyPI package ``scipy-openblas32``. Its
run path points at the usual location next to asteria in site-packages; preloading the library by
absolute path here makes the import work in any other layout too (the dynamic loader then reuses
the already-loaded ``libscipy_openblas.so``).
"""

from __future__ import annotations

import ctypes
import os
import sys

_PROVIDERS = ("openblas", "mkl")


def _preload_openblas() -> str:
    try:
        import scipy_openblas32
    except ImportError as exc:  # pragma: no cover - a broken installation
        raise ImportError(
            "asteria needs the package scipy-openblas32 (its LAPACK). "
            "Fix: pip install scipy-openblas32"
        ) from exc
    path = os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so")
    if sys.platform.startswith("linux") and os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


def find_mkl_runtime() -> str | None:
    """Path of MKL's single dynamic library (``libmkl_rt``) from the PyPI package ``mkl``, if any."""
    import glob

    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
        if found:
            return found[0]
    return None


OPENBLAS_PATH = _preload_openblas()

from . import _core  # noqa: E402  (after the preload on purpose)


def select_provider(name: str | None = None) -> dict:
    """Choose the LAPACK provider for refresh work.

    Args:
        name: ``"openblas"`` (the default, always available), ``"mkl"`` (needs ``pip install
            'asteria[mkl]'``), or ``None`` to read the ``ASTERIA_LAPACK`` environment variable
            (default ``openblas``).

    Returns:
        The provider now in use: ``{"name", "library", "threads"}``.

    Raises:
        ValueError: for an unknown provider name.
        asteria.AsteriaError: when MKL was asked for but cannot be loaded (the message says how to
            install it).
    """
    if name is None:
        name = os.environ.get("ASTERIA_LAPACK", "openblas").strip().lower() or "openblas"
    if name not in _PROVIDERS:
        raise ValueError(f"unknown LAPACK provider {name!r}; choose one of {', '.join(_PROVIDERS)}")
    if name == "mkl":
        lib = find_mkl_runtime()
        _core.linalg.load_provider("mkl", lib or "")
    else:
        _core.linalg.load_provider("openblas", "")
    return _core.linalg.provider()
