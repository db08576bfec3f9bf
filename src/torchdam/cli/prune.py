"""The main job: train a zoo model with DAM gates, compact it, and measure both.

This is what ``torchdam prune`` runs; the CLI only parses options and prints. Every
number in the returned report is measured here, on the model that actually runs.
"""
from __future__ import annotations

import copy
import errno
import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from torchdam import distributed, serialize
from torchdam.atomic import write_atomic
from torchdam.attach import attach, detach, warn_dead_layers, widths
from torchdam.budget import nothing_removed_message
from torchdam.checkpoint import LAST, PREV, fingerprint
from torchdam.compact import compact
from torchdam.count import count, paired_latency
from torchdam.data import DATASETS, Splits, load_dataset
from torchdam.errors import CheckpointError, ConfigError, DiskFullError, TorchDAMError
from torchdam.lock import FolderLock
from torchdam.models import MODELS, build_model
from torchdam.train import BEST_FILE, CHECKPOINT_DIR, LOG_FORMATS, TrainConfig, Trainer

LAYER_TYPES: dict[str, type] = {"linear": nn.Linear, "conv": nn.Conv2d}
COMPACTED_DIR = "compacted"
#: What a prune run leaves in its output folder: name -> is it a folder.
RUN_OUTPUTS: dict[str, bool] = {
    CHECKPOINT_DIR: True, COMPACTED_DIR: True, BEST_FILE: False, "gated.safetensors": False,
    "report.json": False, "report.md": False, "widths.png": False, "history.png": False,
    **{f"log.{fmt}": False for fmt in LOG_FORMATS},
}
#: Job options that may differ between a run and its resume: where it writes, and how long
#: latency is timed (a measurement of the same model). Every other field, present or
#: future, is part of the run's identity.
RESUMABLE_JOB_OPTIONS = frozenset({"out_dir", "resume", "overwrite", "latency_repeats"})
#: The files torchdam.save writes into compacted/ (removed by --overwrite).
_COMPACTED_FILES = ("model.safetensors", "architecture.json")


@dataclass
class PruneJob:
    """What to prune and how; ``train`` holds every optimisation option."""

    model: str = "lenet300"
    data: str = "mnist"
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: str = "relu_tanh"
    layers: tuple[str, ...] = ("linear", "conv")
    exclude: tuple[str, ...] = ()
    val_size: int = 5000
    limit: int | None = None
    min_width: int = 1
    latency_repeats: int = 30
    # "last": ship the final epoch. DAM narrows the model while it trains, so the best
    # validation accuracy tends to fall on an early, wider epoch; "best" ships that one.
    #: which epoch's model is compacted and shipped: "last" or "best" (validation)
    ship: str = "last"
    out_dir: Path = Path("runs/prune")
    #: Continue the killed or interrupted run whose output folder is ``out_dir``.
    resume: bool = False
    #: Replace another run's outputs in ``out_dir`` (without it, such a folder is refused).
    overwrite: bool = False

    def validate(self) -> None:
        """Fail on a bad name or number before any data is read or any epoch is spent."""
        MODELS.get(self.model)
        DATASETS.get(self.data)
        if self.ship not in ("last", "best"):
            raise ConfigError(f"--ship must be 'last' or 'best', got {self.ship!r}")
        for key, low in (("min_width", 1), ("latency_repeats", 1), ("val_size", 0), ("limit", 1)):
            value = getattr(self, key)
            if value is None and key == "limit":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 2**31 - 1:
                what = "limit must be a positive number of training examples" if key == "limit" \
                    else f"{key} must be a whole number >= {low}"
                raise ConfigError(f"{what} (and <= 2**31-1), got {value!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in a folder and --overwrite replaces it: pass one")
        unknown = [t for t in self.layers if t not in LAYER_TYPES and not any(c in t for c in ".*?[")]
        if unknown:
            raise ConfigError(f"unknown layer selector(s) {unknown}: use {', '.join(LAYER_TYPES)} or module-name globs")
        if self.resume and not (Path(self.out_dir) / CHECKPOINT_DIR).is_dir():
            raise CheckpointError(f"{Path(self.out_dir) / CHECKPOINT_DIR}: nothing to resume; "
                                  "pass the output folder of an earlier run")


    def identity(self, splits: Splits) -> dict:
        """Everything but the training options (``train``, compared on its own) that makes
        this run's result what it is, with a fingerprint of the exact training and
        validation data; a resume must match it (see :data:`RESUMABLE_JOB_OPTIONS`)."""
        options = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name != "train" and f.name not in RESUMABLE_JOB_OPTIONS}
        data = fingerprint(splits.train.tensors, splits.val.tensors)
        return {**options, "data_sha256": data}


