"""asteria: second-order optimizers for PyTorch with an asynchronous C++ refresh runtime."""

from __future__ import annotations

from ._loader import _core, select_provider

AsteriaError = _core.AsteriaError
__version__ = _core.__version__

select_provider(None)


def config() -> dict:
    """How this asteria was built and what it runs with.

    Returns:
        A dict with the version, the LAPACK provider in use (``{"name", "library", "threads"}``),
        whether the CUDA backend was built, and the OpenBLAS library path.
    """
    from ._loader import OPENBLAS_PATH

    return {
        "version": __version__,
        "lapack": _core.linalg.provider(),
        "openblas_library": OPENBLAS_PATH,
        "cuda_built": _core.cuda_built(),
    }


__all__ = ["AsteriaError", "config", "select_provider", "__version__"]
