"""What the training loop does with a batch: move it to the device, and turn it into
``(outputs, targets)`` for the loss.

A batch may be a tensor, a tuple/list (named tuples too), a dict, a Hugging Face
``BatchEncoding`` or an object with ``.to(device)`` (PyTorch Geometric's ``Data``), nested
to any depth; :func:`to_device` moves every tensor in it. How a
batch feeds the model is a ``forward_fn(model, batch) -> (outputs, targets)``;
:func:`default_forward` is the ``(inputs, targets)`` / bare-tensor convention of
``TensorDataset`` loaders, and any other layout passes its own::

    Trainer(model, config, forward_fn=lambda m, b: (m(b[0], b[1]), b[2]))      # (users, items, ratings)
    Trainer(model, config, forward_fn=lambda m, b: (m(**b).logits, b["labels"]))  # HF dict batches
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

from torchdam.errors import ConfigError, DataError

#: ``forward_fn(model, batch) -> (outputs, targets)``: ``loss_fn(outputs, targets)`` is the task loss.
ForwardFn = Callable[[nn.Module, Any], tuple[Any, Any]]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it on ``device``, containers rebuilt as their own type
    (a mapping type that cannot be rebuilt from a dict becomes a dict)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {key: to_device(value, device) for key, value in batch.items()}
        try:
            return type(batch)(moved)  # dict, OrderedDict, HF BatchEncoding
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(to_device(value, device) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    if callable(getattr(batch, "to", None)) and not isinstance(batch, nn.Module):
        return batch.to(device)  # a batch type that moves itself (PyTorch Geometric's Data / Batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets, ...)`` -> ``(model(inputs), targets)`` (later items ignored); a
    bare tensor is unlabelled data and is its own target (autoencoders)."""
    if isinstance(batch, Tensor):
        return model(batch), batch
    if isinstance(batch, Mapping):
        raise ConfigError(f"the loader yields dict batches (keys {list(batch)}); pass "
                          "Trainer(forward_fn=lambda model, batch: (outputs, targets))")
    return model(batch[0]), batch[1]


def batch_size(outputs: Any, targets: Any) -> int:
    """Samples in a batch: the targets' first dimension, else the outputs'."""
    for t in (targets, outputs):
        if isinstance(t, Tensor) and t.dim() > 0:
            return t.shape[0]
    raise DataError("cannot tell the batch size: forward_fn must return outputs or targets "
                    "that are tensors with a batch dimension")
