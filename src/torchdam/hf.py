"""DAM for code that trains with the Hugging Face ``transformers.Trainer``: one callback
and the optimizer it needs, no Trainer change.

``pip install "torchdam[hf]"``. Gate the model (``torchdam.attach``), then::

    dam = DAMCallback(lam=0.1, cold_start=1, example_inputs=input_ids[:8])
    Trainer(model, args, train_dataset=ds, callbacks=[dam], optimizers=dam_optimizer(model, args, beta_lr=1e-2)).train()
    dam.compacted          # the physically smaller copy of the model

The callback uses :class:`torchdam.DAMPolicy`, as :class:`torchdam.Trainer` and the
Lightning callback do. The HF Trainer computes the loss itself, so the penalty goes in as a
gradient: ``on_pre_optimizer_step`` (once per optimizer step, after gradient accumulation,
after HF has unscaled AMP gradients and clipped them) adds ``d(lam * mean beta) / d beta``
to the betas' grads, which equals adding the penalty to the (accumulation-averaged) loss;
the penalty's own gradient is not clipped. During cold start the betas' grads are dropped
there instead. :func:`dam_optimizer` builds the optimizer HF would (``args.optim``,
``args.learning_rate``, HF's decay / no-decay split of the weights) with the betas in a
group of their own (``beta_lr``, no weight decay); HF then builds its lr schedule
(warm-up, decay) over it, the betas' group included.

Every HF log record (``trainer.state.log_history``, the progress printer) gets
``dam/beta/<layer>`` and ``dam/width/<layer>``. HF calls reporting integrations
(``report_to``: TensorBoard, W&B, ...) before user callbacks; for them to see these keys
put the callback first: ``trainer.callback_handler.callbacks.insert(0, dam)``.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchdam.attach import gate_parameters, named_gates, warn_dead_layers
from torchdam.compact import compact
from torchdam.errors import AttachError, ConfigError
from torchdam.serialize import save
from torchdam.train.batch import to_device
from torchdam.train.policy import BETA_GROUP, DAMPolicy, Group, dam_param_groups

try:
    import transformers
except ImportError as err:  # an optional extra: say how to get it
    raise ImportError('torchdam.hf needs Hugging Face transformers: pip install "torchdam[hf]"') from err

__all__ = ["DAMCallback", "dam_optimizer"]
NO_DECAY_GROUP = "no_decay"


def dam_optimizer(model: nn.Module, args: "transformers.TrainingArguments", beta_lr: float | None,
                  beta_weight_decay: float = 0.0) -> tuple[torch.optim.Optimizer, None]:
    """``(optimizer, None)`` for ``Trainer(optimizers=...)``: the optimizer class and
    settings ``args`` select, over ``"weights"`` (``args.weight_decay``), ``"no_decay"``
    (biases and norms, as HF splits them) and ``"dam_beta"`` (every gate's beta at
    ``beta_lr``, or ``args.learning_rate`` when None, with ``beta_weight_decay``). ``None``
    for the scheduler lets HF build its own schedule over these groups."""
    if not gate_parameters(model):
        raise AttachError(f"{type(model).__name__} has no DAM gates: call torchdam.attach on it first")
    optimizer_cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or \
            {"params", "model", "optimizer_dict"} & set(kwargs):
        raise ConfigError(f"dam_optimizer needs an optimizer built from parameter groups; "
                          f"args.optim={args.optim!r} is not one")
    # HF's own rule for which weights decay; it does not use the Trainer instance.
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    no_decay = [p for name, p in model.named_parameters() if p.requires_grad and name not in decay]
    groups = dam_param_groups(model, lr=args.learning_rate, beta_lr=beta_lr, weight_decay=args.weight_decay,
                              beta_weight_decay=beta_weight_decay,
                              special={NO_DECAY_GROUP: Group(no_decay, None, 0.0)})
    return optimizer_cls(groups, **kwargs), None


def _record(model: nn.Module) -> dict[str, float]:
    record: dict[str, float] = {}
    for name, gate in named_gates(model):
        record[f"dam/beta/{name}"] = gate.beta.item()
        record[f"dam/width/{name}"] = float(gate.active())
    return record


class DAMCallback(transformers.TrainerCallback):
    """DAM penalty, cold start, beta/width logging and compaction at train end for the
    Hugging Face Trainer. The model must already have gates (:func:`torchdam.attach`).

    Args:
        lam: penalty weight lambda (>= 0).
        cold_start: epochs (counted from 0) during which the betas do not move.
        example_inputs: positional inputs of the model (a tensor or tuple, e.g.
            ``input_ids``) for :func:`torchdam.compact` at train end; ``None`` skips it.
            ``compacted`` is then a smaller copy of the whole model.
        save_dir: where the main process saves the compacted model (:func:`torchdam.save`).
        save_module: dotted path of the submodule of the compacted model to save (``None``:
            all of it). :func:`torchdam.save` stores plain ``nn.Module`` trees, not a
            ``PreTrainedModel``'s config object, so name the network inside the wrapper.
    """

    def __init__(self, lam: float, cold_start: int = 0, example_inputs: Any = None,
                 save_dir: str | Path | None = None, save_module: str | None = None) -> None:
        self.policy = DAMPolicy(lam, cold_start)
        if save_dir is not None and example_inputs is None:
            raise ConfigError("DAMCallback(save_dir=...) saves the compacted model: pass example_inputs too")
        self.example_inputs, self.save_module = example_inputs, save_module
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.history: list[dict] = []
        self.compacted: nn.Module | None = None

    def _to_save(self, model: nn.Module) -> nn.Module:
        if self.save_module is None:
            return model
        try:
            return model.get_submodule(self.save_module)
        except AttributeError:
            raise ConfigError(f"DAMCallback(save_module={self.save_module!r}): {type(model).__name__} "
                              "has no such submodule") from None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, optimizer=None, **kwargs):
        betas = gate_parameters(model)
        if not betas:
            raise AttachError(f"{type(model).__name__} has no DAM gates: call torchdam.attach on it "
                              "before building the Trainer")
        if self.save_dir is not None:
            self._to_save(model)  # a bad name fails now, not after training
        beta_ids = {id(b) for b in betas}
        shared = [g.get("name", i) for i, g in enumerate(getattr(optimizer, "param_groups", []))
                  if any(id(p) in beta_ids for p in g["params"]) and any(id(p) not in beta_ids for p in g["params"])]
        if shared:
            warnings.warn(f"the DAM betas share optimizer group(s) {shared} with the weights (their lr and "
                          "weight decay); pass Trainer(optimizers=torchdam.hf.dam_optimizer(model, args, "
                          f"beta_lr)) to give them a {BETA_GROUP!r} group of their own", stacklevel=2)

    def on_pre_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
        # state.epoch is where the previous step left off: floor() is this step's epoch.
        self.policy.after_backward(model, math.floor(state.epoch or 0), penalty_scale=1.0)

    def on_log(self, args, state, control, logs: dict | None = None, model: nn.Module | None = None, **kwargs):
        if logs is None or model is None:
            return
        record = _record(model)
        logs.update(record)
        if state.log_history:  # HF appended a copy of ``logs`` just before calling on_log
            state.log_history[-1].update(record)

    def on_epoch_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        self.history.append({"epoch": state.epoch, "step": state.global_step, **_record(model)})

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self.example_inputs is None or not state.is_world_process_zero:
            return
        warn_dead_layers(model)
        device = next(model.parameters()).device
        self.compacted = compact(model, to_device(self.example_inputs, device))
        if self.save_dir is not None:
            save(self._to_save(self.compacted), self.save_dir)
