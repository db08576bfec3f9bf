"""A small Vision Transformer (Dosovitskiy et al. 2021) in plain torch, for CIFAR/MNIST-sized
images: the zoo's transformer, so ``torchdam prune`` gates attention heads and FFN units.

Patch embedding (a Conv2d with stride = kernel = patch), a learned class token and position
embedding, ``nn.TransformerEncoder`` of pre-norm ``nn.TransformerEncoderLayer`` blocks
(GELU), a final LayerNorm and a Linear head on the class token.

What :func:`torchdam.attach` gates by default: every block's attention heads
(``encoder.layers.i.self_attn``, one unit per head) and FFN hidden units (``linear1``).
Not gated: ``linear2`` and the patch embedding's ``proj`` (they write the residual stream,
:data:`torchdam.attention.NOT_GATED`) and ``head`` (the output layer). The hidden size (the
residual stream's width) is not pruned: :func:`torchdam.compact` does not narrow a
transformer's stream, so the LayerNorms, embeddings and stream writers keep ``dim``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from torchdam import attention
from torchdam.errors import ConfigError


class PatchEmbed(nn.Module):
    """``(N, C, H, W)`` -> ``(N, patches, dim)``: one ``patch x patch`` conv with stride ``patch``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# The patch embedding writes the residual stream: a type selector (nn.Conv2d, the CLI's
# "conv") does not gate it, as for Hugging Face's ViTPatchEmbeddings.
if (None, PatchEmbed, ("proj",)) not in attention.NOT_GATED:
    attention.NOT_GATED.append((None, PatchEmbed, ("proj",)))


class VisionTransformer(nn.Module):
    """ViT: patch embedding + class token + position embedding, ``depth`` pre-norm encoder
    blocks, LayerNorm, ``head`` on the class token (registered last: the output layer)."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 96,
        depth: int = 4,
        heads: int = 3,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"ViT: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if dim % heads:
            raise ConfigError(f"ViT: dim {dim} is not a multiple of heads {heads}")
        patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        block = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=dropout, activation="gelu",
            batch_first=True, norm_first=True)
        # pre-norm layers cannot use nested tensors anyway; saying so avoids torch's warning
        self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # nn.TransformerEncoder deep-copies one layer, so every block would start identical:
        # initialise each one anew (the ViT/timm recipe: truncated normal 0.02, zero biases).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(tokens))[:, 0])


def vit_tiny(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> VisionTransformer:
    """ViT-tiny for 28x28 / 32x32 images: patch 4 (7x7 or 8x8 patches), dim 96, depth 4,
    3 heads of 32, MLP 192 (ratio 2), no dropout; 0.3 M parameters."""
    return VisionTransformer(image_size, 4, in_channels, num_classes, dim=96, depth=4, heads=3, mlp_ratio=2.0)
