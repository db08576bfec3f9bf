"""``torchdam`` command line: thin, it parses options and calls the library.

Every error torchdam raises on purpose (:class:`torchdam.errors.TorchDAMError`) becomes
one line on stderr and exit code 2; so does a bad option (typer/click's own usage error)
and any file system error (``OSError``).
Ctrl-C is exit code 130 (128 + SIGINT, the shell's convention), after `prune` has saved a
checkpoint that `--resume` continues from.

Every option's default is read from where the option lives (:class:`TrainConfig` for
training, :class:`PruneJob` for the job), so the command line and the API never disagree.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from torchdam.cli.prune import PruneJob
from torchdam.errors import ConfigError, TorchDAMError
from torchdam.train.config import TrainConfig

INTERRUPTED = ("torchdam: interrupted; everything written so far is kept "
               "(`torchdam prune ... --resume OUT` continues a training run)")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DiscriminAtive Masking: learn a compact width in one training run, then ship it.")


@app.command()
def prune(
    model: str = typer.Option(PruneJob.model, help="zoo model: see `torchdam models`"),
    data: str = typer.Option(PruneJob.data, help="dataset: mnist, fashion_mnist, cifar10"),
    lam: float = typer.Option(TrainConfig.lam, help="penalty weight lambda (>= 0)"),
    epochs: int = typer.Option(TrainConfig.epochs, help="training epochs (single stage, no fine-tuning)"),
    lr: float = typer.Option(TrainConfig.lr, help="learning rate of the weights"),
    beta_lr: float = typer.Option(TrainConfig.beta_lr, help="learning rate of the gates' betas (sets pruning speed)"),
    optimizer: str = typer.Option(TrainConfig.optimizer, help="sgd or adam"),
    momentum: float = typer.Option(TrainConfig.momentum),
    weight_decay: float = typer.Option(TrainConfig.weight_decay, help="weight decay of the weights (never of beta)"),
    batch_size: int = typer.Option(TrainConfig.batch_size),
    schedule: str = typer.Option(TrainConfig.schedule, help="cosine, step or none"),
    milestones: List[int] = typer.Option(list(TrainConfig.milestones), help="epochs of x0.1 lr drops for --schedule step"),
    cold_start: int = typer.Option(TrainConfig.cold_start, help="epochs with beta frozen"),
    gate: str = typer.Option(PruneJob.gate, help="relu_tanh, linear or piecewise_linear"),
    layers: List[str] = typer.Option(list(PruneJob.layers), help="layer types (linear, conv) or name globs to gate"),
    exclude: List[str] = typer.Option(list(PruneJob.exclude), help="layer names/globs not to gate"),
    min_width: int = typer.Option(PruneJob.min_width, help="units kept in a layer whose units all died"),
    ship: str = typer.Option(PruneJob.ship, help="ship the 'last' epoch or the 'best' validation epoch"),
    checkpoint: Optional[str] = typer.Option(None, hidden=True, help="old name of --ship"),
    seed: int = typer.Option(TrainConfig.seed),
    limit: Optional[int] = typer.Option(PruneJob.limit, help="use only this many training images (smoke runs)"),
    latency_repeats: int = typer.Option(PruneJob.latency_repeats, help="timed forwards per latency median"),
    out: Path = typer.Option(PruneJob.out_dir, help="output folder"),
    progress: bool = typer.Option(TrainConfig.progress, help="show progress bars"),
    checkpoint_every: int = typer.Option(TrainConfig.checkpoint_every,
                                         help="also checkpoint every N steps (0: at each epoch's end only)"),
    resume: Optional[Path] = typer.Option(
        None, help="continue the killed or interrupted run in this folder (its outputs go there too)"),
    target_flops: Optional[float] = typer.Option(
        None, help="train to this fraction of the dense model's FLOPs (e.g. 0.33); --lam/--beta-lr are then unused"),
    target_params: Optional[float] = typer.Option(
        None, help="train to this fraction of the dense model's parameters"),
    reach_at: float = typer.Option(TrainConfig.reach_at, help="with a target: fraction of the steps by which it is reached (then held)"),
    penalty: Optional[str] = typer.Option(
        None, help="cost (each layer pulled by what its units cost; default with a target) or uniform (the paper's mean)"),
    round_to: int = typer.Option(
        TrainConfig.round_to, help="with a target: every compacted width a multiple of N (8 runs ResNet-sized CNNs "
                                   "faster; narrow layers then stay whole; heads are not rounded)"),
    overwrite: bool = typer.Option(
        False, help="replace the outputs of an earlier run in --out (without it, such a folder is refused)"),
) -> None:
    """Train with DAM gates, compact, and report accuracy, widths, params, FLOPs, latency.

    Under `torchrun --nproc_per_node N` it trains with DDP (--batch-size per process) and
    rank 0 alone writes and prints."""
    from torchdam.cli.prune import run
    from torchdam.cli.report import format_report

    if checkpoint is not None:  # "checkpoint" now means only the resumable training state
        typer.echo("torchdam: warning: --checkpoint is now called --ship (which epoch's model to ship); "
                   "the old name still works", err=True)
        ship = checkpoint
    job = PruneJob(
        model=model, data=data, gate=gate, layers=tuple(layers), exclude=tuple(exclude), limit=limit,
        min_width=min_width, ship=ship, latency_repeats=latency_repeats,
        out_dir=resume or out, resume=resume is not None, overwrite=overwrite,
        train=TrainConfig(
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
            weight_decay=weight_decay, beta_lr=beta_lr, lam=lam, cold_start=cold_start,
            schedule=schedule, milestones=tuple(milestones), seed=seed, progress=progress,
            checkpoint_every=checkpoint_every, target_flops=target_flops, target_params=target_params,
            reach_at=reach_at, penalty=penalty, round_to=round_to),
    )
    try:
        report = run(job)
    except KeyboardInterrupt:  # typer would turn it into a silent exit 130
        typer.echo(INTERRUPTED, err=True)
        raise typer.Exit(130) from None
    if report is None:  # a DDP rank other than 0
        return
    typer.echo(format_report(report))
    typer.echo(f"wrote {job.out_dir}/: report.md, report.json, log.jsonl, widths.png, history.png, compacted/")
    if report.get("message"):  # a target not reached, or a lambda run that removed nothing: the last line
        typer.echo(f"torchdam: {report['message']}")


@app.command()
def models() -> None:
    """List the zoo models."""
    from torchdam.models import MODELS

    typer.echo("\n".join(MODELS.names()))


def evaluated_dataset(path: Path, data: Optional[str]) -> str:
    """The dataset to score the model in ``path`` on: the one its run recorded (``data`` in
    the metadata `torchdam prune` saves with it), or ``data``, which must then agree."""
    from torchdam.serialize import load_metadata

    recorded = load_metadata(path).get("data")
    if data is None and recorded is None:
        raise ConfigError(f"{path} records no dataset; pass --data")
    if data is not None and recorded is not None and data != recorded:
        raise ConfigError(f"{path} was trained on {recorded}, not {data}; omit --data to score it on {recorded}")
    return data or recorded


@app.command()
def evaluate(
    path: Path = typer.Argument(..., help="a folder written by `torchdam prune` (its compacted/ subfolder)"),
    data: Optional[str] = typer.Option(None, help="dataset (default: the one the run recorded in PATH)"),
) -> None:
    """Reload a compacted model with torchdam.load and report its test accuracy."""
    from torch.utils.data import DataLoader

    from torchdam.data import load_dataset
    from torchdam.serialize import load
    from torchdam.train import Trainer

    data = evaluated_dataset(path, data)
    model = load(path)
    splits = load_dataset(data)
    trainer = Trainer(model, TrainConfig(progress=False))
    result = trainer.evaluate(DataLoader(splits.test, batch_size=1000))
    typer.echo(f"{path}: test accuracy {100 * result['acc']:.2f}% on {data}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors -> one line on stderr, exit code 2."""
    try:  # typer >= 0.2x vendors click; older typer uses click itself
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover
        from click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError as exc:
        # `torchdam` with no command: show the help, as git/pip do
        typer.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(0)
    except UsageError as exc:  # bad option or value: one line, not click's usage box
        typer.echo(f"torchdam: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except TorchDAMError as exc:
        typer.echo(f"torchdam: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a file system failure torchdam did not name itself: still one line
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"torchdam: error: {where}{exc.strerror or exc}; files written before are intact", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
