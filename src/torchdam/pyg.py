"""PyTorch Geometric layers, taught to attach and compact once a model's file has imported
them (looked up in ``sys.modules``: torchdam works without PyG installed).

* PyG's ``Linear`` (``torch_geometric.nn.dense.linear``) is a Linear with ``in_channels`` /
  ``out_channels``: the MLPs of ``torch_geometric.nn.models.MLP``, GIN and EdgeConv.
* A graph convolution's units are its output node features. ``GCNConv``, ``GraphConv`` and
  ``SAGEConv`` aggregate per feature (sum, mean, max, min, mul), so a gate on the conv's
  output folds exactly into the rows of the Linears that produce it (and GCNConv's own
  bias), and a dead input feature leaves the Linears that read it. Each conv is one layer
  to the dependency graph; its own Linears are not gated apart from it.

An ``nn.Linear`` selector (the default :func:`torchdam.attach`) selects all of them.
Other message-passing layers are left ungated by the default selection (attention
convolutions such as ``GATConv`` split their features into heads).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch_pruning as tp
from torch import Tensor, nn

from torchdam.attach import LINEAR_LIKE, UNGATEABLE, UNIT_LAYERS


@dataclass(frozen=True)
class Rule:
    """Where a PyG layer's features live: the child Linears (``""``: the layer itself)
    whose rows are its output features, those whose columns read its input features, and
    a bias parameter of its own added after the aggregation."""

    outputs: Callable[[nn.Module], tuple[str, ...]]
    inputs: Callable[[nn.Module], tuple[str, ...]]
    bias: str | None = None
    #: a graph convolution (aggregates over neighbours; False: a Linear)
    conv: bool = True
    #: why an instance cannot be gated beyond the checks every convolution gets (None: it can)
    refuses: Callable[[nn.Module], str | None] = lambda m: None


def _sage_outputs(m: nn.Module) -> tuple[str, ...]:
    return ("lin_l", "lin_r") if m.root_weight else ("lin_l",)


def _sage_inputs(m: nn.Module) -> tuple[str, ...]:
    # with project=True the neighbours pass through ``lin`` (in -> in) before aggregation;
    # the root term still reads the input itself
    return ("lin", *_sage_outputs(m)[1:]) if m.project else _sage_outputs(m)


#: (module under ``torch_geometric.``, class name) -> rule
RULES: dict[tuple[str, str], Rule] = {
    ("nn.dense.linear", "Linear"): Rule(lambda m: ("",), lambda m: ("",), conv=False),
    ("nn.conv.gcn_conv", "GCNConv"): Rule(lambda m: ("lin",), lambda m: ("lin",), "bias"),
    ("nn.conv.graph_conv", "GraphConv"): Rule(lambda m: ("lin_rel", "lin_root"), lambda m: ("lin_rel", "lin_root")),
    ("nn.conv.sage_conv", "SAGEConv"): Rule(_sage_outputs, _sage_inputs, refuses=lambda m: (
        "it L2-normalises its output over the features (normalize=True), so a gate cannot fold into it"
        if m.normalize else None)),
}
#: aggregations over each feature on its own (a gate's zeros stay zeros, and scale through)
PER_FEATURE_AGGREGATIONS = ("SumAggregation", "MeanAggregation", "MaxAggregation", "MinAggregation",
                            "MulAggregation")


def _types() -> dict[type, Rule]:
    found = {}
    for (module, name), rule in RULES.items():
        loaded = sys.modules.get(f"torch_geometric.{module}")
        cls = getattr(loaded, name, None) if loaded is not None else None
        if cls is not None:
            found[cls] = rule
    return found


def _conv_reason(rule: Rule) -> Callable[[nn.Module], str | None]:
    def reason(module: nn.Module) -> str | None:
        if not isinstance(module.in_channels, int):
            return f"it is a bipartite graph convolution (in_channels={module.in_channels})"
        aggr = type(getattr(module, "aggr_module", None)).__name__
        if aggr not in PER_FEATURE_AGGREGATIONS:
            return f"its aggregation ({aggr}) mixes features; DAM needs one over each feature on its own"
        return rule.refuses(module)
    return reason


def _lin(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path) if path else module


def _fold(rule: Rule) -> Callable[[nn.Module, Tensor], None]:
    def fold(module: nn.Module, g: Tensor) -> None:
        for path in rule.outputs(module):
            lin = _lin(module, path)
            lin.weight.mul_(g.unsqueeze(1))
            if lin.bias is not None:
                lin.bias.mul_(g)
        if rule.bias and getattr(module, rule.bias) is not None:
            getattr(module, rule.bias).mul_(g)
    return fold


class PygPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning rule for a PyG layer: output features are the rows (and biases) of its
    output Linears, inputs the columns of those reading them; ``in_channels`` and
    ``out_channels`` are updated on the layer and its Linears."""

    TARGET_MODULES = None

    def __init__(self, rule: Rule) -> None:
        super().__init__()
        self.rule = rule

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.out_channels)) - set(idxs))
        for path in self.rule.outputs(layer):
            lin = _lin(layer, path)
            lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 0)
            if lin.bias is not None:
                lin.bias = self._prune_parameter_and_grad(lin.bias, keep, 0)
            lin.out_channels = len(keep)
        if self.rule.bias and getattr(layer, self.rule.bias) is not None:
            setattr(layer, self.rule.bias, self._prune_parameter_and_grad(getattr(layer, self.rule.bias), keep, 0))
        layer.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.in_channels)) - set(idxs))
        for path in self.rule.inputs(layer):
            lin = _lin(layer, path)
            lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 1)
            lin.in_channels = len(keep)
        layer.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


