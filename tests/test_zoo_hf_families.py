"""Hugging Face families torchdam has no rule for by name, as a user brings them: built from
a config (random weights, nothing downloaded), default ``attach``, one training step with
the penalty, half the units dead, ``compact`` under ``torch.no_grad()`` on a few inputs,
then the compacted model must give the gated model's outputs on fresh inputs, be smaller
in parameters and FLOPs, and save/load exactly.

Standard attention (separate q/k/v/output ``nn.Linear`` s, heads split by ``head_dim``) must
be recognised from its structure: its heads are the units and leave physically, with any
parameter holding one value per head on its last axis (gpt-oss's attention sinks, Swin's
relative position bias table). Modules that only look standard (a per-head quantity their
tensors' shapes do not show) must keep their heads and still compact exactly. Grouped-query attention whose projections a user gates as
plain layers used to send Torch-Pruning's group search into an endless loop
(VainF/Torch-Pruning#527): compact must end, exactly, within a time bound.

Tiny models: hidden 32, 2 layers, 4 heads, sequence 8."""
from __future__ import annotations

import functools
import signal
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo_checks import assert_no_dam_state, assert_save_load_round_trip

import torchdam as dam
from torchdam.attention import heads_of
from torchdam.budget import TOLERANCE, WidthModel, _beta_for, live_counts
from torchdam.calling import call, compared_outputs, run_eval
from torchdam.compact import ScatterUnits
from torchdam.train import TrainConfig, Trainer

T = pytest.importorskip("transformers")

H, LAYERS, HEADS, FFN, VOCAB, SEQ = 32, 2, 4, 64, 60, 8
INIT = {"initializer_range": 0.2}


def text(batch: int, gen: torch.Generator) -> dict:
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": torch.randint(3, VOCAB, (batch, SEQ), generator=gen), "attention_mask": mask}


def seq2seq(batch: int, gen: torch.Generator) -> dict:
    return {**text(batch, gen), "decoder_input_ids": torch.randint(3, VOCAB, (batch, 5), generator=gen)}


def image(batch: int, gen: torch.Generator) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}


def decoder_lm(config_cls, model_cls, **extra) -> Callable[[], nn.Module]:
    return lambda: model_cls(config_cls(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=16, **extra, **INIT))


@dataclass
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], dict]
    heads: int  # attention modules whose heads must be the units (0: none recognised)


