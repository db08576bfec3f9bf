"""The single-stage training loop for every DAM experiment and every dense baseline.

DAM trains weights and gates jointly (docs/METHOD.md section 2): the loss is the task loss plus
``penalty(model, lam)``, the betas sit in their own parameter group (own learning rate,
no weight decay by default) and can be frozen for the first ``cold_start`` epochs; all of
it is :mod:`torchdam.train.policy`. A model without gates trains the same way, with no
penalty and no beta group. Batches may have any layout (``forward_fn``,
:mod:`torchdam.train.batch`).

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

With ``out_dir`` set, the full training state (model, optimizer, scheduler, RNG states,
position in the epoch, best-val tracking, log) is checkpointed atomically at every epoch's
end and every ``checkpoint_every`` steps, and ``fit(..., resume=out_dir)`` continues a
killed run so that it ends exactly as an uninterrupted one (see ``docs/RELIABILITY.md``).
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchdam import distributed
from torchdam.atomic import write_atomic
from torchdam.attach import named_gates
from torchdam.budget import Budget, budget_from_config, warn_if_nothing_removed
from torchdam.checkpoint import (get_rng_state, load_checkpoint, load_latest, save_checkpoint, set_rng_state,
                                 state_digest)
from torchdam.errors import CheckpointError, ConfigError, DataError, DivergenceError
from torchdam.train.batch import ForwardFn, batch_size, default_forward, to_device
from torchdam.train.config import RESUMABLE_CHANGES, TrainConfig, lr_factor
from torchdam.train.log import RunLog
from torchdam.train.policy import DAMPolicy, build_optimizer
from torchdam.train.state import STATE_FORMAT, check_state, differences, is_plain

#: The progress bar's postfix needs a host sync; refresh it only this often.
POSTFIX_EVERY = 20
BEST_FILE = "best.safetensors"
CHECKPOINT_DIR = "checkpoints"


def _has_accuracy(out: Any, y: Any) -> bool:
    """Classification: 2-D logits and int64 class indices."""
    return (isinstance(out, Tensor) and isinstance(y, Tensor)
            and out.dim() == 2 and y.dim() == 1 and y.dtype == torch.int64)


class _Tally:
    """Epoch sums kept on the device, so a step never waits for the host."""

    def __init__(self, device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.seen = 0
        self.classifies = True

    def add(self, loss: Tensor, out: Any, y: Any) -> None:
        n = batch_size(out, y)
        self.loss += loss.detach() * n
        self.seen += n
        if self.classifies and _has_accuracy(out, y):
            self.correct += (out.detach().argmax(1) == y).sum()
        else:
            self.classifies = False

    def finite(self) -> bool:
        return bool(torch.isfinite(self.loss).item())

    def result(self, what: str) -> dict:
        seen = torch.tensor(float(self.seen), dtype=torch.float64, device=self.loss.device)
        classifies = torch.tensor(float(self.classifies), dtype=torch.float64, device=self.loss.device)
        # Ranks of a distributed run see different shards; report the whole epoch.
        loss, correct, seen, classifies = distributed.sum_across(self.loss, self.correct, seen, classifies)
        n = int(seen.item())
        if n == 0:
            raise DataError(f"the {what} loader yielded no batches; check the dataset and batch_size")
        acc = correct.item() / n if classifies.item() == distributed.world_size() else None
        return {"loss": loss.item() / n, "acc": acc}

    def state(self) -> dict:
        return {"loss": self.loss.cpu(), "correct": self.correct.cpu(), "seen": self.seen,
                "classifies": self.classifies}

    def states_of_every_rank(self) -> list[dict]:
        """Every rank's :meth:`state`, gathered (a collective: every rank must call it).
        Ranks train on different shards, so each one resumes its own partial sums."""
        row = torch.stack([self.loss.detach().double(), self.correct.double(),
                           torch.tensor(float(self.seen), dtype=torch.float64, device=self.loss.device),
                           torch.tensor(float(self.classifies), dtype=torch.float64, device=self.loss.device)])
        # float64 holds every float32 loss sum and every count below 2**53 exactly
        return [{"loss": r[0].to(self.loss.dtype).cpu(), "correct": r[1].to(torch.int64).cpu(),
                 "seen": int(r[2].item()), "classifies": bool(r[3].item())}
                for r in distributed.gather_rows(row)]

    def load(self, state: dict) -> None:
        self.loss.copy_(state["loss"])
        self.correct.copy_(state["correct"])
        self.seen, self.classifies = state["seen"], state["classifies"]


class _Position:
    """Where training stands: the epoch in progress and how many of its steps are done.
    ``epoch_rng`` is the RNG state just before the epoch's loader was iterated, so that a
    resumed run can draw the same shuffle and skip the batches already trained on."""

    def __init__(self) -> None:
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.epoch_rng: dict | None = None
        self.rng: dict | None = None
        self.tally: dict | None = None


class _ModelInputs(Exception):
    """Carries the model's call arguments out of a forward pre-hook (see ``_bind_budget``)."""


