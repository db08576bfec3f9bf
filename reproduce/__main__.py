"""``python -m reproduce NAME [--quick] [--seeds N] [--out DIR]`` from a checkout's root."""
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
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/reproduce/NAME)")
    args = parser.parse_args(argv)
    out_dir = args.out or Path("runs/reproduce") / args.name
    try:
        run_experiment(args.name, out_dir, quick=args.quick, seeds=args.seeds)
    except TorchDAMError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print((out_dir / "results.md").read_text())
    print(f"wrote {out_dir}/")
    sys.exit(0)


if __name__ == "__main__":
    main()
