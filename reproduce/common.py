"""What the reproduction experiments share: seeds, statistics, PCA, result files, plots,
and the resumable sweep (runs.jsonl, sweep.json, the folder lock)."""
from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Hashable, Iterable, Self, Sequence

import matplotlib
import torch
from torch import Tensor
from tqdm.auto import tqdm

matplotlib.use("Agg")  # no screen here, and plots go to files
import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported for the experiment modules)

from torchdam.atomic import write_atomic  # noqa: E402
from torchdam.errors import ConfigError  # noqa: E402

RUNS_FILE = "runs.jsonl"  #: one finished run per line, appended as each run ends
SWEEP_FILE = "sweep.json"  #: the identity (experiment, protocol, settings) of the runs in a folder


def seed_list(seeds: int | None, default: int, quick: bool) -> list[int]:
    """Seeds 0..n-1: one in quick mode unless asked otherwise, else ``seeds`` or the protocol's."""
    n = seeds if seeds is not None else (1 if quick else default)
    if n < 1:
        raise ConfigError(f"--seeds must be >= 1, got {n}")
    return list(range(n))


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of the non-None values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def fmt(values: Iterable[float | None], digits: int = 3, style: str = "f") -> str:
    """``mean +- std`` of ``values`` for a Markdown cell (``style`` "f" or "e"); ``-`` when there is none."""
    m, s = mean_std(values)
    return "-" if m is None else f"{m:.{digits}{style}} +- {s:.{digits}{style}}"


def table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(iterable: Iterable, desc: str, total: int | None = None) -> tqdm:
    """The experiment-level progress bar (one tick per training run)."""
    return tqdm(iterable, desc=desc, total=total, leave=False)


def pca(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, components (d, d) as rows, variances)`` of ``x`` (N, d), largest variance first."""
    x = x.double()
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / (x.shape[0] - 1)
    variances, vectors = torch.linalg.eigh(cov)
    order = variances.argsort(descending=True)
    return mean, vectors[:, order].T, variances[order].clamp(min=0)


def pca_elbow(variances: Tensor, max_components: int | None = None) -> int:
    """Components before the largest drop of the spectrum on a log scale (largest
    ``lambda_i / lambda_{i+1}``): the classical elbow reading of a scree plot."""
    v = variances[: (max_components or len(variances)) + 1].double()
    # Numerically zero variances (rank-deficient data) scatter over many decades; floor them
    # so the elbow is read where the signal ends, not inside the round-off.
    v = v.clamp(min=float(v[0]) * 1e-10)
    gaps = torch.log(v[:-1]) - torch.log(v[1:])
    return int(gaps.argmax()) + 1


def components_for(variances: Tensor, fraction: float) -> int:
    """Fewest principal components explaining ``fraction`` of the total variance."""
    cumulative = variances.cumsum(0) / variances.sum()
    return int((cumulative < fraction).sum()) + 1


def write_results(out_dir: Path, results: dict, markdown: str) -> dict:
    """``results.json`` (everything measured) and ``results.md`` (the tables) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n", "the results")
    write_atomic(out_dir / "results.md", markdown.rstrip() + "\n", "the results")
    return results


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"), "a plot")
    plt.close(fig)


def format_mean_std(values: Iterable[float | None], fmt: str = "{:.4f}") -> str:
    """``"mean +- std"`` (:func:`mean_std`) for a table cell; ``"-"`` without values."""
    mean, std = mean_std(values)
    return "-" if mean is None else f"{fmt.format(mean)} +- {fmt.format(std)}"


# ---------------------------------------------------------------- the resumable sweep
# A sweep folder holds sweep.json (what its runs are), runs.jsonl (the finished runs) and
# .lock (held while one process trains). Started again, an experiment trains only the runs
# missing from runs.jsonl; its tables are always built from runs.jsonl, so --report-only
# writes the same results without training.

def resolve_protocol(experiment: str, protocol: str | None, quick: bool, choices: Iterable[str],
                     default: str) -> str:
    """The protocol's name: ``protocol``, else "quick" with ``quick``, else ``default``.
    An unknown name, or ``quick`` with another protocol, is a :class:`ConfigError`."""
    choices = list(choices)
    name = protocol or ("quick" if quick else default)
    if name not in choices:
        raise ConfigError(f"unknown protocol {name!r} for {experiment}; choose one of: {', '.join(choices)}")
    if quick and name != "quick":
        raise ConfigError(f"--quick is the protocol 'quick'; it cannot be combined with --protocol {name}")
    return name


def read_runs(out_dir: Path, key: Callable[[dict], Hashable]) -> list[dict]:
    """The finished runs recorded in ``out_dir/runs.jsonl`` (one JSON object a line), in
    file order. A line cut short by a kill, or one ``key`` cannot read, is skipped with a
    warning (that run is simply trained again); a later record of the same ``key`` replaces
    the earlier one."""
    path = Path(out_dir) / RUNS_FILE
    if not path.is_file():
        return []
    runs: dict[Hashable, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
            k = key(run)
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}: line {n} is not a complete run record (a write cut short?); skipped",
                          stacklevel=2)
            continue
        runs[k] = run
    return list(runs.values())


def append_run(out_dir: Path, run: dict) -> None:
    """Append one run to ``runs.jsonl``, flushed and fsync'ed before returning. A last line
    without its newline is a write a kill cut short: it is dropped first (only one process
    writes, under the sweep's :class:`SweepLock`)."""
    path = Path(out_dir) / RUNS_FILE
    with open(path, "a+b") as f:
        f.seek(0)
        content = f.read()
        if content and not content.endswith(b"\n"):
            f.truncate(content.rfind(b"\n") + 1)
        f.write((json.dumps(run) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically."""
    write_atomic(path, json.dumps(obj, indent=1) + "\n", path.name)


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_sweep(out_dir: Path, identity: dict) -> None:
    """``sweep.json`` names the experiment, protocol and settings of the runs in ``out_dir``;
    runs of another sweep are never pooled with them (one-line :class:`ConfigError`). The
    first start writes it."""
    path = Path(out_dir) / SWEEP_FILE
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as read back
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != identity:
            old, new = _flat(saved), _flat(identity)
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                              for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise ConfigError(f"{out_dir} holds runs of another sweep ({diffs}); "
                              "choose another --out or the same --protocol")
    else:
        if (Path(out_dir) / RUNS_FILE).is_file():
            raise ConfigError(f"{Path(out_dir) / RUNS_FILE} exists without {SWEEP_FILE}: cannot tell which sweep it is")
        write_json(path, identity)


def open_sweep(out_dir: Path, identity: dict, report_only: bool) -> None:
    """Make ``out_dir`` a sweep folder of ``identity`` (:func:`check_sweep`). With
    ``report_only`` there must be runs to report already."""
    if report_only and not (Path(out_dir) / RUNS_FILE).is_file():
        raise ConfigError(f"{Path(out_dir) / RUNS_FILE}: no runs to report yet")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    check_sweep(out_dir, identity)


class SweepLock:
    """One process trains a sweep folder at a time (a second would train the same runs)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / ".lock"

    def __enter__(self) -> Self:
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ConfigError(f"{self.path.parent}: another process is training this sweep; "
                              "use --report-only to write up its runs so far") from None
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
