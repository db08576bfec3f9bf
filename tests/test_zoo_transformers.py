"""Transformers as DAM hosts: heads and FFN hidden units gated by the default attach,
trained a few steps, compacted exactly, for torch and Hugging Face families; each compacted
model carries no DAM state, round-trips ``torchdam.save``/``load`` exactly and exports to
ONNX or documents why not (``tests/zoo_checks.py``).

Tiny models (hidden 32, 2 layers, 4 heads, sequence 8) with random weights, built from
configs (never downloaded)."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_checks import (
    OnnxLimitation,
    assert_no_dam_state,
    assert_onnx_export,
    assert_save_load_round_trip,
    export_and_compare,
)

import torchdam as dam
from torchdam import attention
from torchdam.attach import plan
from torchdam.attention import PrunedMultiheadAttention
from torchdam.calling import call, compared_outputs
from torchdam.compact import compact

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, HEAD_DIM, FFN, SEQ, VOCAB = 32, 4, 8, 64, 8, 50


# ---------------------------------------------------------------- torch models

class TorchEncoderNet(nn.Module):
    """``nn.TransformerEncoder`` (batch_first, fast path available) between a linear
    embedding and a classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=FFN, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(HIDDEN, 5)

    def forward(self, x, padding=None):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding).mean(1))


