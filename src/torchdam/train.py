"""One single-stage trainer for every DAM experiment and every dense baseline.

DAM trains weights and gates jointly (PAPER.md section 2): the loss is the task loss plus
``penalty(model, lam)``, the betas sit in their own parameter group (own learning rate,
no weight decay by default) and can be frozen for the first ``cold_start`` epochs. A
model without gates trains the same way, with no penalty and no beta group.

Example:
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> import torchdam
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> _ = torchdam.attach(net)
    >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    >>> trainer = Trainer(net, TrainConfig(epochs=1, batch_size=16, progress=False))
    >>> records = trainer.fit(DataLoader(data, batch_size=16))
    >>> sorted(k for k in records[0] if "/" in k)
    ['beta/0', 'width/0']
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchdam.attach import gate_parameters, named_gates, penalty
from torchdam.errors import CheckpointError, ConfigError, DataError, TorchDAMError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "none")
LOG_FORMATS = ("jsonl", "csv")
BETA_GROUP = "dam_beta"
#: The progress bar's postfix needs a host sync; refresh it only this often.
POSTFIX_EVERY = 20
BEST_FILE = "best.safetensors"


@dataclass
class TrainConfig:
    """Options of :class:`Trainer`. Epochs in ``milestones`` and ``cold_start`` count from
    0 (like ``torch.optim.lr_scheduler.MultiStepLR``): ``cold_start=20`` freezes beta for
    epochs 1..20 as logged; ``milestones=(100,)`` lowers the lr from logged epoch 101."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta_lr: float | None = None
    # Decay on beta would cap how far the penalty can push it (PAPER.md section 2).
    beta_weight_decay: float = 0.0
    lam: float = 0.5
    cold_start: int = 0
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    seed: int = 0
    progress: bool = True
    log_format: str = "jsonl"

    def __post_init__(self) -> None:
        self.milestones = tuple(int(m) for m in self.milestones)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.beta_lr is None or self.beta_lr >= 0, f"beta_lr must be >= 0, got {self.beta_lr}"),
            (self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.beta_weight_decay >= 0, f"beta_weight_decay must be >= 0, got {self.beta_weight_decay}"),
            (self.lam >= 0, f"lam (lambda) must be >= 0, got {self.lam}"),
            (0 <= self.cold_start <= self.epochs,
             f"cold_start must be between 0 and epochs={self.epochs}, got {self.cold_start}"),
            (self.optimizer in OPTIMIZERS,
             f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES,
             f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}"),
            (self.log_format in LOG_FORMATS,
             f"unknown log_format {self.log_format!r}; choose one of: {', '.join(LOG_FORMATS)}"),
            (self.gamma > 0, f"gamma must be > 0, got {self.gamma}"),
            (all(m >= 0 for m in self.milestones), f"milestones must be >= 0, got {self.milestones}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer with group 0 ``"weights"`` (``weight_decay``) and, when the model has
    gates, group 1 ``"dam_beta"`` (``beta_lr``, ``beta_weight_decay``)."""
    betas = gate_parameters(model)
    beta_ids = {id(b) for b in betas}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in beta_ids]
    groups = [{"params": weights, "name": "weights", "weight_decay": config.weight_decay}]
    if betas:
        beta_lr = config.lr if config.beta_lr is None else config.beta_lr
        groups.append({"params": betas, "name": BETA_GROUP, "lr": beta_lr,
                       "weight_decay": config.beta_weight_decay})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(groups, lr=config.lr)


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of the base learning rate during 0-based ``epoch``."""
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if config.schedule == "step":
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    return 1.0


def _split_batch(batch) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Tensor):  # unlabelled data: reconstruct the input
        return batch, batch
    return batch[0], batch[1]


def _has_accuracy(out: Tensor, y: Tensor) -> bool:
    return out.dim() == 2 and y.dim() == 1 and y.dtype == torch.int64


