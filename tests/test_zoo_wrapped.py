"""Models as people hold them when they reach torchdam: weights under a reparametrization
(``weight_norm``/``spectral_norm`` parametrizations as in audio and GAN code, the older
pre-hook ``weight_norm``, ``torch.nn.utils.prune`` masks); models inside a
``torch.compile``, ``DataParallel`` or ``AveragedModel`` (EMA) wrapper, deep copies, a gated
backbone later put inside a larger model, an FX-traced ``GraphModule``; activation
checkpointing in forward. Each must attach, train, compact exactly and leave the user's
model as it was."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_zoo_cnn import FAMILIES, assert_same_outputs, train_steps
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils.checkpoint import checkpoint
from zoo_checks import assert_no_dam_state, assert_save_load_round_trip

import torchdam as dam
from torchdam.budget import WidthModel, live_counts
from torchdam.calling import call

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _each_layer(fn):
    def apply(model: nn.Module) -> nn.Module:
        for module in list(model.modules()):
            if isinstance(module, LAYERS):
                fn(module)
        return model
    return apply


def _legacy_weight_norm(module: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in torch, still common in audio code
        torch.nn.utils.weight_norm(module)


REPARAMETRIZE = {
    "weight_norm": _each_layer(parametrizations.weight_norm),
    "spectral_norm": _each_layer(parametrizations.spectral_norm),
    "legacy_weight_norm": _each_layer(_legacy_weight_norm),
    "pruning_mask": _each_layer(lambda m: prune.l1_unstructured(m, "weight", amount=0.3)),
}


def reparametrized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module) or any(
        isinstance(h, (WeightNorm, prune.BasePruningMethod)) for h in module._forward_pre_hooks.values())


@pytest.mark.parametrize("family", ["resnet18", "mobilenet_v2", "audio_conv1d", "lstm_classifier"])
@pytest.mark.parametrize("how", list(REPARAMETRIZE))
def test_reparametrized_weights_compact_exactly_and_stay_reparametrized(family, how, tmp_path):
    fam = FAMILIES[family]
    torch.manual_seed(0)
    model = REPARAMETRIZE[how](fam.make())
    wrapped = [name for name, m in model.named_modules() if reparametrized(m)]
    gates = dam.attach(model)
    assert list(gates) == list(dam.attach(fam.make()))  # the same layers as without (output layer too)
    train_steps(model, fam.inputs, lam=fam.lam)
    for g in gates.values():
        g.beta.data.fill_(-2.0)
    gen = torch.Generator().manual_seed(1)
    example, fresh = fam.inputs(4, gen), fam.inputs(3, gen)
    model.eval()
    with torch.no_grad():
        before = call(model, fresh)
        small = dam.compact(model, example)
    assert_same_outputs(model, small, fresh)
    assert dam.count(small, fresh)["flops"] < dam.count(model, fresh)["flops"]
    assert not any(reparametrized(m) for m in small.modules())  # plain weights: what was folded stays
    assert_no_dam_state(small)
    assert_save_load_round_trip(small, fam.inputs(5, gen), tmp_path / "small")
    # the user's model is as it was: reparametrized, same outputs, still trains
    assert [name for name, m in model.named_modules() if reparametrized(m)] == wrapped
    with torch.no_grad():
        assert torch.equal(call(model, fresh), before)
    train_steps(model, fam.inputs, steps=1, lam=fam.lam)


def test_width_model_prices_a_weight_normed_model_as_compacted():
    fam = FAMILIES["resnet18"]
    torch.manual_seed(0)
    model = REPARAMETRIZE["weight_norm"](fam.make())
    gates = dam.attach(model)
    x = fam.inputs(2, torch.Generator().manual_seed(0))
    wm = WidthModel(model, x)
    for i, g in enumerate(gates.values()):
        g.beta.data.fill_(-1.0 - (i % 3))
    real = dam.count(dam.compact(model, x), x[:1])
    for metric in ("flops", "params"):
        assert abs(float(wm.cost(live_counts(model), metric)) / real[metric] - 1) < 0.01, metric


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["torch.compile", "DataParallel"])
def test_a_wrapped_model_is_gated_and_compacted_as_the_model_inside(wrap):
    torch.manual_seed(0)
    inner = mlp()
    model = wrap(inner)
    gates = dam.attach(model)
    assert list(gates) == ["0", "2"]  # the user's names, not "_orig_mod.0" / "module.0"
    assert all(getattr(inner[int(n)], "dam_gate") is g for n, g in gates.items())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = F.mse_loss(model(torch.randn(8, 10)), torch.randn(8, 3)) + dam.penalty(model, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(g.beta.grad is not None for g in gates.values())
    for g in gates.values():
        g.beta.data.fill_(-2.0)
    assert set(dam.widths(model)) == {"0", "2"}
    with torch.no_grad():
        small = dam.compact(model, torch.randn(4, 10))
    assert isinstance(small, nn.Sequential) and small[0].out_features == dam.widths(model)["0"][0] < 32
    assert_same_outputs(inner, small, torch.randn(3, 10))
    assert dam.count(small, torch.randn(1, 10))["flops"] < dam.count(model, torch.randn(1, 10))["flops"]


def test_an_averaged_model_compacts_to_the_model_it_averages():
    torch.manual_seed(0)
    model = mlp()
    dam.attach(model)
    ema = torch.optim.swa_utils.AveragedModel(model)  # torch's EMA/SWA: a deep copy inside
    for _, g in dam.named_gates(model):
        g.beta.data.fill_(-2.0)
    ema.update_parameters(model)
    assert dam.widths(ema) == dam.widths(model) and set(dam.widths(ema)) == {"0", "2"}
    with torch.no_grad():
        small = dam.compact(ema, torch.randn(4, 10))
    assert isinstance(small, nn.Sequential) and small[0].out_features < 32
    assert_same_outputs(ema.module, small, torch.randn(3, 10))


def test_a_copy_of_a_gated_model_uses_its_own_gates():
    torch.manual_seed(0)
    model = FAMILIES["resnet18"].make()
    dam.attach(model)
    copied = copy.deepcopy(model)  # an EMA teacher, a checkpointed best model, ...
    for _, g in dam.named_gates(copied):
        g.beta.data.fill_(-2.0)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), copied.eval()
    with torch.no_grad():
        assert not torch.equal(model(x), copied(x))
        small = dam.compact(copied, x)
    assert all(g.beta.item() == 1.0 for _, g in dam.named_gates(model))
    assert_same_outputs(copied, small, x)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(16, 12)

    def forward(self, x):
        return self.proj(self.body(self.stem(x)))


def test_a_gated_backbone_inside_a_larger_model_is_named_where_it_sits():
    torch.manual_seed(0)
    backbone = Backbone()
    gates = dam.attach(backbone, include_output=True)  # gated on its own, the gate of stem.0 on stem.1 (BN)
    assert list(gates) == ["stem.0", "body.0", "proj"]
    full = nn.Sequential(nn.Identity(), backbone, nn.ReLU(), nn.Linear(12, 3))  # then given a head
    assert list(dam.widths(full)) == ["1.stem.0", "1.body.0", "1.proj"]
    for g in gates.values():
        g.beta.data.fill_(-2.0)
    with torch.no_grad():
        small = dam.compact(full, torch.randn(4, 3, 8, 8))
    assert small[1].stem[0].out_channels == small[1].stem[1].num_features == dam.widths(full)["1.stem.0"][0] < 8
    assert small[3].in_features == dam.widths(full)["1.proj"][0] < 12
    assert_same_outputs(full, small, torch.randn(3, 3, 8, 8))


class Checkpointed(nn.Module):
    """Activation checkpointing in forward whatever the mode, torch's default (reentrant) kind."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def block(self, x):
        return F.relu(self.b(F.relu(self.a(x))))

    def forward(self, x):
        return self.head(checkpoint(self.block, x, use_reentrant=True))


