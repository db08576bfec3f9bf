"""Model zoo: ``build_model("resnet56", num_classes=10)`` is a registry lookup.

Every constructor takes ``in_channels``, ``num_classes`` and ``image_size`` keywords so the
CLI can pass them uniformly; one architecture lives in one file. Register a new model with
``MODELS.register("name")(constructor)``.
"""
from __future__ import annotations

import inspect

from torch import nn

from torchdam.models import lenet5, mlp, preresnet, resnet, vit
from torchdam.models.lenet5 import LeNet5
from torchdam.models.mlp import MLP
from torchdam.models.preresnet import PreActBottleneck, PreResNet
from torchdam.models.resnet import BasicBlock, CifarResNet
from torchdam.models.vit import PatchEmbed, VisionTransformer
from torchdam.errors import ConfigError
from torchdam.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")
MODELS.register("mlp")(mlp.mlp)
MODELS.register("lenet300")(mlp.lenet300)
MODELS.register("lenet5")(lenet5.lenet5)
MODELS.register("resnet20")(resnet.resnet20)
MODELS.register("resnet56")(resnet.resnet56)
MODELS.register("preresnet")(preresnet.preresnet)
MODELS.register("preresnet164")(preresnet.preresnet164)
MODELS.register("vit-tiny")(vit.vit_tiny)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; unknown names raise ConfigError listing the choices.

    >>> build_model("lenet300", num_classes=10).layers[-1].out_features
    10
    """
    constructor = MODELS.get(name)
    signature = inspect.signature(constructor)
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        # Checked up front so a typo in a CLI option is a ConfigError, not a TypeError.
        options = ", ".join(signature.parameters)
        raise ConfigError(f"model {name!r}: {err}; its options are: {options}") from None
    return constructor(**kwargs)


__all__ = [
    "MODELS", "MLP", "BasicBlock", "CifarResNet", "LeNet5", "PatchEmbed", "PreActBottleneck", "PreResNet",
    "VisionTransformer", "build_model",
]
