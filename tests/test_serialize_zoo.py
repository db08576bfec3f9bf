"""torchdam.serialize on RNNs, attention and transformer layers, the layer zoo, narrowed
layers, and the allow-lists for functions, methods and registered classes."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

import torchdam as dam
from torchdam.errors import CheckpointError, ConfigError
from torchdam.serialize import ARCH_FILE, FUNCTIONS, load, register_function, register_module, save



def _outputs(model: nn.Module, inputs: tuple) -> list[Tensor]:
    with torch.no_grad():
        return [t for t in tree_flatten(model(*inputs))[0] if isinstance(t, Tensor)]


def _round_trip(model: nn.Module, make_inputs, tmp_path, **load_kw) -> nn.Module:
    """Saves and reloads ``model``; outputs on inputs drawn after saving and the state_dict
    must be identical (no tolerance)."""
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", **load_kw)
    assert type(loaded) is type(model) and loaded.training == model.training
    inputs = make_inputs()
    expected, got = _outputs(model, inputs), _outputs(loaded, inputs)
    assert len(expected) == len(got) > 0
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    return loaded


def _assert_flat_weights_are_parameters(rnn: nn.RNNBase) -> None:
    assert len(rnn._flat_weights) == len(rnn._flat_weights_names)
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))


# ---------------------------------------------------------------------------- RNNs

_RNNS = {
    "lstm-bi-2layer-batch_first-proj": (
        lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True, proj_size=3),
        lambda: (torch.randn(2, 5, 4),)),
    "lstm-with-state": (
        lambda: nn.LSTM(4, 6, bias=False),
        lambda: (torch.randn(5, 2, 4), (torch.randn(1, 2, 6), torch.randn(1, 2, 6)))),
    "gru-bi-2layer": (lambda: nn.GRU(4, 6, num_layers=2, bidirectional=True, dropout=0.2),
                      lambda: (torch.randn(5, 2, 4),)),
    "rnn-relu-batch_first": (lambda: nn.RNN(4, 6, nonlinearity="relu", batch_first=True),
                             lambda: (torch.randn(2, 5, 4),)),
    "rnn-tanh-unbatched": (lambda: nn.RNN(4, 6, num_layers=3), lambda: (torch.randn(5, 4),)),
}


@pytest.mark.parametrize("name", list(_RNNS))
def test_rnn_round_trip_rebuilds_flat_weights(tmp_path, name):
    build, make_inputs = _RNNS[name]
    loaded = _round_trip(build().eval(), make_inputs, tmp_path)
    _assert_flat_weights_are_parameters(loaded)
    loaded.flatten_parameters()
    # the kernels read the loaded parameters themselves: gradients reach every one
    loaded.train()
    sum(t.sum() for t in _outputs_with_grad(loaded, make_inputs())).backward()
    assert all(p.grad is not None for p in loaded.parameters())
    # and .to() (which re-inits the flat weights) still works
    loaded.double()
    _assert_flat_weights_are_parameters(loaded)
    assert loaded._flat_weights[0].dtype == torch.float64


def _outputs_with_grad(model: nn.Module, inputs: tuple) -> list[Tensor]:
    return [t for t in tree_flatten(model(*inputs))[0] if isinstance(t, Tensor)]


@register_module
class Tagger(nn.Module):
    """Embedding -> (narrowable) LSTM -> Linear; registered, so load needs no trusted_modules."""

    def __init__(self, vocab: int = 20, width: int = 8, hidden: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.proj = nn.Linear(width, width)
        self.rnn = nn.LSTM(width, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(torch.relu(self.proj(self.embed(tokens))))[0])


def _narrow_linear_out(linear: nn.Linear, keep: list[int]) -> None:
    """In place, as Torch-Pruning narrows: new smaller parameters, updated attributes."""
    linear.weight = nn.Parameter(linear.weight.detach()[keep].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[keep].clone())
    linear.out_features = len(keep)


def _narrow_linear_in(linear: nn.Linear, keep: list[int]) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, keep].clone())
    linear.in_features = len(keep)


def test_lstm_model_narrowed_by_hand_round_trips(tmp_path):
    model = Tagger()
    model.rnn = nn.LSTM(8, 3, batch_first=True, bidirectional=True)  # rebuilt with a smaller hidden size
    model.head = nn.Linear(6, 5)
    _narrow_linear_out(model.proj, [0, 2, 3, 5])
    model.rnn.weight_ih_l0 = nn.Parameter(model.rnn.weight_ih_l0.detach()[:, [0, 2, 3, 5]].clone())
    model.rnn.weight_ih_l0_reverse = nn.Parameter(model.rnn.weight_ih_l0_reverse.detach()[:, [0, 2, 3, 5]].clone())
    model.rnn.input_size = 4
    loaded = _round_trip(model.eval(), lambda: (torch.randint(0, 20, (2, 7)),), tmp_path)
    assert loaded.rnn.hidden_size == 3 and loaded.rnn.input_size == 4 and loaded.proj.out_features == 4
    _assert_flat_weights_are_parameters(loaded.rnn)


def test_compacted_lstm_model_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Tagger()
    for gate in dam.attach(model, layers=["proj"]).values():
        gate.beta.data.fill_(-1.0)
    tokens = torch.randint(0, 20, (2, 7))
    small = dam.compact(model, tokens)
    assert small.rnn.input_size < 8
    _round_trip(small, lambda: (torch.randint(0, 20, (2, 7)),), tmp_path)


# ---------------------------------------------------------------------------- attention / transformers

_ATTENTION = {
    "mha-self": (lambda: nn.MultiheadAttention(8, 2),
                 lambda: (torch.randn(5, 2, 8),) * 3),
    "mha-batch_first-kdim-vdim-bias_kv": (
        lambda: nn.MultiheadAttention(8, 2, kdim=3, vdim=5, batch_first=True, add_bias_kv=True,
                                      add_zero_attn=True),
        lambda: (torch.randn(2, 4, 8), torch.randn(2, 6, 3), torch.randn(2, 6, 5))),
    "mha-no-bias": (lambda: nn.MultiheadAttention(8, 4, bias=False, batch_first=True),
                    lambda: (torch.randn(2, 4, 8),) * 3),
    "encoder-gelu-batch_first": (
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, activation="gelu", batch_first=True),
                                      2, norm=nn.LayerNorm(8), enable_nested_tensor=False),
        lambda: (torch.randn(2, 5, 8),)),
    "encoder-layer-silu-function-norm_first": (
        lambda: nn.TransformerEncoderLayer(8, 2, 16, activation=F.silu, norm_first=True),
        lambda: (torch.randn(5, 2, 8),)),
    "decoder-layer-gelu-module": (
        lambda: nn.TransformerDecoderLayer(8, 2, 16, activation=nn.GELU(approximate="tanh"), batch_first=True),
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 3, 8))),
    "transformer": (lambda: nn.Transformer(8, 2, 1, 1, 16),
                    lambda: (torch.randn(5, 2, 8), torch.randn(3, 2, 8))),
}


@pytest.mark.parametrize("name", list(_ATTENTION))
def test_attention_and_transformer_round_trip(tmp_path, name):
    build, make_inputs = _ATTENTION[name]
    torch.manual_seed(0)
    loaded = _round_trip(build().eval(), make_inputs, tmp_path)
    for module in loaded.modules():
        if isinstance(module, nn.MultiheadAttention):
            assert type(module.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_transformer_activation_is_the_allow_listed_function(tmp_path):
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation="gelu")
    save(layer, tmp_path)
    assert json.loads((tmp_path / ARCH_FILE).read_text())["root"]["attrs"]["activation"] == {
        "function": "torch.nn.functional.gelu"}
    assert load(tmp_path).activation is F.gelu


# ---------------------------------------------------------------------------- layer zoo

_ZOO = {
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 6, padding_idx=0, scale_grad_by_freq=True),
                                        nn.LayerNorm(6, eps=1e-3), nn.GELU(), nn.Linear(6, 2)),
                  lambda: (torch.randint(0, 10, (3, 4)),)),
    "norms": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(3, 6), nn.SiLU(), nn.Flatten(2),
                                    nn.LayerNorm(8, elementwise_affine=False), nn.RMSNorm([6, 8]),
                                    nn.RMSNorm(8, eps=1e-4), nn.Dropout(0.2), nn.Identity()),
              lambda: (torch.randn(2, 3, 4, 6),)),
    "conv-transpose-1d": (lambda: nn.Sequential(nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1),
                                                nn.ConvTranspose1d(4, 4, 3, groups=2, dilation=2)),
                          lambda: (torch.randn(2, 3, 5),)),
    "conv-transpose-2d": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, (3, 2), stride=(2, 1), padding=1),
                                                nn.ConvTranspose2d(4, 2, 2, bias=False)),
                          lambda: (torch.randn(2, 3, 4, 4),)),
    "conv-transpose-3d": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=2),
                          lambda: (torch.randn(1, 2, 2, 3, 2),)),
    "depthwise": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Conv2d(4, 8, 1),
                                        nn.Conv2d(8, 16, 3, groups=8, padding="same", padding_mode="reflect")),
                  lambda: (torch.randn(2, 4, 5, 5),)),
}


@pytest.mark.parametrize("name", list(_ZOO))
def test_layer_zoo_round_trip(tmp_path, name):
    build, make_inputs = _ZOO[name]
    torch.manual_seed(0)
    _round_trip(build().eval(), make_inputs, tmp_path)


def test_layers_narrowed_by_hand_round_trip(tmp_path):
    """Shapes and attributes as compaction leaves them, not as the constructors build them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3),
                          nn.Unflatten(1, (3, 1)), nn.ConvTranspose1d(3, 5, 3), nn.GroupNorm(5, 5))
    keep = [0, 1, 4, 6, 7]
    _narrow_linear_out(model[0], keep)
    model[1].weight = nn.Parameter(model[1].weight.detach()[keep].clone())
    model[1].bias = nn.Parameter(model[1].bias.detach()[keep].clone())
    model[1].normalized_shape = (len(keep),)
    _narrow_linear_in(model[3], keep)
    model[5].weight = nn.Parameter(model[5].weight.detach()[:, :2].clone())  # 5 -> 2 output channels
    model[5].bias = nn.Parameter(model[5].bias.detach()[:2].clone())
    model[5].out_channels = 2
    model[6] = nn.GroupNorm(2, 2)
    loaded = _round_trip(model.eval(), lambda: (torch.randn(4, 6),), tmp_path)
    assert loaded[0].weight.shape == (5, 6) and loaded[1].normalized_shape == (5,)
    assert loaded[5].out_channels == 2


