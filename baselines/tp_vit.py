"""Torch-Pruning's own transformer pruning (Fang et al., DepGraph, CVPR 2023): train dense,
remove whole attention heads and FFN hidden units with ``tp.pruner.MetaPruner`` to a FLOPs
target, fine-tune.

``strength`` is the FLOPs reduction to reach (dense FLOPs / pruned FLOPs, e.g. 2.0), so the
method can be run at the FLOPs a DAM run reached (matched FLOPs). The pruner is configured
as Torch-Pruning's ViT examples configure it for head pruning
(``examples/transformers/prune_timm_vit.py``, ``prune_hf_vit.py``): ``num_heads`` of every
q/k/v projection, ``prune_num_heads=True`` and ``prune_head_dims=False`` (remove whole heads,
as DAM does), an importance of its own (``GroupMagnitudeImportance()``: group L2 norm,
mean-normalised per group, its default), and only the blocks' inner dimensions pruned (the
examples' "bottleneck" mode): every Linear/Conv that is not a q/k/v projection of a gated
attention module or an FFN first layer is in ``ignored_layers``, so the residual stream
(hidden size), the patch embedding and the head keep their width, as in DAM, which does not
narrow the stream either. The units are those :func:`torchdam.attach` gates (heads and
``linear1``; :func:`torchdam.attach.plan` finds them), so both methods prune the same things.

Two adaptations, both needed to run Torch-Pruning on this model at all:

* Torch-Pruning's ``nn.MultiheadAttention`` rule prunes its ``embed_dim`` (the model's hidden
  size), not heads: heads are pruned through separate q/k/v ``nn.Linear`` layers. Every
  attention module is therefore first rewritten as torchdam's
  :class:`~torchdam.attention.PrunedMultiheadAttention` with all heads kept (separate
  projections, identical outputs); after pruning, one that kept all its heads becomes an
  ``nn.MultiheadAttention`` again, as in a DAM-compacted model (so the two run the same
  module types and their latencies compare).
* To reach a FLOPs target the pruner runs one-shot (``global_pruning=True``) with
  ``head_pruning_ratio`` and ``pruning_ratio`` (FFN units) chosen by :func:`search_ratio`:
  the smallest common ratio meeting the target, then the FFN ratio lowered until the FLOPs
  (:func:`torchdam.count`) are just at or below the target, so Torch-Pruning never gets
  more FLOPs than the model it is matched to, and not much fewer. Global, because with
  local ranking Torch-Pruning removes ``ceil(r * heads)`` heads per layer: with 3 heads any
  ``r > 0`` removes one from every layer. Torch-Pruning's own benchmark reaches a speed-up
  by many small iterative steps instead; its local head count per step (``ceil`` of the
  ratio times the heads left) would remove a head per layer at every step.

Where the global head ranking selects every head of a layer, Torch-Pruning refuses that
layer's group (the layer keeps all its heads), so past some ratio the heads cannot follow
the common ratio; :func:`search_ratio` then removes as many heads as Torch-Pruning applies
in full and the rest of the FLOPs from the FFN units. A target it cannot reach raises
:class:`NotApplicableError`.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch_pruning as tp
from torch import nn

from baselines import dense
from baselines.common import NotApplicableError, Result, Setup, Trained, finetune, finish, find_sites, test_accuracy
from torchdam.attention import PrunedMultiheadAttention
from torchdam.count import count
from torchdam.errors import ConfigError

#: common ratios tried first (0, 0.01, ..., 0.95); then the FFN ratio is bisected
GRID = tuple(i / 100 for i in range(96))
BISECTION_STEPS = 12


def split_attention(model: nn.Module, only: list[str] | None = None) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (or those named in ``only``), in
    place, by a :class:`PrunedMultiheadAttention` keeping all heads; returns their names."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.MultiheadAttention and (only is None or n in only)]
    for name in names:
        mha = model.get_submodule(name)
        model.set_submodule(name, PrunedMultiheadAttention(mha, list(range(mha.num_heads))))
    return names


def as_multihead_attention(p: PrunedMultiheadAttention) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` computing what ``p`` computes (``p`` kept every head)."""
    w = p.q_proj.weight
    mha = nn.MultiheadAttention(p.embed_dim, p.num_heads, dropout=p.dropout, bias=p.q_proj.bias is not None,
                                batch_first=p.batch_first, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([p.q_proj.weight, p.k_proj.weight, p.v_proj.weight]))
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.copy_(torch.cat([p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]))
        mha.out_proj.weight.copy_(p.out_proj.weight)
        if mha.out_proj.bias is not None:
            mha.out_proj.bias.copy_(p.out_proj.bias)
    return mha.train(p.training)


