"""Say the size you want: budget-driven, cost-aware DAM.

With a plain penalty, how much DAM removes is set by lambda x beta-lr x steps / (number of
gated layers), not by lambda alone. A :class:`Budget` instead takes the size you want (a
fraction of the dense model's FLOPs or parameters) and drives the betas there, in the same
single training run:

.. code-block:: python

    budget = dam.Budget(flops=0.33)                       # or params=0.5
    budget.bind(model, example_inputs, total_steps=epochs * len(loader))
    for x, y in loader:                                   # the user's own loop
        loss = F.cross_entropy(model(x), y)               # no DAM penalty in the loss
        opt.zero_grad(); loss.backward(); opt.step()
        budget.step()                                     # after opt.step(), before the next zero_grad

or ``Trainer(model, TrainConfig(target_flops=0.33))`` / ``torchdam prune --target-flops 0.33``.

Three parts:

1. **A width model measured from the model** (:class:`WidthModel`). Torch-Pruning's
   dependency graph is traced once to find which modules' output and input channels each
   gate controls (a BatchNorm after the gate, every consumer, a Flatten's index map, a
   concat's offsets, a residual stream's writers, the depthwise convs and norms between),
   and the rules :func:`torchdam.compact` acts by decide what it will do with them (one
   source of truth, :mod:`torchdam.coupling`: ``consumer_inputs``, ``frozen_layers``,
   ``bias_deltas`` and ``stream_members``): a
   gate whose units join a residual stream or reach a layer that keeps its width (tied
   weights, a grouped conv), or reach a consumer as a constant it cannot take in its bias,
   shrinks only its own layer; a stream whose every writer is gated narrows to its widest
   writer; a bias-free consumer that takes such a constant gains a bias. The model is
   priced as trained (a fresh BatchNorm maps a dead unit to zero, a trained one to a
   constant); once built, it compacts a copy at half width and adopts compact's fallbacks
   if that differs (layers scattered back after its output check, streams left whole),
   refusing the model in one line if the compacted copy is still larger than priced. Each module's FLOPs are
   measured once at full width with ``torchdam.count``'s counter (and its parameters counted), and
   ``cost(widths) = rest + sum_m cost_m * (out_m(widths) / n_out_m) * (in_m(widths) / n_in_m)``;
   a side no gate controls keeps factor 1. Its gradient with respect to a gate's live count
   is the marginal cost of that gate's units, recomputed as widths change. It is checked
   against ``count(compact(model))`` in ``tests/test_budget.py`` and, on models written
   elsewhere (MobileNetV2, DenseNet, U-Net, ConvNeXt, tied LMs, ...), in
   ``tests/test_budget_zoo.py`` (exact on both).

   Transformers: a head gate's units are priced from :mod:`torchdam.attention`'s own
   description of what removing a head takes (:meth:`~torchdam.attention.Heads.cuts`: the
   q/k/v rows and the output projection's columns, per kv group under GQA), plus what the
   attention module computes and holds itself, outside its child layers (the score and
   value products, which run outside any layer in Hugging Face models; an
   ``nn.MultiheadAttention``'s packed in-projection and its projections applied by weight),
   which is per head. FFN units go through the dependency graph like any layer (Llama's
   ``gate_proj`` shares ``up_proj``'s units). The residual stream (hidden size) keeps its
   width, as in :func:`torchdam.compact`, so embeddings, norms and stream writers are the
   floor below which a target is unreachable. Checked against ``count(compact(model))`` in
   ``tests/test_budget_transformers.py`` (exact on HF BERT, ViT, GPT-2, Llama and
   ``nn.TransformerEncoder``/``nn.MultiheadAttention`` models).
2. **A cost-aware pull**: each step every beta moves by ``-eta * (task_grad + p * d_g)``
   where ``d_g = d cost / d beta_g`` (``penalty="cost"``, the default), or the paper's
   uniform ``d_g = 1/G`` (``penalty="uniform"``, the gradient of ``mean(beta)``).
3. **A controller, not a guess**: a schedule ``target(t)`` falls from 1 to the target by
   ``reach_at`` (default 65% of the steps); each step the pull ``p`` (a Lagrange
   multiplier, >= 0) is set from the error between the model's current cost and the
   schedule (raised when above, relaxed to 0 when below) plus the schedule's slope, using
   the width model's linearisation. At ``reach_at`` the betas **snap**: live counts are
   chosen so the cost is as close to the target as possible from below (integer counts,
   multiples of ``round_to``), the betas set to give exactly those counts, and frozen for
   the rest of training, so the remaining steps recover accuracy at the final width.

The budget owns the betas while it is bound: :meth:`Budget.step` rewrites them after the
optimizer's step (so whatever optimizer, momentum or decay the betas got is overridden),
and the beta step ``eta`` is derived from the run's length and the gates' costs, so it is
never set by hand.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from torchdam import attention, coupling, lora, pyg
from torchdam.attach import (
    LINEAR_LIKE,
    _units,
    detach,
    gate_paths,
    named_gates,
    unit_group,
    unwrap,
    widths,
)
from torchdam.calling import as_tuple, run_eval
from torchdam.compact import ScatterUnits, compact, plain_weights
from torchdam.count import FlopCounter
from torchdam.count import count as measure
from torchdam.errors import AttachError, ConfigError, TorchDAMError
from torchdam.gates import DAMGate

METRICS = ("flops", "params")
PENALTIES = ("cost", "uniform")
SCHEDULES = ("cubic", "linear")
#: Default fraction of the steps by which the target is reached.
REACH_AT = 0.65
#: Default ``round_to``, chosen by measurement (BENCHMARKS.md "round_to"): coarser steps
#: run wide models a little faster at equal FLOPs but cost narrow ones the target's +-3%.
ROUND_TO = 1
#: Relative tolerance of a reached budget: never above target * (1 + TOLERANCE).
TOLERANCE = 0.03
#: The controller recomputes the gates' marginal costs every this many steps.
REFRESH = 10

_MODULE_TYPES = (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.BN, tp.ops.OPTYPE.DEPTHWISE_CONV)
#: The side of an attention module that stands for its units (its own work and parameters).
_UNITS = "units"


# --------------------------------------------------------------------------- width model


@dataclass
class _Segment:
    """Part of a module side whose width follows gates: ``mult * (n - live)`` of the side's
    channels go when ``live`` of the controlling gates' ``n`` units live (``live`` = the
    largest live count among ``gates``: the writers of one residual stream)."""

    gates: tuple[int, ...]
    n: int
    mult: float


@dataclass
class _Side:
    n: int
    segments: list[_Segment] = field(default_factory=list)


class WidthModel:
    """The FLOPs and parameters of the compacted model as a function of every gate's live
    count, measured from ``model`` (gated with :func:`torchdam.attach`) on ``example_inputs``.

    ``cost(live, metric)`` is differentiable in ``live`` (a float tensor over
    :attr:`names`); ``dense[metric]`` is the full-width model's count (as
    :func:`torchdam.count` gives it). ``example_inputs`` as for :func:`torchdam.compact`: a
    tensor, a tuple, or a dict of keyword inputs (Hugging Face); its first sample is used, or
    all of it when the model cannot take one sample (a graph's node features and edges).

    What it cannot price is refused here, in one line naming the layer
    (:class:`AttachError`): a gated layer the inputs do not reach or Torch-Pruning cannot
    trace, attention heads :func:`torchdam.compact` could not remove, a model that
    compacted at half width is larger than priced (a budget would land above its target).

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
        >>> _ = torchdam.attach(net)
        >>> wm = WidthModel(net, torch.randn(1, 10))
        >>> int(wm.cost(torch.tensor([9.0]), "flops"))
        270
    """

    def __init__(self, model: nn.Module, example_inputs) -> None:
        source = unwrap(model)
        attention.register_library_layers()
        gates = list(named_gates(source))
        if not gates:
            raise AttachError("a budget needs DAM gates: call torchdam.attach(model) first")
        self.names = [name for name, _ in gates]
        self.n = torch.tensor([g.n for _, g in gates], dtype=torch.float64)
        work = copy.deepcopy(source).eval()
        plain_weights(work)  # as in compact's copy
        info = [(name, host, g.n) for name, host, g in gate_paths(work)]
        #: units of each gate that leave together (a GroupNorm's group, a graph attention head)
        self.groups = [unit_group(work.get_submodule(host)) for _, host, _ in info]
        self._group = torch.tensor(self.groups, dtype=torch.float64)
        heads = self._head_gates(work, info)
        #: whether the model cannot run on one sample (a graph's nodes and edges): then all of
        #: ``example_inputs`` is what is measured
        self._unbatched = not _runs(work, _one_sample(example_inputs))
        inputs = self._sample(example_inputs)
        # measured gated: fused kernels that would skip a gate are off, as in the compacted copy
        flops, calls = self._measure(work, inputs, [m for m, _ in heads.values()])
        attention.keep_nested_tensors_off(work)  # as in compact's copy: encoders run as when gated
        detach(work)
        self.dense = {"flops": flops, "params": sum(p.numel() for p in work.parameters())}
        for p in work.parameters():
            p.requires_grad_(True)
        dg = self._graph(work, inputs) if len(heads) < len(info) else None
        #: indices (in :attr:`names`) of the gates whose units are attention heads
        self.head_gates = frozenset(heads)
        sides = self._trace(work, dg, info, heads, inputs)
        self._compile(work, sides, calls, heads)
        rescued, kept, larger = self._verify(source, example_inputs)
        if larger is not None:
            # compact's fallbacks after a failed output check: the layers at fault scattered
            # back (or keeping every unit), and no residual stream narrowed
            sides = self._trace(work, dg, info, heads, inputs, rescued, narrow=False, kept=kept)
            self._compile(work, sides, calls, heads)
            *_, larger = self._verify(source, example_inputs)
            if larger is not None:
                raise AttachError(larger)

    # -- measuring

    def _sample(self, example_inputs):
        """What is measured: the first sample of ``example_inputs``, or all of them."""
        return example_inputs if self._unbatched else _one_sample(example_inputs)

    @staticmethod
    def _measure(work: nn.Module, inputs, attentions: list[nn.Module]) -> tuple[int, dict[int, int]]:
        """Total FLOPs, and FLOPs of every leaf module and head-gated attention module
        (summed over its calls); an attention module's include its children's."""
        records: list[tuple[nn.Module, tuple, dict]] = []
        watched = _leaves(work)
        watched += [lin for m in watched if isinstance(m, _composite_types()) for lin, _, _ in _parts(m) if lin is not m]
        hooks = [m.register_forward_hook(lambda m, a, kw, out: records.append((m, a, kw)), with_kwargs=True)
                 for m in watched + attentions]
        try:
            with FlopCounter() as counter:
                run_eval(work, inputs)
        finally:
            for h in hooks:
                h.remove()
        calls: dict[int, int] = {}
        with torch.no_grad():
            for module, args, kwargs in records:
                with FlopCounter() as one:
                    module(*args, **kwargs)
                calls[id(module)] = calls.get(id(module), 0) + int(one.get_total_flops())
        return int(counter.get_total_flops()), calls

    @staticmethod
    def _graph(work: nn.Module, inputs) -> tp.DependencyGraph:
        try:
            return coupling.build_graph(work, inputs)
        except TorchDAMError as exc:
            raise AttachError(f"a budget cannot trace {type(work).__name__}: {str(exc).splitlines()[0]}") from exc

    # -- tracing which sides each gate controls (as torchdam.compact will remove them)

    @staticmethod
    def _head_gates(work: nn.Module, info) -> dict[int, tuple[nn.Module, attention.Heads]]:
        """``{gate index: (attention module, its head layout)}`` for the head gates; refuses
        (one line, naming the module) heads that compact could not remove."""
        heads = {}
        for i, (producer_name, host_name, n) in enumerate(info):
            host = work.get_submodule(host_name)
            layout = attention.heads_of(host)
            if layout is None:
                continue
            reason = layout.refusal(host)
            if reason is None and layout.layout(host)[0] != n:
                reason = f"its gate has {n} units, its layout {layout.layout(host)[0]}"
            if reason is not None:
                raise AttachError(f"a budget cannot model the heads of attention {producer_name!r}: {reason}")
            heads[i] = (host, layout)
        return heads

    def _trace(self, work: nn.Module, dg: tp.DependencyGraph | None, info,
               heads: dict[int, tuple[nn.Module, attention.Heads]], inputs,
               scattered: frozenset[int] = frozenset(), narrow: bool = True,
               kept: frozenset[int] = frozenset()) -> dict[tuple[int, str], _Side]:
        modules = {id(m) for m in work.modules()}
        customized = (*LINEAR_LIKE, nn.GroupNorm)  # other libraries' layers (registered), GroupNorm
        sides: dict[tuple[int, str], _Side] = {}
        seen: set[tuple] = set()
        #: (consumer, gates): a bias compact adds to the consumer while one of the gates has a dead unit
        self._new_biases: list[tuple[nn.Module, frozenset[int]]] = []
        #: the gates (not over heads) whose dead units compact scatters back to full width
        self._scattered: frozenset[int] = frozenset()

        def add(module, side: str, idxs, gates: tuple[int, ...], n: int, total: int | None = None) -> None:
            key = (id(module), side)
            if key not in sides:
                if total is None:
                    pruner = dg.get_pruner_of_module(module)
                    total = pruner.get_out_channels(module) if side == "out" else pruner.get_in_channels(module)
                sides[key] = _Side(int(total))
            mark = (key, frozenset(idxs), gates)
            if mark in seen:
                return
            seen.add(mark)
            sides[key].segments.append(_Segment(gates, n, len(set(idxs)) / n))

        def traced(dep) -> bool:
            module = dep.target.module
            if id(module) not in modules:
                return False
            if isinstance(module, nn.PReLU):  # one weight for all channels: nothing to shrink
                return module.num_parameters > 1
            return dep.target.type in _MODULE_TYPES or isinstance(module, customized)

        # a head gate: its units' channels of the projections attention.py cuts, and the
        # module's own work and parameters (scores, a packed in-projection), per unit
        for i, (module, layout) in heads.items():
            n = info[i][2]
            if i in kept:  # compact keeps its heads: their work stays whatever the gate's width
                sides[(id(module), _UNITS)] = _Side(n)
                continue
            for cut in layout.cuts(module):
                add(cut.layer, cut.side, cut.channels(list(range(n))), (i,), n, cut.total)
            add(module, _UNITS, range(n), (i,), n, n)
        producers = {}
        for i, (producer_name, host_name, n) in enumerate(info):
            if i not in heads and i not in kept:  # a kept gate's units stay: its width costs the same
                producer, host = work.get_submodule(producer_name), work.get_submodule(host_name)
                reached = producer in dg.module2node and (
                    host in dg.module2node or dg.get_pruner_of_module(host) is None)
                if dg.get_pruner_of_module(producer) is not None and not reached:
                    continue  # not reached by the inputs: compact keeps it whole, so its width costs nothing
                producers[i] = (producer, host, n)
        if not producers:
            return sides
        partners = attention.shared_units(work)
        frozen = coupling.frozen_layers(work, coupling.tied_layers(work))
        groups, layers, consumers = {}, {}, {}
        for i, (producer, host, n) in producers.items():
            name = info[i][0]
            pruner = dg.get_pruner_of_module(producer)
            if pruner is None:
                raise AttachError(f"a budget cannot trace gated layer {name!r}: Torch-Pruning has no "
                                  f"rule for {type(producer).__name__}")
            # as compact sees a layer whose every unit is dead: which units go is DAM's order
            layers[i] = coupling.GatedLayer(name, producer, info[i][1], host, -1, n, [], list(range(n)))
            try:
                groups[i] = coupling.pruning_group(dg, producer, list(range(n)), name)
            except coupling.GroupSearchError:  # compact scatters such a layer back: so does the budget
                consumers[i] = None
                continue
            consumers[i] = coupling.consumer_inputs(dg, groups[i], layers[i], frozen,
                                                    partners.get(id(producer), frozenset()))
        removable = self._removable(work, inputs if self._unbatched else _twice(inputs), layers, consumers)
        removable = {i: d for i, d in removable.items() if i not in scattered}
        stream = {i for i in producers if i not in removable}
        self._scattered = frozenset(stream)
        # compact gives a consumer without a bias one when a dead unit reaches it as a constant
        biases: dict[int, tuple[nn.Module, set[int]]] = {}
        for i, deltas in removable.items():
            for module, delta in deltas.items():
                if delta.dim() > 0 and getattr(module, "bias", None) is None:
                    biases.setdefault(id(module), (module, set()))[1].add(i)
        self._new_biases = [(module, frozenset(gates)) for module, gates in biases.values()]
        by_module: dict[int, coupling.GatedLayer] = {}
        for i in stream:
            by_module[id(layers[i].producer)] = by_module[id(layers[i].host)] = layers[i]
        index = {id(layer): i for i, layer in layers.items()}
        for i, (producer, host, n) in producers.items():
            group = groups.get(i)  # None: Torch-Pruning's search failed (scattered, its own width only)
            if i not in stream:
                for dep, idxs in group:
                    if traced(dep):
                        add(dep.target.module, self._side(dg, dep), idxs, (i,), n)
                continue
            # a residual stream: the gate shrinks its own layer (and norm) only ...
            add(producer, "out", range(n), (i,), n)
            if host is not producer:
                add(host, "out", range(n), (i,), n)
            # ... and the stream narrows to its widest writer when every writer is gated
            found = coupling.stream_members(dg, layers[i], by_module, frozen) if narrow and group is not None else None
            if found is None:
                continue
            members = {index[id(m)] for m in found}
            own = {id(producers[j][k]) for j in members for k in (0, 1)}
            for dep, idxs in group:
                module = dep.target.module
                if traced(dep):
                    side = self._side(dg, dep)
                    if side == "out" and id(module) in own:
                        continue
                    add(module, side, idxs, tuple(sorted(members)), n)
        return sides

    def _verify(self, source: nn.Module, example_inputs) -> tuple[frozenset[int], frozenset[int], str | None]:
        """Compacts a copy of ``source`` with every gate at half its units and compares with
        :meth:`cost`. Returns the gates priced as removed that compact scattered back (it
        does when the compacted outputs differ, e.g. an op Torch-Pruning takes for
        per-channel mixes channels), those whose units it kept (when scattering them back
        differs too), and why the compacted model is larger than priced (None if it is not).
        Priced larger is allowed: a fresh BatchNorm maps a dead unit to zero where a trained
        one need not (see :meth:`_removable`)."""
        half = copy.deepcopy(source)
        paths = list(gate_paths(half))
        gates = [(name, g) for name, _, g in paths]
        hosts = [host for _, host, _ in paths]
        live = [max(1, g.n // 2) for _, g in gates]
        with torch.no_grad():
            for (_, g), units in zip(gates, live):
                g.beta.fill_(_beta_for(g, units))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small = compact(half, example_inputs)
        except TorchDAMError as exc:
            raise AttachError(f"a budget cannot price {type(source).__name__}: compact fails on it with half of "
                              f"every gated layer's units ({str(exc).splitlines()[0]})") from exc
        rescued = frozenset(i for i, (_, g) in enumerate(gates)
                            if i not in self.head_gates and i not in self._scattered
                            and isinstance(small.get_submodule(hosts[i]), ScatterUnits))
        kept = frozenset(i for i, (name, g) in enumerate(gates)
                         if i not in rescued and live[i] < g.n and self._whole(small.get_submodule(name),
                                                                               small.get_submodule(hosts[i]), g.n))
        real = measure(small, self._sample(example_inputs))
        for metric in METRICS:
            said = float(self.cost(torch.tensor(live, dtype=torch.float64), metric))
            if real[metric] > said * (1 + 1e-9) + 1e-6:
                where = ", ".join(repr(gates[i][0]) for i in sorted(rescued)) or type(source).__name__
                return rescued, kept, (f"a budget cannot price {where}: compacted with half of every gated layer's "
                                 f"units it has {real[metric]} {metric}, more than the width model's {said:.0f} "
                                 "(a budget would land above its target)")
        return rescued, kept, None

    @staticmethod
    def _whole(producer: nn.Module, host: nn.Module, n: int) -> bool:
        """Whether compact left all ``n`` units of a gated layer or attention module."""
        layout = attention.heads_of(producer)
        if layout is not None:
            return layout.layout(producer)[0] == n
        return not isinstance(host, ScatterUnits) and _units(producer)[0] == n

    @staticmethod
    def _side(dg: tp.DependencyGraph, dep) -> str:
        return "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"

    @staticmethod
    def _removable(work: nn.Module, inputs, layers: dict[int, coupling.GatedLayer],
                   consumers: dict[int, dict[nn.Module, list[int]] | None]) -> dict[int, dict[nn.Module, Tensor]]:
        """The gates whose dead units :func:`torchdam.compact` removes from every coupled
        layer, by its own rule (:func:`~torchdam.coupling.bias_deltas`): each consumer must
        take in its bias the constant a dead unit becomes on the way (a BatchNorm or a
        depthwise conv's bias after the gate); the others are scattered back. Probed with
        every gate's units dead and the per-channel layers' parameters and statistics moved
        off their initial values (a fresh BatchNorm maps 0 to 0, a trained one does not),
        so the answer is the trained model's; ``inputs`` is the sample twice, as compact
        needs more than one value per unit to see that it is constant. Changes ``work``'s
        values (its shapes are what the width model reads afterwards).

        Returns ``{gate index: {consumer: the bias it gains}}`` (a 0-d zero: none)."""
        wanted = {i: c for i, c in consumers.items() if c is not None}
        if not wanted:
            return {}
        with torch.no_grad():
            for module in work.modules():
                if coupling.channelwise(module):
                    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                        if t.is_floating_point():
                            t.add_(0.25)

        def dead(module: nn.Module, args: tuple, out):
            return torch.zeros_like(out) if isinstance(out, Tensor) else out

        hooks = [layer.host.register_forward_hook(dead) for layer in layers.values()]
        try:
            values = coupling.input_values(work, inputs, [m for c in wanted.values() for m in c])
        finally:
            for h in hooks:
                h.remove()
        deltas = {i: coupling.bias_deltas(c, values) for i, c in wanted.items()}
        return {i: d for i, d in deltas.items() if d is not None}

    # -- compiling to tensors

    def _compile(self, work: nn.Module, sides: dict[tuple[int, str], _Side], calls: dict[int, int],
                 heads: dict[int, tuple[nn.Module, attention.Heads]]) -> None:
        seg_gates, seg_n, seg_mult, seg_side = [], [], [], []
        side_index: dict[tuple[int, str], int] = {}
        side_n = []
        for key, side in sides.items():
            side_index[key] = len(side_n)
            side_n.append(side.n)
            for s in side.segments:
                seg_gates.append(s.gates)
                seg_n.append(s.n)
                seg_mult.append(s.mult)
                seg_side.append(side_index[key])
        G = len(self.names)
        member = torch.zeros(len(seg_gates), G, dtype=torch.bool)
        for k, gates in enumerate(seg_gates):
            member[k, list(gates)] = True
        self._member = member
        self._seg_n = torch.tensor(seg_n, dtype=torch.float64)
        self._seg_mult = torch.tensor(seg_mult, dtype=torch.float64)
        self._seg_side = torch.tensor(seg_side, dtype=torch.long)
        self._side_n = torch.tensor(side_n, dtype=torch.float64)
        # terms: cost * product of factors; each term has an out side and an in side (-1: none),
        # and a flag (-1: none): 1 while one of a set of gates has a dead unit, else 0
        rows: dict[str, list[tuple[int, int, int, int]]] = {"flops": [], "params": []}
        rest = dict(self.dense)
        counted: set[int] = set()  # a tied parameter is counted once, as torchdam.count does
        # per-unit parameters of head gates (a bias table in a leaf child) are priced per unit below
        by_unit = {id(p) for module, layout in heads.values() for p in layout.per_unit_parameters(module)}
        whole = _composite_types()
        for module in _leaves(work):
            out_i = side_index.get((id(module), "out"), -1)
            in_i = side_index.get((id(module), "in"), -1)
            if coupling.channelwise(module):
                in_i = -1  # a depthwise conv's or a norm's work follows its (coupled) channels once
            flops = calls.get(id(module), 0)
            if isinstance(module, whole):  # each Linear by the sides it has; the rest by both
                for lin, is_out, is_in in _parts(module):
                    o, i = (out_i if is_out else -1), (in_i if is_in else -1)
                    rows["flops"].append((calls.get(id(lin), 0), o, i, -1))
                    flops -= calls.get(id(lin), 0)
                    for p in lin.parameters(recurse=False):
                        if id(p) not in counted:
                            counted.add(id(p))
                            rows["params"].append((p.numel(), o, i if p.dim() > 1 else -1, -1))
                            rest["params"] -= p.numel()
                for p in (pyg.head_parameters(module) if isinstance(module, pyg.layer_types()) else []):  # (1, heads, C)
                    counted.add(id(p))
                    rows["params"].append((p.numel(), out_i, -1, -1))
                    rest["params"] -= p.numel()
                rest["flops"] -= calls.get(id(module), 0) - flops
            if flops:
                rows["flops"].append((flops, out_i, in_i, -1))
                rest["flops"] -= flops
            for p in module.parameters(recurse=False):
                if id(p) in counted or id(p) in by_unit:
                    continue
                counted.add(id(p))
                o = out_i if out_i >= 0 and p.dim() >= 1 and p.shape[_axis(module, p, "out")] == side_n[out_i] else -1
                i = in_i if in_i >= 0 and p.dim() >= 2 and p.shape[_axis(module, p, "in")] == side_n[in_i] else -1
                rows["params"].append((p.numel(), o, i, -1))
                rest["params"] -= p.numel()
        flags = torch.zeros(len(self._new_biases), len(self.names), dtype=torch.bool)
        for f, (module, gates) in enumerate(self._new_biases):
            flags[f, list(gates)] = True
            out_i = side_index.get((id(module), "out"), -1)
            rows["params"].append((int(module.weight.shape[_axis(module, module.weight, "out")]), out_i, -1, f))
        self._flags = flags
        for module, layout in (h for _, h in sorted(heads.items())):
            # what the attention module computes itself (scores, an nn.MultiheadAttention's
            # projections applied by weight) and holds itself: per unit
            units = side_index[(id(module), _UNITS)]
            inside = {id(m) for m in _leaves(module) if m is not module}  # (a composite's parts: once, in it)
            own = calls.get(id(module), 0) - sum(calls.get(i, 0) for i in inside)
            rows["flops"].append((own, units, -1, -1))
            rest["flops"] -= own
            for p in layout.per_unit_parameters(module):
                if id(p) not in counted:
                    counted.add(id(p))
                    rows["params"].append((p.numel(), units, -1, -1))
                    rest["params"] -= p.numel()
        self._rest = rest
        self._terms = {}
        for metric, r in rows.items():
            cost = torch.tensor([c for c, _, _, _ in r], dtype=torch.float64)
            out_i = torch.tensor([o for _, o, _, _ in r], dtype=torch.long)
            in_i = torch.tensor([i for _, _, i, _ in r], dtype=torch.long)
            flag_i = torch.tensor([f for _, _, _, f in r], dtype=torch.long)
            self._terms[metric] = (cost, out_i, in_i, flag_i)

    # -- evaluating

    def side_widths(self, live: Tensor) -> Tensor:
        """Width of every traced module side for these live counts (``live``: ``(G,)`` or
        a batch ``(B, G)``)."""
        live = live.to(torch.float64)
        masked = torch.where(self._member, live.unsqueeze(-2), torch.tensor(-math.inf, dtype=torch.float64))
        seg_live = masked.amax(-1) if self._member.shape[0] else masked.sum(-1)
        removed = self._seg_mult * (self._seg_n - seg_live)
        base = self._side_n.expand(*live.shape[:-1], -1)
        return base - torch.zeros_like(base).index_add(-1, self._seg_side, removed)

    def cost(self, live: Tensor, metric: str = "flops") -> Tensor:
        """The compacted model's FLOPs (per sample of ``example_inputs``) or parameters
        (a batch ``(B, G)`` of live counts gives ``(B,)``)."""
        if metric not in METRICS:
            raise ConfigError(f"unknown budget metric {metric!r}; choose one of: {', '.join(METRICS)}")
        live = self.kept(live)
        ratio = self.side_widths(live) / self._side_n
        ratio = torch.cat([ratio, ratio.new_ones(*ratio.shape[:-1], 1)], -1)  # index -1: no gate on that side
        cost, out_i, in_i, flag_i = self._terms[metric]
        live = live.to(torch.float64)
        # a unit of any of the flag's gates dead: 1 (0 with every unit live, linear in between)
        dead = torch.where(self._flags, (self.n - live).clamp(0.0, 1.0).unsqueeze(-2), 0.0)
        flag = dead.amax(-1) if self._flags.shape[0] else dead.sum(-1)
        flag = torch.cat([flag, flag.new_ones(*flag.shape[:-1], 1)], -1)
        return self._rest[metric] + (cost * ratio[..., out_i] * ratio[..., in_i] * flag[..., flag_i]).sum(-1)

    def kept(self, live: Tensor) -> Tensor:
        """The units compact keeps for these live counts: a gate's whole groups with a live
        unit (see :func:`~torchdam.attach.unit_group`). Rounded up in value only, so that
        :meth:`marginal` still sees what one more live unit would cost."""
        live = live.to(torch.float64)
        up = torch.where(self._group > 1, torch.ceil(live / self._group - 1e-9) * self._group, live)
        return live + (up - live).detach()

    def relative(self, live: Tensor, metric: str = "flops") -> Tensor:
        return self.cost(live, metric) / self.dense[metric]

    def marginal(self, live: Tensor, metric: str = "flops") -> Tensor:
        """``d cost / d live_g`` for every gate: what one more live unit of it costs."""
        live = live.detach().to(torch.float64).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.cost(live, metric), live)
        return grad

    def floor(self, metric: str = "flops") -> float:
        """The smallest relative cost reachable (every gated layer at one unit)."""
        return float(self.relative(torch.ones(len(self.names), dtype=torch.float64), metric))


def _composite_types() -> tuple[type, ...]:
    """Layers made of Linears that Torch-Pruning sees as one (PyG's, peft's LoRA Linear)."""
    found = lora.lora_type()
    return (*pyg.layer_types(), *((found,) if found is not None else ()))


def _parts(module: nn.Module) -> list[tuple[nn.Module, bool, bool]]:
    """A composite layer's Linears with the sides they have (``(linear, out, in)``)."""
    return lora.parts(module) if lora.is_lora(module) else pyg.parts(module)


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The layers priced one by one: modules with no child but a DAM gate (a gated layer is
    a leaf layer), and composite layers as a whole (one layer to Torch-Pruning; their Linears inside)."""
    whole = _composite_types()
    found, inside = [], set()
    for module in model.modules():
        if id(module) in inside or isinstance(module, DAMGate):
            continue
        if isinstance(module, whole):
            inside.update(id(m) for m in module.modules())
            found.append(module)
        elif all(isinstance(c, DAMGate) for c in module.children()):
            found.append(module)
    return found


def _axis(module: nn.Module, p: Tensor, side: str) -> int:
    """The axis of parameter ``p`` of ``module`` that holds the module's ``side`` channels
    (a bias: 0; a transposed conv's or HF ``Conv1D``'s weight: ``(in, out, ...)``)."""
    if p.dim() < 2:
        return 0
    conv1d = attention.conv1d_type()  # HF Conv1D: a Linear with its weight transposed
    transposed = bool(getattr(module, "transposed", False)) or (conv1d is not None and isinstance(module, conv1d))
    return (1 if transposed else 0) if side == "out" else (0 if transposed else 1)


def _runs(model: nn.Module, inputs) -> bool:
    try:
        run_eval(model, inputs)
    except TorchDAMError:
        return False
    return True


def _one_sample(example_inputs):
    """The first sample of ``example_inputs`` (a tensor, tuple/list, or dict of keyword inputs)."""
    def first(t):
        return t.detach()[:1] if isinstance(t, Tensor) and t.dim() > 0 else t

    if isinstance(example_inputs, Mapping):
        return {k: first(v) for k, v in example_inputs.items()}
    return tuple(first(t) for t in as_tuple(example_inputs))


def _twice(inputs):
    """One-sample ``inputs`` (as :func:`_one_sample` gives them) as a batch of that sample twice."""
    def double(t):
        return torch.cat([t, t]) if isinstance(t, Tensor) and t.dim() > 0 else t

    if isinstance(inputs, Mapping):
        return {k: double(v) for k, v in inputs.items()}
    return tuple(double(t) for t in inputs)


def live_counts(model: nn.Module) -> Tensor:
    """Every gate's live unit count (``g > 0``), in :func:`named_gates` order."""
    return torch.tensor([float(g.active()) for _, g in named_gates(unwrap(model))], dtype=torch.float64)


# --------------------------------------------------------------------------- the budget


def _continuous_live(beta: Tensor, n: Tensor, k: Tensor) -> Tensor:
    """Live count interpolated within a unit: ``n (1 + beta / k) - 1/2`` clipped to [0, n]
    (through the midpoints of the exact count's steps)."""
    return (n * (1.0 + beta / k) - 0.5).clamp(min=0.0).minimum(n)


def _beta_for(gate: DAMGate, live: int) -> float:
    """A beta giving exactly ``live`` live units: midway between the offsets of the last
    dead and the first live unit (above every offset for ``live == n``)."""
    mu = gate.mu.detach().double()
    n = gate.n
    if live >= n:
        return float(gate.k / (2 * n))
    first = n - live
    return float(-(mu[first - 1] + mu[first]) / 2)


@dataclass
class Budget:
    """Drive DAM to a size: a fraction of the dense model's ``flops`` or ``params``.

    Args:
        flops / params: the target, a fraction in (0, 1] of the dense model (give one).
        reach_at: fraction of the steps (after ``start``) by which the target is reached;
            then the betas snap and freeze, and the rest of the run trains at that width.
        penalty: ``"cost"`` (each gate pulled by what its units cost, from the width
            model) or ``"uniform"`` (the paper's ``mean(beta)``: every gate pulled alike).
        round_to: every snapped live count is a multiple of this (Torch-Pruning's
            ``round_to``); a layer narrower than it keeps its full width, and a layer
            keeps at least ``round_to`` units.
        schedule: how the target falls from 1 to ``flops``/``params`` by ``reach_at``:
            ``"cubic"`` (``T + (1 - T)(1 - u)^3``, Zhu & Gupta's gradual pruning: fast while
            the network is redundant, gently near the target) or ``"linear"``.

    Use :meth:`bind` once, then :meth:`step` after every optimizer step.
    """

    flops: float | None = None
    params: float | None = None
    reach_at: float = REACH_AT
    penalty: str = "cost"
    round_to: int = ROUND_TO
    schedule: str = "cubic"

    def __post_init__(self) -> None:
        given = [m for m in METRICS if getattr(self, m) is not None]
        if len(given) != 1:
            raise ConfigError("a Budget takes exactly one target: flops=... or params=... "
                              "(a fraction of the dense model, e.g. flops=0.33)")
        self.metric = given[0]
        self.target = float(getattr(self, self.metric))
        if not (math.isfinite(self.target) and 0 < self.target <= 1):
            raise ConfigError(f"target {self.metric} must be a fraction in (0, 1] of the dense model, "
                              f"got {self.target} (0.33 means a third of the dense {self.metric})")
        if not (isinstance(self.reach_at, (int, float)) and 0 < self.reach_at <= 1):
            raise ConfigError(f"reach_at must be in (0, 1], got {self.reach_at!r}")
        if self.penalty not in PENALTIES:
            raise ConfigError(f"unknown penalty {self.penalty!r}; choose one of: {', '.join(PENALTIES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown budget schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be a whole number >= 1, got {self.round_to!r}")
        self.bound = False
        self.model: nn.Module | None = None
        self.width_model: WidthModel | None = None
        self.t = 0
        self.pull = 0.0
        self.frozen = False
        self.trace: list[tuple[int, float, float, float]] = []
        self.unreachable = False
        self._pending: dict | None = None
        self._cached: tuple[Tensor, Tensor] | None = None

    # -- setup

    def bind(self, model: nn.Module, example_inputs, total_steps: int, start_step: int = 0) -> "Budget":
        """Trace ``model``'s width model from ``example_inputs`` (one sample is enough: a
        tensor, a tuple, or a dict of keyword inputs for Hugging Face models) and plan
        ``total_steps`` optimizer steps; the schedule starts after ``start_step`` (e.g. a
        cold start). Sets every beta to the edge where all its units still live."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"total_steps must be a whole number >= 1, got {total_steps!r}")
        if not 0 <= start_step < total_steps:
            raise ConfigError(f"a budget needs steps to reach its target: start_step={start_step} (e.g. a cold "
                              f"start) leaves none of the {total_steps} steps; shorten the cold start")
        self.model = unwrap(model)
        self.gates = [g for _, g in named_gates(self.model)]
        fixed = [name for name, g in named_gates(self.model) if type(g).mask is not DAMGate.mask]
        if fixed:
            raise ConfigError(f"a budget drives DAM gates (beta); {', '.join(fixed)} have fixed or other masks")
        self.width_model = wm = WidthModel(self.model, example_inputs)
        self.total, self.start = int(total_steps), int(start_step)
        self.reach = min(self.total, self.start + max(1, round(self.reach_at * (self.total - self.start))))
        self._n = torch.tensor([g.n for g in self.gates], dtype=torch.float64)
        self._k = torch.tensor([g.k for g in self.gates], dtype=torch.float64)
        group = torch.tensor([g.group for g in self.gates], dtype=torch.float64)
        self._lo = self._k * (1.5 * group / self._n - 1.0)  # one unit (one group of units sharing an offset) live
        self._hi = self._k / (2.0 * self._n)        # every unit live, as near the edge as can be
        self._allowed = [self.allowed(g.n, heads=i in wm.head_gates, group=wm.groups[i])
                         for i, g in enumerate(self.gates)]
        mins = torch.tensor([float(a[0]) for a in self._allowed], dtype=torch.float64)
        self.floor = float(wm.relative(mins, self.metric))  # every gated layer at its fewest units
        self.unreachable = self.floor > self.target
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._load(state)
        else:
            with torch.no_grad():
                for g, hi in zip(self.gates, self._hi.tolist()):
                    g.beta.clamp_(max=hi)
            self._shadow = self._betas()
            # eta: with no task gradient, a pull of p = 1 follows the schedule's mean slope
            s, d = self._sensitivity(self._shadow)
            span = max(1, self.reach - self.start)
            self.eta = float((1.0 - min(self.target, 1.0)) / span / max(float((s * d).sum()), 1e-12))
            if self.target >= 1.0:
                self.eta = 0.0
        self.bound = True
        return self

    def _betas(self) -> Tensor:
        return torch.stack([g.beta.detach().reshape(()) for g in self.gates]).double().cpu()

    def _write(self, betas: Tensor) -> None:
        with torch.no_grad():
            for g, b in zip(self.gates, betas.tolist()):
                g.beta.fill_(b)

    # -- the schedule and the controller

    def schedule_at(self, step: int) -> float:
        """The target (relative cost) the schedule asks for after ``step`` steps."""
        if step <= self.start:
            return 1.0
        if step >= self.reach:
            return self.target
        u = (step - self.start) / (self.reach - self.start)
        shape = (1.0 - u) ** 3 if self.schedule == "cubic" else 1.0 - u
        return self.target + (1.0 - self.target) * shape

    def _sensitivity(self, betas: Tensor) -> tuple[Tensor, Tensor]:
        """``s_g = d cost_rel / d beta_g`` (units leave at n/k per unit of beta) and the
        pull direction ``d_g`` (``s_g`` for the cost-aware penalty, ``1/G`` for uniform);
        gates already at one unit get neither."""
        wm = self.width_model
        live = _continuous_live(betas, self._n, self._k)
        s = wm.marginal(live, self.metric) / wm.dense[self.metric] * self._n / self._k
        s = s.clamp(min=0.0)
        movable = betas > self._lo + 1e-9
        s = torch.where(movable, s, torch.zeros_like(s))
        d = s.clone() if self.penalty == "cost" else movable.double() / len(self.gates)
        return s, d

    def current(self, smooth: bool = False) -> float:
        """The model's cost now, relative to dense: from the exact live counts, or (``smooth``)
        the live counts interpolated within a unit, which the controller follows."""
        if smooth:
            live = _continuous_live(self._shadow, self._n, self._k)
        else:
            live = torch.tensor([float(g.active()) for g in self.gates], dtype=torch.float64)
        return float(self.width_model.relative(live, self.metric))

    def step(self) -> None:
        """One controller step; call it right after ``optimizer.step()`` (the betas' task
        gradients must still be in ``.grad``). Rewrites every beta."""
        if not self.bound:
            raise ConfigError("Budget.step() before Budget.bind(model, example_inputs, total_steps)")
        t = self.t
        betas = self._shadow
        if self.frozen or t < self.start or self.eta == 0.0:
            self._write(betas)
        else:
            grad = torch.stack([g.beta.grad.detach().reshape(()) if g.beta.grad is not None
                                else torch.zeros((), device=g.beta.device) for g in self.gates]).double().cpu()
            if self._cached is None or t % REFRESH == 0 or bool((betas <= self._lo + 1e-9).any()):
                self._cached = self._sensitivity(betas)  # marginal costs change slowly with the widths
            s, d = self._cached
            now = float(self.width_model.relative(_continuous_live(betas, self._n, self._k), self.metric))
            wanted = self.schedule_at(t + 1)
            sd = float((s * d).sum())
            if sd > 0:
                # p makes the linearised cost after this step equal to the schedule's
                p = ((now - wanted) / self.eta - float((s * grad).sum())) / sd
            else:
                p = 0.0
            # at most a tenth of a layer's range per step, and never a push upwards
            limit = float(((self._hi - self._lo) / 10.0 / (self.eta * d.clamp(min=1e-12))).min())
            self.pull = p = min(max(p, 0.0), limit)
            betas = (betas - self.eta * (grad + p * d)).clamp(min=self._lo).minimum(self._hi)
            # as the model stores them (float32), so a resumed run continues from the same values
            betas = betas.float().double()
            self._shadow = betas
            self._write(betas)
        self.t = t + 1
        if self.t >= self.reach and not self.frozen:
            self.snap()
        every = max(1, self.total // 200)
        if self.t % every == 0 or self.t == self.reach or self.t == self.total:
            self.trace.append((self.t, self.current(), self.schedule_at(self.t), self.pull))

    # -- the snap

    def allowed(self, n: int, heads: bool = False, group: int = 1) -> list[int]:
        """The live counts the snap may choose for a gate over ``n`` units. ``round_to``
        does not apply to a gate over attention heads (``heads``): a head is already
        ``head_dim`` channels, and rounding head counts would keep small attention whole.
        Units that leave in groups of ``group`` (a GroupNorm's) take multiples of both."""
        r = 1 if heads else math.lcm(self.round_to, group)
        values = list(range(r, n + 1, r)) or [n]
        if values[-1] != n:
            values.append(n)
        return values

    def snap(self, start: Tensor | None = None) -> dict[str, int]:
        """Set the betas so the cost is as close to the target as possible from below
        (integer live counts, multiples of ``round_to``), then freeze them. The snap starts
        from the betas' (interpolated) live counts, or from ``start`` (one live count per gate,
        in :func:`named_gates` order; fractions allowed): a width pattern to fit to the budget."""
        if not self.bound:
            raise ConfigError("Budget.snap() before Budget.bind(model, example_inputs, total_steps)")
        wm = self.width_model
        allowed = self._allowed
        if start is None:
            before = _continuous_live(self._shadow, self._n, self._k)
        else:
            before = torch.as_tensor(start, dtype=torch.float64).reshape(-1)
            if before.shape != self._n.shape:
                raise ConfigError(f"snap(start=...) takes one live count per gate ({len(self.gates)}), "
                                  f"got {before.numel()}")
            before = before.clamp(min=0.0).minimum(self._n)

        def at_most(values: list[int], x: float) -> int:
            fit = [v for v in values if v <= x + 1e-9]
            return fit[-1] if fit else values[0]

        def rel(live: list[int]) -> float:
            return float(wm.relative(torch.tensor(live, dtype=torch.float64), self.metric))

        def shifted(delta: float) -> list[int]:
            return [at_most(a, float(b) - delta * n) for a, b, n in zip(allowed, before, self._n.tolist())]

        # 1. one shift of every layer's width fraction, the smallest that meets the target
        lo, hi = -1.0, 1.0
        if rel(shifted(lo)) <= self.target:
            hi = lo
        elif rel(shifted(hi)) > self.target:
            lo = hi
        else:
            for _ in range(60):
                mid = (lo + hi) / 2
                if rel(shifted(mid)) <= self.target:
                    hi = mid
                else:
                    lo = mid
        live = shifted(hi)
        # 2. fill up to the target: add units where the shift took most, while they fit
        while True:
            best = None
            for i, values in enumerate(allowed):
                up = [v for v in values if v > live[i]]
                if not up:
                    continue
                trial = live.copy()
                trial[i] = up[0]
                cost = rel(trial)
                if cost <= self.target:
                    key = ((float(before[i]) - live[i]) / self._n[i].item(), cost)
                    if best is None or key > best[0]:
                        best = (key, trial)
            if best is None:
                break
            live = best[1]
        # 3. still short of the target by more than half the tolerance (coarse units): trade
        #    units between two layers while that gets closer
        live = self._trade(live, allowed, rel)
        self._write(self._shadow)
        betas = self._shadow.clone()
        for i, (g, count) in enumerate(zip(self.gates, live)):
            if int(g.active()) != count:
                betas[i] = _beta_for(g, count)
        betas = betas.float().double()
        self._shadow = betas
        self._write(betas)
        for g, count in zip(self.gates, live):
            if int(g.active()) != count:  # pragma: no cover (a float32 offset on the boundary)
                raise ConfigError(f"budget snap: gate over {g.n} units has {int(g.active())} live, wanted {count}")
        self.frozen = True
        self.pull = 0.0
        self.unreachable = rel(live) > self.target
        return dict(zip(self.width_model.names, live))

    def _trade(self, live: list[int], allowed: list[list[int]], rel) -> list[int]:
        """Trade units between two layers while the cost gets closer to the target from
        below: for a pair (i, j), a nearby count of i (up to 8 allowed steps either way;
        with more than 12 gates one step up) with the most of j that fits. Of the trades landing within half the tolerance, the
        one changing the widths least wins; if none does, the closest."""
        wm, cost = self.width_model, rel(live)
        band = self.target * (1.0 - TOLERANCE / 2)
        n = self._n
        for _ in range(20):
            if cost >= band:
                break
            closest, least = None, None
            for i, values_i in enumerate(allowed):
                at = max(k for k, v in enumerate(values_i) if v <= live[i])
                if len(allowed) <= 12:
                    options = [v for v in values_i[max(0, at - 8):at + 9] if v != live[i]]
                else:  # many gates: their units are fine enough for one step up on i
                    options = values_i[at + 1:at + 2]
                for v in options:
                    for j, values_j in enumerate(allowed):
                        if j == i:
                            continue
                        trials = torch.tensor(live, dtype=torch.float64).repeat(len(values_j), 1)
                        trials[:, i] = v
                        trials[:, j] = torch.tensor(values_j, dtype=torch.float64)
                        costs = wm.relative(trials, self.metric)
                        fits = (costs <= self.target).nonzero().flatten()
                        if not len(fits):
                            continue
                        k = int(fits[costs[fits].argmax()])
                        c = float(costs[k])
                        if c <= cost:
                            continue
                        trial = [int(x) for x in trials[k].tolist()]
                        if closest is None or c > closest[0]:
                            closest = (c, trial)
                        if c >= band:
                            change = float(((trials[k] - torch.tensor(live, dtype=torch.float64)).abs() / n).sum())
                            if least is None or change < least[0]:
                                least = (change, (c, trial))
            if closest is None:
                break
            cost, live = least[1] if least is not None else closest
        return live

    # -- reporting and checkpoints

    def postfix(self) -> str:
        """``"0.512/0.330"``: the model's cost now (relative) / the target, for a progress bar."""
        return f"{self.current():.3f}/{self.target:.3f}"

    def record(self) -> dict:
        """What a per-epoch log line gets: the cost now, the schedule's value and the pull."""
        return {f"{self.metric}_rel": self.current(), f"target_{self.metric}_rel": self.schedule_at(self.t),
                "pull": self.pull}

    def summary(self, reached: float | None = None) -> dict:
        """Target vs reached (``reached``: the compacted model's measured relative cost;
        default the width model's); ``ok`` is within -3% .. +3% of the target."""
        reached = self.current() if reached is None else float(reached)
        within = abs(reached / self.target - 1.0) <= TOLERANCE
        return {"metric": self.metric, "target": self.target, "reached": reached,
                "ok": within and not self.unreachable, "within_tolerance": within, "floor": self.floor,
                "unreachable": self.unreachable, "penalty": self.penalty, "round_to": self.round_to,
                "reach_at": self.reach_at, "reach_step": self.reach, "total_steps": self.total,
                "eta": self.eta, "trace": [list(t) for t in self.trace]}

    def message(self, reached: float | None = None) -> str | None:
        """One line when the target was not reached (None when it was)."""
        s = self.summary(reached)
        if s["ok"]:
            return None
        what = "FLOPs" if self.metric == "flops" else "parameters"
        if self.unreachable:
            return (f"target not reached: {what} {100 * s['reached']:.1f}% of dense, above the target "
                    f"{100 * self.target:.1f}%: the gated layers at one unit each still cost "
                    f"{100 * self.floor:.1f}% (the ungated layers); gate more layers or raise the target")
        return (f"target not reached: {what} {100 * s['reached']:.1f}% of dense against a target of "
                f"{100 * self.target:.1f}% (outside +-{100 * TOLERANCE:.0f}%)")

    def state_dict(self) -> dict:
        cached = None if self._cached is None else [c.tolist() for c in self._cached]
        return {"t": self.t, "pull": self.pull, "frozen": self.frozen, "eta": self.eta, "cached": cached,
                "trace": [list(t) for t in self.trace], "unreachable": self.unreachable}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpointed budget; applied at :meth:`bind` if not bound yet (the
        betas themselves are in the model's state)."""
        if self.bound:
            self._load(state)
        else:
            self._pending = dict(state)

    def _load(self, state: dict) -> None:
        self.t, self.pull, self.frozen = int(state["t"]), float(state["pull"]), bool(state["frozen"])
        self.eta = float(state["eta"])
        self.trace = [tuple(t) for t in state["trace"]]
        self.unreachable = bool(state["unreachable"])
        cached = state.get("cached")
        self._cached = None if cached is None else tuple(torch.tensor(c, dtype=torch.float64) for c in cached)
        self._shadow = self._betas()


def nothing_removed_message(model: nn.Module, cli: bool = False) -> str | None:
    """The one line a lambda-mode run (no target) that removed no unit should print."""
    w = widths(unwrap(model))
    if not w or any(active < total for active, total in w.values()):
        return None
    if cli:
        return "no unit was removed: raise --lam or --beta-lr, or give --target-flops"
    return ("no unit was removed: raise lam or beta_lr, or give a target "
            "(TrainConfig(target_flops=0.33) or torchdam.Budget)")


def warn_if_nothing_removed(model: nn.Module) -> bool:
    """Warn in one line (and return True) when every gate still has all its units."""
    message = nothing_removed_message(model)
    if message is not None:
        warnings.warn(message, stacklevel=2)
    return message is not None


def budget_from_config(config) -> Budget | None:
    """The :class:`Budget` a :class:`torchdam.TrainConfig` asks for (None: lambda mode)."""
    if getattr(config, "target_flops", None) is None and getattr(config, "target_params", None) is None:
        return None
    return Budget(flops=config.target_flops, params=config.target_params, reach_at=config.reach_at,
                  penalty=config.penalty or "cost", round_to=config.round_to)


def check_config(config) -> None:
    """Validate a :class:`torchdam.TrainConfig`'s budget options (no target: lambda mode,
    where only the paper's uniform penalty exists)."""
    if budget_from_config(config) is None:
        if config.penalty not in (None, "uniform"):
            raise ConfigError(f"penalty={config.penalty!r} needs a target (target_flops or target_params); "
                              "without one DAM uses the paper's uniform penalty lam * mean(beta)")
        if config.round_to != ROUND_TO:
            raise ConfigError("round_to needs a target (target_flops or target_params)")


__all__ = ["TOLERANCE", "Budget", "WidthModel", "budget_from_config", "check_config", "live_counts",
           "nothing_removed_message", "warn_if_nothing_removed"]