# ---------------------------------------------------------------------------- allow-lists

class Unregistered(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def test_unregistered_class_refused_with_both_remedies(tmp_path):
    save(nn.Sequential(Unregistered()), tmp_path)
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    message = str(err.value)
    assert str(tmp_path / ARCH_FILE) in message and f"{__name__}.Unregistered" in message
    assert "register_module(cls)" in message and f"trusted_modules=[{__name__!r}]" in message


def test_register_module_rejects_what_load_could_not_find():
    with pytest.raises(ConfigError, match="nn.Module subclass"):
        register_module(int)

    def make():
        class Local(nn.Module):
            pass
        return Local

    with pytest.raises(ConfigError, match="module level"):
        register_module(make())


def test_lambda_activation_refused_at_save_with_advice(tmp_path):
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation=lambda x: x.clamp(min=0))
    with pytest.raises(CheckpointError) as err:
        save(layer, tmp_path)
    message = str(err.value)
    assert "'activation'" in message and "<lambda>" in message
    assert "register_function" in message and "state_dict with safetensors" in message
    assert not (tmp_path / ARCH_FILE).exists()


def test_registered_function_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr("torchdam.serialize.registry.FUNCTIONS", dict(FUNCTIONS))
    with pytest.raises(ConfigError, match="stable name"):
        register_function(lambda x: x)
    register_function(_swish)
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation=_swish).eval()
    loaded = _round_trip(layer, lambda: (torch.randn(5, 2, 8),), tmp_path)
    assert loaded.activation is _swish
    with pytest.raises(ConfigError, match="already registered"):
        register_function(torch.exp, name=f"{__name__}._swish")


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "torch.load", f"{__name__}._swish"])
def test_function_outside_allow_list_refused(tmp_path, name):
    save(nn.TransformerEncoderLayer(8, 2, 16), tmp_path)
    arch = json.loads((tmp_path / ARCH_FILE).read_text())
    arch["root"]["attrs"]["activation"] = {"function": name}
    (tmp_path / ARCH_FILE).write_text(json.dumps(arch))
    with pytest.raises(CheckpointError, match=rf"{ARCH_FILE}.*refusing function '{name}'"):
        load(tmp_path)