FAMILIES = [
    # decoder LMs built on Llama's attention and gated MLP, grouped-query attention included
    Family("mistral", decoder_lm(T.MistralConfig, T.MistralForCausalLM, num_key_value_heads=2), text, 2),
    Family("qwen2", decoder_lm(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=2), text, 2),
    Family("qwen3", decoder_lm(T.Qwen3Config, T.Qwen3ForCausalLM, num_key_value_heads=2, head_dim=8), text, 2),
    Family("gemma", decoder_lm(T.GemmaConfig, T.GemmaForCausalLM, num_key_value_heads=2, head_dim=8), text, 2),
    Family("phi", decoder_lm(T.PhiConfig, T.PhiForCausalLM), text, 2),
    Family("mixtral", decoder_lm(T.MixtralConfig, T.MixtralForCausalLM, num_key_value_heads=2,
                                 num_local_experts=4, num_experts_per_tok=2), text, 2),
    # q/k/v packed [q | k | v] under GQA, the query width read from the (shared) config;
    # gate and up projections packed in one layer
    Family("phi3", decoder_lm(T.Phi3Config, T.Phi3ForCausalLM, num_key_value_heads=2, pad_token_id=0), text, 2),
    # per-head attention sinks, cut with the heads
    Family("gpt_oss", decoder_lm(T.GptOssConfig, T.GptOssForCausalLM, num_key_value_heads=2, head_dim=8,
                                 num_local_experts=4, num_experts_per_tok=2), text, 2),
    Family("gpt_neox", lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=16, **INIT)), text, 2),  # interleaved q/k/v
    Family("bloom", lambda: T.BloomForCausalLM(T.BloomConfig(
        vocab_size=VOCAB, hidden_size=H, n_layer=LAYERS, n_head=HEADS, **INIT)), text, 0),
    # heads split with self.num_heads, which compact updates
    Family("opt", lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=VOCAB, hidden_size=H, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        max_position_embeddings=16, word_embed_proj_dim=H, **INIT)), text, 2),
    # encoders
    Family("distilbert", lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=VOCAB, dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=16,
        **INIT)), text, 2),
    Family("roberta", lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=20, pad_token_id=1, **INIT)), text, 2),
    # encoder-decoders: self- and cross-attention
    Family("t5", lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=VOCAB, d_model=H, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        decoder_start_token_id=0, **INIT)), seq2seq, 0),
    Family("bart", lambda: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=16,
        **INIT)), seq2seq, 6),
    Family("whisper", lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_source_positions=8, max_target_positions=16, decoder_start_token_id=1, pad_token_id=0, **INIT)),
        lambda b, g: {"input_features": torch.randn(b, 8, 16, generator=g),
                      "decoder_input_ids": torch.randint(3, VOCAB, (b, 5), generator=g)}, 6),
    # vision
    Family("clip_vision", lambda: T.CLIPVisionModel(T.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, **INIT)), image, 2),
    Family("dinov2", lambda: T.Dinov2Model(T.Dinov2Config(
        image_size=32, patch_size=8, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        mlp_ratio=2, **INIT)), image, 2),
    # a relative position bias table per head, cut with the heads
    Family("swin", lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3,
        **INIT)), image, 2),
    Family("convnext", lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, **INIT)), image, 0),
    Family("mobilenet_v2", lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=3, **INIT)), image, 0),
    # the older ViT attention (q/k/v in an ``attention`` child, split by num_attention_heads)
    Family("dpt", lambda: T.DPTForDepthEstimation(T.DPTConfig(
        image_size=32, patch_size=8, hidden_size=H, num_hidden_layers=4, num_attention_heads=HEADS,
        intermediate_size=FFN, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], **INIT)), image, 4),  # an unused fusion layer
    Family("mobilevit", lambda: T.MobileViTForImageClassification(T.MobileViTConfig(
        image_size=32, patch_size=2, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
        num_attention_heads=2, num_labels=3, **INIT)), image, 9),  # convolutions and attention
    # samples patches even in eval (its random shuffle): compact compares under one seed
    Family("vit_mae", lambda: T.ViTMAEModel(T.ViTMAEConfig(
        image_size=32, patch_size=8, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, **INIT)), image, 2),
    # its pooler is not used by the classifier: kept whole, with a warning
    Family("bigbird", lambda: T.BigBirdForSequenceClassification(T.BigBirdConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        max_position_embeddings=64, attention_type="original_full", sep_token_id=2, **INIT)), text, 2),
    # time series
    Family("patchtst", lambda: T.PatchTSTForPrediction(T.PatchTSTConfig(
        num_input_channels=3, context_length=32, patch_length=8, patch_stride=8, prediction_length=4, d_model=H,
        num_attention_heads=HEADS, num_hidden_layers=LAYERS, ffn_dim=FFN, **INIT)),
        lambda b, g: {"past_values": torch.randn(b, 32, 3, generator=g)}, 2),
    # a state-space model: no attention; its mixers' projections gated as layers
    Family("mamba", lambda: T.MambaForCausalLM(T.MambaConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, state_size=4, expand=2, conv_kernel=4, **INIT)),
        lambda b, g: {"input_ids": torch.randint(3, VOCAB, (b, SEQ), generator=g)}, 0),
    # audio: a conv feature extractor with a grouped positional conv
    Family("wav2vec2", lambda: T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, num_labels=3, **INIT)),
        lambda b, g: {"input_values": torch.randn(b, 400, generator=g)}, 2),
]
FAMILY = {f.name: f for f in FAMILIES}


