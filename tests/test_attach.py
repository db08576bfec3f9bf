import pytest
import torch
from torch import nn

import torchdam as dam
from torchdam import AttachError, ConfigError


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2)
    )


def test_attach_skips_output_layer_and_keeps_parameter_names():
    model = mlp()
    names_before = list(model.state_dict())
    gates = dam.attach(model)
    assert list(gates) == ["1", "3"]
    assert [n for n in model.state_dict() if "dam_gate" not in n] == names_before
    assert "1.dam_gate.beta" in model.state_dict()


def test_include_output_gates_the_head():
    assert list(dam.attach(mlp(), include_output=True)) == ["1", "3", "5"]


def test_gate_acts_after_following_batchnorm():
    model = cnn()
    gates = dam.attach(model)
    assert gates["0"].host_name == "1"
    with torch.no_grad():
        gates["0"].beta.fill_(-2.5)  # kills units 0, 1
    seen = {}
    model[2].register_forward_hook(lambda m, i, o: seen.setdefault("relu", o))
    model.train()
    model(torch.randn(8, 1, 6, 6))
    # with the gate after BN, dead channels are exactly zero even in training mode
    assert torch.all(seen["relu"][:, :2] == 0)


def test_select_by_name_glob_and_exclude():
    model = mlp()
    assert list(dam.attach(model, layers=("[13]",))) == ["1", "3"]
    model = mlp()
    assert list(dam.attach(model, layers=(nn.Linear,), exclude=("3",))) == ["1"]


def test_attach_on_a_user_module_tree():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(10, 7), nn.Tanh())
            self.decoder = nn.Linear(7, 10)

        def forward(self, x):
            return self.decoder(self.encoder(x))

    net = Net()
    gates = dam.attach(net)
    assert list(gates) == ["encoder.0"]
    assert net(torch.randn(2, 10)).shape == (2, 10)


def test_attach_matching_nothing_is_a_clear_error():
    with pytest.raises(AttachError, match="matched no layer"):
        dam.attach(mlp(), layers=(nn.Conv2d,))
    with pytest.raises(AttachError, match="include_output"):
        dam.attach(nn.Sequential(nn.Linear(3, 2)))


def test_double_attach_refused_and_detach_restores():
    model = mlp()
    x = torch.randn(2, 12)
    before = model(x)
    gates = dam.attach(model)
    with pytest.raises(AttachError, match="already has"):
        dam.attach(model)
    for g in gates.values():
        g.beta.data.fill_(-3.0)
    assert not torch.allclose(model(x), before)
    dam.detach(model)
    assert torch.equal(model(x), before)
    assert not list(dam.named_gates(model))


def test_unsupported_selector_type():
    with pytest.raises(ConfigError):
        dam.attach(mlp(), layers=(3,))


def test_penalty_value_and_gradient():
    model = mlp()
    gates = list(dam.attach(model).values())
    gates[0].beta.data.fill_(0.5)
    gates[1].beta.data.fill_(-7.0)  # clamped at -5: no gradient
    lam = 0.3
    p = dam.penalty(model, lam)
    assert p.item() == pytest.approx(lam * (0.5 + -5.0) / 2)
    p.backward()
    assert gates[0].beta.grad.item() == pytest.approx(lam / 2)
    assert gates[1].beta.grad.item() == 0.0


def test_penalty_rejects_negative_lambda_and_ungated_model():
    model = mlp()
    dam.attach(model)
    with pytest.raises(ConfigError):
        dam.penalty(model, -0.1)
    with pytest.raises(AttachError):
        dam.penalty(mlp(), 0.1)


def test_widths_counts_live_units():
    model = mlp()
    gates = dam.attach(model)
    gates["1"].beta.data.fill_(-2.5)  # 8 units: j > 4 live -> 3
    assert dam.widths(model) == {"1": (3, 8), "3": (6, 6)}


