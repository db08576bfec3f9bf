"""What the reproduction experiments share: seeds, statistics, PCA, result files, plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import torch
from torch import Tensor
from tqdm.auto import tqdm

matplotlib.use("Agg")  # no screen here, and plots go to files
import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported for the experiment modules)

from torchdam.atomic import write_atomic  # noqa: E402


def seed_list(seeds: int | None, default: int, quick: bool) -> list[int]:
    """Seeds 0..n-1: one in quick mode unless asked otherwise, else ``seeds`` or the protocol's."""
    n = seeds if seeds is not None else (1 if quick else default)
    if n < 1:
        from torchdam.errors import ConfigError

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