def _check_writable(out: Path) -> None:
    """Fail before any epoch is spent if the results could not be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ConfigError(f"output folder {out} is not writable ({err.strerror or err}); "
                          "choose another --out") from None


def _outputs_present(out: Path) -> list[str]:
    """The run outputs in ``out``: files (or links), and folders that are not empty."""
    present = []
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir())):
            present.append(name)
    return present


def _remove_outputs(out: Path) -> None:
    """--overwrite: delete what an earlier run wrote (only torchdam's own files)."""
    for name, is_dir in RUN_OUTPUTS.items():
        path = out / name
        if not is_dir and (path.is_symlink() or path.is_file()):
            path.unlink()
    for folder, names in ((out / CHECKPOINT_DIR, (LAST, PREV)), (out / COMPACTED_DIR, _COMPACTED_FILES)):
        if folder.is_dir() and not folder.is_symlink():
            for name in names:
                (folder / name).unlink(missing_ok=True)
            _remove_temporaries(folder)
            if not any(folder.iterdir()):
                folder.rmdir()


def _remove_temporaries(folder: Path) -> None:
    """Temporary files a killed run left (``.<name>.<random>.tmp``: write_atomic, the log,
    checkpoints, torchdam.save). Only under the folder's lock: a live run's are its own."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _recover_compacted(out: Path) -> None:
    """Finish or undo a compacted/ swap that a kill interrupted (see :func:`_save_compacted`)."""
    old, new, current = out / ".compacted.old.tmp", out / ".compacted.new.tmp", out / COMPACTED_DIR
    if old.is_dir() and not current.exists():
        old.rename(current)  # killed between the two renames: the old model was complete
    for leftover in (old, new):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)


def _check_outputs(out: Path) -> None:
    """Fail before training if a result could not be written where it goes: a folder in
    place of a file or a file in place of a folder, or an unwritable folder."""
    for name, is_dir in RUN_OUTPUTS.items():
        path = out / name
        if is_dir and path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file, but the run writes a folder there; move it away or choose "
                              "another --out")
        if not is_dir and path.is_dir() and not path.is_symlink():
            raise ConfigError(f"{path} is a folder, but the run writes a file there; move it away or choose "
                              "another --out")
        if is_dir and path.is_dir():
            try:
                with tempfile.TemporaryFile(dir=path):
                    pass
            except OSError as err:
                raise ConfigError(f"{path} is not writable ({err.strerror or err}); fix its permissions "
                                  "or choose another --out") from None


def prepare_folder(job: PruneJob, out: Path) -> None:
    """Rank 0, holding the folder's lock: make sure ``out`` is this run's (a new run does
    not mix its files with another run's unless --overwrite; --resume needs the run's
    checkpoints), clear what a killed run left half-done, and check every output path."""
    try:
        _recover_compacted(out)  # first: what it restores is the earlier run's, like the rest
        _check_outputs(out)
        present = _outputs_present(out)
        if present and not job.resume:
            if not job.overwrite:
                raise ConfigError(f"{out} already holds another run's {', '.join(present)}; continue that run "
                                  f"with --resume {out}, or pass --overwrite to replace it")
            _remove_outputs(out)
        for folder in (out, out / CHECKPOINT_DIR, out / COMPACTED_DIR):
            _remove_temporaries(folder)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        raise ConfigError(f"{out}: cannot tidy the output folder ({where}{err.strerror or err}); "
                          "fix its permissions or choose another --out") from None


def _save_compacted(small: nn.Module, out: Path, metadata: dict) -> None:
    """Write the compacted model so that ``out/compacted`` is always a complete model, the
    old one or the new one: save into a fresh folder, then swap the folders."""
    target, new, old = out / COMPACTED_DIR, out / ".compacted.new.tmp", out / ".compacted.old.tmp"
    try:
        _recover_compacted(out)
        serialize.save(small, new, metadata=metadata)
        if target.exists():
            target.rename(old)
        try:
            new.rename(target)
        except OSError:
            if old.exists():
                old.rename(target)
            raise
        _recover_compacted(out)  # removes the old model
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFullError(f"{target}: disk full while writing the compacted model; free space and run "
                                "`torchdam prune ... --resume` (files written before are intact)") from None
        raise CheckpointError(f"{target}: cannot write the compacted model ({err.strerror or err}); "
                              "files written before are intact") from None
    finally:
        shutil.rmtree(new, ignore_errors=True)  # there only if the swap did not happen


def _selectors(names: tuple[str, ...]) -> tuple:
    return tuple(LAYER_TYPES.get(n, n) for n in names)


def run(job: PruneJob) -> dict | None:
    """Train single-stage, compact, evaluate and measure; writes everything to ``out_dir``.

    Returns the report dict (also written as ``report.json``).
    Under torchrun every rank trains its shard (``batch_size`` is per rank) and only rank
    0 compacts, measures and writes; the other ranks return ``None``."""
    job.validate()
    out = Path(job.out_dir)
    device = distributed.init_from_env()
    lock, error = None, None
    if distributed.is_main_process():  # rank 0 alone owns, checks and tidies the folder
        try:
            _check_writable(out)
            lock = FolderLock(out).acquire()
            prepare_folder(job, out)
        except TorchDAMError as err:
            error = err
    try:
        if not distributed.all_ok(error is None):  # every rank stops together
            raise error or ConfigError(f"rank 0 cannot use the output folder {out}; see its error")
        return _run(job, out, device)
    finally:
        if lock is not None:
            lock.release()


def _run(job: PruneJob, out: Path, device: torch.device) -> dict | None:
    torch.manual_seed(job.train.seed)
    splits = load_dataset(job.data, val_size=job.val_size, seed=job.train.seed, limit=job.limit)
    channels, size = splits.input_shape[0], splits.input_shape[-1]
    model = build_model(job.model, in_channels=channels, num_classes=splits.num_classes, image_size=size)
    attach(model, layers=_selectors(job.layers), exclude=_selectors(job.exclude), gate=job.gate)
    shard = distributed.sampler(splits.train, shuffle=True, seed=job.train.seed)
    train = DataLoader(splits.train, batch_size=job.train.batch_size, sampler=shard, shuffle=shard is None)
    trainer = Trainer(model, job.train, out_dir=out, device=device, identity=job.identity(splits))
    with warnings.catch_warnings():  # the job says it in the CLI's own words, as its last line
        warnings.filterwarnings("ignore", message="no unit was removed")
        trainer.fit(train, DataLoader(splits.val, batch_size=1000), resume=out if job.resume else None)
    main, world_size = distributed.is_main_process(), distributed.world_size()
    distributed.shutdown()  # compaction and measurement run on rank 0 alone
    if not main:
        return None
    if job.ship == "best":
        trainer.restore_best()
    model.to("cpu")
    evaluator = Trainer(model, job.train)
    loader = lambda ds: DataLoader(ds, batch_size=1000)
    warn_dead_layers(model)

    test = loader(splits.test)
    sample = splits.test.tensors[0][:1]
    small = compact(model, splits.val.tensors[0][:8], min_width=job.min_width)
    gated_eval, small_eval = evaluator.evaluate(test), evaluator.evaluate(test, model=small)
    if gated_eval["acc"] != small_eval["acc"]:
        raise TorchDAMError(f"compacted accuracy {small_eval['acc']} differs from gated {gated_eval['acc']}")
    dense = detach(copy.deepcopy(model))  # the model without gates: what a user had before
    before, after = count(model, sample), count(small, sample)
    timed_before, timed_after, speedup = paired_latency(dense, small, sample, blocks=job.latency_repeats)
    before.update(timed_before)
    after.update(timed_after)
    layer_widths = widths(model)
    report = {
        "model": job.model,
        "data": job.data,
        "epochs": job.train.epochs,
        "ship": job.ship,
        "best_epoch": trainer.best_epoch,
        "best_val_acc": trainer.best_val_acc,
        "final_val_acc": trainer.records[-1].get("val_acc"),
        "test_acc_gated": gated_eval["acc"],
        "test_acc_compacted": small_eval["acc"],
        "widths": {k: list(v) for k, v in layer_widths.items()},
        "units_kept": sum(a for a, _ in layer_widths.values()),
        "units_total": sum(t for _, t in layer_widths.values()),
        "before": before,
        "after": after,
        "config": {**asdict(job.train), **{k: v for k, v in asdict(job).items()
                                            if k not in ("train", "out_dir", "resume", "overwrite")},
                   "data_sha256": trainer.identity["data_sha256"]},
        "train_seconds": sum(r["seconds"] for r in trainer.records),
        "world_size": world_size,
        "speedup": speedup,
    }
    budget = trainer.budget
    if budget is not None:
        reached = after[budget.metric] / before[budget.metric]
        report["budget"] = budget.summary(reached)
        report["message"] = budget.message(reached)
    else:
        report["message"] = nothing_removed_message(model, cli=True)
    # the gated model that was compacted, so its predictions can be checked against the reload
    gated_state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(out / "gated.safetensors", lambda tmp: save_file(gated_state, str(tmp)), "the gated model")
    _save_compacted(small, out, metadata={
        "model": job.model, "data": job.data, "widths": report["widths"],
        "input_shape": list(sample.shape), "test_acc": small_eval["acc"]})
    write_atomic(out / "report.json", json.dumps(report, indent=1, default=str), "the report")
    from torchdam.cli import report as report_module  # matplotlib is only needed here

    report_module.plot_widths(layer_widths, out / "widths.png")
    report_module.plot_history(trainer.records, out / "history.png", budget=report.get("budget"))
    write_atomic(out / "report.md", report_module.format_report(report), "the report")
    return report