def test_all_dead_layer_warns():
    from torchdam.attach import warn_dead_layers

    model = mlp()
    dam.attach(model)["1"].beta.data.fill_(-5.0)
    with pytest.warns(UserWarning, match="every unit of 1"):
        assert warn_dead_layers(model) == ["1"]


def test_gated_model_compiles_without_graph_breaks():
    """No host sync in the gate: dynamo traces the hooked forward as one graph."""
    torch.manual_seed(0)
    model = mlp()
    dam.attach(model)["1"].beta.data.fill_(-1.0)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 12)
    loss = compiled(x).square().sum() + dam.penalty(model, 0.1)
    loss.backward()
    grad = model[1].dam_gate.beta.grad.clone()
    model.zero_grad()
    (model(x).square().sum() + dam.penalty(model, 0.1)).backward()
    assert torch.allclose(grad, model[1].dam_gate.beta.grad)


def _hooked_reference(model, x):
    """The gated output computed the plain way: every host's output times its mask."""
    from torchdam.attach import GatedForward

    hosts = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), GatedForward)]
    saved = [m.__dict__.pop("forward") for m in hosts]
    handles = [m.register_forward_hook(lambda mod, i, o: mod.dam_gate(o)) for m in hosts]
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(hosts, saved):
            m.forward = f


@pytest.mark.parametrize("train", [True, False])
def test_fast_gated_forwards_equal_scaling_the_output(train):
    """BN hosts scale their affine and Linear hosts may scale weight rows: same numbers as
    multiplying the host's output by the mask, and BN running stats update identically."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 16, 7), nn.ReLU(), nn.Linear(7, 3))
    for i, g in enumerate(dam.attach(model).values()):
        g.beta.data.fill_(-1.0 - i)
    model.train(train)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 2, 8, 8)
    fast, ref = model(x), _hooked_reference(twin, x)
    assert torch.allclose(fast, ref, atol=1e-6)
    assert torch.allclose(model[1].running_mean, twin[1].running_mean)
    assert int(model[1].num_batches_tracked) == int(twin[1].num_batches_tracked)


def test_deepcopy_rebinds_the_gated_forward_and_detach_restores_the_class_forward():
    import copy

    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    gates = dam.attach(model)
    twin = copy.deepcopy(model)
    gates["0"].beta.data.fill_(-4.0)  # changes the original only
    x = torch.randn(5, 4)
    model.eval(), twin.eval()
    assert not torch.allclose(model(x), twin(x))
    dam.detach(model)
    assert "forward" not in model[1].__dict__
    assert torch.equal(model(x), nn.Sequential(*model)(x))


def test_attach_twice_through_the_following_batchnorm_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    dam.attach(model, layers=("0",))
    with pytest.raises(AttachError, match="already has"):
        dam.attach(model, layers=("0",))


def test_linear_weight_row_scaling_equals_output_scaling():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))  # weight 15 < output 64*5
    dam.attach(model)["0"].beta.data.fill_(-2.2)
    x = torch.randn(64, 3)
    fast = model(x)
    fast.sum().backward()
    grad_fast = model[0].dam_gate.beta.grad.clone()
    twin = copy.deepcopy(model)
    twin.zero_grad()
    ref = _hooked_reference(twin, x)
    ref.sum().backward()
    assert torch.allclose(fast, ref, atol=1e-6)
    assert torch.allclose(grad_fast, twin[0].dam_gate.beta.grad, atol=1e-5)


def test_layers_of_one_unit_are_not_gated_by_default_only_by_name():
    """A scalar score or gate (MoE's shared-expert gate, an attention-pooling score): DAM
    would only switch it off, never remove it."""
    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.score, self.head = nn.Linear(4, 8), nn.Linear(8, 1), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            w = torch.softmax(self.score(h), dim=1)
            return self.head((w * h).sum(1))

    model = Pool()
    assert list(dam.attach(model)) == ["fc"]
    dam.detach(model)
    assert list(dam.attach(model, layers=("score",))) == ["score"]
