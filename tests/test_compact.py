import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import torchdam as dam
from torchdam import CompactionError, UnsupportedLayerError
from torchdam.compact import ScatterUnits, compact
from torchdam.count import count
from torchdam.models import build_model


def assert_same_outputs(gated, small, x):
    gated.eval()
    with torch.no_grad():
        ref, out = gated(x), small(x)
    assert out.shape == ref.shape
    assert (ref - out).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def randomise_bn(model, gen):
    """Non-trivial BN statistics and affine, as after training."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            if m.affine:
                m.weight.data.normal_(generator=gen)
                m.bias.data.normal_(generator=gen)


def train_until_dead(model, x, y, steps=40, lam=1.0, beta_lr=0.1):
    """Short single-stage DAM training that leaves many units dead (BN stats updated)."""
    betas = dam.gate_parameters(model)
    ids = {id(b) for b in betas}
    opt = torch.optim.Adam(
        [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": 1e-3},
         {"params": betas, "lr": beta_lr}])
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y) + dam.penalty(model, lam)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dam.widths(model)


def dead_fraction(widths):
    return 1 - sum(a for a, _ in widths.values()) / sum(t for _, t in widths.values())


ZOO = [
    ("mlp", dict(), (1, 28, 28)),
    ("lenet300", dict(), (1, 28, 28)),
    ("lenet5", dict(), (1, 28, 28)),
    ("resnet20", dict(), (3, 32, 32)),
    ("preresnet", dict(depth=20), (3, 32, 32)),
]


@pytest.mark.parametrize("name,kwargs,shape", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_model_compacts_exactly_after_training(name, kwargs, shape):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    dam.attach(model, layers=(nn.Linear, nn.Conv2d))
    x, y = torch.randn(16, *shape), torch.randint(0, 10, (16,))
    widths = train_until_dead(model, x, y)
    assert 0.2 < dead_fraction(widths) < 0.95, widths  # preresnet lands near 0.32
    small = compact(model, x[:2])
    assert not any(isinstance(m, dam.DAMGate) for m in small.modules())
    assert_same_outputs(model, small, x)
    before, after = count(model, x[:1]), count(small, x[:1])
    assert after["params"] < before["params"] and after["flops"] < before["flops"]


def test_preresnet_keeps_residual_width_but_skips_dead_compute():
    torch.manual_seed(1)
    model = build_model("preresnet", depth=11)
    gates = dam.attach(model)
    x = torch.randn(4, 3, 32, 32)
    randomise_bn(model, torch.Generator().manual_seed(1))
    for i, g in enumerate(gates.values()):
        g.beta.data.fill_(-1.0 - (i % 3))
    small = compact(model, x[:2])
    scatters = [m for m in small.modules() if isinstance(m, ScatterUnits)]
    assert scatters, "conv3 outputs join the residual stream and must be scattered back"
    for s in scatters:
        assert s.module.out_channels == s.index.numel() < s.total
    assert_same_outputs(model, small, x)


def test_min_width_keeps_a_layer_whose_units_all_died():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 2))
    gates = dam.attach(model)
    gates["2"].beta.data.fill_(-10.0)
    x = torch.randn(3, 6)
    with pytest.warns(UserWarning, match="min_width"):
        small = compact(model, x)
    assert small[2].out_features == 1 and small[4].in_features == 1
    assert_same_outputs(model, small, x)
    with pytest.warns(UserWarning):
        assert compact(model, x, min_width=3)[2].out_features == 3


def test_gated_output_layer_keeps_its_width():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    gates = dam.attach(model, include_output=True)
    gates["2"].beta.data.fill_(-2.0)
    x = torch.randn(3, 6)
    small = compact(model, x)
    assert_same_outputs(model, small, x)


def test_original_model_is_untouched():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    dam.attach(model)["0"].beta.data.fill_(-2.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    compact(model, torch.randn(2, 6))
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unsupported_gate_host_is_named():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.out_features = 4
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w

    from torchdam.attach import UNIT_LAYERS

    UNIT_LAYERS[Scale] = ("out_features", -1)
    try:
        model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 2))
        dam.attach(model, layers=(Scale,))
        with pytest.raises(UnsupportedLayerError, match="'1' of type Scale"):
            compact(model, torch.randn(2, 3))
    finally:
        del UNIT_LAYERS[Scale]


def test_ungated_model_and_wrong_input_are_clear_errors():
    with pytest.raises(CompactionError, match="no DAM gates"):
        compact(nn.Linear(3, 2), torch.randn(1, 3))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    dam.attach(model)
    with pytest.raises(dam.ShapeError, match="do not fit"):
        compact(model, torch.randn(2, 7))


@st.composite
def random_stacks(draw):
    """A random Linear MLP or Conv(+BN) stack with random betas (so random dead units)."""
    conv = draw(st.booleans())
    depth = draw(st.integers(1, 4))
    layers, c = [], draw(st.integers(1, 3))
    in_c = c
    for _ in range(depth):
        out = draw(st.integers(1, 12))
        if conv:
            layers.append(nn.Conv2d(c, out, draw(st.sampled_from([1, 3])), padding="same"))
            if draw(st.booleans()):
                layers.append(nn.BatchNorm2d(out))
        else:
            layers.append(nn.Linear(c, out))
        layers.append(draw(st.sampled_from([nn.ReLU, nn.Tanh, nn.Identity]))())
        c = out
    if conv:
        layers += [nn.Flatten(), nn.Linear(c * 16, 3)]
        shape = (in_c, 4, 4)
    else:
        layers.append(nn.Linear(c, 3))
        shape = (in_c,)
    betas = draw(st.lists(st.floats(-5.5, 1.0), min_size=depth, max_size=depth))
    return nn.Sequential(*layers), shape, betas, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_stacks())
def test_property_random_stacks_compact_exactly(case):
    model, shape, betas, seed = case
    gen = torch.Generator().manual_seed(seed)
    randomise_bn(model, gen)
    # by name: layers of one unit are gated too (a type selector skips them)
    names = [n for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    gates = dam.attach(model, layers=tuple(names))
    for g, b in zip(gates.values(), betas):
        g.beta.data.fill_(b)
    x = torch.randn(5, *shape, generator=gen)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = compact(model, x)
    assert_same_outputs(model, small, x)
    for name, (active, total) in dam.widths(model).items():
        module = small.get_submodule(name)
        width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        assert width == max(active, 1)


@pytest.mark.parametrize("index", [[2, 3, 4, 5], [0, 3, 5]], ids=["contiguous", "scattered"])
def test_scatter_units_puts_live_units_back_in_place(index):
    conv = nn.Conv2d(2, len(index), 1)
    scatter = ScatterUnits(conv, index, total=6, axis=1)
    x = torch.randn(3, 2, 4, 4)
    out = scatter(x)
    expected = torch.zeros(3, 6, 4, 4)
    expected[:, index] = conv(x)
    assert torch.equal(out, expected)


class _TwoWayStream(nn.Module):
    """Two gated producers added into one stream, ``act`` on it, then an ungated head."""

    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.head, self.act = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3), act

    def forward(self, x):
        return self.head(self.act(self.a(x) + self.b(x)))


def _stream_model(act):
    torch.manual_seed(0)
    model = _TwoWayStream(act)
    gates = dam.attach(model)
    gates["a"].beta.data.fill_(-gates["a"].k * 0.5)
    gates["b"].beta.data.fill_(-gates["b"].k * 0.7)
    return model


def test_stream_channels_dead_in_every_producer_are_removed_from_the_stream():
    model = _stream_model(nn.ReLU())
    widths = dam.widths(model)
    union = max(widths["a"][0], widths["b"][0])
    assert union < 6
    x = torch.randn(5, 4)
    small = compact(model, x)
    assert small.head.in_features == union  # relu(0 + 0) = 0: removed from the whole stream
    for name in ("a", "b"):  # each producer computes its live units only
        layer = getattr(small, name)
        assert (layer.module if isinstance(layer, ScatterUnits) else layer).out_features == widths[name][0]
    assert isinstance(small.b, ScatterUnits) and small.b.total == union  # the narrower one is scattered
    assert_same_outputs(model, small, x)
    wide = compact(model, x, narrow_streams=False)
    assert wide.head.in_features == 6
    assert count(small, x[:1])["flops"] < count(wide, x[:1])["flops"]


def test_stream_narrowing_falls_back_when_the_zeros_do_not_stay_zero():
    model = _stream_model(nn.Sigmoid())  # sigmoid(0) = 0.5 reaches the head: not removable
    x = torch.randn(5, 4)
    small = compact(model, x)
    assert small.head.in_features == 6
    assert_same_outputs(model, small, x)


def test_resnet_stream_narrows_to_the_widest_producer():
    torch.manual_seed(0)
    model = build_model("resnet20")
    gates = dam.attach(model, layers=(nn.Linear, nn.Conv2d))
    randomise_bn(model, torch.Generator().manual_seed(0))
    for i, g in enumerate(gates.values()):
        g.beta.data.fill_(-g.k * (0.4 + 0.1 * (i % 3)))
    x = torch.randn(4, 3, 32, 32)
    small = compact(model, x[:2])
    widths = dam.widths(model)
    stage3 = [n for n in widths if n.startswith("layer3") and (n.endswith("conv2") or "shortcut" in n)]
    assert small.fc.in_features == max(widths[n][0] for n in stage3) < 64
    assert small.layer3[1].conv1.in_channels == small.fc.in_features
    assert_same_outputs(model, small, x)


def test_a_forward_that_asserts_its_input_shape_fails_in_one_line():
    """Model code checks shapes with bare asserts (diffusers' Upsample2D): a ShapeError
    naming the inputs, not an AssertionError from deep inside."""
    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            if x.shape[1] != 4:
                raise AssertionError  # what `assert` raises outside pytest: no message
            return self.out(torch.relu(self.fc(x)))

    model = Checked()
    dam.attach(model)
    with pytest.raises(dam.ShapeError, match=r"\[\(2, 5\)\] do not fit Checked: AssertionError in its forward"):
        compact(model, torch.randn(2, 5))
