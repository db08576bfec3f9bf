"""Reproductions of the paper's experiments: ``torchdam reproduce <name> [--quick]``.

Each experiment is one module that registers a function
``run(out_dir: Path, quick: bool, seeds: int | None) -> dict`` in :data:`EXPERIMENTS`;
it writes ``results.json``, ``results.md`` and its plots to ``out_dir`` and returns the
results. ``quick`` is a seconds-long smoke version (used by the tests); the full version is
what REPRODUCTION.md reports.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from torchdam.registry import Registry

Experiment = Callable[..., dict]
EXPERIMENTS: Registry[dict] = Registry("experiment")

#: modules that register experiments; imported on first use so `import torchdam` stays light
_MODULES: tuple[str, ...] = ("dimred", "autoencoder", "graph", "igmc")


def load_all() -> Registry[dict]:
    for name in _MODULES:
        importlib.import_module(f"torchdam.experiments.{name}")
    return EXPERIMENTS


def run_experiment(name: str, out_dir: Path, quick: bool = False, seeds: int | None = None) -> dict:
    return load_all().get(name)(out_dir=Path(out_dir), quick=quick, seeds=seeds)
