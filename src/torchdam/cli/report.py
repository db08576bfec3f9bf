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
        f"## torchdam prune: {r['model']} on {r['data']} ({r['epochs']} epochs, shipped: {r['ship']} epoch)",
        "",
        f"test accuracy  gated {100 * r['test_acc_gated']:.2f}%  ->  compacted {100 * r['test_acc_compacted']:.2f}%",
        f"gated units    {kept}/{total} kept ({100 * (1 - kept / total):.1f}% removed)",
        *_budget_lines(r),
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
    speedup = r.get("speedup", {})
    for key in sorted(k for k in b if k.startswith("latency_ms_b")):
        batch = key.removeprefix("latency_ms_b")
        pair = speedup.get(f"b{batch}")
        if pair is not None:  # interleaved pairs: median of per-pair ratios, with the quartiles
            ratio = f"{pair['median']:.2f}x (IQR {pair['p25']:.2f}-{pair['p75']:.2f}, {pair['pairs']} pairs)"
            lines.append(f"| latency batch {batch} (median ms, interleaved) | {b[key]:.3f} | {a[key]:.3f} | {ratio} |")
        else:
            lines.append(f"| latency batch {batch} (median ms) | {b[key]:.3f} | {a[key]:.3f} | {_ratio(b[key], a[key])} |")
    if speedup:
        lines += ["", "Latency: dense (gates removed) and compacted forwards timed in alternating blocks; "
                  "ratio = median over pairs of dense/compacted."]
    if r.get("message"):
        lines += ["", f"**{r['message']}**"]
    return "\n".join(lines) + "\n"


def _budget_lines(r: dict) -> list[str]:
    """``target vs reached`` for a budget run."""
    b = r.get("budget")
    if not b:
        return []
    what = "FLOPs" if b["metric"] == "flops" else "params"
    off = 100 * (b["reached"] / b["target"] - 1)
    verdict = "within +-3%" if b["ok"] else "NOT within +-3%"
    return [f"budget         {what} target {100 * b['target']:.1f}% of dense -> reached {100 * b['reached']:.1f}% "
            f"({off:+.1f}%, {verdict}; {b['penalty']} penalty, held from step {b['reach_step']} of {b['total_steps']})"]


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


def plot_history(records: list[dict], path: Path, budget: dict | None = None) -> None:
    """Beta and active width of every gate, per epoch; with a budget, also the model's
    cost (relative to dense) per step against the schedule and the target."""
    epochs = [r["epoch"] for r in records]
    gates = [k.split("/", 1)[1] for k in records[0] if k.startswith("beta/")] if records else []
    if budget:
        fig, (ax_beta, ax_width, ax_cost) = plt.subplots(1, 3, figsize=(13.5, 3.5))
        _plot_budget(ax_cost, budget, records)
    else:
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


def _plot_budget(ax, budget: dict, records: list[dict]) -> None:
    what = "FLOPs" if budget["metric"] == "flops" else "params"
    trace = budget.get("trace") or []
    steps_per_epoch = budget["total_steps"] / max(1, len(records))
    if trace:
        x = [t[0] / steps_per_epoch for t in trace]
        ax.plot(x, [t[1] for t in trace], label=f"{what} (width model)")
        ax.plot(x, [t[2] for t in trace], "--", label="schedule")
    ax.axhline(budget["target"], color="red", lw=0.8, label=f"target {budget['target']:.3f}")
    ax.axvline(budget["reach_step"] / steps_per_epoch, color="grey", lw=0.8, ls=":", label="widths frozen")
    ax.plot([len(records)], [budget["reached"]], "o", color="black", label=f"compacted {budget['reached']:.3f}")
    ax.set(xlabel="epoch", ylabel=f"{what} / dense", title=f"{what} vs target", ylim=(0, 1.05))
    ax.legend(fontsize="small")
