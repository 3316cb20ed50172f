"""The embedded training corpus: the Python standard library's own source files.

Every Python installation carries its standard library as ``.py`` source, so a corpus built
from it works offline on any machine with no download. The corpus is byte-level (vocabulary
of 256: a token is one byte of the UTF-8 source), and it is deterministic for a given Python
version:

* Files are found under ``sysconfig.get_paths()["stdlib"]`` (the running interpreter's
  standard library) and named by their path relative to that directory, with ``/``
  separators.
* Skipped (see :data:`EXCLUDED_DIRS` and :func:`is_excluded`): third-party code
  (``site-packages``, ``dist-packages``), test suites (``test``, ``tests``, ``idle_test``),
  bundled wheels, byte-code caches, the generated codec tables of ``encodings`` and the
  help text of ``pydoc_data`` (large, repetitive, not code), and the machine-specific
  ``_sysconfigdata_*`` module (so the same Python version gives the same corpus on every
  machine).
* Selection under a size cap: files are ranked by the SHA-256 of their relative path (a
  fixed pseudo-random order, so a cap keeps a spread of modules rather than the
  alphabetically first packages). Walking that ranking, the first files go to the
  validation split until it holds ``val_fraction`` of the cap, the next ones to the training
  split until the cap is reached. Whole files are assigned to one split, so no validation
  text was seen in training.
* Inside each split, files are concatenated in sorted relative-path order, each preceded by
  a one-line header ``# file: <relative path>``.

:func:`Corpus.fingerprint` (SHA-256 of both splits) identifies the exact corpus; checkpoints
record it so a run is never resumed on different data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from pathlib import Path

import torch

#: Vocabulary size of the byte-level corpus.
VOCAB_SIZE = 256

#: Default cap on the corpus size (training + validation bytes).
DEFAULT_MAX_BYTES = 4 * 1024 * 1024

#: Default share of the cap given to the validation split.
DEFAULT_VAL_FRACTION = 0.05

#: Directory names skipped anywhere in the tree.
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "_bundled",
        "lib-dynload",
    }
)

#: Top-level directories skipped (relative to the stdlib root).
EXCLUDED_TOP_DIRS = frozenset({"encodings", "pydoc_data"})


def stdlib_root() -> Path:
    """Return the running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_excluded(relpath: str) -> bool:
    """Tell whether a ``/``-separated path relative to the stdlib root is left out.

    Args:
        relpath: path of a ``.py`` file relative to the stdlib root.

    Returns:
        True for files in :data:`EXCLUDED_DIRS` (at any depth) or
        :data:`EXCLUDED_TOP_DIRS`, for configuration directories (``config-*``) and for the
        machine-specific ``_sysconfigdata_*`` modules.
    """
    parts = relpath.split("/")
    dirs, name = parts[:-1], parts[-1]
    if any(d in EXCLUDED_DIRS for d in dirs):
        return True
    if dirs and (dirs[0] in EXCLUDED_TOP_DIRS or dirs[0].startswith("config-")):
        return True
    return name.startswith("_sysconfigdata")


def list_source_files(root: Path | str | None = None) -> list[tuple[str, int]]:
    """List the corpus candidates under ``root``.

    Args:
        root: directory to scan; the running interpreter's stdlib when None.

    Returns:
        ``(relative path, size in bytes)`` for every ``.py`` file that is not excluded,
        sorted by relative path.
    """
    root = Path(root) if root is not None else stdlib_root()
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune excluded directories early (os.walk honours in-place edits).
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            if is_excluded(rel) or not full.is_file():
                continue
            found.append((rel, full.stat().st_size))
    found.sort()
    return found


