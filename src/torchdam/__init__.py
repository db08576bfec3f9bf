"""torchdam: DiscriminAtive Masking (DAM) for PyTorch.

    import torchdam as dam
    gates = dam.attach(model)                       # gate every Linear/Conv2d but the head
    loss = task_loss + dam.penalty(model, lam)      # lam * mean(beta)
    small = dam.compact(model, example_inputs)      # physically smaller, same outputs
    dam.Trainer(model, dam.TrainConfig(target_flops=0.33))  # or say the size you want
"""
from torchdam.attach import attach, detach, gate_parameters, named_gates, penalty, widths
from torchdam.budget import Budget
from torchdam.compact import compact
from torchdam.count import count, latency
from torchdam.serialize import load, save
from torchdam.train import TrainConfig, Trainer
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
    "AttachError", "Budget", "CheckpointError", "CompactionError", "ConfigError", "DAMGate", "DataError",
    "ShapeError", "TorchDAMError", "TrainConfig", "Trainer", "UnsupportedLayerError", "attach",
    "compact", "count", "detach", "gate_parameters", "latency", "load", "named_gates", "penalty",
    "save", "widths",
]
__version__ = "0.1.0"
