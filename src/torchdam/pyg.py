"""PyTorch Geometric layers, taught to attach and compact once a model's file has imported
them (looked up in ``sys.modules``: torchdam works without PyG installed).

* PyG's ``Linear`` (``torch_geometric.nn.dense.linear``) is a Linear with ``in_channels`` /
  ``out_channels``: the MLPs of ``torch_geometric.nn.models.MLP``, GIN and EdgeConv.
* A graph convolution's units are its output node features. ``GCNConv``, ``GraphConv``,
  ``SAGEConv``, ``SGConv``, ``LEConv``, ``ClusterGCNConv``, ``TAGConv``, ``ChebConv`` and
  ``ResGatedGraphConv`` aggregate per feature (sum, mean, max, min, mul), so a gate on the
  conv's output folds exactly into the rows of the Linears that produce it (and an own
  bias), and a dead input feature leaves the Linears that read it. Each conv is one layer
  to the dependency graph; its own Linears are not gated apart from it.
* ``GATConv``, ``GATv2Conv`` and ``TransformerConv`` (heads concatenated) split their
  features into heads that share the attention logits: the features of a head share one DAM
  offset and switch off together, and a dead head leaves whole. GAT's logits are homogeneous
  in the features (GATv2's leaky ReLU too, for positive scales), so the gate folds into the
  features' Linears with the logit weights divided by it; TransformerConv's gated features
  are its values, apart from the logits: either way the attention stays as it was.

An ``nn.Linear`` selector (the default :func:`torchdam.attach`) selects all of them.
Other message-passing layers are left ungated by the default selection and named when
nothing else could be gated.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from torchdam.attach import UNIT_GROUPS, register_library_linear


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
    #: the layer's output width (all heads' features of an attention conv)
    units: Callable[[nn.Module], int] = lambda m: m.out_channels
    #: attention convs: features per head (consecutive units sharing one DAM offset, so a head
    #: switches off whole), per-head parameters ``(1, heads, C)`` that weigh the gated features
    #: in the attention logits (divided by the gate at folding, so the logits stay as they
    #: were; cut with their heads), and Linears and parameters that only lose a dead unit's
    #: rows (logit terms apart: GAT's edge features, keys and queries)
    head: Callable[[nn.Module], int] | None = None
    logit_weights: tuple[str, ...] = ()
    cut_with_heads: Callable[[nn.Module], tuple[str, ...]] = lambda m: ()


def _present(m: nn.Module, *names: str) -> tuple[str, ...]:
    return tuple(n for n in names if getattr(m, n, None) is not None)


def _gat_refuses(m: nn.Module) -> str | None:
    return None if m.concat else "it averages its heads (concat=False): a head cannot leave the mean"


def _transformer_refuses(m: nn.Module) -> str | None:
    if m.lin_beta is not None:
        return "it mixes its output features into a gate of its own (beta=True)"
    if m.lin_edge is not None:
        return "its edge features enter both the attention keys and the values (edge_dim)"
    return _gat_refuses(m)


def _hops(m: nn.Module) -> tuple[str, ...]:
    return tuple(f"lins.{k}" for k in range(len(m.lins)))


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
    # linear in their Linears' outputs (sums over neighbours and hops)
    ("nn.conv.sg_conv", "SGConv"): Rule(lambda m: ("lin",), lambda m: ("lin",)),
    ("nn.conv.le_conv", "LEConv"): Rule(lambda m: ("lin1", "lin2", "lin3"), lambda m: ("lin1", "lin2", "lin3")),
    ("nn.conv.cluster_gcn_conv", "ClusterGCNConv"): Rule(lambda m: ("lin_out", "lin_root"),
                                                          lambda m: ("lin_out", "lin_root")),
    ("nn.conv.tag_conv", "TAGConv"): Rule(_hops, _hops, "bias"),
    ("nn.conv.cheb_conv", "ChebConv"): Rule(_hops, _hops, "bias"),
    # ResGatedGraphConv: sigmoid(k_i + q_j) * v_j per feature: the values and the root term
    # carry the gate; keys and queries only lose a dead feature's rows
    ("nn.conv.res_gated_graph_conv", "ResGatedGraphConv"): Rule(
        lambda m: _present(m, "lin_value", "lin_skip"), lambda m: _present(m, "lin_key", "lin_query", "lin_value", "lin_skip"),
        "bias", cut_with_heads=lambda m: ("lin_key", "lin_query")),
    # GAT: logits a_src.x_j + a_dst.x_i (+ a_edge.lin_edge(e)) over x = lin(x) split in heads
    ("nn.conv.gat_conv", "GATConv"): Rule(
        lambda m: _present(m, "lin", "res"), lambda m: _present(m, "lin", "res"), "bias", refuses=_gat_refuses,
        units=lambda m: m.heads * m.out_channels, head=lambda m: m.out_channels,
        logit_weights=("att_src", "att_dst"), cut_with_heads=lambda m: _present(m, "lin_edge", "att_edge")),
    # GATv2: logits a.leaky_relu(lin_l(x_j) + lin_r(x_i) + lin_edge(e)), positively homogeneous
    ("nn.conv.gatv2_conv", "GATv2Conv"): Rule(
        lambda m: _present(m, "lin_l", "lin_r", "lin_edge", "res"), lambda m: _present(m, "lin_l", "lin_r", "res"),
        "bias", refuses=_gat_refuses, units=lambda m: m.heads * m.out_channels, head=lambda m: m.out_channels,
        logit_weights=("att",)),
    # TransformerConv: logits q_i.k_j per head; the gated features are the values (and the
    # root term), so q and k only lose a dead head's rows
    ("nn.conv.transformer_conv", "TransformerConv"): Rule(
        lambda m: _present(m, "lin_value", "lin_skip"), lambda m: _present(m, "lin_query", "lin_key", "lin_value", "lin_skip"),
        refuses=_transformer_refuses, units=lambda m: m.heads * m.out_channels, head=lambda m: m.out_channels,
        cut_with_heads=lambda m: ("lin_query", "lin_key")),
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
        for lin in _unique(module, rule.outputs(module)):
            lin.weight.mul_(g.unsqueeze(1))
            if lin.bias is not None:
                lin.bias.mul_(g)
        if rule.bias and getattr(module, rule.bias) is not None:
            getattr(module, rule.bias).mul_(g)
        # a head's features scaled by g > 0 and its logit weights by 1/g: the same logits (a
        # dead head's logits no longer matter: its features are zero, and it leaves)
        inverse = torch.where(g > 0, 1 / g.clamp(min=torch.finfo(g.dtype).tiny), torch.zeros_like(g))
        for name in rule.logit_weights:
            weight = getattr(module, name)
            weight.mul_(inverse.view(weight.shape))
    return fold


def _unique(module: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
    """The modules at ``paths``, each once (GATv2 with ``share_weights``: lin_r is lin_l)."""
    found: dict[int, nn.Module] = {}
    for path in paths:
        lin = _lin(module, path)
        found.setdefault(id(lin), lin)
    return list(found.values())


class PygPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning rule for a PyG layer: output features are the rows (and biases) of its
    output Linears, inputs the columns of those reading them; ``in_channels`` and
    ``out_channels`` are updated on the layer and its Linears."""

    TARGET_MODULES = None

    def __init__(self, rule: Rule) -> None:
        super().__init__()
        self.rule = rule

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        rule, gone = self.rule, set(idxs)
        keep = [i for i in range(rule.units(layer)) if i not in gone]
        head = rule.head(layer) if rule.head is not None else None
        if head is not None and len({i // head for i in gone}) * head != len(gone):
            from torchdam.coupling import Refused  # (coupling builds on this module)

            raise Refused(f"{type(layer).__name__} would lose part of a head of {head} features")
        heads = [p for p in rule.cut_with_heads(layer) if isinstance(getattr(layer, p), nn.Module)]
        for lin in _unique(layer, rule.outputs(layer) + tuple(heads)):
            lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 0)
            if lin.bias is not None:
                lin.bias = self._prune_parameter_and_grad(lin.bias, keep, 0)
            lin.out_channels = len(keep)
        if rule.bias and getattr(layer, rule.bias) is not None:
            setattr(layer, rule.bias, self._prune_parameter_and_grad(getattr(layer, rule.bias), keep, 0))
        if head is None:
            layer.out_channels = len(keep)
            return layer
        for name in rule.logit_weights + tuple(p for p in rule.cut_with_heads(layer) if p not in heads):
            weight = getattr(layer, name)  # (1, heads, C): cut as (1, heads * C)
            flat = self._prune_parameter_and_grad(nn.Parameter(weight.detach().flatten(1)), keep, 1)
            setattr(layer, name, nn.Parameter(flat.detach().view(1, -1, head), requires_grad=weight.requires_grad))
        layer.heads = len(keep) // head
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.in_channels)) - set(idxs))
        for lin in _unique(layer, self.rule.inputs(layer)):
            lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 1)
            lin.in_channels = len(keep)
        layer.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return self.rule.units(layer)

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


