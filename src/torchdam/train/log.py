"""What a run leaves on disk while it trains: the per-epoch log (checkpoints of the whole
training state are :mod:`torchdam.checkpoint`)."""
from __future__ import annotations

import csv
import errno
import json
import os
import tempfile
from pathlib import Path

from torchdam.atomic import fsync_dir


class RunLog:
    """Per-epoch log, flushed after every line so an interrupted run keeps what it has
    done. A resumed run rewrites it from the checkpoint's records (atomically), so it
    holds each epoch exactly once."""

    def __init__(self, path: Path, fmt: str, records: list[dict] = ()) -> None:
        self.path = path
        self.fmt = fmt
        self.writer: csv.DictWriter | None = None
        # a new, exclusively created temporary (never a planted file or link), renamed over the log
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self.file = os.fdopen(fd, "w", newline="")
        try:
            for record in records:
                self.write(record)
            os.fsync(self.file.fileno())
            if path.is_dir() and not path.is_symlink():
                raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            self.file.close()
            Path(tmp).unlink(missing_ok=True)
            raise

    def write(self, record: dict) -> None:
        if self.fmt == "jsonl":
            self.file.write(json.dumps(record) + "\n")
        else:
            if self.writer is None:
                self.writer = csv.DictWriter(self.file, fieldnames=list(record))
                self.writer.writeheader()
            self.writer.writerow({k: "" if v is None else v for k, v in record.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()
