"""What a run leaves on disk while it trains: the per-epoch log (checkpoints of the whole
training state are :mod:`torchdam.checkpoint`)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path


class RunLog:
    """Per-epoch log, flushed after every line so an interrupted run keeps what it has
    done. A resumed run rewrites it from the checkpoint's records (atomically), so it
    holds each epoch exactly once."""

    def __init__(self, path: Path, fmt: str, records: list[dict] = ()) -> None:
        self.path = path
        self.fmt = fmt
        self.writer: csv.DictWriter | None = None
        tmp = path.with_name(f".{path.name}.tmp")
        self.file = open(tmp, "w", newline="")
        try:
            for record in records:
                self.write(record)
            os.fsync(self.file.fileno())
            os.replace(tmp, path)
        except BaseException:
            self.file.close()
            tmp.unlink(missing_ok=True)
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