@contextmanager
def time_limit(seconds: int):
    """Fails the test instead of hanging it (SIGALRM, main thread)."""
    def fail(*_):
        raise TimeoutError(f"did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outputs(model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    """As compact compares them: eval mode, one fixed seed (ViT-MAE samples in eval)."""
    return run_eval(model, inputs)


@dataclass
class Compacted:
    gated: nn.Module
    small: nn.Module
    gates: dict
    fresh: dict


@functools.cache
def compacted(name: str) -> Compacted:
    family = FAMILY[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = family.build()
    gates = dam.attach(model)
    model.train()  # one step with the penalty: the gated forward trains and the betas move
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = compared_outputs(call(model, family.inputs(2, gen)))[0]
    loss = F.mse_loss(out, torch.zeros_like(out)) + dam.penalty(model, 1.0)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for g in gates.values():
            g.beta.fill_(-2.0 if g.n > 2 else -1.0)  # about half the units of every gate dead
    model.eval()
    with warnings.catch_warnings(), time_limit(120), torch.no_grad():
        warnings.simplefilter("ignore")
        small = dam.compact(model, family.inputs(2, gen))
    return Compacted(model, small, gates, family.inputs(3, gen))


@pytest.mark.parametrize("name", list(FAMILY))
def test_default_attach_compacts_exactly_and_smaller(name):
    c = compacted(name)
    with torch.no_grad():
        for ref, got in zip(outputs(c.gated, c.fresh), outputs(c.small, c.fresh), strict=True):
            assert got.shape == ref.shape
            assert (ref - got).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert_no_dam_state(c.small)
    before, after = dam.count(c.gated, c.fresh), dam.count(c.small, c.fresh)
    assert after["params"] < before["params"] and after["flops"] < before["flops"], (before, after)


@pytest.mark.parametrize("name", list(FAMILY))
def test_standard_attention_heads_are_the_units_and_leave(name):
    c, family = compacted(name), FAMILY[name]
    head_gates = [n for n in c.gates if getattr(heads_of(c.gated.get_submodule(n)), "heads", False)]
    assert len(head_gates) == family.heads, head_gates
    for n in head_gates:
        live, total = dam.widths(c.gated)[n]
        assert 0 < live < total
        gated_q = heads_of(c.gated.get_submodule(n)).projections(c.gated.get_submodule(n))[0]
        small_q = heads_of(c.small.get_submodule(n)).projections(c.small.get_submodule(n))[0]
        assert small_q.out_features == gated_q.out_features * live // total
        for proj in heads_of(c.gated.get_submodule(n)).projections(c.gated.get_submodule(n)):
            assert not isinstance(getattr(proj, "dam_gate", None), nn.Module)  # never gated as layers


#: generative families whose compacted model must still generate as the gated one does
GENERATIVE = ["mistral", "gemma", "phi3", "gpt_oss", "gpt_neox", "bloom", "opt", "t5", "bart", "whisper", "mamba"]


@pytest.mark.parametrize("name", GENERATIVE)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_compacted_model_generates_as_the_gated_one(name, cache):
    """``generate`` with its key/value cache (allocated from the layers' outputs, or ahead
    of time from the config with ``static``): heads removed, the same greedy tokens."""
    c = compacted(name)
    inputs = FAMILY[name].inputs(2, torch.Generator().manual_seed(1))
    kw = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    if cache == "static":
        options["cache_implementation"] = "static"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, got = c.gated.generate(**kw, **options), c.small.generate(**kw, **options)
    assert got.shape[-1] >= 4  # four new tokens (Whisper returns them alone)
    assert torch.equal(got, want)


def test_a_packed_gate_up_mlp_is_gated_by_its_hidden_units():
    """Phi-3's ``gate_up_proj`` packs gate and up; a unit is one hidden channel: one row of
    each half and one input of ``down_proj``, gated at ``down_proj``'s input."""
    c = compacted("phi3")
    for layer in range(LAYERS):
        name = f"model.layers.{layer}.mlp"
        live, total = dam.widths(c.gated)[name]
        assert total == FFN and 0 < live < total
        mlp = c.small.get_submodule(name)
        assert mlp.gate_up_proj.out_features == 2 * live and mlp.down_proj.in_features == live
        assert not isinstance(getattr(c.gated.get_submodule(name).gate_up_proj, "dam_gate", None), nn.Module)
    assert dam.attach(FAMILY["phi3"].build(), heads=False).keys() == {f"model.layers.{i}.mlp" for i in range(LAYERS)}


def test_phi3_attention_reads_its_own_head_count_after_compaction():
    """Phi-3 slices its packed q/k/v by ``config.num_attention_heads``; compact gives each
    attention module whose heads it removes a config of its own and leaves the model's alone."""
    c = compacted("phi3")
    assert c.gated.config.num_attention_heads == HEADS and c.small.config.num_attention_heads == HEADS
    for layer in range(LAYERS):
        attn = c.small.model.layers[layer].self_attn
        live, _ = dam.widths(c.gated)[f"model.layers.{layer}.self_attn"]
        assert attn.config.num_attention_heads == live * HEADS // 2 and attn.num_key_value_heads == live
        assert attn.config is not c.small.config


@pytest.mark.parametrize("name", ["mistral", "phi3", "bart", "roberta", "gpt_neox", "swin", "gpt_oss"])
def test_compacted_family_saves_and_loads_exactly(name, tmp_path):
    c = compacted(name)
    assert_save_load_round_trip(c.small, c.fresh, tmp_path / name)


def test_gqa_projections_gated_as_layers_compact_in_bounded_time():
    """Torch-Pruning's group search through ``repeat_kv`` never ends (it did not here
    without the bound): compact must fall back to computing those layers narrow and
    scattering them back, exactly."""
    torch.manual_seed(0)
    model = decoder_lm(T.LlamaConfig, T.LlamaForCausalLM, num_key_value_heads=2)().eval()
    names = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    gates = dam.attach(model, layers=names, heads=False)
    with torch.no_grad():
        for g in gates.values():
            g.beta.fill_(-2.0)
    gen = torch.Generator().manual_seed(0)
    with time_limit(60), torch.no_grad():
        small = dam.compact(model, text(2, gen))
    k_proj = small.get_submodule(names[0])
    assert isinstance(k_proj, ScatterUnits) and k_proj.module.out_features < k_proj.total
    fresh = text(3, gen)
    with torch.no_grad():
        ref, got = outputs(model, fresh)[0], outputs(small, fresh)[0]
    assert (ref - got).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_scattered_layer_reads_like_the_layer_it_replaced():
    """Model code reads its layers' attributes (Whisper: ``conv1.stride``); a scattered
    layer answers as the wrapped one, with its full width, and keeps no gate of its own."""
    conv = nn.Conv1d(4, 6, 3, stride=2)
    wrapped = ScatterUnits(nn.Conv1d(4, 3, 3, stride=2), [3, 4, 5], 6, 1)
    assert (wrapped.stride, wrapped.kernel_size, wrapped.in_channels) == (conv.stride, conv.kernel_size, 4)
    assert wrapped.out_channels == 6 and wrapped.module.out_channels == 3
    wrapped.module.add_module("dam_gate", dam.DAMGate(3))
    with pytest.raises(AttributeError):
        getattr(wrapped, "dam_gate")  # noqa: B009
    with pytest.raises(AttributeError):
        getattr(wrapped, "no_such_attribute")  # noqa: B009


@pytest.mark.parametrize("name", ["mistral", "phi3", "bart", "roberta", "gpt_neox", "opt", "swin", "bloom", "gpt_oss"])
def test_budget_width_model_prices_what_compact_gives(name):
    """``--target-flops`` rests on the width model: its price of a set of widths must be
    what ``count(compact(model))`` measures, on these families too."""
    family = FAMILY[name]
    torch.manual_seed(0)
    model = family.build().eval()
    gates = dam.attach(model)
    gen = torch.Generator().manual_seed(0)
    x = family.inputs(2, gen)
    one = {k: v[:1] for k, v in x.items()}
    with time_limit(120):
        wm = WidthModel(model, x)
    assert wm.dense == dam.count(model, one)
    for gate in gates.values():  # every gate at a chosen live count, 1 .. n
        gate.beta.data.fill_(_beta_for(gate, int(torch.randint(1, gate.n + 1, (), generator=gen))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = dam.count(dam.compact(model, x), one)
    live = live_counts(model)
    for metric in ("flops", "params"):
        assert abs(float(wm.cost(live, metric)) - real[metric]) < 0.5, (metric, float(wm.cost(live, metric)), real)


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_trainer_reaches_a_flops_target(family):
    """``TrainConfig(target_flops=1/3)`` on grouped-query-attention models: Mistral, which the
    library has no rule for by name (heads and gated-MLP units), and Phi-3 (packed q/k/v,
    packed gate/up): priced and removed, target within +-3%."""
    torch.manual_seed(0)
    config, cls = {"mistral": (T.MistralConfig, T.MistralForSequenceClassification),
                   "phi3": (T.Phi3Config, T.Phi3ForSequenceClassification)}[family]
    model = cls(config(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, max_position_embeddings=16, num_labels=3, pad_token_id=0, **INIT))
    dam.attach(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (256, SEQ), generator=gen)
    labels = torch.randn(VOCAB, 3, generator=gen)[ids].sum(1).argmax(-1)  # a labelling it can learn
    trainer = Trainer(model, TrainConfig(epochs=2, batch_size=16, lr=1e-3, progress=False, target_flops=1 / 3),
                      forward_fn=lambda net, batch: (net(input_ids=batch[0]).logits, batch[1]))
    trainer.fit(DataLoader(TensorDataset(ids, labels), batch_size=16, shuffle=True))
    narrowed = [live < total for live, total in dam.widths(model).values()]
    assert all(narrowed) if family == "mistral" else any(narrowed), dam.widths(model)
    with torch.no_grad():
        small = dam.compact(model, {"input_ids": ids[:4]})
    one = {"input_ids": ids[:1]}
    got = dam.count(small, one)["flops"] / dam.count(model, one)["flops"]
    assert 1 - TOLERANCE <= got * 3 <= 1 + TOLERANCE, (got, dam.widths(model))
    assert trainer.budget.summary(got)["ok"]


class PerHeadScaleAttention(nn.Module):
    """Looks like HF's standard attention (q/k/v/o Linears, ``head_dim``, heads split by
    width) but scales each head by a factor it derives from its config's head count: a per
    head quantity torchdam cannot see, so removing heads changes its outputs."""

    def __init__(self, dim: int = H, heads: int = HEADS) -> None:
        super().__init__()
        self.head_dim, self.config_heads = dim // heads, heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):
        hidden_shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (p(x).view(hidden_shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)
        n = y.shape[1]
        scale = torch.arange(1, self.config_heads + 1, dtype=y.dtype)[:n].view(1, n, 1, 1)  # per head
        return self.o_proj((y * scale).transpose(1, 2).reshape(*x.shape[:-1], -1))


PerHeadScaleAttention.__module__ = "transformers.models.fake.modeling_fake"  # taken for an HF module


class PerHeadScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp, self.head = PerHeadScaleAttention(), nn.Linear(H, FFN), nn.Linear(FFN, 3)

    def forward(self, x):
        return self.head(F.relu(self.mlp(x + self.attn(x)))).mean(1)


def test_heads_whose_removal_changes_the_outputs_are_kept_with_a_warning_naming_them():
    """A wrongly recognised head layout must not fail compact after training: the module
    keeps its heads (dead ones output zero, as gated), said in one warning naming it."""
    torch.manual_seed(0)
    model = PerHeadScaleNet().eval()
    gates = dam.attach(model)
    assert heads_of(model.attn) is not None and "attn" in gates  # taken for standard attention
    with torch.no_grad():
        for g in gates.values():
            g.beta.fill_(-2.0)
    x, fresh = torch.randn(2, SEQ, H), torch.randn(3, SEQ, H)
    with pytest.warns(UserWarning, match=r"kept every head of 'attn'"), torch.no_grad():
        small = dam.compact(model, x)
    assert small.attn.q_proj.out_features == H  # heads kept
    assert small.mlp.out_features == dam.widths(model)["mlp"][0] < FFN  # units still removed
    with torch.no_grad():
        assert torch.allclose(small(fresh), model(fresh), atol=1e-5)


def test_width_model_prices_heads_compact_keeps():
    torch.manual_seed(0)
    model = PerHeadScaleNet().eval()
    gates = dam.attach(model)
    x = torch.randn(2, SEQ, H)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compact's warning that attn keeps its heads
        wm = WidthModel(model, x)
        for beta in (-1.0, -2.5):
            with torch.no_grad():
                for g in gates.values():
                    g.beta.fill_(beta)
                real = dam.count(dam.compact(model, x), x[:1])
            for metric in ("flops", "params"):
                said = float(wm.cost(live_counts(model).clamp(min=1), metric))
                assert abs(said / real[metric] - 1) < 0.01, (beta, metric, said, real[metric])


def test_attention_sinks_leave_with_their_heads():
    c = compacted("gpt_oss")
    for layer in range(LAYERS):
        name = f"model.layers.{layer}.self_attn"
        live, total = dam.widths(c.gated)[name]
        per = HEADS // total  # query heads per kv unit
        gated, small = c.gated.get_submodule(name), c.small.get_submodule(name)
        assert small.sinks.shape == (live * per,) and small.q_proj.out_features == live * per * gated.head_dim
        keep = [u * per + i for u in range(total - live, total) for i in range(per)]  # DAM kills the low units
        assert torch.equal(small.sinks, gated.sinks.detach()[keep])
