"""torchdam: DiscriminAtive Masking (DAM) for PyTorch.

    import torchdam as dam
    gates = dam.attach(model)                       # gate Linear/conv units and attention heads
    loss = task_loss + dam.penalty(model, lam)      # lam * mean(beta)
    small = dam.compact(model, example_inputs)      # physically smaller, same outputs
    dam.Trainer(model, dam.TrainConfig(target_flops=0.33))  # or say the size you want

Your own training loop: ``dam.dam_param_groups`` (the betas' own optimizer group) and
``dam.DAMPolicy`` (penalty, cold start); or ``dam.Trainer``, ``torchdam.lightning`` and
``torchdam.hf`` callbacks, which use the same policy.
"""
from torchdam.attach import attach, detach, gate_parameters, named_gates, penalty, widths
from torchdam.budget import Budget
from torchdam.compact import compact
# Per-layer rule tables and their registrars. Reach them here (or with
# ``from torchdam.attach import ...``): ``torchdam.attach`` / ``torchdam.compact`` are the
# functions, so ``import torchdam.attach as m`` gives the function, not the module.
from torchdam.attach import UNIT_LAYERS, register_unit_layer
from torchdam.compact import FOLDERS, register_folder
from torchdam.count import count, latency
from torchdam.serialize import load, save
from torchdam.train import DAMPolicy, TrainConfig, Trainer, dam_param_groups
from torchdam.errors import (
    AttachError,
    CheckpointError,
    CompactionError,
    ConfigError,
    DataError,
    ShapeError,
    TorchDAMError,
    UnsupportedLayerError,
)
from torchdam.gates import DAMGate

__all__ = [
    "AttachError", "Budget", "CheckpointError", "CompactionError", "ConfigError", "DAMGate", "DAMPolicy", "DataError",
    "ShapeError", "TorchDAMError", "TrainConfig", "Trainer", "UnsupportedLayerError", "attach",
    "compact", "count", "dam_param_groups", "detach", "gate_parameters", "latency", "load", "named_gates", "penalty",
    "save", "widths",
    "FOLDERS", "UNIT_LAYERS", "register_folder", "register_unit_layer",
]
__version__ = "0.1.0"
