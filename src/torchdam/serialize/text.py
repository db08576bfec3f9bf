"""Text helpers save and load share: dotted module paths, one-line excerpts of
file-supplied text for messages, and JSON objects that refuse duplicated keys."""
from __future__ import annotations

from typing import Any


def _where(path: str) -> str:
    shown = path if len(path) <= 200 else path[:200] + "..."
    return f"module '{shown}'" if path else "the root module"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _shorten(text: str, limit: int = 400) -> str:
    """One line of at most ``limit`` characters (values in messages come from the file)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(err: BaseException) -> str:
    return _shorten(str(err), 300)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json object_pairs_hook: a duplicated key is an error, not "the last one wins"."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {duplicate!r}")
    return out
