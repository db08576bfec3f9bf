"""torchdam.serialize: pickle-free save/load of (compacted) models."""
from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from torchdam.errors import CheckpointError
from torchdam.serialize import ARCH_FILE, WEIGHTS_FILE, load, load_metadata, save

from blocking import outcome_in_thread


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


# ---------------------------------------------------------------------------- hostile files
# load validates the structure of both files before it uses them; each refusal is one
# CheckpointError naming the file and the reason.

def _edit_arch(directory, change) -> None:
    arch = json.loads((directory / ARCH_FILE).read_text())
    change(arch)
    (directory / ARCH_FILE).write_text(json.dumps(arch))


def _refused(directory, *patterns: str) -> str:
    with pytest.raises(CheckpointError) as err:
        load(directory)
    message = str(err.value)
    assert "\n" not in message and str(directory) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def _sequential(*children: dict) -> dict:
    return {"class": "torch.nn.modules.container.Sequential", "module": "torch.nn.modules.container",
            "attrs": {}, "training": False, "params": {}, "buffers": {},
            "children": {str(i): c for i, c in enumerate(children)}}


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    save(_mlp(), tmp_path)
    text = (tmp_path / ARCH_FILE).read_text()
    (tmp_path / ARCH_FILE).write_text(text.replace('"metadata": {}', '"metadata": ' + "[" * 100_000 + "]" * 100_000))
    _refused(tmp_path, "nested too deeply")
    save(_mlp(), tmp_path)
    value: dict = {"tuple": [1]}
    for _ in range(70):
        value = {"tuple": [value]}
    _edit_arch(tmp_path, lambda a: a["root"]["children"]["1"]["attrs"].update(deep=value))
    _refused(tmp_path, "MAX_VALUE_DEPTH")
    save(_mlp(), tmp_path)

    def deep_modules(arch):
        node = arch["root"]["children"]["1"]
        for _ in range(120):
            node = _sequential(node)
        arch["root"]["children"]["1"] = node

    _edit_arch(tmp_path, deep_modules)
    _refused(tmp_path, "MAX_DEPTH")


@pytest.mark.parametrize("name", ["forward", "load_state_dict", "_call_impl", "_compiled_call_impl", "__call__",
                                  "state_dict", "extra_repr", "reset_parameters", "T_destination", "__class__"])
def test_attribute_shadowing_a_method_is_refused(tmp_path, name):
    """A loaded model used to hold `forward = "x"` and fail later with 'str' object is not callable."""
    save(_mlp(), tmp_path)
    _edit_arch(tmp_path, lambda a: a["root"]["children"]["1"]["attrs"].update({name: "x"}))
    _refused(tmp_path, rf"'{re.escape(name)}' of module '1' \(Linear\)")


def test_attribute_shadowing_a_property_or_a_member_is_refused(tmp_path):
    save(nn.LSTM(3, 4), tmp_path)
    _edit_arch(tmp_path, lambda a: a["root"]["attrs"].update(all_weights=[]))  # RNNBase.all_weights: a property
    _refused(tmp_path, "all_weights.*would shadow LSTM.all_weights")
    save(_mlp(), tmp_path)
    _edit_arch(tmp_path, lambda a: a["root"]["children"]["1"]["attrs"].update(weight="x"))  # also a parameter
    _refused(tmp_path, "one name for two")


def test_save_refuses_an_attribute_that_shadows_a_method(tmp_path):
    model = _mlp()
    model[1].extra_repr = "not a method"
    with pytest.raises(CheckpointError, match=r"'extra_repr' of module '1' \(Linear\) would shadow"):
        save(model, tmp_path)


