"""The ``torchdam`` command line (extra ``cli``): :mod:`torchdam.cli.app` parses options,
:mod:`torchdam.cli.prune` is the ``torchdam prune`` job, :mod:`torchdam.cli.report` its
table and plots. The library itself never imports this package."""
from __future__ import annotations

import sys

#: what the command line needs beyond the library (the extra ``cli``)
CLI_PACKAGES = ("typer", "matplotlib", "PIL")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``torchdam`` script; a missing CLI dependency is one line, exit 2."""
    try:
        from torchdam.cli.app import main as run
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in CLI_PACKAGES:
            raise
        print(f"torchdam: error: the command line needs {err.name!r}: pip install 'torchdam[cli]'", file=sys.stderr)
        sys.exit(2)
    run(argv)
