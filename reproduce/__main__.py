"""``python -m reproduce NAME [--quick] [--seeds N] [--out DIR] [--protocol P] [--report-only]
[--threads N]`` from a checkout's root."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reproduce import MODULES, run_experiment
from torchdam.errors import TorchDAMError


def main(argv: list[str] | None = None) -> None:
    """Runs the experiment; exits 0, or 2 with one line for a user error."""
    parser = argparse.ArgumentParser(prog="python -m reproduce", description="Run one of the paper's experiments.")
    parser.add_argument("name", choices=list(MODULES), help="experiment (see REPRODUCTION.md)")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke version")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the protocol's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/reproduce/NAME, or NAME-PROTOCOL with --protocol)")
    parser.add_argument("--protocol", default=None,
                        help="named protocol, for experiments that have several (the autoencoders, "
                             "dimensionality-reduction, graph-representation: short [default], paper, quick; "
                             "recommendation: cpu-budget [default], longer, paper, quick)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write results from the runs already recorded in --out "
                             "(experiments with resumable sweeps: those with --protocol)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 on a shared machine)")
    args = parser.parse_args(argv)
    out_dir = args.out or Path("runs/reproduce") / (f"{args.name}-{args.protocol}" if args.protocol else args.name)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    try:
        run_experiment(args.name, out_dir, quick=args.quick, seeds=args.seeds,
                       protocol=args.protocol, report_only=args.report_only)
    except TorchDAMError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print((out_dir / "results.md").read_text())
    print(f"wrote {out_dir}/")
    sys.exit(0)


if __name__ == "__main__":
    main()
