"""Crash-safe checkpoints: ``save_checkpoint``, ``load_checkpoint`` and ``checkpoint_info``.

A checkpoint file is a 64-byte header, a small block of text metadata and the bytes
``torch.save`` produces (the payload), each protected by a CRC32C. Saving streams
``torch.save`` into a private temporary file next to the target and renames it over the
target only after every byte is on stable storage (``fsync`` of the file, then of the
directory), so the previous checkpoint at that path survives a full disk, an I/O error or a
crash at any moment. Loading checks the header, the sizes and the payload CRC before
``torch.load(..., weights_only=True)`` reads the payload, so a torn or corrupted file is
refused with :class:`CheckpointError` and no code from the file ever runs.

The on-disk format is described in ``cpp/include/asteria/checkpoint.h``.
"""

from __future__ import annotations

import datetime
import io
import os
from typing import Any, Mapping

import torch

from ._loader import _core

__all__ = ["CheckpointError", "checkpoint_info", "load_checkpoint", "save_checkpoint"]

#: Raised for a file that is not an asteria checkpoint, or is torn or corrupted (a ``ValueError``).
#: Its ``reason`` attribute is ``"not_a_checkpoint"``, ``"torn"``, ``"corrupted"``,
#: ``"unsupported"`` (a newer format version) or ``"invalid_metadata"``.
CheckpointError = _core.CheckpointError

#: Metadata keys asteria writes itself; user keys may not start with this prefix.
RESERVED_PREFIX = "asteria."


class _PayloadSink(io.RawIOBase):
    """The write-only file object ``torch.save`` streams into: every write goes to the C++ writer.

    After a failed write (the writer has then removed its temporary file) later writes are
    dropped: ``torch.save`` still writes the end of its archive while the error propagates, and
    a second error from that would hide the first. ``error`` keeps the first one.
    """

    def __init__(self, writer: Any) -> None:
        super().__init__()
        self._writer = writer
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        if self.error is not None:
            return memoryview(data).nbytes
        try:
            return self._writer.write(data)
        except BaseException as exc:
            self.error = exc
            raise


class _PayloadWindow(io.RawIOBase):
    """A read-only, seekable file object over the payload of an open checkpoint.

    ``torch.load`` reads each tensor's bytes through ``readinto`` straight into the tensor's
    storage, so loading needs no second copy of the payload in memory.
    """

    def __init__(self, reader: Any) -> None:
        super().__init__()
        self._reader = reader
        self._size = reader.payload_bytes
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        n = self._reader.readinto(self._pos, buffer)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"whence must be 0, 1 or 2, got {whence!r}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos


def _tensor_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    """Bytes of the distinct tensor storages inside ``obj`` (dicts, lists, tuples): the payload's
    approximate size, used only to say how much space a checkpoint needs when the disk fills up."""
    if depth > 64:
        return 0
    if isinstance(obj, torch.Tensor):
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, functional...)
            return obj.numel() * obj.element_size()
        key = storage.data_ptr() if storage.device.type != "meta" else id(storage)
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    return 0


