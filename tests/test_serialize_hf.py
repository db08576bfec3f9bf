"""torchdam.serialize on Hugging Face transformers models built tiny from configs (random
weights, nothing downloaded): exact round trips, hand-narrowed and compacted layers, shared
configs, and the allow-list for transformers classes."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import Tensor, nn

import torchdam as dam
from torchdam.errors import CheckpointError
from torchdam.serialize import ARCH_FILE, load, save

transformers = pytest.importorskip("transformers")
from transformers import (
    BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
    LlamaForCausalLM, ViTConfig, ViTForImageClassification,
)
from transformers.pytorch_utils import Conv1D

VOCAB = 100


def _bert_config(**kw) -> BertConfig:
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      vocab_size=VOCAB, **kw)


def _tokens() -> dict[str, Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (2, 7))}


_MODELS = {
    "bert": (lambda: BertModel(_bert_config()), _tokens),
    "bert-classifier": (lambda: BertForSequenceClassification(_bert_config(num_labels=3)), _tokens),
    "bert-gelu_python": (lambda: BertModel(_bert_config(hidden_act="gelu_python")), _tokens),
    "bert-gelu_pytorch_tanh": (lambda: BertModel(_bert_config(hidden_act="gelu_pytorch_tanh")), _tokens),
    "vit": (lambda: ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3)), lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                                bos_token_id=0, eos_token_id=0)), _tokens),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64)), _tokens),
}


def _outputs(model: nn.Module, inputs: dict[str, Tensor]) -> list[Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return [v for v in out.values() if isinstance(v, Tensor)]


def _round_trip(model: nn.Module, make_inputs, tmp_path) -> nn.Module:
    """Saves and reloads ``model`` (eval); outputs on inputs drawn after saving, state_dict,
    non-persistent buffers and configs must be identical."""
    model.eval()
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training
    inputs = make_inputs()
    expected, got = _outputs(model, inputs), _outputs(loaded, inputs)
    assert len(expected) == len(got) > 0
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    originals = dict(model.named_buffers())
    assert all(torch.equal(buf, originals[name]) for name, buf in loaded.named_buffers())
    assert vars(loaded.config) == vars(model.config)
    assert loaded.config._attn_implementation == model.config._attn_implementation
    # one config object, shared by every module that holds one, as in the saved model
    assert all(m.config is loaded.config for m in loaded.modules() if "config" in vars(m))
    return loaded


@pytest.mark.parametrize("name", list(_MODELS))
def test_hf_model_round_trip(tmp_path, name):
    build, make_inputs = _MODELS[name]
    torch.manual_seed(0)
    _round_trip(build(), make_inputs, tmp_path)


def test_gpt2_keeps_conv1d_tied_head_and_generation_config(tmp_path):
    build, make_inputs = _MODELS["gpt2"]
    model = build()
    loaded = _round_trip(model, make_inputs, tmp_path)
    assert type(loaded.transformer.h[0].attn.c_attn) is Conv1D
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert loaded.generation_config.to_dict() == model.generation_config.to_dict()


def test_llama_rotary_buffers_and_generate(tmp_path):
    build, make_inputs = _MODELS["llama"]
    model = build()
    loaded = _round_trip(model, make_inputs, tmp_path)
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    prompt = make_inputs()["input_ids"]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=3, do_sample=False),
                       model.generate(prompt, max_new_tokens=3, do_sample=False))


def _narrowed_linear(linear: nn.Linear, out_keep: list[int] | None = None, in_keep: list[int] | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    weight = weight if out_keep is None else weight[out_keep]
    weight = weight if in_keep is None else weight[:, in_keep]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.detach() if out_keep is None else linear.bias.detach()[out_keep])
    return new


def test_bert_narrowed_by_hand_rebuilds_saved_shapes_not_config_shapes(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config())
    layer0, layer1 = model.bert.encoder.layer
    keep = list(range(0, 64, 2))[:40] + list(range(1, 17, 2))  # 40 of 64 intermediate units
    layer0.intermediate.dense = _narrowed_linear(layer0.intermediate.dense, out_keep=keep)
    layer0.output.dense = _narrowed_linear(layer0.output.dense, in_keep=keep)
    heads = list(range(8, 24))  # heads 1 and 2 of 4
    attn = layer1.attention
    for name in ("query", "key", "value"):
        setattr(attn.self, name, _narrowed_linear(getattr(attn.self, name), out_keep=heads))
    attn.self.num_attention_heads, attn.self.all_head_size = 2, 16
    attn.output.dense = _narrowed_linear(attn.output.dense, in_keep=heads)
    loaded = _round_trip(model, _tokens, tmp_path)
    l0, l1 = loaded.bert.encoder.layer
    assert l0.intermediate.dense.out_features == 40 and l0.output.dense.in_features == 40
    assert loaded.config.intermediate_size == 64 and loaded.config.num_attention_heads == 4
    assert (l1.attention.self.num_attention_heads, l1.attention.self.all_head_size) == (2, 16)
    assert l1.attention.self.query.weight.shape == (16, 32)


def test_llama_narrowed_by_hand_keeps_module_attributes(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_MODELS["llama"][0]().config)
    layer = model.model.layers[0]
    mlp, attn = layer.mlp, layer.self_attn
    keep = list(range(48))
    mlp.gate_proj = _narrowed_linear(mlp.gate_proj, out_keep=keep)
    mlp.up_proj = _narrowed_linear(mlp.up_proj, out_keep=keep)
    mlp.down_proj = _narrowed_linear(mlp.down_proj, in_keep=keep)
    mlp.intermediate_size = 48
    q_heads, kv_heads = list(range(16)), list(range(8))  # 2 query heads sharing 1 key/value head
    attn.q_proj = _narrowed_linear(attn.q_proj, out_keep=q_heads)
    attn.k_proj = _narrowed_linear(attn.k_proj, out_keep=kv_heads)
    attn.v_proj = _narrowed_linear(attn.v_proj, out_keep=kv_heads)
    attn.o_proj = _narrowed_linear(attn.o_proj, in_keep=q_heads)
    loaded = _round_trip(model, _tokens, tmp_path)
    assert loaded.model.layers[0].mlp.intermediate_size == 48 and loaded.config.intermediate_size == 64
    assert loaded.model.layers[0].self_attn.k_proj.out_features == 8
    assert loaded.model.layers[1].mlp.down_proj.in_features == 64


def test_gpt2_narrowed_conv1d_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _MODELS["gpt2"][0]()
    mlp = model.transformer.h[1].mlp
    keep = list(range(0, 128, 2))
    c_fc, c_proj = Conv1D(len(keep), 32), Conv1D(32, len(keep))
    c_fc.weight.data.copy_(mlp.c_fc.weight.detach()[:, keep])
    c_fc.bias.data.copy_(mlp.c_fc.bias.detach()[keep])
    c_proj.weight.data.copy_(mlp.c_proj.weight.detach()[keep])
    c_proj.bias.data.copy_(mlp.c_proj.bias.detach())
    mlp.c_fc, mlp.c_proj = c_fc, c_proj
    loaded = _round_trip(model, _tokens, tmp_path)
    assert loaded.transformer.h[1].mlp.c_fc.nf == 64 and loaded.transformer.h[1].mlp.c_proj.nx == 64


def test_compacted_bert_round_trips(tmp_path):
    torch.manual_seed(0)
    model = BertModel(_bert_config()).eval()
    for i, gate in enumerate(dam.attach(model, layers=["*.intermediate.dense"]).values()):
        gate.beta.data.fill_(-1.0 - i)
    small = dam.compact(model, _tokens()["input_ids"])
    widths = [layer.intermediate.dense.out_features for layer in small.encoder.layer]
    assert all(w < 64 for w in widths)
    loaded = _round_trip(small, _tokens, tmp_path)
    assert [layer.intermediate.dense.out_features for layer in loaded.encoder.layer] == widths


# ---------------------------------------------------------------------------- allow-list

def _saved_bert(tmp_path) -> dict:
    save(BertModel(_bert_config()), tmp_path)
    return json.loads((tmp_path / ARCH_FILE).read_text())


@pytest.mark.parametrize("cls, module", [
    ("transformers.trainer.Trainer", "transformers.trainer"),
    ("transformers.modeling_utils.PreTrainedModel", "transformers.modeling_utils"),
    ("transformers.models.bert.configuration_bert.BertConfig", "transformers.models.bert.configuration_bert"),
    ("transformers.models.bert.modeling_bert.os.system", "transformers.models.bert.modeling_bert"),
])
def test_transformers_module_class_outside_allow_list_refused(tmp_path, cls, module):
    arch = _saved_bert(tmp_path)
    arch["root"].update({"class": cls, "module": module})
    (tmp_path / ARCH_FILE).write_text(json.dumps(arch))
    imported_before = module in sys.modules
    with pytest.raises(CheckpointError, match=rf"{ARCH_FILE}.*{cls}"):
        load(tmp_path)
    assert imported_before or module not in sys.modules  # a refused module is never imported


@pytest.mark.parametrize("cls, module", [
    ("transformers.models.bert.modeling_bert.BertModel", "transformers.models.bert.modeling_bert"),
    ("transformers.training_args.TrainingArguments", "transformers.training_args"),
    ("transformers.models.bert.configuration_bert.PreTrainedConfig", "transformers.models.bert.configuration_bert"),
])
def test_config_object_class_outside_allow_list_refused(tmp_path, cls, module):
    arch = _saved_bert(tmp_path)
    arch["objects"][0].update({"class": cls, "module": module})
    (tmp_path / ARCH_FILE).write_text(json.dumps(arch))
    with pytest.raises(CheckpointError, match=rf"{ARCH_FILE}.*{cls}"):
        load(tmp_path)


def test_missing_transformers_is_one_clear_error(tmp_path, monkeypatch):
    _saved_bert(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(CheckpointError, match=rf"{ARCH_FILE}.*transformers.*pip install transformers"):
        load(tmp_path)


def test_unknown_hf_attribute_object_refused_at_save(tmp_path):
    model = BertModel(_bert_config())
    model.encoder.cache = object()
    with pytest.raises(CheckpointError, match=r"'cache' of module 'encoder'.*state_dict with safetensors"):
        save(model, tmp_path)