@pytest.mark.parametrize("where, ref, why", [
    ("params", "1", "names a module"),
    ("params", "4.weight", "names nothing saved before it"),  # a later parameter
    ("params", "nowhere", "names nothing saved before it"),
    ("children", "", "a reference cycle"),
    ("children", "4", "names no module saved before it"),
])
def test_references_must_name_what_was_saved_before(tmp_path, where, ref, why):
    save(_mlp(), tmp_path)

    def point(arch):
        node = arch["root"]["children"]["1"]
        if where == "params":
            node["params"]["weight"] = {"ref": ref}
        else:
            node["children"]["inner"] = {"ref": ref}

    _edit_arch(tmp_path, point)
    _refused(tmp_path, re.escape(why))


def test_param_reference_to_a_buffer_is_refused(tmp_path):
    save(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3)), tmp_path)
    _edit_arch(tmp_path, lambda a: a["root"]["children"]["1"]["params"].update(bias={"ref": "0.running_mean"}))
    _refused(tmp_path, "names a buffer")


def test_shared_modules_cannot_multiply_into_an_endless_state_dict(tmp_path):
    save(nn.Sequential(nn.Linear(2, 2)), tmp_path)

    def explode(arch):
        for i in range(1, 40):  # module i holds module i-1 twice: 2**39 paths
            arch["root"]["children"][str(i)] = _sequential({"ref": str(i - 1)}, {"ref": str(i - 1)})

    _edit_arch(tmp_path, explode)
    _refused(tmp_path, "shared modules|more tensors")


def test_scatter_units_total_is_bounded_by_the_saved_weights(tmp_path):
    """A huge ScatterUnits.total used to allocate gigabytes on the first forward."""
    from torchdam.compact import ScatterUnits

    model = nn.Sequential(ScatterUnits(nn.Conv2d(3, 2, 1), [1, 3], 6, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    save(model, tmp_path)
    assert torch.equal(load(tmp_path)(x), model(x))
    for total in (2**27, 2**40, 1):
        save(model, tmp_path)
        _edit_arch(tmp_path, lambda a, total=total: a["root"]["children"]["0"]["attrs"].update(total=total))
        _refused(tmp_path, "total")
    save(model, tmp_path)
    _edit_arch(tmp_path, lambda a: a["root"]["children"]["0"]["attrs"].update(pad_before=1))
    _refused(tmp_path, "pad_before")
    # an index outside the stream, forged in the weights file
    save(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    tensors["0.index"] = torch.tensor([1, 9])
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    _refused(tmp_path, "index is not increasing")


@pytest.mark.parametrize("model, path, attr, value", [
    (nn.Linear(4, 3), "", "out_features", 300),
    (nn.Linear(4, 3), "", "in_features", 5),
    (nn.Embedding(10, 4), "", "num_embeddings", 10**6),
    (nn.Embedding(10, 4), "", "padding_idx", 10),
    (nn.Conv2d(2, 3, 3), "", "kernel_size", {"tuple": [5, 5]}),
    (nn.Conv2d(2, 3, 3), "", "padding", {"tuple": [10**6, 10**6]}),
    (nn.BatchNorm2d(3), "", "num_features", 4),
    (nn.LSTM(3, 4), "", "hidden_size", 400),
    (nn.LSTM(3, 4), "", "num_layers", 2),
    (nn.LayerNorm(4), "", "normalized_shape", {"tuple": [5]}),
    (nn.MultiheadAttention(8, 2), "", "num_heads", 3),
])
def test_size_attributes_must_match_the_tensors(tmp_path, model, path, attr, value):
    save(model, tmp_path)
    _edit_arch(tmp_path, lambda a: a["root"]["attrs"].update({attr: value}))
    _refused(tmp_path, rf"{attr}|inconsistent")


def test_integer_attributes_are_bounded_by_the_saved_elements(tmp_path):
    save(_mlp(), tmp_path)
    _edit_arch(tmp_path, lambda a: a["root"]["children"]["3"]["attrs"].update(extra={"tuple": [1, 10**9]}))
    _refused(tmp_path, "1000000000, more than the .* saved tensor elements justify")
    save(_mlp(), tmp_path)
    _edit_arch(tmp_path, lambda a: a["root"]["children"]["3"]["attrs"].update(extra=2**64))
    _refused(tmp_path, "beyond 64 bits")
    model = _mlp()
    model[3].extra = 10**9
    with pytest.raises(CheckpointError, match="cannot save: attribute 'extra'.*1000000000"):
        save(model, tmp_path / "refused")


def test_missing_declared_attribute_is_refused(tmp_path):
    save(_mlp(), tmp_path)
    _edit_arch(tmp_path, lambda a: a["root"]["children"]["0"]["attrs"].pop("end_dim"))
    _refused(tmp_path, r"Flatten\) lacks \['end_dim'\]")


@pytest.mark.parametrize("text, why", [
    ('{"format": "torchdam-arch", "format": "torchdam-arch", "version": 2, "root": {}}', "duplicate key"),
    ('{"format": "torchdam-arch", "version": ' + "9" * 5000 + "}", "digits"),
    ('{"format": "torchdam-arch", "version": true, "root": {}}', "version True"),
    ('{"format": "torchdam-arch", "version": 2, "root": {}, "code": "x"}', "unknown keys"),
])
def test_malformed_json_shapes_refused(tmp_path, text, why):
    save(_mlp(), tmp_path)
    (tmp_path / ARCH_FILE).write_text(text)
    _refused(tmp_path, re.escape(why))


def test_safetensors_header_checked_before_anything_is_allocated(tmp_path):
    save(nn.Linear(3, 2), tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])

    def forge(change) -> None:
        forged = json.loads(json.dumps(header))
        change(forged)
        text = json.dumps(forged).encode()
        weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])

    forge(lambda h: h["weight"].update(shape=[2**40, 3]))  # claims 12 TB
    _refused(tmp_path, "holds 24 bytes")
    forge(lambda h: h["weight"].update(data_offsets=[0, 2**50]))
    _refused(tmp_path, "offsets outside the file")
    forge(lambda h: h.update(extra={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}))
    _refused(tmp_path, r"unexpected keys \['extra'\]")
    forge(lambda h: h["bias"].update(dtype="I32"))
    _refused(tmp_path, "int32 tensor there")
    weights.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    _refused(tmp_path, "header of .* bytes does not fit")