def register_pyg_layers() -> None:
    """Teach attach/compact the PyG layers of :data:`RULES` whose files are loaded (a no-op
    without PyG, or when done)."""
    from torchdam.compact import FOLDERS
    from torchdam.coupling import TP_PRUNERS

    for cls, rule in _types().items():
        if cls in UNIT_LAYERS:
            continue
        UNIT_LAYERS[cls] = ("out_channels", -1)
        FOLDERS[cls] = _fold(rule)
        TP_PRUNERS[cls] = PygPruner(rule)
        if rule.conv:
            UNGATEABLE[cls] = _conv_reason(rule)
        if cls not in LINEAR_LIKE:
            LINEAR_LIKE.append(cls)


def not_gated(module: nn.Module) -> tuple[str, ...]:
    """A message-passing layer's own Linear children: gated with the layer (or not at all,
    for one that splits its features into heads), never as layers of their own."""
    base = sys.modules.get("torch_geometric.nn.conv.message_passing")
    if base is None or not isinstance(module, base.MessagePassing):
        return ()
    linear = sys.modules["torch_geometric.nn.dense.linear"].Linear
    return tuple(name for name, child in module.named_children() if isinstance(child, (nn.Linear, linear)))


def unsupported(model: nn.Module) -> str:
    """For an attach that gated nothing: the message-passing layers of ``model`` it has no rule
    for (``""`` when none)."""
    base = sys.modules.get("torch_geometric.nn.conv.message_passing")
    if base is None:
        return ""
    known = tuple(_types())
    found = [(n, type(m).__name__) for n, m in model.named_modules()
             if isinstance(m, base.MessagePassing) and not isinstance(m, known) and not_gated(m)]
    if not found:
        return ""
    names = ", ".join(f"{n!r} ({c})" for n, c in found[:3]) + (", ..." if len(found) > 3 else "")
    rules = ", ".join(name for (module, name), rule in RULES.items() if rule.conv)
    return (f"; its graph convolutions {names} have no DAM rule (torchdam gates {rules}, PyG's Linear and MLP, "
            "and the MLPs inside GIN/EdgeConv)")


def parts(module: nn.Module) -> list[tuple[nn.Module, bool, bool]]:
    """A registered PyG layer's Linears as ``(linear, its rows are the layer's outputs, its
    columns read the layer's inputs)``: what a width model prices each of them by."""
    rule = _types()[type(module)]
    outs, ins = rule.outputs(module), rule.inputs(module)
    return [(_lin(module, path), path in outs, path in ins) for path in dict.fromkeys(outs + ins)]


def own_bias(module: nn.Module) -> nn.Parameter | None:
    """The bias a PyG layer adds after its aggregation (GCNConv's), if any."""
    rule = _types()[type(module)]
    return getattr(module, rule.bias) if rule.bias else None


def is_graph_conv(module: nn.Module) -> bool:
    rule = _types().get(type(module))
    return rule is not None and rule.conv


def layer_types() -> tuple[type, ...]:
    """The PyG layer types registered so far (Torch-Pruning sees each as one layer)."""
    return tuple(_types())