class MHABlock(nn.Module):
    """Pre-norm block written by hand: MultiheadAttention + LayerNorm + MLP, residuals."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, HIDDEN)
        self.blocks = nn.Sequential(MHABlock(), MHABlock())
        self.head = nn.Linear(HIDDEN, 5)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


# ---------------------------------------------------------------- Hugging Face models

def bert(impl):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=16, num_labels=3, attn_implementation=impl, initializer_range=0.2)
    return transformers.BertForSequenceClassification(cfg)


def vit(impl):
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=HEADS, intermediate_size=FFN, num_labels=3, attn_implementation=impl, initializer_range=0.2)
    return transformers.ViTForImageClassification(cfg)


def gpt2(impl):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_inner=FFN,
        bos_token_id=0, eos_token_id=0, attn_implementation=impl, initializer_range=0.2)
    return transformers.GPT2LMHeadModel(cfg)


def llama(impl):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, attn_implementation=impl, initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg)


def tokens(batch, gen):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=gen)


def text_inputs(batch, gen):
    ids = tokens(batch, gen)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, -2:] = 0  # one padded sequence
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], object]  # what compact and training get
    count_input: Callable[[object], torch.Tensor]  # a tensor for dam.count
    classes: int  # logits' last dim, for the training loss
    units: int  # head units per attention module (kv groups under GQA)
    ffn: str  # suffix of the FFN hidden layer's name
    check: Callable[[nn.Module, int], None]  # compacted attention module, live units
    onnx: OnnxLimitation | None = None  # why the compacted model does not export as called here


def check_mha(m, live):
    if live == HEADS:
        assert isinstance(m, nn.MultiheadAttention)
    else:
        assert isinstance(m, PrunedMultiheadAttention)
        assert (m.num_heads, m.head_dim, m.embed_dim) == (live, HEAD_DIM, HIDDEN)
        assert m.q_proj.out_features == m.out_proj.in_features == live * HEAD_DIM


def check_bert(m, live):
    assert (m.self.num_attention_heads, m.self.all_head_size) == (live, live * HEAD_DIM)
    assert m.self.query.out_features == m.self.value.out_features == m.output.dense.in_features == live * HEAD_DIM


def check_vit(m, live):
    assert m.num_attention_heads == live
    assert m.q_proj.out_features == m.k_proj.out_features == m.o_proj.in_features == live * HEAD_DIM


def check_gpt2(m, live):
    assert (m.num_heads, m.split_size, m.embed_dim) == (live, live * HEAD_DIM, HIDDEN)
    assert m.c_attn.weight.shape == (HIDDEN, 3 * live * HEAD_DIM)
    assert m.c_proj.weight.shape == (live * HEAD_DIM, HIDDEN)


def check_llama(m, live):
    groups = HEADS // 2  # query heads per key/value head
    assert (m.num_key_value_heads, m.num_heads, m.num_key_value_groups) == (live, live * groups, groups)
    assert m.k_proj.out_features == m.v_proj.out_features == live * HEAD_DIM
    assert m.q_proj.out_features == m.o_proj.in_features == live * groups * HEAD_DIM


def with_attention_mask(inputs):
    """``inputs`` plus an explicit attention mask (the last two tokens of sequence 0 padded)."""
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, -2:] = 0
    return {**inputs, "attention_mask": mask}


#: HF causal LMs called with input_ids alone: without an attention mask and a cache,
#: transformers' mask code looks for packed sequences in the position ids
#: (masking_utils.find_packed_sequence_indices, torch.diff), and the TorchScript exporter has
#: no ONNX symbolic for aten::diff at opset 20. With an attention mask that code does not run
#: and the model exports (checked); torch.export based export handles aten::diff (checked in
#: test_compacted_causal_lm_exports_with_the_default_exporter).
CAUSAL_LM_ONNX = OnnxLimitation(
    torch.onnx.errors.UnsupportedOperatorError, "aten::diff",
    "TorchScript ONNX export has no symbolic for aten::diff (HF's packed-sequence detection "
    "without an attention mask)", workaround=with_attention_mask)


def _cases():
    cases = [
        Case("torch_encoder", TorchEncoderNet, lambda b, g: torch.randn(b, SEQ, 8, generator=g), lambda x: x,
             5, HEADS, "linear1", check_mha),
        Case("mha_block", MHANet, lambda b, g: torch.randn(b, SEQ, 8, generator=g), lambda x: x,
             5, HEADS, "mlp.0", check_mha),
    ]
    for impl in ("eager", "sdpa"):
        cases += [
            Case(f"bert_{impl}", lambda impl=impl: bert(impl), text_inputs, lambda x: x["input_ids"],
                 3, HEADS, "intermediate.dense", check_bert),
            Case(f"vit_{impl}", lambda impl=impl: vit(impl),
                 lambda b, g: {"pixel_values": torch.randn(b, 3, 32, 32, generator=g)},
                 lambda x: x["pixel_values"], 3, HEADS, "mlp.fc1", check_vit),
            Case(f"gpt2_{impl}", lambda impl=impl: gpt2(impl), lambda b, g: {"input_ids": tokens(b, g)},
                 lambda x: x["input_ids"], VOCAB, HEADS, "mlp.c_fc", check_gpt2, CAUSAL_LM_ONNX),
            Case(f"llama_{impl}", lambda impl=impl: llama(impl), lambda b, g: {"input_ids": tokens(b, g)},
                 lambda x: x["input_ids"], VOCAB, 2, "mlp.up_proj", check_llama, CAUSAL_LM_ONNX),
        ]
    return cases


CASES = _cases()


def logits(model, inputs):
    return compared_outputs(call(model, inputs))[0]


def is_attention(module):
    return type(module) in attention.attention_types()


CASE = {c.name: c for c in CASES}


@dataclass
class Compacted:
    gated: nn.Module
    small: nn.Module
    gates: dict
    heads: list
    ffn: list
    widths: dict
    example: object
    fresh: object
    gen: torch.Generator


@functools.cache
def compacted(case_name: str) -> Compacted:
    """Default attach, a few real training steps with the penalty, mixed live/dead gates,
    compact under no_grad; once per case (the tests below share it)."""
    case = CASE[case_name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = case.build()
    gates = dam.attach(model)
    heads = [n for n in gates if is_attention(model.get_submodule(n))]
    ffn = [n for n in gates if n.endswith(case.ffn)]
    assert len(heads) == 2 and len(ffn) == 2, list(gates)
    for name in heads:  # the attention's own projections are not gated as layers
        inner = model.get_submodule(name)
        assert not any(isinstance(getattr(m, "dam_gate", None), nn.Module) for m in inner.modules() if m is not inner)

    # a few real training steps, penalty included: the betas go down
    betas = dam.gate_parameters(model)
    ids = {id(b) for b in betas}
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": 1e-3},
                             {"params": betas, "lr": 0.05, "weight_decay": 0.0}])
    start = [b.item() for b in betas]
    model.train()
    for _ in range(3):
        x = case.inputs(4, gen)
        out = logits(model, x)
        target = torch.randint(0, case.classes, out.shape[:-1], generator=gen)
        loss = F.cross_entropy(out.reshape(-1, case.classes), target.reshape(-1)) + dam.penalty(model, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b.item() < s for b, s in zip(betas, start))

    # mixed live/dead: FFN units and (for n=4) heads 0-1 / (GQA, n=2) kv group 0 die
    with torch.no_grad():
        for name, g in gates.items():
            g.beta.fill_(-1.5 if name in heads else -2.0)
    widths = dam.widths(model)
    model.eval()
    fresh = case.inputs(3, gen)
    example = case.inputs(2, gen)
    with torch.no_grad():
        small = compact(model, example)
    return Compacted(model, small, gates, heads, ffn, widths, example, fresh, gen)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_default_attach_trains_prunes_heads_and_ffn_and_compacts_exactly(case):
    c = compacted(case.name)
    model, gates, heads, widths, fresh, gen = c.gated, c.gates, c.heads, c.widths, c.fresh, c.gen
    for name in heads:  # heads (kv groups) are the units
        assert widths[name] == (case.units // 2, case.units)

    with torch.no_grad():  # the gated model's eval output depends on the head gates
        before = logits(model, fresh)
        gates[heads[0]].beta.fill_(-3.0)
        assert (logits(model, fresh) - before).abs().max() > 1e-3 * before.abs().max()
        gates[heads[0]].beta.fill_(-1.5)
        assert torch.equal(logits(model, fresh), before)

    small = c.small
    assert not any(isinstance(m, dam.DAMGate) for m in small.modules())
    assert_no_dam_state(small)  # no head-gate, _sa_block or nested-tensor hooks left
    with torch.no_grad():
        ref, got = logits(model, fresh), logits(small, fresh)
    assert got.shape == ref.shape
    assert (ref - got).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())

    for name in heads:
        case.check(small.get_submodule(name), widths[name][0])
    for name in c.ffn:
        layer = small.get_submodule(name)
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.nf
        assert width == widths[name][0]
    x1 = case.count_input(case.inputs(1, gen))
    gated_count, small_count = dam.count(model, x1), dam.count(small, x1)
    assert small_count["params"] < gated_count["params"]
    assert small_count["flops"] < gated_count["flops"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compacted_model_saves_and_loads_exactly(case, tmp_path):
    c = compacted(case.name)
    loaded = assert_save_load_round_trip(c.small, case.inputs(5, torch.Generator().manual_seed(2)),
                                         tmp_path / "compacted")
    for name in c.heads:  # narrowed head counts come back as saved, not as the config says
        case.check(loaded.get_submodule(name), c.widths[name][0])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compacted_model_exports_to_onnx(case, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    c = compacted(case.name)
    assert_onnx_export(c.small, c.example, c.fresh, tmp_path / "m.onnx", case.onnx)


def test_compacted_causal_lm_exports_with_the_default_exporter(tmp_path):
    """What the TorchScript exporter cannot export (aten::diff, see CAUSAL_LM_ONNX), the
    torch.export based one (OnnxModel's default) does: input_ids alone, batch dynamic."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    c = compacted("llama_sdpa")
    export_and_compare(c.small, c.example, c.fresh, tmp_path / "m.onnx", dynamo=True)


# ---------------------------------------------------------------- torch fast paths

def test_transformer_encoder_fast_path_and_nested_tensors_respect_gates():
    torch.manual_seed(0)
    model = TorchEncoderNet().eval()
    x = torch.randn(3, SEQ, 8)
    padding = torch.zeros(3, SEQ, dtype=torch.bool)
    padding[0, 5:] = True
    gates = dam.attach(model)
    assert model.encoder.use_nested_tensor is False
    with torch.no_grad():  # eval + no_grad + padding mask: torch's fused/nested path would run
        before = model(x, padding)
        for name in ("encoder.layers.0.self_attn", "encoder.layers.1.linear1"):
            old = gates[name].beta.item()
            gates[name].beta.fill_(-3.0)
            assert (model(x, padding) - before).abs().max() > 1e-4, name
            gates[name].beta.fill_(old)
        gates["encoder.layers.0.self_attn"].beta.fill_(-1.5)
        gates["encoder.layers.1.linear1"].beta.fill_(-2.0)
        small = compact(model, (x, padding))
        assert isinstance(small.encoder.layers[0].self_attn, PrunedMultiheadAttention)
        assert small.encoder.use_nested_tensor is False  # computes what the gated model did
        assert not any(m._forward_pre_hooks for m in small.modules())
        x2 = torch.randn(4, SEQ, 8)
        pad2 = torch.zeros(4, SEQ, dtype=torch.bool)
        pad2[1, 3:] = True
        assert torch.allclose(small(x2, pad2), model(x2, pad2), atol=1e-5)
    dam.detach(model)
    assert model.encoder.use_nested_tensor is True
    assert not any(m._forward_pre_hooks for m in model.modules())


class _Attend(nn.Module):
    """One MultiheadAttention called in a given form; returns the attention output."""

    def __init__(self, kwargs, **mha):
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, **mha)
        self.kwargs = kwargs

    def forward(self, q, k, v, *masks):
        extra = dict(zip(("key_padding_mask", "attn_mask"), masks))
        return self.attn(q, k, v, **self.kwargs, **{k: m for k, m in extra.items() if m is not None})[0]