@pytest.mark.parametrize("value", [{"method": "forward"}, {"method": "__init__"}, {"object": 0},
                                   {"partial": {"function": "os.system", "args": ["true"], "kwargs": {"dict": {}}}}])
def test_forged_attribute_values_refused(tmp_path, value):
    save(nn.Linear(2, 2), tmp_path)
    arch = json.loads((tmp_path / ARCH_FILE).read_text())
    arch["root"]["attrs"]["extra"] = value
    (tmp_path / ARCH_FILE).write_text(json.dumps(arch))
    with pytest.raises(CheckpointError, match=ARCH_FILE):
        load(tmp_path)


@pytest.mark.parametrize("cls, module", [("os._wrap_close", "os"), ("builtins.dict", "builtins"),
                                         ("torch.nn.modules.linear.Linear", "torch.nn.modules.linear")])
def test_forged_object_class_refused(tmp_path, cls, module):
    save(nn.Linear(2, 2), tmp_path)
    arch = json.loads((tmp_path / ARCH_FILE).read_text())
    arch["objects"] = [{"class": cls, "module": module, "attrs": {}}]
    arch["root"]["attrs"]["extra"] = {"object": 0}
    (tmp_path / ARCH_FILE).write_text(json.dumps(arch))
    with pytest.raises(CheckpointError, match=rf"{ARCH_FILE}.*{cls}"):
        load(tmp_path)


def test_plain_values_round_trip(tmp_path):
    model = nn.Linear(2, 2)
    model.extra = {"ids": {0: "a", 1: "b"}, "names": {"x", "y"}, "frozen": frozenset({1, 2}),
                   "dtype": torch.bfloat16, "device": torch.device("cpu"), "size": torch.Size([2, 3]),
                   "nested": [(1, None), 2.5, float("inf")]}
    save(model, tmp_path)
    assert load(tmp_path).extra == {**model.extra, "size": (2, 3)}


def test_torch_only_model_loads_without_transformers(tmp_path, monkeypatch):
    save(nn.Sequential(nn.LSTM(3, 4)), tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    assert isinstance(load(tmp_path)[0], nn.LSTM)