def _rank_key(relpath: str) -> str:
    return hashlib.sha256(relpath.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A byte-level corpus split into training and validation text.

    Attributes:
        train: training bytes as a 1-D ``torch.uint8`` tensor.
        val: validation bytes as a 1-D ``torch.uint8`` tensor.
        train_files: relative paths of the training files, in concatenation order.
        val_files: relative paths of the validation files, in concatenation order.
        root: the directory the files were read from.
    """

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    root: str

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens (always 256: bytes)."""
        return VOCAB_SIZE

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the validation and training bytes; identifies the corpus."""
        h = hashlib.sha256()
        h.update(self.val.numpy().tobytes())
        h.update(b"\0")
        h.update(self.train.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        """One line for the console: file counts and sizes."""
        return (
            f"corpus: Python {sysconfig.get_python_version()} stdlib sources, "
            f"{len(self.train_files)} train files ({self.train.numel() / 1e6:.2f} MB), "
            f"{len(self.val_files)} validation files ({self.val.numel() / 1e6:.2f} MB)"
        )


def _concat(root: Path, files: list[str]) -> torch.Tensor:
    chunks = []
    for rel in sorted(files):
        chunks.append(f"# file: {rel}\n".encode("utf-8"))
        chunks.append((root / rel).read_bytes())
        if not chunks[-1].endswith(b"\n"):
            chunks.append(b"\n")
    data = bytearray(b"".join(chunks))
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8).clone()


def load_corpus(
    max_bytes: int = DEFAULT_MAX_BYTES,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    root: Path | str | None = None,
) -> Corpus:
    """Build the corpus deterministically (see the module docstring for the rules).

    Args:
        max_bytes: cap on the total size of the selected files (headers not counted);
            at least 4096.
        val_fraction: share of the cap given to validation, in (0, 0.5].
        root: directory to read; the running interpreter's stdlib when None.

    Returns:
        The :class:`Corpus`.

    Raises:
        ValueError: if an argument is out of range, or if the directory holds too little
            source to fill both splits.
    """
    if max_bytes < 4096:
        raise ValueError(f"max_bytes must be >= 4096, got {max_bytes}")
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    root = Path(root) if root is not None else stdlib_root()
    files = list_source_files(root)
    files.sort(key=lambda f: _rank_key(f[0]))
    val_cap = int(max_bytes * val_fraction)
    val_files: list[str] = []
    train_files: list[str] = []
    val_bytes = train_bytes = 0
    for rel, size in files:
        if size == 0:
            continue
        if val_bytes < val_cap:
            if val_bytes + size <= 2 * val_cap or not val_files:
                val_files.append(rel)
                val_bytes += size
            continue
        if val_bytes + train_bytes + size > max_bytes:
            continue  # too big for what is left; a smaller file later may still fit
        train_files.append(rel)
        train_bytes += size
        if val_bytes + train_bytes >= max_bytes - 1024:
            break
    if not val_files or not train_files:
        raise ValueError(f"not enough Python source under {root} to build a corpus")
    return Corpus(
        train=_concat(root, train_files),
        val=_concat(root, val_files),
        train_files=tuple(sorted(train_files)),
        val_files=tuple(sorted(val_files)),
        root=str(root),
    )


def train_batch(
    data: torch.Tensor, batch_size: int, context: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the training batch of one step.

    The batch is a pure function of ``(seed, step)``: a run resumed at step ``k`` sees
    exactly the batches the uninterrupted run would have seen, and every configuration of a
    comparison trains on the same data. The data position is therefore just the step.

    Args:
        data: 1-D ``uint8`` token tensor.
        batch_size: sequences per batch.
        context: tokens per sequence.
        seed: run seed.
        step: 0-based index of the optimizer step.

    Returns:
        ``(inputs, targets)``, both ``int64`` of shape ``(batch_size, context)``; targets are
        inputs shifted by one token.
    """
    if data.numel() < context + 2:
        raise ValueError(f"corpus of {data.numel()} bytes is shorter than context {context} + 1")
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=gen)
    offsets = torch.arange(context + 1)
    window = data[starts[:, None] + offsets].long()
    return window[:, :-1], window[:, 1:]


def val_batches(
    data: torch.Tensor, batch_size: int, context: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: evenly spaced windows over the validation text.

    Args:
        data: 1-D ``uint8`` validation tokens.
        batch_size: sequences per batch.
        context: tokens per sequence.
        max_batches: number of batches (fewer if the text is short).

    Returns:
        A list of ``(inputs, targets)`` pairs; the same for every run of a corpus.
    """
    n_windows = min(max_batches * batch_size, max(1, (data.numel() - 1) // context))
    span = data.numel() - context - 1
    if span < 0:
        raise ValueError(f"validation text of {data.numel()} bytes is shorter than the context")
    starts = torch.linspace(0, span, n_windows).long()
    offsets = torch.arange(context + 1)
    window = data[starts[:, None] + offsets].long()
    return [
        (window[i : i + batch_size, :-1], window[i : i + batch_size, 1:])
        for i in range(0, n_windows, batch_size)
    ]