def _load_in_thread(directory, timeout: float = 10.0) -> BaseException | None:
    """load(directory) in a thread; fails the test if it is still blocked after ``timeout``."""
    return outcome_in_thread(lambda: load(directory), "load", timeout)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", [ARCH_FILE, WEIGHTS_FILE])
@pytest.mark.parametrize("kind", ["fifo", "fifo-symlink", "dev-zero", "directory"])
def test_special_files_are_refused_without_blocking(tmp_path, name, kind):
    save(_mlp(), tmp_path / "m")
    target = tmp_path / "m" / name
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "fifo-symlink":
        os.mkfifo(tmp_path / "pipe")
        os.symlink(tmp_path / "pipe", target)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", target)
    else:
        target.mkdir()
    err = _load_in_thread(tmp_path / "m")
    assert isinstance(err, CheckpointError) and str(target) in str(err)
    assert re.search("FIFO|character device|directory", str(err)), err


def test_file_size_limits(tmp_path, monkeypatch):
    from torchdam import serialize

    save(_mlp(), tmp_path)
    monkeypatch.setattr(serialize.limits, "MAX_ARCH_BYTES", 100)
    _refused(tmp_path, rf"{ARCH_FILE}: \d+ bytes, more than the 100 bytes allowed")
    _refused(tmp_path, r"torchdam\.serialize\.limits\.MAX_ARCH_BYTES")  # the message names the knob
    monkeypatch.setattr(serialize.limits, "MAX_ARCH_BYTES", 2**20)
    monkeypatch.setattr(serialize.limits, "MAX_WEIGHTS_BYTES", 100)
    _refused(tmp_path, rf"{WEIGHTS_FILE}: \d+ bytes, more than the 100 bytes allowed")
