"""Torch-Pruning's head + FFN pruning (baselines/tp_vit.py) on a tiny ViT: it reaches FLOPs
targets from below, removes whole heads and FFN units only, and its model is measured like
every other method's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines import BASELINES, NotApplicableError, Setup, dense, tp_vit
from torchdam.attention import PrunedMultiheadAttention
from torchdam.count import count
from torchdam.models import VisionTransformer
from torchdam.train import TrainConfig

from tiny_task import one_thread, tiny_splits  # noqa: F401 (one_thread: autouse fixture)

SITES = [f"encoder.layers.{i}.{n}" for i in range(2) for n in ("self_attn", "linear1")]


def tiny_vit() -> nn.Module:
    # 8x8 inputs in 2x2 patches: 17 tokens of width 24, 2 blocks of 3 heads, FFN 48
    return VisionTransformer(image_size=8, patch_size=2, in_channels=3, num_classes=4, dim=24, depth=2, heads=3)


@pytest.fixture(scope="module")
def trained():
    setup = Setup(tiny_vit, tiny_splits(), TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-3,
                                                       progress=False), finetune_epochs=1)
    return setup, dense.train(setup)


def test_split_attention_and_back_compute_the_same() -> None:
    model = tiny_vit().eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert tp_vit.split_attention(model) == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
        assert isinstance(model.encoder.layers[0].self_attn, PrunedMultiheadAttention)
        assert torch.allclose(model(x), ref, atol=1e-6)
        model.encoder.layers[0].self_attn = tp_vit.as_multihead_attention(model.encoder.layers[0].self_attn)
        assert torch.allclose(model(x), ref, atol=1e-6)


@pytest.mark.parametrize("strength", [1.0, 1.5, 2.5])
def test_reaches_the_flops_target_from_below_and_prunes_heads_and_ffn_only(trained, strength: float) -> None:
    setup, pre = trained
    before = {k: v.clone() for k, v in pre.model.state_dict().items()}
    result = BASELINES.get("tp_vit")(setup, strength, pretrained=pre)
    assert all(torch.equal(before[k], v) for k, v in pre.model.state_dict().items())  # dense run reused intact
    assert result.method == "tp_vit" and list(result.widths) == SITES
    assert count(result.model, setup.sample()) == {"params": result.params, "flops": result.flops}
    assert result.flops <= result.extra["target_flops"] == pytest.approx(result.dense_flops / strength)
    # matched: at most one FFN unit's FLOPs of one block below the target (or exactly dense at 1.0)
    assert result.flops >= result.extra["target_flops"] - 2 * 2 * 17 * 24
    assert result.epochs_total == 2 and result.extra["reused_pretrained"]
    model = result.model
    assert model.patch_embed.proj.out_channels == 24 and model.head.in_features == 24  # stream kept
    for i, layer in enumerate(model.encoder.layers):
        heads, _ = result.widths[f"encoder.layers.{i}.self_attn"]
        assert layer.linear1.out_features == result.widths[f"encoder.layers.{i}.linear1"][0]
        assert layer.linear2.out_features == 24
        attn = layer.self_attn
        if heads == 3:  # every head kept: an nn.MultiheadAttention again, as in a DAM-compacted model
            assert isinstance(attn, nn.MultiheadAttention)
        else:
            assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == heads >= 1
            assert attn.head_dim == 8 and attn.q_proj.out_features == 8 * heads
            assert len(attn.kept_heads) == heads and set(attn.kept_heads) <= {0, 1, 2}
    if strength == 1.0:
        assert result.flops == result.dense_flops and result.extra["pruning_ratio"] == 0.0
    else:
        assert sum(k for k, _ in result.widths.values()) < sum(t for _, t in result.widths.values())
    x = setup.splits.test.tensors[0][:8]
    with torch.no_grad():
        assert model(x).shape == (8, 4)


def test_kept_heads_follow_the_q_rows() -> None:
    before = torch.arange(3 * 2 * 4, dtype=torch.float).view(6, 4)
    assert tp_vit._kept_heads(before, before[2:], head_dim=2) == [1, 2]
    assert tp_vit._kept_heads(before, torch.cat([before[:2], before[4:]]), head_dim=2) == [0, 2]


def test_strength_is_a_flops_reduction(trained) -> None:
    setup, pre = trained
    with pytest.raises(Exception, match="FLOPs reduction"):
        tp_vit.run(setup, 0.5, pretrained=pre)
    with pytest.raises(NotApplicableError, match="reaches no model"):
        tp_vit.run(setup, 1000.0, pretrained=pre)


def test_target_mode_takes_a_fraction_of_the_dense_flops(trained) -> None:
    """--targets mode: the same pruning given ``target_flops`` (a fraction), recorded as the
    fraction and the reached fraction, like the other methods' target rows."""
    setup, pre = trained
    result = tp_vit.run(setup, 0.0, pretrained=pre, target_flops=0.5)
    assert result.strength == 0.5 and result.extra["target_flops"] == 0.5
    assert result.extra["reached_flops"] == pytest.approx(result.flops / result.dense_flops)
    assert 0.5 * 0.97 <= result.extra["reached_flops"] <= 0.5
    with pytest.raises(Exception, match="fraction of the dense FLOPs"):
        tp_vit.run(setup, 0.0, pretrained=pre, target_flops=2.0)
