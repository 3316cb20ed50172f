"""asteria: second-order optimizers for PyTorch with an asynchronous C++ refresh runtime.

Swap ``torch.optim.AdamW`` for one of the optimizers below::

    import asteria
    opt = asteria.SOAP(model.parameters(), lr=3e-3)

Public names: the optimizers ``Shampoo``, ``SOAP``, ``KLShampoo`` and ``KLSOAP``; their
runtime settings ``RuntimeConfig`` and ``Runtime`` (a refresh worker pool several optimizers can share); ``config()`` (build and provider report);
``select_provider()`` (LAPACK provider); ``AsteriaError`` (errors of the native core); for distributed
runs, ``gather_state_dict()`` (one full checkpoint from every rank's state) and ``DistributedError``;
``BudgetError`` (the memory budgets cannot hold the optimizer state; a ``MemoryError``);
``StepFailedError`` (a step was interrupted midway, e.g. by an I/O error of the NVMe tier: reload the last
checkpoint);
crash-safe checkpoints: ``save_checkpoint()``, ``load_checkpoint()``, ``checkpoint_info()`` and
``CheckpointError`` (a torn, corrupted or foreign checkpoint file; a ``ValueError``); the warnings
``RefreshFailureWarning`` (a refresh failed; the previous preconditioner is kept) and ``PinnedMemoryWarning``
(pinned host memory could not be page-locked).
"""

from __future__ import annotations

from ._loader import _core, select_provider

AsteriaError = _core.AsteriaError
__version__ = _core.__version__

select_provider(None)

from .optim import KLSOAP, SOAP, KLShampoo, RefreshFailureError, Shampoo  # noqa: E402
from .runtime import PinnedMemoryWarning, RefreshFailureWarning, Runtime, RuntimeConfig  # noqa: E402
from .runtime.tiers import BudgetError, StepFailedError  # noqa: E402
from .runtime.distributed import DistributedError, gather_state_dict  # noqa: E402
from .checkpoint import CheckpointError, checkpoint_info, load_checkpoint, save_checkpoint  # noqa: E402


def config() -> dict:
    """How this asteria was built and what it runs with.

    Returns:
        A dict with the version, the LAPACK provider in use (``{"name", "library", "threads"}``),
        the OpenBLAS library path, and whether the CUDA backend was built.
    """
    from ._loader import OPENBLAS_PATH

    return {
        "version": __version__,
        "lapack": _core.linalg.provider(),
        "openblas_library": OPENBLAS_PATH,
        "cuda_built": _core.cuda_built(),
    }


__all__ = [
    "AsteriaError",
    "BudgetError",
    "CheckpointError",
    "DistributedError",
    "KLSOAP",
    "KLShampoo",
    "PinnedMemoryWarning",
    "RefreshFailureError",
    "RefreshFailureWarning",
    "Runtime",
    "RuntimeConfig",
    "SOAP",
    "Shampoo",
    "StepFailedError",
    "__version__",
    "checkpoint_info",
    "config",
    "gather_state_dict",
    "load_checkpoint",
    "save_checkpoint",
    "select_provider",
]