class _CtrlC:
    """Turns the first Ctrl-C into a flag the loop checks after each completed step, so
    the checkpoint written on the way out is never of a half-applied optimizer step; a
    second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> "_CtrlC":
        # Only the main thread may set handlers; under DDP every rank must stop together,
        # which a flag seen at different steps cannot promise, so there Ctrl-C just stops.
        if threading.current_thread() is threading.main_thread() and not distributed.is_distributed():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Train ``model`` (gated or dense) for ``config.epochs`` epochs in one stage.

    Args:
        model: any ``nn.Module``; gates from :func:`torchdam.attach` are found by itself.
        config: a :class:`TrainConfig`.
        loss_fn: ``loss_fn(outputs, targets)``; accuracy is reported when outputs are 2-D
            logits and targets int64 class indices, otherwise ``acc`` is ``None``.
        forward_fn: ``forward_fn(model, batch) -> (outputs, targets)``, for batches of any
            layout (several inputs, dicts, Hugging Face ``BatchEncoding``); used in
            training and :meth:`evaluate`. Default: ``(inputs, targets)`` tuples, or a bare
            tensor that is its own target. Batches are moved to ``device`` first, nested
            containers included.
        out_dir: where ``log.jsonl``/``log.csv``, ``best.safetensors`` and
            ``checkpoints/`` go; ``None`` writes nothing (the best weights are then kept
            in memory, and there is nothing to resume from).
        device: where the model and batches live.
        extra_penalty: ``extra_penalty(model)`` -> scalar added to every step's loss (e.g. a
            baseline's sparsity term: L1 on BatchNorm scales, an expected-L0 count).
        budget: a :class:`torchdam.Budget` (or ``config.target_flops``/``target_params``):
            train to that size instead of with ``lam`` (see :mod:`torchdam.budget`).
        identity: what else makes this run the run it is, beyond ``config`` (model and data
            names, a data :func:`torchdam.checkpoint.fingerprint`, ...): plain values
            (str, int, float, bool, None, lists/tuples/dicts of them). It is checkpointed with
            the gates' types and sizes and the world size, and a resume whose identity differs
            in any of them is refused.

    Under ``torchrun`` (see :mod:`torchdam.distributed`) the model is trained in DDP and
    only rank 0 writes files.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        out_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        extra_penalty: Callable[[nn.Module], Tensor] | None = None,
        forward_fn: ForwardFn = default_forward,
        budget: Budget | None = None,
        identity: dict | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"Trainer needs a TrainConfig, got {type(config).__name__}")
        if identity is not None and not (isinstance(identity, dict) and is_plain(identity)):
            raise ConfigError(f"Trainer's identity must be a dict of plain values (str, int, float, bool, None "
                              f"and lists/tuples/dicts of them), got {identity!r}"[:300])
        self.identity = dict(identity or {})
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.config = config
        self.loss_fn = loss_fn
        self.forward_fn = forward_fn
        self.extra_penalty = extra_penalty
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.gates = dict(named_gates(model))
        self.policy = DAMPolicy.from_config(config)
        if budget is not None and budget_from_config(config) is not None:
            raise ConfigError("give the target once: either Trainer(budget=...) or TrainConfig(target_...)")
        self.budget = budget if budget is not None else budget_from_config(config)
        self.optimizer = build_optimizer(model, config)
        lambdas = [lambda e: lr_factor(config, e)]
        if self.gates:
            lambdas.append(lambda e: 0.0 if self.policy.frozen(e) else lr_factor(config, e))
        # The scheduler alone sets every group's lr, so cold start cannot be undone by it.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)
        self.best_val_acc: float | None = None
        self.best_val_loss: float | None = None
        self.best_epoch: int | None = None
        self._best_state: dict[str, Tensor] | None = None
        self.records: list[dict] = []
        self._net = distributed.wrap(self.model, self.device)
        self._position = _Position()
        self._writes = self.out_dir is not None and distributed.is_main_process()

    @property
    def best_path(self) -> Path | None:
        return self.out_dir / BEST_FILE if self.out_dir is not None else None

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.out_dir / CHECKPOINT_DIR if self.out_dir is not None else None

    def fit(self, train_loader: Iterable, val_loader: Iterable | None = None,
            resume: str | Path | None = None) -> list[dict]:
        """Train; returns (and logs) one record per epoch.

        ``resume``: a checkpoint file, a ``checkpoints/`` folder or an ``out_dir`` of an
        earlier run with the same config and data; training continues from its newest
        good checkpoint (falling back, with a warning, to the previous one if the newest is
        damaged) and ends exactly as the uninterrupted run would have. A first Ctrl-C
        finishes the current step, writes a checkpoint and raises ``KeyboardInterrupt``."""
        torch.manual_seed(self.config.seed)
        self.records = []
        self._position = _Position()
        if resume is not None:
            self._load_state(resume)
        log = self._open_log()
        try:
            with _CtrlC() as ctrl_c:
                for epoch in range(self._position.epoch, self.config.epochs):
                    record = self._run_epoch(epoch, train_loader, val_loader, ctrl_c)
                    self.records.append(record)
                    if log is not None:
                        log.write(record)
                    position = self._position
                    position.epoch, position.step_in_epoch, position.epoch_rng = epoch + 1, 0, None
                    self._save_state(tally=None)
                    if ctrl_c.pressed:  # pressed during validation: the epoch is saved
                        raise KeyboardInterrupt
        finally:
            if log is not None:
                log.close()
        if self.gates and self.budget is None:
            warn_if_nothing_removed(self.model)
        return self.records

    def _run_epoch(self, epoch: int, train_loader: Iterable, val_loader: Iterable | None,
                   ctrl_c: _CtrlC) -> dict:
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        train = self._train_epoch(epoch, train_loader, ctrl_c)
        if not math.isfinite(train["loss"]):
            raise DivergenceError(
                f"loss became NaN/inf at epoch {epoch + 1}; lower the learning rate or lambda "
                "(checkpoints of the epochs before are kept)"
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
        if self.budget is not None:
            record.update(self.budget.record())
        distributed.check_same({name: gate.beta for name, gate in self.gates.items()})
        return record

    def _batches(self, epoch: int, loader: Iterable):
        """The epoch's batch iterator, advanced past the steps a resumed run has done."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: order = f(seed, epoch)
            sampler.set_epoch(epoch)
        position = self._position
        if position.step_in_epoch == 0:
            position.epoch_rng = get_rng_state()
            return iter(loader)
        # The loader draws its shuffle from the global RNG when iterated: replay that draw,
        # skip the batches already trained on, then continue from the saved state.
        set_rng_state(position.epoch_rng)
        batches = iter(loader)
        for done in range(position.step_in_epoch):
            if next(batches, None) is None:
                raise CheckpointError(
                    f"the checkpoint is {position.step_in_epoch} steps into epoch {epoch + 1}, but the "
                    f"training loader now has only {done} batches; resume with the same data and batch size")
        set_rng_state(position.rng)
        return batches

    def _train_epoch(self, epoch: int, loader: Iterable, ctrl_c: _CtrlC) -> dict:
        self.model.train()
        tally = _Tally(self.device)
        position = self._position
        if position.tally is not None:
            tally.load(position.tally)
            position.tally = None
        total_steps = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(self._batches(epoch, loader), desc=f"epoch {epoch + 1}/{self.config.epochs}",
                   leave=False, total=total_steps, initial=position.step_in_epoch,
                   disable=None if self.config.progress else True)
        for step, batch in enumerate(bar, start=position.step_in_epoch):
            batch = to_device(batch, self.device)
            if self.budget is not None and not self.budget.bound:
                self._bind_budget(batch, total_steps)
            out, y = self.forward_fn(self._net, batch)
            loss = self.loss_fn(out, y)
            # a size target drives the betas itself (Budget.step), with no lambda term
            total = loss + self.policy.penalty(self.model) if self.gates and self.budget is None else loss
            if self.extra_penalty is not None:
                total = total + self.extra_penalty(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.policy.after_backward(self.model, epoch)  # cold start: the betas' grads dropped
            self.optimizer.step()
            if self.budget is not None:
                self.budget.step()  # owns the betas: rewrites them after the optimizer's step
            tally.add(loss, out, y)
            position.step_in_epoch, position.global_step = step + 1, position.global_step + 1
            every = self.config.checkpoint_every
            if (every and position.global_step % every == 0) or ctrl_c.pressed:
                if not tally.finite():  # never checkpoint diverged weights
                    raise DivergenceError(f"loss became NaN/inf in epoch {epoch + 1} (step {step + 1}); "
                                          "lower the learning rate or lambda (earlier checkpoints are kept)")
                self._save_state(tally=tally)
            if ctrl_c.pressed:
                raise KeyboardInterrupt
            if not bar.disable and step % POSTFIX_EVERY == 0:
                bar.set_postfix(self._postfix(tally), refresh=False)
        bar.close()
        return tally.result("training")

    def _bind_budget(self, batch, steps_per_epoch: int | None) -> None:
        """Binds the size target to the model's inputs as ``forward_fn`` passes them on the
        first batch: a pre-hook catches them and stops the call before anything runs (no
        statistics, no random draws: a resumed run stays bit-identical)."""
        if steps_per_epoch is None:
            raise ConfigError("a size target needs a training loader with a length (len(loader)) "
                              "to plan its schedule")

        def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _ModelInputs(args, kwargs)

        handle = self.model.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.forward_fn(self.model, batch)
            raise ConfigError("forward_fn did not call the model; a size target needs its inputs")
        except _ModelInputs as caught:
            args, kwargs = caught.args
        finally:
            handle.remove()
        if args and kwargs:
            raise ConfigError("a size target needs the model called with positional inputs only or keyword "
                              f"inputs only (Hugging Face style); this forward_fn passes {len(args)} positional "
                              f"and the keywords {', '.join(kwargs)}")
        self.budget.bind(self.model, kwargs or args, total_steps=self.config.epochs * steps_per_epoch,
                         start_step=self.config.cold_start * steps_per_epoch)

    def _postfix(self, tally: _Tally) -> dict:
        postfix = {"loss": f"{tally.loss.item() / tally.seen:.4f}"}
        if tally.classifies:
            postfix["acc"] = f"{tally.correct.item() / tally.seen:.3f}"
        if self.gates:
            width = torch.stack([g.active() / g.n for g in self.gates.values()]).mean()
            postfix["width"] = f"{width.item():.3f}"
        if self.budget is not None and self.budget.bound:
            postfix[self.budget.metric] = self.budget.postfix()
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
                out, y = self.forward_fn(model, to_device(batch, self.device))
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
        if not self._writes:
            self._best_state = state
            return
        self._best_state = None
        self.best_path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"epoch": str(epoch), "sha256": state_digest(state)}
        write_atomic(self.best_path, lambda tmp: save_file(state, str(tmp), metadata=metadata),
                     "the best checkpoint")

    def restore_best(self) -> nn.Module:
        """Load the best-validation weights back into the model and return it."""
        if self.best_epoch is None:
            raise CheckpointError("no best checkpoint yet: call fit() with a val_loader first")
        state = self._best_state if self._best_state is not None else self._read_best()
        self.model.load_state_dict(state)
        return self.model

    def _read_best(self) -> dict[str, Tensor]:
        """``best.safetensors``, verified against the SHA-256 and epoch stored in it."""
        path = self.best_path
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            state = load_file(str(path))
        except Exception as e:  # missing file, or safetensors' own SafetensorError
            raise CheckpointError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from e
        if "sha256" not in metadata:
            raise CheckpointError(f"{path}: no checksum in it (not written by this torchdam), so it cannot be "
                                  "verified; train again, or ship the last epoch (--checkpoint last)")
        if state_digest(state) != metadata["sha256"]:
            raise CheckpointError(f"{path}: corrupted (checksum mismatch); ship the last epoch "
                                  "(--checkpoint last) or train again")
        if metadata.get("epoch") != str(self.best_epoch):
            raise CheckpointError(f"{path}: holds epoch {metadata.get('epoch')}, but this run's best epoch is "
                                  f"{self.best_epoch}; it belongs to another run")
        return {k: v.to(self.device) for k, v in state.items()}

    # ------------------------------------------------------------------ checkpoints

    def _save_state(self, tally: _Tally | None) -> None:
        """Checkpoint the whole training state (rank 0 writes; every rank learns whether
        it worked, so all of them raise together)."""
        if self.out_dir is None:
            return
        # every rank's partial epoch sums (a collective, so before rank 0 alone writes)
        tallies = tally.states_of_every_rank() if tally is not None and distributed.is_distributed() else None
        error = None
        if self._writes:
            position = self._position
            state = {
                "format": STATE_FORMAT,
                "config": asdict(self.config),
                "identity": self.run_identity(),
                "epoch": position.epoch,
                "step_in_epoch": position.step_in_epoch,
                "global_step": position.global_step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": get_rng_state(),
                "epoch_rng": position.epoch_rng,
                "tally": tally.state() if tally is not None else None,
                "tallies": tallies,
                "best": {"acc": self.best_val_acc, "loss": self.best_val_loss, "epoch": self.best_epoch},
                "records": self.records,
            }
            if self.budget is not None:
                state["budget"] = self.budget.state_dict()
            try:
                save_checkpoint(state, self.checkpoint_dir)
            except CheckpointError as err:
                error = err
        if not distributed.all_ok(error is None):
            raise error or CheckpointError("rank 0 could not write the checkpoint; see its error")

    def run_identity(self) -> dict:
        """What a resume must match besides ``config``: the ``identity`` given, every gate's
        type and size, and the number of processes (it sets the global batch)."""
        gates = {name: {"class": type(g).__name__, "gate": g.gate, "n": g.n, "k": g.k, "alpha": g.alpha,
                        "axis": g.axis} for name, g in self.gates.items()}
        return {**self.identity, "gates": gates, "world_size": distributed.world_size()}

    def _load_state(self, resume: str | Path) -> None:
        path = Path(resume)
        if path.is_file():
            state = load_checkpoint(path)
            check_state(state, path)
        else:
            folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
            state, path = load_latest(folder, validate=check_state)
        saved, current = state["config"], asdict(self.config)
        changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ConfigError(f"{path}: cannot resume with different options ({diffs}); "
                              "use the options of the run being resumed")
        diffs = differences(state["identity"], self.run_identity())
        if diffs:
            raise ConfigError(f"{path}: cannot resume a different run ({'; '.join(diffs)}); resume with the "
                              "model, data, gates and options of the run being resumed, or start a new run")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            detail = " ".join(str(err).split())[:300]
            raise CheckpointError(f"{path}: does not match this model ({detail}); "
                                  "resume with the same model and layers") from None
        position = self._position
        position.epoch, position.step_in_epoch = state["epoch"], state["step_in_epoch"]
        position.global_step, position.epoch_rng = state["global_step"], state["epoch_rng"]
        tallies = state["tallies"]
        position.rng = state["rng"]
        position.tally = tallies[distributed.rank()] if tallies is not None else state["tally"]
        best = state["best"]
        self.best_val_acc, self.best_val_loss, self.best_epoch = best["acc"], best["loss"], best["epoch"]
        if self.best_epoch is not None and not (self.best_path and self.best_path.is_file()):
            raise CheckpointError(f"{self.best_path}: missing, but the checkpoint {path} refers to it; "
                                  "resume in the run's own output folder")
        self.records = list(state["records"])
        if self.budget is not None and "budget" in state:
            self.budget.load_state_dict(state["budget"])
        try:
            set_rng_state(state["rng"])
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as err:
            raise CheckpointError(f"{path}: malformed RNG state ({' '.join(str(err).split())[:200]}); "
                                  "resume from another checkpoint or start again") from None

    def _open_log(self) -> RunLog | None:
        if not self._writes:
            return None
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            return RunLog(self.out_dir / f"log.{self.config.log_format}", self.config.log_format, self.records)
        except OSError as err:
            raise CheckpointError(f"{self.out_dir}: cannot write the training log ({err.strerror or err}); "
                                  "choose a writable --out folder") from None
