"""The model zoo: every registered model builds, runs and has the paper's size."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdam as dam
from torchdam.attach import plan
from torchdam.attention import PrunedMultiheadAttention
from torchdam.errors import ConfigError
from torchdam.models import MODELS, BasicBlock, PreActBottleneck, build_model

# name -> (build kwargs, input shape (C, H, W), exact parameter count for 10 classes)
CASES = {
    "mlp": ({}, (1, 28, 28), 269_322),
    "lenet300": ({}, (1, 28, 28), 266_610),
    "lenet5": ({}, (1, 28, 28), 61_706),
    "resnet20": ({}, (3, 32, 32), 272_474),  # 0.27M; option-B shortcuts add 2,752
    "resnet56": ({}, (3, 32, 32), 855_770),  # 0.85M
    "preresnet": ({"depth": 20}, (3, 32, 32), 219_482),
    "preresnet164": ({}, (3, 32, 32), 1_703_258),  # 1.7M
    "vit-tiny": ({}, (3, 32, 32), 311_338),  # 0.31M: dim 96, depth 4, 3 heads, MLP 192
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_is_covered() -> None:
    assert sorted(CASES) == MODELS.names()


@pytest.mark.parametrize("name", sorted(CASES))
def test_builds_runs_and_has_expected_size(name: str) -> None:
    kwargs, shape, params = CASES[name]
    model = build_model(name, **kwargs).eval()
    assert n_params(model) == params
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mlp", "lenet300", "lenet5", "resnet20", "vit-tiny"])
def test_uniform_keywords(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=7, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_lenet5_flatten_size_follows_image_size() -> None:
    assert build_model("lenet5").classifier[1].in_features == 16 * 5 * 5
    assert build_model("lenet5", in_channels=3, image_size=32).classifier[1].in_features == 16 * 6 * 6


def test_mlp_hidden_widths() -> None:
    model = build_model("mlp", hidden=(32,))
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [32, 10]


@pytest.mark.parametrize("name", sorted(CASES))
def test_head_is_the_last_weight_layer(name: str) -> None:
    # attach() leaves the head ungated by taking the last registered Linear/Conv2d.
    layers = [m for m in build_model(name, **CASES[name][0]).modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 10


@pytest.mark.parametrize("depth", [0, 21, 163, 165])
def test_bad_preresnet_depth_raises(depth: int) -> None:
    with pytest.raises(ConfigError, match="9n\\+2"):
        build_model("preresnet", depth=depth)


def test_unknown_model_and_option_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="resnet56"):
        build_model("resnet57")
    with pytest.raises(ConfigError, match="widht"):
        build_model("lenet300", widht=3)


def _next_sibling(parent: nn.Module, name: str) -> str | None:
    names = [n for n, _ in parent.named_children()]
    i = names.index(name)
    return names[i + 1] if i + 1 < len(names) else None


def test_resnet_block_order_pairs_each_conv_with_its_bn() -> None:
    model = build_model("resnet20")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    for block in blocks:
        assert [n for n, _ in block.named_children()] == ["conv1", "bn1", "conv2", "bn2", "shortcut"]
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
            assert _next_sibling(block, conv) == bn
            assert getattr(block, bn).num_features == getattr(block, conv).out_channels
        if isinstance(block.shortcut, nn.Sequential):  # option B: conv then its BN
            sc_conv, sc_bn = block.shortcut
            assert isinstance(sc_conv, nn.Conv2d) and isinstance(sc_bn, nn.BatchNorm2d)
    assert sum(isinstance(b.shortcut, nn.Sequential) for b in blocks) == 2
    assert [n for n, _ in model.named_children()][-1] == "fc"


def test_preresnet_block_order() -> None:
    model = build_model("preresnet", depth=20)
    blocks = [m for m in model.modules() if isinstance(m, PreActBottleneck)]
    assert len(blocks) == 6
    for block in blocks:
        assert [n for n, _ in block.named_children()] == [
            "bn1", "conv1", "bn2", "conv2", "bn3", "conv3", "downsample"
        ]
        for conv, bn in (("conv1", "bn2"), ("conv2", "bn3")):
            assert _next_sibling(block, conv) == bn
            assert getattr(block, bn).num_features == getattr(block, conv).out_channels
    downsamples = [b.downsample for b in blocks if isinstance(b.downsample, nn.Conv2d)]
    assert len(downsamples) == 3  # first block of each stage: 16->64, 64->128, 128->256
    assert [n for n, _ in model.named_children()][-1] == "fc"


def test_preresnet164_depth() -> None:
    blocks = [m for m in build_model("preresnet164").modules() if isinstance(m, PreActBottleneck)]
    assert len(blocks) == 54  # (164 - 2) / 9 = 18 per stage


def test_backward_reaches_every_parameter() -> None:
    model = build_model("preresnet", depth=11)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------ vit-tiny

VIT_SITES = [f"encoder.layers.{i}.{layer}" for i in range(4) for layer in ("self_attn", "linear1")]


def test_vit_tiny_on_mnist_and_cifar_sizes() -> None:
    for channels, size, patches in ((1, 28, 49), (3, 32, 64)):
        model = build_model("vit-tiny", in_channels=channels, num_classes=10, image_size=size).eval()
        assert model.pos_embed.shape == (1, patches + 1, 96)
        with torch.no_grad():
            assert model(torch.randn(2, channels, size, size)).shape == (2, 10)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        build_model("vit-tiny", image_size=30)


def test_vit_tiny_blocks_start_from_different_weights() -> None:
    # nn.TransformerEncoder deep-copies one layer; the model re-initialises each block
    layers = build_model("vit-tiny").encoder.layers
    assert not torch.equal(layers[0].linear1.weight, layers[1].linear1.weight)
    assert not torch.equal(layers[0].self_attn.in_proj_weight, layers[1].self_attn.in_proj_weight)


def test_vit_tiny_default_attach_gates_heads_and_ffn_units_only() -> None:
    model = build_model("vit-tiny")
    sites = plan(model)
    assert list(sites) == VIT_SITES
    assert {(s.kind, s.units) for s in sites.values()} == {("heads", 3), ("units", 192)}
    # the CLI's default selectors (--layers linear conv) gate the same: the patch embedding
    # conv and linear2 write the residual stream, the head is the output layer
    assert plan(model, (nn.Linear, nn.Conv2d)) == sites
    gates = dam.attach(model)
    assert list(gates) == VIT_SITES
    assert dam.widths(model)["encoder.layers.0.self_attn"] == (3, 3)
    for name in ("patch_embed.proj", "encoder.layers.0.linear2", "head"):
        assert not hasattr(model.get_submodule(name), "dam_gate")
    # named explicitly, the patch embedding can still be gated
    assert "patch_embed.proj" in plan(build_model("vit-tiny"), ("patch_embed.proj",))


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_vit_tiny_compacts_exactly_and_counts_fewer_flops(channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model("vit-tiny", in_channels=channels, num_classes=10, image_size=size)
    x = torch.randn(8, channels, size, size)
    dense = dam.count(model, x[:1])
    gates = dam.attach(model)
    with torch.no_grad():  # layer 0 loses a head (beta < 0), every FFN loses its first 40%
        for name, gate in gates.items():
            gate.beta.fill_(-1.0 if name == "encoder.layers.0.self_attn" else (2.0 if "attn" in name else -2.0))
    assert dam.widths(model)["encoder.layers.0.self_attn"] == (2, 3)
    assert dam.widths(model)["encoder.layers.1.linear1"] == (115, 192)
    model.eval()
    small = dam.compact(model, x)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-5)
    layers = small.encoder.layers
    assert isinstance(layers[0].self_attn, PrunedMultiheadAttention) and layers[0].self_attn.num_heads == 2
    assert isinstance(layers[1].self_attn, nn.MultiheadAttention)  # all heads kept: unchanged
    assert [l.linear1.out_features for l in layers] == [115] * 4
    assert small.patch_embed.proj.out_channels == small.norm.normalized_shape[0] == 96  # stream not narrowed
    after = dam.count(small, x[:1])
    assert after["params"] < dense["params"] and after["flops"] < dense["flops"]


def test_vit_tiny_flop_count_covers_attention() -> None:
    # 65 tokens of width 96, 4 blocks: q/k/v/out projections, QK^T and AV, the FFN (192),
    # plus the patch embedding and head; norms, softmax and GELU add the rest (under 1%)
    tokens, d, ffn = 65, 96, 192
    block = 2 * tokens * d * 4 * d + 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * d * ffn
    matmuls = 4 * block + 2 * 64 * 48 * d + 2 * d * 10
    flops = dam.count(build_model("vit-tiny"), torch.randn(1, 3, 32, 32))["flops"]
    assert matmuls < flops < 1.01 * matmuls