def test_reentrant_activation_checkpointing_is_traced_through():
    torch.manual_seed(0)
    model = Checkpointed()
    gates = dam.attach(model)
    x = torch.randn(4, 10, requires_grad=True)  # reentrant checkpointing needs an input requiring grad
    (model(x).square().mean() + dam.penalty(model, 1.0)).backward()
    assert all(g.beta.grad is not None for g in gates.values())
    for g in gates.values():
        g.beta.data.fill_(-2.0)
    small = dam.compact(model, torch.randn(4, 10))
    assert small.a.out_features == small.b.in_features < 32 and small.b.out_features == small.head.in_features < 32
    assert_same_outputs(model, small, torch.randn(3, 10))


def test_an_fx_traced_model_compacts():
    torch.manual_seed(0)
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                                                   nn.Flatten(), nn.Linear(8 * 4 * 4, 3)))
    gates = dam.attach(traced)
    for g in gates.values():
        g.beta.data.fill_(-2.0)
    small = dam.compact(traced, torch.randn(2, 3, 8, 8))
    assert isinstance(small, torch.fx.GraphModule) and small.get_submodule("5").in_features < 8 * 4 * 4
    assert_same_outputs(traced, small, torch.randn(3, 3, 8, 8))


def _lora_llama(**options):
    T = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, **options))


