"""torchdam.serialize: pickle-free save/load of (compacted) models."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchdam.errors import CheckpointError
from torchdam.serialize import ARCH_FILE, WEIGHTS_FILE, load, load_metadata, save


class Scale(nn.Module):
    """A user-defined module: a plain attribute, a parameter, a non-persistent buffer."""

    def __init__(self, width: int, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = factor
        self.shape = (1, width)
        self.weight = nn.Parameter(torch.randn(width))
        self.register_buffer("offset", torch.randn(width), persistent=False)
        self.register_buffer("index", torch.arange(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight * self.factor + self.offset)[:, self.index].reshape(-1, *self.shape[1:])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(inplace=True), nn.Dropout(0.3),
                         nn.Linear(7, 3, bias=False))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5, momentum=None), nn.ReLU(),
        nn.MaxPool2d((2, 2)),
        nn.Conv2d(5, 4, (3, 1), padding="same", padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=(1, 0), padding_mode="circular", bias=False),
        nn.MaxPool2d(2, stride=1, ceil_mode=True), nn.Flatten(1, -1), nn.Linear(24, 2),
    )


def _warm_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A few train-mode passes so running stats and num_batches_tracked are not defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
    return model.eval()


def _assert_round_trip(model: nn.Module, x: torch.Tensor, tmp_path, **load_kw) -> nn.Module:
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", **load_kw)
    assert type(loaded) is type(model)
    assert loaded.training == model.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    return loaded


def test_mlp_round_trip(tmp_path):
    _assert_round_trip(_mlp().eval(), torch.randn(4, 3, 4), tmp_path)


def test_cnn_round_trip_with_bn_pool_padding(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    model = _warm_bn(_cnn(), x)
    loaded = _assert_round_trip(model, x, tmp_path)
    assert loaded[1].momentum is None and loaded[3].kernel_size == (2, 2)
    assert loaded[4].padding == "same" and loaded[7].padding == (1, 0)
    assert loaded[1].num_batches_tracked.dtype == torch.int64


def test_training_flags_and_requires_grad_survive(tmp_path):
    model = _mlp().train()
    model[1].weight.requires_grad_(False)
    model[4].eval()
    save(model, tmp_path)
    loaded = load(tmp_path)
    assert loaded.training and not loaded[4].training
    assert not loaded[1].weight.requires_grad and loaded[4].weight.requires_grad


def test_custom_class_needs_trusted_modules(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), Scale(4)).eval()
    save(model, tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"trusted_modules=\[.*" + Scale.__module__):
        load(tmp_path / "m")
    loaded = _assert_round_trip(model, torch.randn(2, 3), tmp_path, trusted_modules=[Scale.__module__])
    assert loaded[1].shape == (1, 4) and isinstance(loaded[1].shape, tuple)
    assert torch.equal(loaded[1].offset, model[1].offset)  # non-persistent buffer kept too


def test_tied_parameters_and_shared_modules_stay_shared(tmp_path):
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 4))
    model[3].weight = model[0].weight
    loaded = _assert_round_trip(model.eval(), torch.randn(2, 4), tmp_path)
    assert loaded[0] is loaded[2] and loaded[3].weight is loaded[0].weight


def test_metadata_round_trip(tmp_path):
    meta = {"model": "lenet300", "widths": {"0": 87}, "example_input_shape": [1, 1, 28, 28]}
    save(_mlp(), tmp_path, metadata=meta)
    assert load_metadata(tmp_path) == meta
    with pytest.raises(CheckpointError, match="metadata"):
        save(_mlp(), tmp_path / "bad", metadata={"fn": print})


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load(tmp_path / "nowhere")
    save(_mlp(), tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load(tmp_path)
    (tmp_path / ARCH_FILE).unlink()
    with pytest.raises(CheckpointError, match=ARCH_FILE):
        load(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_safetensors(tmp_path, keep):
    save(_mlp(), tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE) as err:
        load(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"format": "other", "version": 1}',
                                  '{"format": "torchdam-arch", "version": 99}',
                                  '{"format": "torchdam-arch", "version": 1, "root": {"class": 3}}'])
def test_corrupted_json(tmp_path, text):
    save(_mlp(), tmp_path)
    (tmp_path / ARCH_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=ARCH_FILE):
        load(tmp_path)


def test_binary_garbage_json(tmp_path):
    save(_mlp(), tmp_path)
    (tmp_path / ARCH_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match=ARCH_FILE):
        load(tmp_path)


def test_shape_mismatch(tmp_path):
    save(nn.Linear(5, 3), tmp_path)
    arch = json.loads((tmp_path / ARCH_FILE).read_text())
    arch["root"]["params"]["weight"]["shape"] = [4, 5]
    (tmp_path / ARCH_FILE).write_text(json.dumps(arch))
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load(tmp_path)


@pytest.mark.parametrize("cls, module", [
    ("os.system", "os"),
    ("subprocess.Popen", "subprocess"),
    ("torch.nn.modules.module.os.system", "torch.nn.modules.module"),
    ("torch.nn.modules.module.torch.load", "torch.nn.modules.module"),
    ("torch.nn.modules.module.Module.__init__", "torch.nn.modules.module"),
    ("torch.nn.modules.linear.Linear", "torch.nn.modules.linear.x"),
])
def test_malicious_class_refused_without_running_anything(tmp_path, cls, module):
    sentinel = tmp_path / "pwned"
    save(nn.Linear(2, 2), tmp_path / "m")
    arch = json.loads((tmp_path / "m" / ARCH_FILE).read_text())
    arch["root"].update({"class": cls, "module": module,
                         "attrs": {"args": {"tuple": [f"touch {sentinel}"]}}})
    (tmp_path / "m" / ARCH_FILE).write_text(json.dumps(arch))
    with pytest.raises(CheckpointError, match=ARCH_FILE):
        load(tmp_path / "m")
    assert not sentinel.exists()


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_planted_pickle_is_not_unpickled(tmp_path, writer):
    sentinel = tmp_path / "pwned"
    save(nn.Linear(2, 2), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    payload = {"weight": _Payload(sentinel)}
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, weights)
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load(tmp_path / "m")
    assert not sentinel.exists()


def test_forward_hook_refused_at_save(tmp_path):
    model = _mlp()
    model[1].register_forward_hook(lambda m, i, o: o)
    with pytest.raises(CheckpointError, match=r"'1'.*forward_hooks"):
        save(model, tmp_path)
    assert not (tmp_path / ARCH_FILE).exists()


@pytest.mark.parametrize("value, what", [(lambda x: x, "function"), (torch.ones(2), "register_buffer"),
                                         (object(), "object")])
def test_unstorable_attribute_refused_at_save(tmp_path, value, what):
    model = _mlp()
    model[4].extra = value
    with pytest.raises(CheckpointError, match=rf"'extra' of module '4'.*{what}"):
        save(model, tmp_path)


def test_class_defined_in_function_refused_at_save(tmp_path):
    class Local(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(CheckpointError, match="inside a function"):
        save(nn.Sequential(Local()), tmp_path)


def test_resave_overwrites_atomically(tmp_path):
    save(nn.Linear(3, 2), tmp_path)
    save(nn.Linear(5, 4), tmp_path)
    assert load(tmp_path).weight.shape == (4, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ARCH_FILE, WEIGHTS_FILE]


@st.composite
def _random_sequential(draw):
    if draw(st.booleans()):
        widths = draw(st.lists(st.integers(1, 9), min_size=2, max_size=5))
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b, bias=draw(st.booleans())),
                       draw(st.sampled_from([nn.ReLU(), nn.Tanh(), nn.Identity(), nn.Dropout(0.1)]))]
        return nn.Sequential(*layers), torch.randn(3, widths[0])
    channels = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    size = 8
    layers = []
    for a, b in zip(channels, channels[1:]):
        k = draw(st.sampled_from([1, 3, (3, 1)]))
        padding = draw(st.sampled_from(["same", 1, (1, 0), 0]))
        mode = draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
        layers += [nn.Conv2d(a, b, k, padding=padding, padding_mode=mode, bias=draw(st.booleans())),
                   nn.BatchNorm2d(b, momentum=draw(st.sampled_from([None, 0.1]))), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(channels[-1] * 4, 3)]
    model = nn.Sequential(*layers)
    x = torch.randn(2, channels[0], size, size)
    return _warm_bn(model, x), x


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_random_sequential())
def test_random_sequentials_round_trip(tmp_path, model_and_input):
    model, x = model_and_input
    _assert_round_trip(model.eval(), x, tmp_path)


def test_compacted_residual_model_round_trips(tmp_path):
    """A compacted pre-activation ResNet (narrowed convs + ScatterUnits) reloads exactly."""
    import torchdam as dam
    from torchdam.compact import ScatterUnits
    from torchdam.models import build_model

    torch.manual_seed(0)
    model = build_model("preresnet", depth=11)
    for i, g in enumerate(dam.attach(model).values()):
        g.beta.data.fill_(-1.0 - (i % 3))
    x = torch.randn(2, 3, 32, 32)
    small = dam.compact(model, x)
    assert any(isinstance(m, ScatterUnits) for m in small.modules())
    reloaded = load(save(small, tmp_path / "m"))
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), small(x))