def _metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(
                    f"metadata must map str to str, got {key!r}: {value!r}; convert values with str()"
                )
            if key.startswith(RESERVED_PREFIX):
                raise ValueError(
                    f"metadata key {key!r}: keys starting with {RESERVED_PREFIX!r} are written by asteria "
                    "itself; choose another key"
                )
            out[key] = value
    out[RESERVED_PREFIX + "version"] = _core.__version__
    out[RESERVED_PREFIX + "torch_version"] = str(torch.__version__)
    out[RESERVED_PREFIX + "created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return out


def _save(
    obj: Any,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None,
    *,
    named_temp: bool = False,
    test_fault: str = "none",
    fault_after_bytes: int = 0,
    chunk_delay_s: float = 0.0,
) -> None:
    """:func:`save_checkpoint` with the writer's TEST HOOK (``test_fault``: ``"enospc"``, ``"eio"``,
    ``"fsync"``, ``"rename"``; ``chunk_delay_s``: a sleep at every write) and ``named_temp`` (a named
    temporary file even where an unnamed one is possible). Tests only."""
    writer = _core.checkpoint.Writer(
        os.fspath(path),
        _metadata(metadata),
        expected_bytes=_tensor_bytes(obj, set()),
        named_temp=named_temp,
        test_fault=test_fault,
        fault_after_bytes=fault_after_bytes,
        chunk_delay_s=chunk_delay_s,
    )
    sink = _PayloadSink(writer)
    try:
        try:
            torch.save(obj, sink)
        except BaseException as exc:
            if sink.error is not None and exc is not sink.error:
                raise sink.error from None  # the write error, not what torch.save made of it
            raise
        writer.commit()
    finally:
        writer.abort()  # removes the temporary file unless the commit succeeded


def save_checkpoint(obj: Any, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
    """Save ``obj`` with ``torch.save`` into a crash-safe checkpoint file at ``path``.

    The payload is streamed into a temporary file in the same directory (mode 0600; an unnamed
    ``O_TMPFILE`` file where the file system allows it, else ``.<name>.<random>.tmp``) while its
    CRC32C is computed; the header is written last, the file is fsynced and renamed over
    ``path`` (a symbolic link at ``path`` is replaced, not followed) and the directory is
    fsynced. Until the rename, the previous file at ``path`` is untouched; on any error the
    temporary file is removed. A crash leaves nothing behind with an unnamed temporary file
    (but for the instant between naming it and the rename); a named one stays behind, never
    with a valid header, and can be deleted.

    Args:
        obj: what to save, e.g. ``{"model": model.state_dict(), "optimizer": opt.state_dict()}``.
            ``torch.load(weights_only=True)`` must be able to load it back: tensors, containers
            and plain Python values.
        path: the checkpoint file. Its directory must exist.
        metadata: text labels stored in the header, readable with :func:`checkpoint_info`
            without loading tensors (at most 64 entries; keys of 1-64 characters from
            ``[A-Za-z0-9_.-]``, not starting with ``asteria.``; values printable text of at most
            4096 UTF-8 bytes). asteria adds ``asteria.version``, ``asteria.torch_version`` and
            ``asteria.created``.

    Raises:
        OSError: the file could not be written (``errno`` says why: ``ENOSPC`` for a full disk,
            ``EROFS``/``EACCES`` for an unwritable directory, ``EIO``...); the message names the
            paths, the bytes written and needed, and the fix. The previous file at ``path`` is
            intact.
        CheckpointError: ``metadata`` breaks the limits above (reason ``invalid_metadata``).
        TypeError: ``metadata`` is not a mapping of ``str`` to ``str``.
        ValueError: a reserved metadata key, or ``path`` names a directory.
    """
    _save(obj, path, metadata)


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_checkpoint`, after checking its integrity.

    The header, the metadata, the file size and the payload's CRC32C are checked first (the
    payload is read once, in bounded memory); then ``torch.load(..., weights_only=True)`` reads
    the payload through a window onto the file, so tensors are read straight into their storage
    and no code from the file is run. ``path`` must not be a symbolic link.

    Args:
        path: the checkpoint file.
        map_location: as for ``torch.load`` (default ``"cpu"``).

    Returns:
        The saved object.

    Raises:
        CheckpointError: the file is not an asteria checkpoint, or is torn (cut short, or with
            bytes appended) or corrupted (a CRC mismatch); the message names the file and says
            what to do (resume from an earlier checkpoint).
        OSError: the file cannot be opened or read (``FileNotFoundError``, ``ELOOP`` for a
            symbolic link...).
        pickle.UnpicklingError: the payload holds objects that ``weights_only=True`` refuses
            (nothing from the file was run).
    """
    with _core.checkpoint.Reader(os.fspath(path)) as reader:
        reader.verify()
        return torch.load(_PayloadWindow(reader), map_location=map_location, weights_only=True)


def checkpoint_info(path: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """The header of a checkpoint, without loading its tensors.

    Args:
        path: the checkpoint file.
        verify: also check the payload's CRC32C (reads the whole payload once).

    Returns:
        A dict with ``path``, ``format_version``, ``header_bytes``, ``metadata_bytes``,
        ``payload_bytes``, ``file_bytes``, ``payload_crc32c``, ``metadata`` (a dict of str) and
        ``verified`` (whether the payload CRC was checked).

    Raises:
        CheckpointError: as for :func:`load_checkpoint` (a payload CRC mismatch only when
            ``verify`` is true).
        OSError: the file cannot be opened or read.
    """
    with _core.checkpoint.Reader(os.fspath(path)) as reader:
        if verify:
            reader.verify()
        h = reader.header()
    return {
        "path": os.fspath(path),
        "format_version": h["format_version"],
        "header_bytes": h["header_bytes"],
        "metadata_bytes": h["metadata_bytes"],
        "payload_bytes": h["payload_bytes"],
        "file_bytes": h["file_bytes"],
        "payload_crc32c": h["payload_crc32c"],
        "metadata": dict(h["metadata"]),
        "verified": bool(verify),
    }
