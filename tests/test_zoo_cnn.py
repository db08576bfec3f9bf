"""Compaction of CNN / RNN / LM / recommender families and hand-written transformers
(nanoGPT's fused qkv with SDPA and a tied head, timm's ViT attention, MLP-Mixer) a new user
would bring, written from scratch here (not the project's zoo): default ``attach``, a few real training steps with the
penalty, mixed live/dead gates, ``compact`` under ``torch.no_grad()``, then the compacted
model must equal the gated one on a fresh input, be strictly smaller in FLOPs and
parameters, carry no DAM state, round-trip ``torchdam.save``/``load`` exactly and export to
ONNX (``tests/zoo_checks.py``)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from zoo_checks import (
    OnnxLimitation,
    assert_no_dam_state,
    assert_onnx_export,
    assert_save_load_round_trip,
)

import torchdam as dam
from torchdam import AttachError, CompactionError, TorchDAMError
from torchdam.calling import call
from torchdam.compact import ScatterUnits, check_equivalent, default_rtol

# ------------------------------------------------------------------ families (from scratch)

def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type = nn.ReLU6) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: nested Sequential (conv, BN, act)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual add."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [conv_bn_act(cin, hidden, 1)]
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2ish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 8, 3, 2),
            InvertedResidual(8, 8, 1, 1),      # expand 1: the depthwise conv reads the stem
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),    # residual
            conv_bn_act(12, 32, 1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise, channels-last LayerNorm, Linear MLP, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(0.5 * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtGNBlock(nn.Module):
    """ConvNeXt block with GroupNorm(1) (layer norm over C, H, W) and 1x1 conv MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.GroupNorm(1, dim)
        self.pw1 = nn.Conv2d(dim, 4 * dim, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.dwconv(x)))))


class LayerNorm2d(nn.Module):
    """ConvNeXt's own channels-first LayerNorm, written with tensor ops (no nn.LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtish(nn.Module):
    def __init__(self, classes: int = 10, dims: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        self.stage1 = ConvNeXtBlock(dims[0])
        self.down = nn.Sequential(nn.GroupNorm(1, dims[0]), nn.Conv2d(dims[0], dims[1], 2, stride=2))
        self.stage2 = ConvNeXtGNBlock(dims[1])
        self.norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean((-2, -1))))


class BasicBlock(nn.Module):
    """torchvision's, with its ``norm_layer`` argument (BatchNorm2d, or GroupNorm as in
    detection backbones and BiT)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18ish(nn.Module):
    def __init__(self, classes: int = 10, width: int = 8, norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1, norm), BasicBlock(width, width, 1, norm))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2, norm), BasicBlock(2 * width, 2 * width, 1, norm))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1))


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-1x1 conv-BN-ReLU-3x3 conv, output concatenated to the input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(F.relu(self.norm2(y)))], 1)


