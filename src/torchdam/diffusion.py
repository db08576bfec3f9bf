"""Hugging Face diffusers' UNet blocks, taught to attach and compact once a model's file has
imported them (looked up in ``sys.modules``: torchdam works without diffusers installed).

* ``ResnetBlock2D`` computes ``norm2(conv1(x) + time_emb_proj(t))``: its ``conv1``'s gate
  goes after ``norm2`` (a GroupNorm, so its channels leave in whole groups, with the time
  embedding's rows that add into them), where its registration order (the time embedding's
  Linear between the two) would leave it before the norm and its units could only be
  scattered back. ``time_emb_proj`` is not gated apart: its units are ``conv1``'s. With the
  ``scale_shift`` time embedding the norm's output is shifted per channel, so a dead unit
  is not zero: the gate then stays on ``conv1``'s output.
* ``Attention`` (the UNets' self- and cross-attention): heads are the units, as for the
  Transformers families (``to_q``/``to_k``/``to_v`` rows and ``to_out[0]`` columns; its
  ``heads`` and ``inner_dim`` updated), where its layout is the plain one.
* ``FeedForward`` with a gated activation (GEGLU, SwiGLU: ``h * act(g)`` with ``h, g`` the
  two halves of one projection): its units are the hidden channels, one of each half, gated
  at the output Linear's input (:class:`torchdam.attention.PairedUnits`, as Phi-3's MLP).
"""
from __future__ import annotations

import sys

from torch import nn

from torchdam import attention
from torchdam.attach import FOLLOWED_BY


def _loaded(module: str, name: str) -> type | None:
    found = sys.modules.get(f"diffusers.{module}")
    return getattr(found, name, None) if found is not None else None


def _resnet_norm(block: nn.Module, child: str) -> str | None:
    if child == "conv1" and block.time_embedding_norm == "default" and isinstance(block.norm2, nn.GroupNorm):
        return "norm2"
    return None


class DiffusersHeads(attention.SplitHeads):
    """diffusers' ``Attention``: separate projections, the head size ``inner_dim // heads``
    (its processors split by ``attn.heads``)."""

    def layout(self, m: nn.Module) -> tuple[int, int, int]:
        d = m.inner_dim // m.heads
        return m.to_k.out_features // d, m.to_q.out_features // m.to_k.out_features, d

    def refusal(self, m: nn.Module) -> str | None:
        extra = [n for n in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out") if getattr(m, n, None) is not None]
        if extra:
            return f"it also projects a second stream ({', '.join(extra)})"
        if m.to_out is None or m.inner_kv_dim != m.inner_dim:
            return "its output or key/value projections are not the plain per-head layout"
        return None


HEADS = DiffusersHeads("to_q", "to_k", "to_v", "to_out.0", "heads", {
    "heads": lambda h, kv, d: h, "inner_dim": lambda h, kv, d: h * d, "inner_kv_dim": lambda h, kv, d: kv * d})


#: gated activations of a FeedForward (their ``proj`` packs ``[h | g]``)
GLU_ACTIVATIONS = ("GEGLU", "SwiGLU")
PAIRED = attention.PairedUnits("net.0.proj", "net.2")


def heads(module: nn.Module) -> attention.Heads | None:
    """The unit layout of a diffusers FeedForward with a gated activation (None otherwise)."""
    ff = _loaded("models.attention", "FeedForward")
    if ff is None or not isinstance(module, ff) or len(module.net) < 3:
        return None
    act, down = module.net[0], module.net[2]
    if type(act).__name__ in GLU_ACTIVATIONS and isinstance(getattr(act, "proj", None), nn.Linear) \
            and isinstance(down, nn.Linear):
        return PAIRED
    return None


def register_diffusers_layers() -> None:
    """Teach attach/compact diffusers' blocks whose files are loaded (a no-op otherwise)."""
    resnet = _loaded("models.resnet", "ResnetBlock2D")
    if resnet is not None and resnet not in FOLLOWED_BY:
        FOLLOWED_BY[resnet] = _resnet_norm
    attn = _loaded("models.attention_processor", "Attention")
    if attn is not None and attn not in attention.ATTENTION:
        attention.register_attention(attn, HEADS)


def not_gated(module: nn.Module) -> tuple[str, ...]:
    """A ResnetBlock2D's time-embedding projection, whose units are its ``conv1``'s."""
    resnet = _loaded("models.resnet", "ResnetBlock2D")
    if resnet is not None and isinstance(module, resnet) and _resnet_norm(module, "conv1"):
        return ("time_emb_proj",)
    return ()