def test_a_lora_fine_tune_prunes_through_its_adapters():
    """peft's LoRA Linear is one layer (base rows + lora_B rows out, base + lora_A columns in):
    the frozen base and the adapters shrink together, heads included, exactly; the width model
    prices it as compact gives it."""
    from torchdam.budget import WidthModel, _beta_for

    lora = _lora_llama()
    gates = dam.attach(lora)
    inner = "base_model.model.model.layers.0"
    assert f"{inner}.self_attn" in gates and f"{inner}.mlp.up_proj" in gates
    ids = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    out = lora(input_ids=ids).logits
    (out.square().mean() + dam.penalty(lora, 1.0)).backward()
    grads = {n: p.grad for n, p in lora.named_parameters()}
    assert any(g is not None for n, g in grads.items() if "lora_A" in n)
    assert all(g is None for n, g in grads.items() if "base_layer" in n)  # LoRA's base stays frozen
    wm = WidthModel(lora, {"input_ids": ids})
    live = [max(1, g.n // 3) for _, g in dam.named_gates(lora)]
    with torch.no_grad():
        for (_, g), count in zip(dam.named_gates(lora), live):
            g.beta.fill_(_beta_for(g, count))
    lora.eval()
    with torch.no_grad():
        small = dam.compact(lora, {"input_ids": ids})
        assert torch.allclose(small(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5)
    q = small.get_submodule(f"{inner}.self_attn.q_proj")
    assert q.out_features == q.base_layer.out_features == q.lora_B["default"].out_features == 16  # 1 of 2 kv groups
    up = small.get_submodule(f"{inner}.mlp.up_proj")
    assert up.out_features == up.lora_B["default"].out_features == 21
    assert small.get_submodule(f"{inner}.mlp.down_proj").lora_A["default"].in_features == 21
    one = {"input_ids": ids[:1]}
    for metric in ("flops", "params"):
        said = float(wm.cost(torch.tensor(live, dtype=torch.float64), metric))
        assert said == pytest.approx(dam.count(small, one)[metric], rel=1e-9), metric


def test_a_lora_variant_with_state_per_unit_is_refused_by_name():
    """DoRA keeps a magnitude per output unit: refused, naming the layer, when selected; by
    default its layers (and the heads they project) are left whole, and said so."""
    lora = _lora_llama(use_dora=True)
    name = "base_model.model.model.layers.0.mlp.up_proj"
    with pytest.raises(dam.AttachError, match=f"'{name}'.*DoRA"):
        dam.attach(lora, layers=(name,))
    with pytest.raises(dam.AttachError, match=r"its LoRA layers cannot be gated \('base_model.*DoRA") as err:
        dam.attach(lora)
    assert "\n" not in str(err.value)