class DenseNetish(nn.Module):
    def __init__(self, classes: int = 10, growth: int = 4) -> None:
        super().__init__()
        c = 8
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        layers: list[nn.Module] = []
        for _ in range(2):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block = nn.Sequential(*layers)
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2))
        self.norm = nn.BatchNorm2d(c // 2)
        self.fc = nn.Linear(c // 2, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.transition(self.block(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetish(nn.Module):
    """Two-level U-Net: ConvTranspose2d upsampling and skip concatenation; per-pixel logits."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.enc1 = double_conv(3, 8)
        self.enc2 = double_conv(8, 16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = double_conv(16, 8)
        self.out = nn.Conv2d(8, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        return self.out(self.dec(torch.cat([self.up(e2), e1], 1)))


class AudioConv1d(nn.Module):
    """M5-style raw-audio classifier: strided Conv1d + BN + ReLU + pooling stack."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 16, stride=4), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 16, 3), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 16, 3), nn.ReLU(),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(-1))


class RNNClassifier(nn.Module):
    """Sequence classifier: RNN over time, last step -> Linear -> ReLU -> Linear."""

    def __init__(self, rnn: type, classes: int = 4) -> None:
        super().__init__()
        self.rnn = rnn(6, 12, batch_first=True)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.fc2(F.relu(self.fc1(out[:, -1])))


class TiedLM(nn.Module):
    """Token LM whose output projection shares the embedding's weight (weight tying)."""

    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 16, recurrent: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, batch_first=True) if recurrent else None
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        if self.rnn is not None:
            x = self.rnn(x)[0]
        return self.head(self.fc2(F.relu(self.fc1(x))))


class Recommender(nn.Module):
    """Rating model with two inputs (NCF-style MLP): user ids and item ids -> two embeddings
    -> concatenation -> MLP -> one rating per (user, item) pair."""

    def __init__(self, users: int = 30, items: int = 40, dim: int = 8) -> None:
        super().__init__()
        self.user_embed, self.item_embed = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.rating = nn.Linear(16, 1)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        x = torch.cat([self.user_embed(users), self.item_embed(items)], -1)
        return self.rating(self.mlp(x)).squeeze(-1)


class NanoGPTAttention(nn.Module):
    """nanoGPT's attention: q, k, v from one fused Linear split on the channels, causal SDPA."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.c_attn, self.c_proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(x).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class NanoGPT(nn.Module):
    """Two pre-norm blocks, learned positions, the LM head tied to the token embedding."""

    def __init__(self, vocab: int = 20, dim: int = 32) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(16, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(dim), "attn": NanoGPTAttention(dim), "ln2": nn.LayerNorm(dim),
            "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))}) for _ in range(2))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for b in self.blocks:
            x = x + b["attn"](b["ln1"](x))
            x = x + b["mlp"](b["ln2"](x))
        return self.head(self.ln_f(x))


class TimmViTish(nn.Module):
    """timm's ViT attention (``qkv`` reshaped to (3, heads, head_dim), unbind, SDPA), a class
    token, learned positions, pre-norm blocks."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
            "norm2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim)}) for _ in range(2))
        self.heads, self.norm, self.head = heads, nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        b, n, c = x.shape
        for blk in self.blocks:
            qkv = blk["qkv"](blk["norm1"](x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(*qkv.unbind(0))
            x = x + blk["proj"](y.transpose(1, 2).reshape(b, n, c))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


class MixerBlockNet(nn.Module):
    """MLP-Mixer: a token-mixing MLP across patches (transposed) and a channel-mixing MLP."""

    def __init__(self, dim: int = 32, tokens: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 32), nn.GELU(), nn.Linear(32, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return self.head((x + self.channel_mlp(self.norm2(x))).mean(1))


class DilatedTCN(nn.Module):
    """Temporal conv net: dilated Conv1d with a 1x1 residual projection."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 3, padding=2, dilation=2)
        self.c2 = nn.Conv1d(16, 16, 3, padding=4, dilation=4)
        self.res = nn.Conv1d(4, 16, 1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((F.relu(self.c2(F.relu(self.c1(x)))) + self.res(x)).mean(-1))


class BiGRUNet(nn.Module):
    """Linear input projection into a bidirectional GRU (Torch-Pruning cannot follow units
    into it: the projection is computed live only and scattered back), an MLP head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.gru = nn.GRU(16, 24, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(48, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.gru(F.relu(self.embed(x)))
        return self.head(F.relu(self.fc(y[:, -1])))


# ------------------------------------------------------------------ detection, efficient nets, speech, points

class ConvBNSiLU(nn.Module):
    """Ultralytics' ``Conv``: conv, BN, SiLU as attributes (not a Sequential)."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class YoloBottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = ConvBNSiLU(c, c, 3), ConvBNSiLU(c, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: one conv, its output chunked in two, bottlenecks on the second half,
    every piece concatenated into the last conv."""

    def __init__(self, c1: int, c2: int, n: int = 2) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvBNSiLU(c1, 2 * self.c)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, c2)
        self.m = nn.ModuleList(YoloBottleneck(self.c) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """YOLOv5/8's spatial pyramid pooling: one conv, three chained max-pools, concat."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1, self.cv2, self.m = ConvBNSiLU(c1, c1 // 2), ConvBNSiLU(c1 * 2, c2), nn.MaxPool2d(5, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YOLOv8ish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.down = ConvBNSiLU(3, 16, 3, 2), ConvBNSiLU(16, 32, 3, 2)
        self.c2f, self.sppf, self.detect = C2f(32, 32), SPPF(32, 32), nn.Conv2d(32, 9, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.detect(self.sppf(self.c2f(self.down(self.stem(x)))))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 basic unit: split the channels, transform one half (1x1, depthwise 3x3,
    1x1), concatenate, shuffle the channels (reshape-transpose-reshape)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNetV2ish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.units(self.stem(x)).mean((2, 3)))


class ConformerConv(nn.Module):
    """Conformer's convolution module: LayerNorm, pointwise conv to 2d channels, GLU,
    depthwise conv, BatchNorm, SiLU, pointwise conv, residual."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pw1, self.dw = nn.Conv1d(d, 2 * d, 1), nn.Conv1d(d, d, 3, padding=1, groups=d)
        self.bn, self.pw2 = nn.BatchNorm1d(d), nn.Conv1d(d, d, 1)

    def forward(self, x: Tensor) -> Tensor:  # (batch, time, d)
        y = F.glu(self.pw1(self.norm(x).transpose(1, 2)), dim=1)
        return x + self.pw2(F.silu(self.bn(self.dw(y)))).transpose(1, 2)


class Conformerish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.Sequential(ConformerConv(), ConformerConv())
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16))
        self.out = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.inp(x))
        return self.out((h + self.ff(h)).mean(1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expansion, depthwise 3x3, squeeze-excitation, 1x1 projection, residual."""

    def __init__(self, c: int = 16, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.se, self.project = SqueezeExcite(h), nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(self.se(self.dw(self.expand(x))))


class EfficientNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks, self.head = nn.Sequential(MBConv(), MBConv()), nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class PointNetish(nn.Module):
    """PointNet's shared per-point MLP (1x1 Conv1d + BN), max over points, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv1d(3, 32, 1), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Conv1d(32, 64, 1), nn.BatchNorm1d(64), nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.mlp(x).max(2).values)


class Inceptionish(nn.Module):
    """An Inception block: parallel 1x1, 1x1-3x3 and pool-1x1 branches concatenated, global
    average pool, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(3, 8, 1)
        self.b2 = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(3, 8, 1))
        self.head = nn.Linear(24, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1))
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


# ------------------------------------------------------------------ the zoo test

def images(size: int):
    return lambda n, gen: torch.randn(n, 3, size, size, generator=gen)


def tokens(n: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 20, (n, 5), generator=gen)


def _shrank(module: nn.Module, attr: str, live: int) -> bool:
    return getattr(module, attr) == live


def check_mobilenet(small, widths):
    # the 1x1 expansion is gated; its depthwise conv and that conv's BN lose the same channels
    live = widths["features.2.conv.0.0"][0]
    dw, bn = small.features[2].conv[1][0], small.features[2].conv[1][1]
    assert dw.groups == dw.in_channels == dw.out_channels == bn.num_features == live < 32


def check_convnext(small, widths):
    assert small.stage1.pwconv1.out_features == small.stage1.pwconv2.module.in_features == widths["stage1.pwconv1"][0]
    assert isinstance(small.stage1.pwconv2, ScatterUnits)  # joins the residual stream
    assert small.stage2.pw1.out_channels == widths["stage2.pw1"][0]


def check_resnet(small, widths):
    assert small.layer1[0].conv1.out_channels == small.layer1[0].conv2.in_channels == widths["layer1.0.conv1"][0]


def check_resnet_groupnorm(small, widths):
    # 4 groups: 2 channels each at width 8 (4 dead: 2 groups leave), 4 each at 16 (7 dead: 1 group)
    block1, block2 = small.layer1[0], small.layer2[1]
    assert widths["layer1.0.conv1"] == (4, 8) and widths["layer2.1.conv1"] == (9, 16)
    assert block1.conv1.out_channels == block1.bn1.num_channels == block1.conv2.in_channels == 4
    assert block1.bn1.num_groups == 2
    assert block2.conv1.out_channels == block2.bn1.num_channels == block2.conv2.in_channels == 12
    assert block2.bn1.num_groups == 3


def check_densenet(small, widths):
    # dead channels of the concatenated stream leave it: the transition reads fewer
    assert small.transition[2].in_channels < 16


def check_unet(small, widths):
    assert small.up.out_channels == widths["up"][0] < 8  # the ConvTranspose2d shrank
    assert small.dec[0].in_channels == widths["up"][0] + widths["enc1.3"][0]  # through the skip concat


def check_audio(small, widths):
    assert small.features[0].out_channels == small.features[4].in_channels == widths["features.0"][0]


def check_rnn(small, widths):
    assert small.fc1.out_features == small.fc2.in_features == widths["fc1"][0]


def check_tied_lm(small, widths):
    assert small.head.weight is small.embed.weight  # still tied
    assert small.fc1.out_features == widths["fc1"][0]


def check_recommender(small, widths):
    assert list(widths) == ["mlp.0", "mlp.2"]  # the MLP's hidden Linears; embeddings and output not by default
    assert small.mlp[0].out_features == small.mlp[2].in_features == widths["mlp.0"][0] < 32
    assert small.mlp[2].out_features == small.rating.in_features == widths["mlp.2"][0] < 16
    assert small.user_embed.embedding_dim == small.item_embed.embedding_dim == small.mlp[0].in_features // 2 == 8


def check_nanogpt(small, widths):
    assert small.head.weight is small.wte.weight  # still tied
    assert small.blocks[0]["mlp"][0].out_features == widths["blocks.0.mlp.0"][0] < 128


def check_timm_vit(small, widths):
    assert small.blocks[0]["fc1"].out_features == widths["blocks.0.fc1"][0] < 64


def check_mixer(small, widths):
    assert small.token_mlp[0].out_features == small.token_mlp[2].in_features == widths["token_mlp.0"][0] < 32
    assert small.channel_mlp[0].out_features == widths["channel_mlp.0"][0] < 64


def check_tcn(small, widths):
    assert small.c1.out_channels == small.c2.in_channels == widths["c1"][0] < 16


def check_bigru(small, widths):
    assert isinstance(small.embed, ScatterUnits) and small.embed.module.out_features == widths["embed"][0] < 16
    assert small.fc.out_features == small.head.in_features == widths["fc"][0] < 32


def check_yolo(small, widths):
    assert small.c2f.cv1.conv.out_channels == widths["c2f.cv1.conv"][0] < 32  # its output is chunked in two
    m0 = small.c2f.m[0]
    assert m0.cv1.conv.out_channels == m0.cv2.conv.in_channels == widths["c2f.m.0.cv1.conv"][0] < 16
    assert small.sppf.cv1.conv.out_channels == widths["sppf.cv1.conv"][0] < 16  # through three max-pools


def check_shufflenet(small, widths):
    branch, live = small.units[0].branch, widths["units.0.branch.0"][0]
    assert branch[0].out_channels == branch[3].groups == branch[3].out_channels == branch[5].in_channels == live < 8


def check_conformer(small, widths):
    assert small.ff[0].out_features == small.ff[2].in_features == widths["ff.0"][0] < 32
    assert small.blocks[0].pw1.out_channels < 32 or isinstance(small.blocks[0].pw1, ScatterUnits)


def check_efficientnet(small, widths):
    # squeeze-excitation multiplies the expansion's channels by per-channel scales computed from
    # them: its dead channels are not constant after the padded depthwise conv, so they are
    # computed live only and scattered back (README: what each family gets)
    block, live = small.blocks[0], widths["blocks.0.expand.0"][0]
    assert block.expand[0].out_channels == live < 64 and isinstance(block.expand[1], ScatterUnits)


def check_pointnet(small, widths):
    assert small.mlp[0].out_channels == small.mlp[3].in_channels == widths["mlp.0"][0] < 32
    assert small.mlp[3].out_channels == small.fc[0].in_features == widths["mlp.3"][0] < 64  # through the max


def check_inception(small, widths):
    assert small.b1.out_channels == widths["b1"][0] < 8
    assert small.head.in_features == sum(widths[n][0] for n in ("b1", "b2.2", "b3.1")) < 24  # through the concat


def user_item_pairs(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randint(0, 30, (n,), generator=gen), torch.randint(0, 40, (n,), generator=gen)


@dataclass(frozen=True)
class Family:
    make: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], object]  # a tensor, or a tuple of positional inputs
    check: Callable[[nn.Module, dict], None]  # the compacted model's shapes
    onnx: OnnxLimitation | None = None  # every family here exports
    lam: float = 0.5  # the penalty in the training steps: above the random task's pull on the betas


FAMILIES = {
    "mobilenet_v2": Family(MobileNetV2ish, images(32), check_mobilenet),
    "convnext": Family(ConvNeXtish, images(32), check_convnext),
    "resnet18": Family(ResNet18ish, images(32), check_resnet),
    "resnet_groupnorm": Family(lambda: ResNet18ish(norm=lambda c: nn.GroupNorm(4, c)), images(32),
                               check_resnet_groupnorm),
    "densenet": Family(DenseNetish, images(16), check_densenet),
    "unet": Family(UNetish, images(16), check_unet),
    "audio_conv1d": Family(AudioConv1d, lambda n, gen: torch.randn(n, 1, 400, generator=gen), check_audio),
    "lstm_classifier": Family(lambda: RNNClassifier(nn.LSTM), lambda n, gen: torch.randn(n, 7, 6, generator=gen),
                              check_rnn),
    "gru_classifier": Family(lambda: RNNClassifier(nn.GRU), lambda n, gen: torch.randn(n, 7, 6, generator=gen),
                             check_rnn),
    "tied_lm_mlp": Family(TiedLM, tokens, check_tied_lm),
    "tied_lm_lstm": Family(lambda: TiedLM(recurrent=True), tokens, check_tied_lm),
    "recommender_two_inputs": Family(Recommender, user_item_pairs, check_recommender),
    "nanogpt_tied_fused_qkv": Family(NanoGPT, tokens, check_nanogpt, lam=5.0),
    "timm_vit_attention": Family(TimmViTish, images(32), check_timm_vit),
    "mlp_mixer": Family(MixerBlockNet, images(32), check_mixer),
    "dilated_tcn": Family(DilatedTCN, lambda n, gen: torch.randn(n, 4, 20, generator=gen), check_tcn),
    "bidirectional_gru": Family(BiGRUNet, lambda n, gen: torch.randn(n, 7, 6, generator=gen), check_bigru),
    "yolov8_c2f_sppf": Family(YOLOv8ish, images(32), check_yolo),
    "shufflenet_v2": Family(ShuffleNetV2ish, images(16), check_shufflenet),
    "conformer_conv": Family(Conformerish, lambda n, gen: torch.randn(n, 12, 8, generator=gen), check_conformer),
    "efficientnet_se": Family(EfficientNetish, images(16), check_efficientnet),
    "pointnet": Family(PointNetish, lambda n, gen: torch.randn(n, 3, 50, generator=gen), check_pointnet),
    "inception": Family(Inceptionish, images(8), check_inception),
}


def train_steps(model: nn.Module, inputs, steps: int = 3, lam: float = 0.5) -> None:
    """A few SGD steps on random data and targets, with the DAM penalty."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(steps):
        out = call(model, inputs(8, gen))
        loss = F.mse_loss(out, torch.randn(out.shape, generator=gen)) + dam.penalty(model, lam)
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_same_outputs(gated: nn.Module, small: nn.Module, x, rtol: float = 1e-5) -> None:
    """``x``: a tensor or a tuple of positional inputs."""
    was_training = gated.training
    gated.eval()
    with torch.no_grad():
        ref, out = call(gated, x), call(small, x)
    gated.train(was_training)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    diff = (ref.float() - out.float()).abs().max().item()
    assert diff <= rtol * max(1.0, ref.float().abs().max().item()), diff


@dataclass
class Compacted:
    gated: nn.Module
    small: nn.Module
    widths: dict
    example: object
    fresh: object


@functools.cache
def compacted(family: str) -> Compacted:
    """Default attach, a few training steps, mixed live/dead gates, compact under no_grad;
    once per family (the tests below share it and do not change it)."""
    fam = FAMILIES[family]
    torch.manual_seed(0)
    model = fam.make()
    gates = dam.attach(model)  # the default selection
    train_steps(model, fam.inputs, lam=fam.lam)
    assert all(g.beta.item() < 1.0 for g in gates.values())  # the penalty pushed every beta down
    for g in gates.values():
        if g.n >= 4:
            g.beta.data.fill_(-2.0)  # units j < 0.4 n dead, the others live
    widths = dam.widths(model)
    assert all(0 < live < n for live, n in widths.values() if n >= 4), widths
    gen = torch.Generator().manual_seed(1)
    example, fresh = fam.inputs(4, gen), fam.inputs(3, gen)
    assert model.training
    with torch.no_grad():
        small = dam.compact(model, example)
        assert not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()
    return Compacted(model, small, widths, example, fresh)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compacts_exactly_under_no_grad_after_training(family):
    c = compacted(family)
    assert not any(isinstance(m, dam.DAMGate) for m in c.small.modules())
    assert_no_dam_state(c.small)
    assert_same_outputs(c.gated, c.small, c.fresh)
    before, after = dam.count(c.gated, c.fresh), dam.count(c.small, c.fresh)
    assert after["flops"] < before["flops"] and after["params"] < before["params"], (before, after)
    FAMILIES[family].check(c.small, c.widths)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compacted_family_saves_and_loads_exactly(family, tmp_path):
    c = compacted(family)
    gen = torch.Generator().manual_seed(2)
    assert_save_load_round_trip(c.small, FAMILIES[family].inputs(5, gen), tmp_path / "compacted")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compacted_family_exports_to_onnx(family, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    c = compacted(family)
    assert_onnx_export(c.small, c.example, c.fresh, tmp_path / "m.onnx", FAMILIES[family].onnx)


# ------------------------------------------------------------------ modes, dtypes, errors

def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))


def gated_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = small_cnn()
    bn = model[1]
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.normal_(), bn.bias.data.normal_()
    for g in dam.attach(model).values():
        g.beta.data.fill_(-2.0)
    return model


def test_compact_under_inference_mode_keeps_modes():
    model = gated_cnn().eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 8, 8)  # an inference tensor
        small = dam.compact(model, x)
        assert torch.is_inference_mode_enabled()
    assert not model.training and torch.is_grad_enabled()
    assert not any(p.is_inference() for p in small.parameters())  # usable outside inference mode
    assert small[0].out_channels == dam.widths(model)["0"][0] < 8
    assert_same_outputs(model, small, torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_compacts_within_the_dtype_tolerance(dtype):
    model = gated_cnn().to(dtype)
    x = torch.randn(4, 3, 8, 8).to(dtype)
    small = dam.compact(model, x)
    assert all(p.dtype == dtype for p in small.parameters())
    assert small[0].out_channels < 8
    assert default_rtol(dtype) == 16 * torch.finfo(dtype).eps
    assert_same_outputs(model, small, torch.randn(3, 3, 8, 8).to(dtype), rtol=default_rtol(dtype))
    model.eval()
    with torch.no_grad():
        wrong = [model(x) + 1]
    with pytest.raises(CompactionError, match=str(dtype)) as err:  # the hint is about rounding ...
        check_equivalent(small, wrong, x)
    assert "BatchNorm" not in str(err.value) and "norm" not in str(err.value)  # ... not a norm


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        return self.head(F.relu(self.a(h) if x.shape[0] > 1 else self.b(h)))


def test_gated_layer_not_reached_by_example_inputs_is_kept_whole_and_named():
    """An unused module (a pooler a task head skips) must not stop compaction; the warning
    says that the branches the inputs did not take are not compacted for."""
    model = Branchy()
    for g in dam.attach(model).values():
        g.beta.data.fill_(-2.0)
    with pytest.warns(UserWarning, match="layer 'b' was not reached by example_inputs: compact keeps all its units"):
        small = dam.compact(model, torch.randn(2, 4))
    assert small.b.out_features == 8 and small.a.out_features == dam.widths(model)["a"][0] < 8
    assert_same_outputs(model, small, torch.randn(3, 4))
    assert "supports the input shapes" in dam.compact.__doc__


def grouped_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU(),   # grouped
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),                       # depthwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_grouped_and_depthwise_convs_are_refused_by_name_and_skipped_by_default():
    with pytest.raises(AttachError, match=r"layer '3'.*grouped convolution \(groups=4\)"):
        dam.attach(grouped_net(), layers=("3",))
    with pytest.raises(AttachError, match=r"layer '6'.*depthwise convolution"):
        dam.attach(grouped_net(), layers=("6",))
    torch.manual_seed(0)
    model = grouped_net()
    gates = dam.attach(model)
    assert list(gates) == ["0"]
    gates["0"].beta.data.fill_(-2.0)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        small = dam.compact(model, x)
    # the grouped conv keeps its 8 inputs (uneven groups otherwise); conv 0 computes only its live units
    assert small[3].in_channels == 8 and isinstance(small[1], ScatterUnits)
    assert small[0].out_channels == dam.widths(model)["0"][0] < 8
    assert_same_outputs(model, small, torch.randn(3, 3, 6, 6))


def test_globs_skip_layers_that_cannot_be_gated_but_exact_names_do_not():
    from torchdam.models import build_model

    assert list(dam.attach(build_model("lenet5"), layers=("features.*",))) == ["features.0", "features.3"]
    assert list(dam.attach(build_model("lenet300"), layers=("layers.*",))) == ["layers.1", "layers.3"]
    with pytest.raises(AttachError, match="layer 'features.1'.*ReLU"):
        dam.attach(build_model("lenet5"), layers=("features.1",))


def test_attach_twice_raises_and_changes_nothing():
    model = small_cnn()
    dam.attach(model, layers=("3",))

    def state(m):
        return ({n: (tuple(mod._forward_hooks.values()), mod.__dict__.get("forward"), getattr(mod, "dam_gate", None))
                 for n, mod in m.named_modules()}, list(m.state_dict()))

    before = state(model)
    with pytest.raises(AttachError, match="already has a DAM gate"):
        dam.attach(model)  # would gate "0" first, then fails on "3"
    assert state(model) == before
    assert [n for n, _ in dam.named_gates(model)] == ["3"]


def test_tied_embedding_gated_is_refused_naming_both_layers():
    model = TiedLM()
    dam.attach(model, layers=("embed", nn.Linear))
    with pytest.raises(CompactionError, match=r"'embed' shares its weight with 'head' \(tied weights\)"):
        dam.compact(model, torch.randint(0, 20, (2, 5)))


class BagOfEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(30, 12), nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, t: Tensor) -> Tensor:
        return self.head(F.relu(self.fc(self.embed(t).mean(1))))


def test_embedding_is_gated_when_selected_explicitly():
    torch.manual_seed(0)
    assert list(dam.attach(BagOfEmbeddings())) == ["fc"]  # not by default ...
    assert list(dam.attach(BagOfEmbeddings(), layers=("*",))) == ["fc"]  # ... nor by a glob
    model = BagOfEmbeddings()
    gates = dam.attach(model, layers=(nn.Embedding, nn.Linear))
    assert list(gates) == ["embed", "fc"] and gates["embed"].axis == -1
    for g in gates.values():
        g.beta.data.fill_(-2.0)
    t = torch.randint(0, 30, (4, 6))
    small = dam.compact(model, t)
    assert small.embed.embedding_dim == small.fc.in_features == dam.widths(model)["embed"][0] < 12
    assert_same_outputs(model, small, torch.randint(0, 30, (3, 6)))


@pytest.mark.parametrize("groups", [8, 2, 1])
def test_group_norm_after_a_gated_conv(groups):
    """A GroupNorm over groups of channels takes the gate like BN, and its units leave in
    whole groups (DAM kills them from index 0 up); over all channels (GroupNorm(1), a layer
    norm) the gate stays before it and the units are scattered."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(groups, 8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    gates = dam.attach(model)
    gates["0"].beta.data.fill_(-2.5)  # units 0-4 of 8 dead: 5 channels, one of them in a half-dead group of 2
    assert dam.widths(model)["0"] == (3, 8)
    small = dam.compact(model, torch.randn(2, 3, 4, 4))
    if groups == 1:
        assert gates["0"].host_name == "0"
        assert isinstance(small[0], ScatterUnits) and small[0].module.out_channels == 3
        assert small[1].num_channels == 8
    else:
        assert gates["0"].host_name == "1"
        kept = {8: 3, 2: 4}[groups]  # groups of 1 channel: the 3 live; of 4: the group with a live unit
        assert small[0].out_channels == small[1].num_channels == small[3].in_channels == kept
        assert small[1].num_groups == groups * kept // 8
    assert_same_outputs(model, small, torch.randn(3, 3, 4, 4))


def test_a_group_norm_registered_after_a_linear_keeps_the_gate_on_the_linear():
    """diffusers' ResNet block registers its time-embedding Linear right before the
    GroupNorm of the conv's output (``norm2``); the gate stays on the Linear."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
            self.time_emb_proj = nn.Linear(5, 8)
            self.norm2 = nn.GroupNorm(2, 8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            h = self.conv1(x) + self.time_emb_proj(t)[:, :, None, None]
            return x + self.conv2(F.silu(self.norm2(h)))

    block = Block()
    gates = dam.attach(block)
    assert {n: g.host_name for n, g in gates.items()} == {"conv1": "conv1", "time_emb_proj": "time_emb_proj"}
    gates["time_emb_proj"].beta.data.fill_(-2.5)
    x, t = torch.randn(2, 8, 4, 4), torch.randn(2, 5)
    assert_same_outputs(block, dam.compact(block, (x, t)), (x, t))


def test_rule_tables_are_reachable_from_the_package():
    from torchdam.attach import UNIT_LAYERS
    from torchdam.compact import FOLDERS

    assert dam.UNIT_LAYERS is UNIT_LAYERS and dam.FOLDERS is FOLDERS
    with pytest.raises(AttachError, match=r"torchdam\.register_unit_layer"):
        dam.attach(nn.Sequential(nn.LSTM(3, 3)), layers=(nn.LSTM,), include_output=True)

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.width = 4

        def forward(self, x: Tensor) -> Tensor:
            return 2 * x

    dam.register_unit_layer(Scale, "width", -1)
    try:
        model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 2))
        assert list(dam.attach(model, layers=(Scale,))) == ["1"]
        with pytest.raises(TorchDAMError, match=r"'1'.*torchdam\.register_folder"):
            dam.compact(model, torch.randn(2, 3))
    finally:
        del dam.UNIT_LAYERS[Scale]


class ChannelMeanNorm(nn.Module):
    """Divides by the mean over channels: removing a zero channel changes every other one."""

    def forward(self, x: Tensor) -> Tensor:
        return x / (1 + x.abs().mean(1, keepdim=True))


def test_units_mixed_by_an_op_the_graph_takes_for_channelwise_are_scattered_back():
    """Torch-Pruning treats the mean over channels as elementwise; the check catches it and
    the layer feeding it computes only its live units, scattered back to full width."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), ChannelMeanNorm(),
                          nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 16, 2))
    for g in dam.attach(model).values():
        g.beta.data.fill_(-2.0)
    small = dam.compact(model, torch.randn(2, 3, 6, 6))
    assert isinstance(small[2], ScatterUnits) and small[2].module.out_channels < 8
    assert small[0].out_channels < 8 and small[5].out_channels < 4  # the others still lose theirs
    assert_same_outputs(model, small, torch.randn(3, 3, 6, 6))


def test_the_layer_at_fault_is_found_in_a_few_compactions_among_many_gates():
    """One culprit among 24 gated layers: halving finds it in about 2 log2(24) compactions,
    not one per gate (a large model's check would otherwise take minutes)."""
    import importlib
    from unittest import mock

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 1), nn.ReLU()]
    for i in range(23):
        layers += [nn.Conv2d(8, 8, 1), nn.ReLU()] + ([ChannelMeanNorm()] if i == 11 else [])
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 16, 2))
    with torch.no_grad():  # near-identity 1x1 convs: the signal reaches the norm undiminished
        for conv in model[2:-2]:
            if isinstance(conv, nn.Conv2d):
                conv.weight.copy_(torch.eye(8).view(8, 8, 1, 1) + 0.05 * torch.randn(8, 8, 1, 1))
                conv.bias.zero_()
    gates = dam.attach(model)
    assert len(gates) == 24
    for g in gates.values():
        g.beta.data.fill_(-2.0)
    compact_module = importlib.import_module("torchdam.compact")
    copies = mock.Mock(wraps=compact_module._compacted_copy)
    with mock.patch.object(compact_module, "_compacted_copy", copies):
        small = dam.compact(model, torch.randn(2, 3, 4, 4))
    scattered = [n for n, m in small.named_modules() if isinstance(m, ScatterUnits)]
    assert scattered == ["24"]  # the conv before the norm over channels, and only it
    assert copies.call_count <= 16, copies.call_count  # one per gate would be 24 and more
    assert_same_outputs(model, small, torch.randn(3, 3, 4, 4))


