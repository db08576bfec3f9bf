"""Human-facing output of a prune run: the printed table and the plots."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen here, and plots go to files
import matplotlib.pyplot as plt  # noqa: E402

from torchdam.atomic import write_atomic  # noqa: E402


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "n/a"


def format_report(r: dict) -> str:
    """Markdown report: accuracy gated vs compacted, widths, params/FLOPs/latency."""
    b, a = r["before"], r["after"]
    kept, total = r["units_kept"], r["units_total"]
    lines = [
        f"## torchdam prune: {r['model']} on {r['data']} ({r['epochs']} epochs, shipped: {r['checkpoint']} epoch)",
        "",
        f"test accuracy  gated {100 * r['test_acc_gated']:.2f}%  ->  compacted {100 * r['test_acc_compacted']:.2f}%",
        f"gated units    {kept}/{total} kept ({100 * (1 - kept / total):.1f}% removed)",
        "",
        "| layer | active / total |",
        "|---|---|",
        *[f"| {name} | {act} / {tot} |" for name, (act, tot) in r["widths"].items()],
        "",
        "| measure | before | after | ratio |",
        "|---|---|---|---|",
        f"| params | {b['params']:,} | {a['params']:,} | {_ratio(b['params'], a['params'])} |",
        f"| FLOPs / sample | {b['flops']:,} | {a['flops']:,} | {_ratio(b['flops'], a['flops'])} |",
    ]
    for key in sorted(k for k in b if k.startswith("latency_ms_b")):
        batch = key.removeprefix("latency_ms_b")
        lines.append(f"| latency batch {batch} (median ms) | {b[key]:.3f} | {a[key]:.3f} | {_ratio(b[key], a[key])} |")
    return "\n".join(lines) + "\n"


def plot_widths(widths: dict[str, tuple[int, int]], path: Path) -> None:
    """Bar chart: each gated layer's total width with its active part on top."""
    names = list(widths)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 3.5))
    ax.bar(names, [t for _, t in widths.values()], color="#dddddd", label="total")
    ax.bar(names, [a for a, _ in widths.values()], color="#1f77b4", label="active")
    ax.set_ylabel("units")
    ax.set_title("DAM widths per layer")
    ax.tick_params(axis="x", rotation=60 if len(names) > 6 else 0)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), "a plot")
    plt.close(fig)


def plot_history(records: list[dict], path: Path) -> None:
    """Beta and active width of every gate, per epoch."""
    epochs = [r["epoch"] for r in records]
    gates = [k.split("/", 1)[1] for k in records[0] if k.startswith("beta/")] if records else []
    fig, (ax_beta, ax_width) = plt.subplots(1, 2, figsize=(9, 3.5))
    for g in gates:
        ax_beta.plot(epochs, [r[f"beta/{g}"] for r in records], label=g)
        ax_width.plot(epochs, [r[f"width/{g}"] for r in records], label=g)
    ax_beta.set(xlabel="epoch", ylabel="beta", title="beta per epoch")
    ax_width.set(xlabel="epoch", ylabel="active units", title="width per epoch")
    if len(gates) <= 10:
        ax_width.legend(fontsize="small")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), "a plot")
    plt.close(fig)