def _causal(n):
    return torch.triu(torch.full((n, n), float("-inf")), 1)


MHA_FORMS = {
    "self_batch_first": (dict(need_weights=False), dict(batch_first=True), lambda: (6, 6, None, None)),
    "cross_seq_first_padding": (dict(need_weights=False), dict(), lambda: (5, 7, "pad", None)),
    "need_weights_float_mask": (dict(need_weights=True), dict(batch_first=True), lambda: (6, 6, None, "2d")),
    "mask_per_head_3d": (dict(need_weights=False), dict(batch_first=True), lambda: (6, 6, "pad", "3d")),
    "causal_hint": (dict(need_weights=False, is_causal=True), dict(batch_first=True), lambda: (6, 6, None, "causal")),
    "kdim_vdim_dropout": (dict(need_weights=False), dict(kdim=12, vdim=10, dropout=0.3), lambda: (5, 4, None, None)),
}


@pytest.mark.parametrize("form", list(MHA_FORMS))
def test_pruned_multihead_attention_matches_the_gated_one(form):
    kwargs, mha, dims = MHA_FORMS[form]
    torch.manual_seed(0)
    model = _Attend(kwargs, **mha)
    gates = dam.attach(model)
    gates["attn"].beta.data.fill_(-1.5)  # heads 0 and 1 die
    tgt, src, pad, mask = dims()
    batch_first = mha.get("batch_first", False)

    def inputs(batch):
        def seq(n, dim):
            return torch.randn(batch, n, dim) if batch_first else torch.randn(n, batch, dim)
        q = seq(tgt, HIDDEN)
        k, v = (q, q) if src == tgt and "kdim" not in mha else (seq(src, mha.get("kdim", HIDDEN)),
                                                                  seq(src, mha.get("vdim", HIDDEN)))
        padding = torch.zeros(batch, src, dtype=torch.bool) if pad else None
        if pad:
            padding[0, -2:] = True
        attn_mask = {None: None, "2d": torch.randn(tgt, src), "causal": _causal(tgt),
                     "3d": torch.rand(batch * HEADS, tgt, src) > 0.8}[mask]
        if mask == "3d":
            attn_mask[..., 0] = False  # every query sees at least one key
        return (q, k, v, padding, attn_mask)

    small = compact(model, inputs(3))
    assert isinstance(small.attn, PrunedMultiheadAttention) and small.attn.num_heads == 2
    model.eval()
    fresh = inputs(4)
    with torch.no_grad():
        assert torch.allclose(small(*fresh), model(*fresh), atol=1e-5)
    if pad is None and mask in (None, "2d"):  # one unbatched sample, as nn.MultiheadAttention takes it
        one = tuple(t[0] if batch_first else t[:, 0] for t in fresh[:3])
        with torch.no_grad():
            assert torch.allclose(small(*one, None, fresh[4]), model(*one, None, fresh[4]), atol=1e-5)


