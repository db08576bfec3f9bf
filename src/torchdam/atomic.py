"""One way to write a result file: completely or not at all, never through a planted link.

Every file torchdam writes (checkpoints, the best weights, compacted models, reports,
logs, plots) goes through :func:`write_atomic`: the content is written to a new temporary
file in the target's folder (created exclusively, so a symlink planted under that name is
never followed), flushed and fsync'ed, then renamed over the target (a rename replaces a
symlink at the target itself rather than writing through it), and the folder entry is
fsync'ed. A reader therefore sees the old file or the new one, never half of one, and a
failure leaves the old file and no temporary file behind.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from torchdam.errors import CheckpointError, DiskFullError

Content = Union[bytes, str, Callable[[Path], None]]


def fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _flush(file, data: bytes) -> None:
    """Isolated so tests can simulate a full disk."""
    file.write(data)
    file.flush()
    os.fsync(file.fileno())


def write_atomic(path: str | os.PathLike, content: Content, what: str = "the file") -> Path:
    """Write ``content`` to ``path`` atomically and return ``path``.

    ``content`` is bytes, text (UTF-8), or ``writer(tmp_path)`` for libraries that write
    files themselves (``safetensors.save_file``, ``matplotlib``'s ``savefig``; pass the
    format explicitly there, since the temporary name has a ``.tmp`` suffix).
    Raises :class:`DiskFullError` on a full disk and :class:`CheckpointError` for any
    other failure (unwritable folder, the target is a folder, ...), naming ``path``.
    """
    target = Path(path)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        if callable(content):
            os.close(fd)
            content(Path(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            data = content.encode() if isinstance(content, str) else content
            with os.fdopen(fd, "wb") as f:
                _flush(f, data)
        if target.is_dir() and not target.is_symlink():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(target))
        os.replace(tmp, target)
        tmp = None
        fsync_dir(target.parent)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFullError(f"{target}: disk full while writing {what}; free space and run again "
                                "(files written before are intact)") from None
        raise CheckpointError(f"{target}: cannot write {what} ({err.strerror or err})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return target
