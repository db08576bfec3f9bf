"""DAM for code that already trains with Lightning: one callback, no trainer change.

``pip install "torchdam[lightning]"``. The callback gates the network (or uses the gates
already attached), adds the DAM penalty's gradient to the betas after every backward,
freezes the betas for ``cold_start`` epochs, logs every gate's beta and width per epoch,
and compacts the network when fitting ends:

    from torchdam.lightning import DAMCallback
    dam = DAMCallback(lam=0.5, cold_start=1, module="net", example_inputs=x[:8], save_dir="out/compacted")
    lightning.Trainer(max_epochs=10, callbacks=[dam]).fit(lit_model, loader)
    dam.compacted          # the physically smaller copy of lit_model.net

The penalty and cold start are :class:`torchdam.DAMPolicy`'s, as in :class:`torchdam.Trainer`.
The penalty goes in as a gradient (added to ``beta.grad`` after the backward), not as a
term of ``training_step``'s loss, so the user's step is untouched and DDP's gradient hooks
are not triggered twice. Give the betas their own lr and no weight decay in
``configure_optimizers``: ``torch.optim.SGD(torchdam.dam_param_groups(self.net, lr, beta_lr), lr)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from torchdam.attach import attach as attach_gates
from torchdam.attach import named_gates, warn_dead_layers
from torchdam.compact import compact
from torchdam.errors import AttachError, ConfigError
from torchdam.serialize import save
from torchdam.train.policy import DAMPolicy

try:
    import lightning.pytorch as pl
except ImportError as err:  # an optional extra: say how to get it
    raise ImportError('torchdam.lightning needs Lightning: pip install "torchdam[lightning]"') from err

__all__ = ["DAMCallback"]


class DAMCallback(pl.Callback):
    """DAM penalty, cold start, width logging and compaction at fit end for Lightning.

    Args:
        lam: penalty weight lambda (>= 0).
        cold_start: epochs (counted from 0) during which the betas do not move.
        module: attribute of the LightningModule holding the network to gate and compact
            (``None``: the LightningModule itself, which cannot be compacted while Lightning
            holds it, so pass ``module`` when you want ``example_inputs`` used).
        attach: keyword arguments for :func:`torchdam.attach` when the network has no gates
            yet (``None`` with no gates is an error).
        example_inputs: inputs to :func:`torchdam.compact` at fit end; ``None`` skips it.
        save_dir: where rank 0 saves the compacted network (:func:`torchdam.save`).
    """

    def __init__(self, lam: float, cold_start: int = 0, module: str | None = None,
                 attach: dict[str, Any] | None = None, example_inputs: Tensor | None = None,
                 save_dir: str | Path | None = None) -> None:
        self.policy = DAMPolicy(lam, cold_start)
        if example_inputs is not None and module is None:
            raise ConfigError("DAMCallback compacts a submodule: pass module='<attribute of your LightningModule>'")
        self.module_name = module
        self.attach_kwargs, self.example_inputs = attach, example_inputs
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.history: list[dict] = []
        self.compacted: nn.Module | None = None

    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module_name is None:
            return pl_module
        net = getattr(pl_module, self.module_name, None)
        if not isinstance(net, nn.Module):
            raise ConfigError(f"DAMCallback(module={self.module_name!r}): {type(pl_module).__name__} "
                              "has no such nn.Module attribute")
        return net

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before configure_optimizers, so gates attached here are in the optimizer.
        net = self.network(pl_module)
        if any(True for _ in named_gates(net)):
            return
        if self.attach_kwargs is None:
            raise AttachError(f"{type(net).__name__} has no DAM gates: call torchdam.attach on it, "
                              "or pass DAMCallback(attach={...})")
        attach_gates(net, **self.attach_kwargs)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Scaled like the loss Lightning just backpropagated (AMP scaler, accumulation).
        scale = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None:
            scale *= scaler.get_scale()
        self.policy.after_backward(self.network(pl_module), trainer.current_epoch, penalty_scale=scale)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record: dict[str, float] = {"epoch": trainer.current_epoch + 1}
        for name, gate in named_gates(self.network(pl_module)):
            record[f"dam/beta/{name}"] = gate.beta.item()
            record[f"dam/width/{name}"] = float(gate.active())
        self.history.append(record)
        pl_module.log_dict({k: v for k, v in record.items() if k != "epoch"}, rank_zero_only=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.example_inputs is None or not trainer.is_global_zero:
            return
        net = self.network(pl_module)
        warn_dead_layers(net)
        self.compacted = compact(net, self.example_inputs.to(pl_module.device))
        if self.save_dir is not None:
            save(self.compacted, self.save_dir)