def test_head_gates_per_sample_path_matches_fused():
    """``fused=False`` applies the head gate to the heads' outputs (for per-sample gates):
    same values as the fused weight scaling, for MHA and an HF module."""
    for build, x in ((MHANet, torch.randn(2, SEQ, 8)), (lambda: bert("eager"), {"input_ids": tokens(2, None)})):
        torch.manual_seed(0)
        a = build().eval()
        b = build().eval()
        b.load_state_dict(a.state_dict())
        for model, fused in ((a, True), (b, False)):
            for g in dam.attach(model, fused=fused).values():
                g.beta.data.fill_(-1.5)
        with torch.no_grad():
            assert torch.allclose(logits(a, x), logits(b, x), atol=1e-6)


# ---------------------------------------------------------------- GQA, Conv1D, options

def test_llama_gqa_unit_is_one_kv_head_with_its_query_heads():
    torch.manual_seed(0)
    model = llama("eager")
    gates = dam.attach(model)
    name = "model.layers.0.self_attn"
    assert gates[name].n == 2 and dam.widths(model)[name] == (2, 2)
    gates[name].beta.data.fill_(-2.0)  # unit 0 (kv head 0, q heads 0-1) dies
    gates["model.layers.1.self_attn"].beta.data.fill_(-10.0)  # every unit dies: min_width keeps one
    ids = {"input_ids": tokens(2, None)}
    with pytest.warns(UserWarning, match="min_width"), torch.no_grad():
        small = compact(model, ids)
    old, new = model.get_submodule(name), small.get_submodule(name)
    d = HEAD_DIM
    assert torch.equal(new.k_proj.weight, old.k_proj.weight[d:])
    assert torch.equal(new.v_proj.weight, old.v_proj.weight[d:])
    assert torch.equal(new.q_proj.weight, old.q_proj.weight[2 * d:])  # q heads 2 and 3 read kv head 1
    g = gates[name].mask().detach()[1]
    assert torch.allclose(new.o_proj.weight, old.o_proj.weight[:, 2 * d:] * g)
    assert small.model.layers[1].self_attn.num_key_value_heads == 1