def register_pyg_layers() -> None:
    """Teach attach/compact the PyG layers of :data:`RULES` whose files are loaded (a no-op
    without PyG, or when done)."""
    for cls, rule in _types().items():
        if rule.head is not None:
            UNIT_GROUPS[cls] = rule.head
        register_library_linear(cls, rule.units, _fold(rule), PygPruner(rule),
                                refuses=_conv_reason(rule) if rule.conv else None)


def not_gated(module: nn.Module) -> tuple[str, ...]:
    """A message-passing layer's own Linear children: gated with the layer (or not at all,
    for one that splits its features into heads), never as layers of their own."""
    base = sys.modules.get("torch_geometric.nn.conv.message_passing")
    if base is None or not isinstance(module, base.MessagePassing):
        return ()
    linear = (nn.Linear, sys.modules["torch_geometric.nn.dense.linear"].Linear)
    found = [name for name, child in module.named_children() if isinstance(child, linear)]
    for name, child in module.named_children():  # parallel Linears summed (ChebConv's ``lins``)
        if isinstance(child, nn.ModuleList):
            found += [f"{name}.{i}" for i, c in enumerate(child) if isinstance(c, linear)]
    return tuple(found)


def unsupported(model: nn.Module) -> str:
    """For an attach that gated nothing: the message-passing layers of ``model`` it has no rule
    for (``""`` when none)."""
    base = sys.modules.get("torch_geometric.nn.conv.message_passing")
    if base is None:
        return ""
    known = tuple(_types())
    found = [(n, type(m).__name__) for n, m in model.named_modules()
             if isinstance(m, base.MessagePassing) and not isinstance(m, known)]
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
    outs = rule.outputs(module) + tuple(p for p in rule.cut_with_heads(module) if isinstance(getattr(module, p), nn.Module))
    ins = rule.inputs(module)
    found: dict[int, tuple[nn.Module, bool, bool]] = {}
    for path in dict.fromkeys(outs + ins):
        lin = _lin(module, path)
        found.setdefault(id(lin), (lin, path in outs, path in ins))
    return list(found.values())


def head_parameters(module: nn.Module) -> list[nn.Parameter]:
    """An attention conv's per-head parameters ``(1, heads, C)``: they shrink with its features."""
    rule = _types()[type(module)]
    names = rule.logit_weights + rule.cut_with_heads(module)
    return [p for p in (getattr(module, n) for n in names) if isinstance(p, nn.Parameter)]


def is_graph_conv(module: nn.Module) -> bool:
    rule = _types().get(type(module))
    return rule is not None and rule.conv


def layer_types() -> tuple[type, ...]:
    """The PyG layer types registered so far (Torch-Pruning sees each as one layer)."""
    return tuple(_types())
