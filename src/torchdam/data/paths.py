"""Where data and caches live: one rule for every loader (the library's and the lab's)."""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "TORCHDAM_DATA_DIR"
CACHE_DIR_ENV = "TORCHDAM_CACHE_DIR"


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``root``, else $TORCHDAM_DATA_DIR, else ``<repo>/../shared/data``
    (a checkout sits beside ``shared/``; nothing is ever downloaded)."""
    if root is not None:
        return Path(root)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    repo = Path(__file__).resolve().parents[3]  # src/torchdam/data/paths.py -> repo root
    return repo.parent / "shared" / "data"


def cache_dir() -> Path:
    """$TORCHDAM_CACHE_DIR, else ``$XDG_CACHE_HOME/torchdam``, else ``~/.cache/torchdam``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torchdam"