def test_gpt2_conv1d_is_gated_folded_and_pruned_like_a_linear():
    conv1d = transformers.pytorch_utils.Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(16, 8), nn.GELU(), conv1d(4, 16))
    gates = dam.attach(model)  # the default nn.Linear selector selects Conv1D; the last one is the output
    assert list(gates) == ["0"] and gates["0"].n == 16
    gates["0"].beta.data.fill_(-2.0)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        expected = model[2](model[1](gates["0"](conv1d.forward(model[0], x))))
        assert torch.allclose(model(x), expected, atol=1e-6)
        small = compact(model, x)
    live = dam.widths(model)["0"][0]
    assert small[0].weight.shape == (8, live) and small[2].weight.shape == (live, 4)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-6)


def test_stream_writers_are_not_gated_by_type_but_can_be_named():
    model = vit("eager")
    sites = plan(model)
    assert "vit.embeddings.patch_embeddings.projection" not in sites
    assert not any(n.endswith("fc2") or n.endswith("_proj") for n in sites)
    named = plan(model, layers=(nn.Linear, "vit.layers.0.mlp.fc2"))
    assert "vit.layers.0.mlp.fc2" in named and "vit.layers.1.mlp.fc2" not in named
    llama_sites = plan(llama("eager"))
    assert not any(n.endswith(("gate_proj", "down_proj")) for n in llama_sites)