def _kept_heads(before: torch.Tensor, after: torch.Tensor, head_dim: int) -> list[int]:
    """Original indices of the heads whose q rows ``after`` still holds."""
    old, new = before.view(-1, head_dim, before.shape[1]), after.view(-1, head_dim, after.shape[1])
    return [next(i for i in range(old.shape[0]) if torch.equal(old[i], block)) for block in new]


def prune(model: nn.Module, ratio: float, head_ratio: float, setup: Setup, attention: list[str],
          units: list[str], importance: tp.importance.Importance | None = None) -> nn.Module:
    """A pruned copy of ``model`` (its attention already split): Torch-Pruning removes
    ``ratio`` of the FFN units named in ``units`` and ``head_ratio`` of the heads (each
    ranked globally)."""
    model = copy.deepcopy(model).eval()
    attn = {name: model.get_submodule(name) for name in attention}
    keep = {model.get_submodule(name) for name in units}
    num_heads = {}
    for a in attn.values():
        for proj in (a.q_proj, a.k_proj, a.v_proj):
            num_heads[proj] = a.num_heads
            keep.add(proj)
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m not in keep]
    q_before = {name: a.q_proj.weight.detach().clone() for name, a in attn.items()}
    with warnings.catch_warnings():
        # cls token / position embedding: parameters of the stream, which is not pruned here
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(
            model, setup.examples()[:1], importance=importance or tp.importance.GroupMagnitudeImportance(),
            global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio)
        pruner.step()
    for name, a in attn.items():
        # from the weights: Torch-Pruning's own count (pruner.num_heads) is decremented even
        # when it refuses a group (one that would remove every head of a layer)
        a.num_heads = a.q_proj.out_features // a.head_dim
        a.kept_heads = _kept_heads(q_before[name], a.q_proj.weight.detach(), a.head_dim)
        if a.num_heads == a.total_heads:
            model.set_submodule(name, as_multihead_attention(a))
    return model


def heads_removed_as_asked(model: nn.Module, attention: list[str], total: int, head_ratio: float) -> bool:
    """Whether Torch-Pruning removed as many heads as ``head_ratio`` asks (global ranking:
    ``total - int(total * (1 - head_ratio))``): it refuses an attention group whose every
    head the ranking selects, and that layer then keeps all its heads."""
    kept = sum(int(model.get_submodule(name).num_heads) for name in attention)
    return total - kept == total - int(total * (1 - head_ratio))