class _Tally:
    """Epoch sums kept on the device, so a step never waits for the host."""

    def __init__(self, device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.seen = 0
        self.classifies = True

    def add(self, loss: Tensor, out: Tensor, y: Tensor) -> None:
        n = y.shape[0]
        self.loss += loss.detach() * n
        self.seen += n
        if self.classifies and _has_accuracy(out, y):
            self.correct += (out.detach().argmax(1) == y).sum()
        else:
            self.classifies = False

    def result(self, what: str) -> dict:
        if self.seen == 0:
            raise DataError(f"the {what} loader yielded no batches; check the dataset and batch_size")
        acc = self.correct.item() / self.seen if self.classifies else None
        return {"loss": self.loss.item() / self.seen, "acc": acc}


class Trainer:
    """Train ``model`` (gated or dense) for ``config.epochs`` epochs in one stage.

    Args:
        model: any ``nn.Module``; gates from :func:`torchdam.attach` are found by itself.
        config: a :class:`TrainConfig`.
        loss_fn: ``loss_fn(outputs, targets)``; accuracy is reported when outputs are 2-D
            logits and targets int64 class indices, otherwise ``acc`` is ``None``.
        out_dir: where ``log.jsonl``/``log.csv`` and ``best.safetensors`` go; ``None``
            writes nothing (the best weights are then kept in memory).
        device: where the model and batches live.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        out_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"Trainer needs a TrainConfig, got {type(config).__name__}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.config = config
        self.loss_fn = loss_fn
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.gates = dict(named_gates(model))
        self.optimizer = build_optimizer(model, config)
        lambdas = [lambda e: lr_factor(config, e)]
        if self.gates:
            lambdas.append(lambda e: 0.0 if e < config.cold_start else lr_factor(config, e))
        # The scheduler alone sets every group's lr, so cold start cannot be undone by it.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)
        self.best_val_acc: float | None = None
        self.best_val_loss: float | None = None
        self.best_epoch: int | None = None
        self._best_state: dict[str, Tensor] | None = None
        self.records: list[dict] = []

    @property
    def best_path(self) -> Path | None:
        return self.out_dir / BEST_FILE if self.out_dir is not None else None

    def fit(self, train_loader: Iterable, val_loader: Iterable | None = None) -> list[dict]:
        """Train; returns (and logs) one record per epoch."""
        torch.manual_seed(self.config.seed)
        self.records = []
        trainable = [b for b in gate_parameters(self.model) if b.requires_grad]
        log = self._open_log()
        try:
            for epoch in range(self.config.epochs):
                # requires_grad=False gives beta no grad, so neither momentum nor Adam moves it.
                frozen = epoch < self.config.cold_start
                for b in trainable:
                    b.requires_grad_(not frozen)
                record = self._run_epoch(epoch, train_loader, val_loader)
                self.records.append(record)
                if log is not None:
                    log.write(record)
        finally:
            for b in trainable:
                b.requires_grad_(True)
            if log is not None:
                log.close()
        return self.records

    def _run_epoch(self, epoch: int, train_loader: Iterable, val_loader: Iterable | None) -> dict:
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        train = self._train_epoch(epoch, train_loader)
        if not math.isfinite(train["loss"]):
            raise TorchDAMError(
                f"loss became NaN/inf at epoch {epoch + 1}; lower the learning rate or lambda"
            )
        self.scheduler.step()
        record = {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"]}
        if val_loader is not None:
            val = self.evaluate(val_loader)
            record.update(val_loss=val["loss"], val_acc=val["acc"])
            self._keep_if_best(epoch + 1, val)
        record["lr"] = lr
        record["seconds"] = time.perf_counter() - start
        for name, gate in self.gates.items():
            record[f"beta/{name}"] = gate.beta.item()
        for name, gate in self.gates.items():
            record[f"width/{name}"] = int(gate.active())
        return record

    def _train_epoch(self, epoch: int, loader: Iterable) -> dict:
        self.model.train()
        tally = _Tally(self.device)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False,
                   disable=None if self.config.progress else True)
        for step, batch in enumerate(bar):
            x, y = (t.to(self.device, non_blocking=True) for t in _split_batch(batch))
            out = self.model(x)
            loss = self.loss_fn(out, y)
            total = loss + penalty(self.model, self.config.lam) if self.gates else loss
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            tally.add(loss, out, y)
            if not bar.disable and step % POSTFIX_EVERY == 0:
                bar.set_postfix(self._postfix(tally), refresh=False)
        bar.close()
        return tally.result("training")

    def _postfix(self, tally: _Tally) -> dict:
        postfix = {"loss": f"{tally.loss.item() / tally.seen:.4f}"}
        if tally.classifies:
            postfix["acc"] = f"{tally.correct.item() / tally.seen:.3f}"
        if self.gates:
            width = torch.stack([g.active() / g.n for g in self.gates.values()]).mean()
            postfix["width"] = f"{width.item():.3f}"
        return postfix

    @torch.no_grad()
    def evaluate(self, loader: Iterable, model: nn.Module | None = None) -> dict:
        """``{"loss", "acc"}`` of ``model`` (default: the trained one) in eval mode;
        ``acc`` is ``None`` unless the task is classification."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        tally = _Tally(self.device)
        try:
            for batch in loader:
                x, y = (t.to(self.device, non_blocking=True) for t in _split_batch(batch))
                out = model(x)
                tally.add(self.loss_fn(out, y), out, y)
        finally:
            model.train(was_training)
        return tally.result("validation")

    def _keep_if_best(self, epoch: int, val: dict) -> None:
        # Without accuracy (autoencoders, regression) the best epoch is the lowest loss.
        if val["acc"] is not None:
            better = self.best_val_acc is None or val["acc"] > self.best_val_acc
        else:
            better = self.best_val_loss is None or val["loss"] < self.best_val_loss
        if not better:
            return
        self.best_val_acc, self.best_val_loss, self.best_epoch = val["acc"], val["loss"], epoch
        # clone: safetensors refuses tensors that share storage (tied weights).
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        if self.best_path is None:
            self._best_state = state
            return
        self.best_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.best_path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"epoch": str(epoch)})
        os.replace(tmp, self.best_path)

    def restore_best(self) -> nn.Module:
        """Load the best-validation weights back into the model and return it."""
        if self.best_epoch is None:
            raise CheckpointError("no best checkpoint yet: call fit() with a val_loader first")
        if self.best_path is None:
            state = self._best_state
        else:
            try:
                state = load_file(str(self.best_path), device=str(self.device))
            except Exception as e:  # missing file, or safetensors' own SafetensorError
                raise CheckpointError(f"cannot read {self.best_path}: {e}") from e
        self.model.load_state_dict(state)
        return self.model

    def _open_log(self) -> _Log | None:
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return _Log(self.out_dir / f"log.{self.config.log_format}", self.config.log_format)


class _Log:
    """Per-epoch log, started afresh by each fit and flushed after every line so an
    interrupted run keeps what it has done."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self.file = open(path, "w", newline="")
        self.writer: csv.DictWriter | None = None

    def write(self, record: dict) -> None:
        if self.fmt == "jsonl":
            self.file.write(json.dumps(record) + "\n")
        else:
            if self.writer is None:
                self.writer = csv.DictWriter(self.file, fieldnames=list(record))
                self.writer.writeheader()
            self.writer.writerow({k: "" if v is None else v for k, v in record.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()