def test_heads_false_and_detach_restore_the_model():
    torch.manual_seed(0)
    model = gpt2("eager").eval()
    x = {"input_ids": tokens(2, None)}
    with torch.no_grad():
        before = logits(model, x)
    gates = dam.attach(model, heads=False)
    assert not any(is_attention(model.get_submodule(n)) for n in gates)
    assert not any(".attn." in n for n in gates)
    dam.detach(model)
    gates = dam.attach(model)
    for g in gates.values():
        g.beta.data.fill_(-1.5)
    dam.detach(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(logits(model, x), before)


def test_compact_takes_a_tensor_or_a_dict_for_hf_models():
    torch.manual_seed(0)
    model = gpt2("sdpa")
    for g in dam.attach(model).values():
        g.beta.data.fill_(-1.5)
    ids = tokens(2, None)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # no cache, no deprecation noise from our calls
        a = compact(model, ids)
        b = compact(model, {"input_ids": ids})
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


def test_a_compacted_model_can_be_gated_and_compacted_again():
    torch.manual_seed(0)
    model = MHANet()
    for g in dam.attach(model).values():
        g.beta.data.fill_(-1.5)
    x = torch.randn(3, SEQ, 8)
    with torch.no_grad():
        small = compact(model, x)
    gates = dam.attach(small)  # the pruned attention's heads are units again, not its projections
    assert dam.widths(small)["blocks.0.attn"] == (2, 2)
    assert not any(n.startswith("blocks.0.attn.") for n in gates)
    gates["blocks.0.attn"].beta.data.fill_(-2.0)  # of heads 2 and 3, head 2 dies
    with torch.no_grad():
        smaller = compact(small, x)
        assert torch.allclose(smaller(x), small(x), atol=1e-5)
    attn = smaller.blocks[0].attn
    assert (attn.num_heads, attn.kept_heads, attn.total_heads) == (1, [3], HEADS)


@pytest.mark.parametrize("case", ["mha_block", "torch_encoder", "llama_sdpa"])
def test_gated_transformer_trains_under_torch_compile_and_its_compacted_copy_compiles(case):
    """What a user does with ``torch.compile``: the gated model's beta gradients through the
    compiled forward equal eager ones (head gates, MHA's gated forward, HF SDPA), and the
    compacted copy compiles and gives the gated outputs (``aot_eager``: dynamo and autograd
    tracing without inductor's C++ build)."""
    spec = CASE[case]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = spec.build()
    gates = dam.attach(model)
    with torch.no_grad():
        for g in gates.values():
            g.beta.fill_(-1.5)
    x = spec.inputs(2, gen)
    grads = []
    for forward in (torch.compile(model, backend="aot_eager"), model):
        model.zero_grad()
        (logits(forward, x).square().mean() + dam.penalty(model, 0.1)).backward()
        grads.append([g.beta.grad.clone() for g in gates.values()])
    for compiled, eager in zip(*grads, strict=True):
        assert torch.allclose(compiled, eager, atol=1e-6)
    model.eval()
    with torch.no_grad():
        small = compact(model, x)
        got, ref = logits(torch.compile(small, backend="aot_eager"), x), logits(model, x)
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