def search_ratio(base: nn.Module, target: float, setup: Setup, attention: list[str], units: list[str],
                 importance: tp.importance.Importance | None = None) -> tuple[float, float, nn.Module]:
    """``(FFN ratio, head ratio, pruned model)`` with at most ``target`` FLOPs per sample.

    1. The smallest common ratio ``r`` (heads and FFN units alike), scanned on :data:`GRID`,
       whose model meets the target with every head the ratio asks for removed (where the
       global head ranking selects every head of a layer, Torch-Pruning refuses that
       layer's group and it keeps all its heads; FLOPs then stop falling with ``r``).
    1b. If there is none: the heads at the largest grid ratio Torch-Pruning applies in full
       (the nearest it allows to a common ratio), with ``GRID[-1]`` of the FFN units removed.
    2. A head is a large step in FLOPs (3.5% of vit-tiny's each), so the model may be well
       below the target; the heads stay as chosen and the FFN ratio is lowered by bisection
       to the smallest one still meeting the target, so the FLOPs match to about one FFN
       unit's."""
    sample = setup.sample()
    total = sum(int(base.get_submodule(name).num_heads) for name in attention)

    def attempt(ratio: float, head_ratio: float) -> tuple[nn.Module, bool, bool]:
        model = prune(base, ratio, head_ratio, setup, attention, units, importance)
        in_full = heads_removed_as_asked(model, attention, total, head_ratio)
        return model, count(model, sample)["flops"] <= target, in_full

    found = next(((r, r) for r in GRID if all(attempt(r, r)[1:])), None)  # 1.
    if found is None:  # 1b.
        head_ratio = max(h for h in GRID if attempt(GRID[-1], h)[2])
        if attempt(GRID[-1], head_ratio)[1]:
            found = GRID[-1], head_ratio
    if found is None:
        raise NotApplicableError(
            f"Torch-Pruning reaches no model with at most {target:,.0f} FLOPs at pruning ratios up to "
            f"{GRID[-1]} (where its global head ranking selects every head of a layer, it keeps all "
            "that layer's heads)")
    hi, head_ratio = found
    model, ok, _ = attempt(0.0, head_ratio)  # 2.
    if ok:
        return 0.0, head_ratio, model
    model, lo = attempt(hi, head_ratio)[0], 0.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        candidate, ok, _ = attempt(mid, head_ratio)
        if ok:
            hi, model = mid, candidate
        else:
            lo = mid
    return hi, head_ratio, model


def widths(model: nn.Module, sites: dict) -> dict[str, tuple[int, int]]:
    """``{site: (kept, total)}``: heads of attention sites, units of the others."""
    out = {}
    for name, site in sites.items():
        module = model.get_submodule(name)
        if site.kind == "heads":
            out[name] = (int(module.num_heads), site.units)
        else:
            out[name] = (int(getattr(module, "out_features", getattr(module, "out_channels", 0))), site.units)
    return out


def run(setup: Setup, strength: float, *, pretrained: Trained | None = None,
        importance: tp.importance.Importance | None = None, target_flops: float | None = None) -> Result:
    """Prune to ``dense FLOPs / strength`` FLOPs per sample (or, given ``target_flops``, to
    that fraction of the dense FLOPs, as the other methods' target mode), then fine-tune.
    ``pretrained``: a :func:`baselines.dense.train` result to prune instead of training anew."""
    if target_flops is not None:
        if not 0 < target_flops <= 1:
            raise ConfigError(f"tp_vit's target_flops is a fraction of the dense FLOPs in (0, 1], got {target_flops}")
        strength = 1.0 / target_flops
    if not strength >= 1:
        raise ConfigError(f"tp_vit's strength is a FLOPs reduction (>= 1), got {strength}")
    trained = pretrained if pretrained is not None else dense.train(setup)
    sites = find_sites(trained.model, setup)
    units = [n for n, s in sites.items() if s.kind == "units"]
    base = copy.deepcopy(trained.model).cpu().eval()
    attention = split_attention(base, [n for n, s in sites.items() if s.kind == "heads"])
    if not attention and not units:
        raise NotApplicableError(f"{setup.model_name} has no attention module or FFN layer to prune")
    sample = setup.sample()
    dense_flops = count(setup.build(), sample)["flops"]
    target = dense_flops / strength
    ratio, head_ratio, small = search_ratio(base, target, setup, attention, units, importance)
    small = small.to(setup.device)
    before = test_accuracy(trained.trainer, small, setup)
    tuned = finetune(small, setup)
    stages = [trained] if tuned is None else [trained, tuned]
    goal = {"target_flops": target_flops, "reached_flops": count(small.cpu(), sample)["flops"] / dense_flops} \
        if target_flops is not None else {"target_flops": target}
    return finish("tp_vit", target_flops if target_flops is not None else strength, small.cpu(), stages, setup,
                  widths(small, sites), pruning_ratio=ratio, head_pruning_ratio=head_ratio, **goal,
                  test_acc_before_finetune=before,
                  reused_pretrained=pretrained is not None)