def test_inexact_compaction_names_the_gated_layer_at_fault():
    from torchdam.compact import FOLDERS

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    for g in dam.attach(model).values():
        g.beta.data.fill_(-2.0)
    fold = FOLDERS[nn.Linear]
    dam.register_folder(nn.Linear, lambda module, g: None if module.out_features == 8 and module.in_features == 8
                        else fold(module, g))  # a broken rule: layer '2' keeps its dead units' values
    try:
        with pytest.raises(CompactionError, match=r"folding the gate of layer '2' into '2' \(Linear\)"):
            dam.compact(model, torch.randn(3, 4))
    finally:
        dam.register_folder(nn.Linear, fold)


class SplitByWidth(nn.Module):
    """Model code that reads a layer's width at run time to split its output."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.cv2 = nn.Conv2d(24, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.cv1(x).split(self.cv1[0].out_channels // 2, 1)
        return self.cv2(torch.cat([a, b, self.m(b)], 1))


def test_a_layer_whose_width_the_forward_reads_keeps_its_units_with_a_warning():
    torch.manual_seed(0)
    model = SplitByWidth()
    for g in dam.attach(model).values():
        g.beta.data.fill_(-2.0)
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"compact kept every unit of 'cv1\.0'.*the dead units output zero"):
        small = dam.compact(model, x)
    assert small.cv1[0].out_channels == 16 and not isinstance(small.cv1[1], ScatterUnits)  # all of it, folded
    assert small.m[0].out_channels == dam.widths(model)["m.0"][0] < 8  # the others are still compacted
    assert_same_outputs(model, small, torch.randn(3, 3, 8, 8))
