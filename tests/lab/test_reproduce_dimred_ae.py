"""The dimensionality-reduction and autoencoder reproductions (quick mode through the CLI),
the L1 baseline as docs/METHOD.md section 3.2 defines it, and our gate against the official DAM layer."""
import json

import pytest
import torch
import torch.nn as nn

from reproduce import EXPERIMENTS
from reproduce.__main__ import main
from reproduce.autoencoder import L1Scale, build_autoencoder, macro_f1
from reproduce.common import components_for, pca, pca_elbow
from torchdam.gates import DAMGate


def run_quick(name, out):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--quick", "--out", str(out)])
    assert exit_info.value.code == 0
    for png in out.glob("*.png"):
        assert png.stat().st_size > 1000, png
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_dimensionality_reduction_quick(tmp_path):
    results, md = run_quick("dimensionality-reduction", tmp_path)
    assert {p.name for p in tmp_path.glob("*.png")} == {"width_trajectory.png", "pca_spectrum.png"}
    assert [r["case"] for r in results["runs"]] == ["linear", "mlp-kernel", "quadratic-kernel"]
    for r in results["runs"]:
        assert 0 <= r["width"] <= 50 and r["test_mse"] >= 0
        assert r["trajectory"][0][0] == 1 and r["trajectory"][-1][0] == results["protocol"][r["case"]]["steps"]
    linear = results["runs"][0]
    assert linear["pca_elbow"] == 10 == linear["pca_99"]  # rank-10 data: an unmistakable elbow
    assert "| linear | 10 | 500 | 1 |" in md and "Protocol 'quick'" in md
    # started again, the finished sweep trains nothing and writes the same results
    assert run_quick("dimensionality-reduction", tmp_path) == (results, md)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("name", ["mnist-autoencoder", "fashion-mnist-autoencoder"])
def test_autoencoder_quick(tmp_path, name):
    results, md = run_quick(name, tmp_path)
    assert {p.name for p in tmp_path.glob("*.png")} == {"width_vs_lambda.png", "mse_vs_width.png", "f1_vs_width.png"}
    assert {(r["method"], r["lambda"]) for r in results["runs"]} == {(m, lam) for m in ("dam", "l1") for lam in (0.1, 5.0)}
    for r in results["runs"]:
        assert 0 <= r["width"] <= 50
        assert 0 < r["test_mse"] < 2  # outputs and inputs both lie in [-1, 1]
        assert r["macro_f1"] is None or 0 <= r["macro_f1"] <= 1
    mse = results["pca"]["test_mse"]
    assert mse["1"] > mse["10"] > mse["50"] > 0
    assert "### At equal width" in md and "| 0.1 |" in md and "Runs whose bottleneck died" in md


def test_l1_baseline_mask_and_penalty_follow_the_paper():
    """Mask relu(s), penalty mean|relu(s)| (docs/METHOD.md section 3.2), s starts at 1."""
    gate = L1Scale(5, lr_scale=4.0)
    assert torch.equal(gate.scale, torch.ones(5)) and gate.active() == 5
    s = torch.tensor([1.5, -0.5, 0.0, 0.25, -2.0])
    with torch.no_grad():
        gate.raw.copy_(s / 4.0)
    assert torch.allclose(gate.mask(), torch.relu(s))
    assert torch.allclose(gate.penalty(), torch.relu(s).abs().mean())
    assert gate.active() == 2
    x = torch.randn(3, 5)
    assert torch.allclose(gate(x), x * torch.relu(s))
    # lr_scale c: one Adam step of lr moves s by c*lr, like DAM's beta_lr = c*lr
    opt = torch.optim.Adam(gate.parameters(), lr=1e-3)
    gate.penalty().backward()
    opt.step()
    assert torch.allclose(gate.scale[[0, 3]], s[[0, 3]] - 4e-3, atol=1e-6)
    assert torch.equal(gate.scale[[1, 2, 4]], s[[1, 2, 4]])  # dead units get no gradient


def test_autoencoder_has_the_paper_architecture():
    dam, l1 = build_autoencoder("dam"), build_autoencoder("l1")
    linears = [m for m in dam.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 128), (128, 64), (64, 32), (32, 50), (50, 32), (32, 64), (64, 128), (128, 784)]
    assert dam.encoder.last.dam_gate.n == 50 and isinstance(l1.scale, L1Scale)
    assert isinstance(dam.encoder[-1], nn.Linear)  # no activation after the code layer
    assert isinstance(dam.decoder[-1], nn.Tanh)


def test_macro_f1_and_pca_helpers():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    # per class F1: 2*1/(2+2)=0.5, 2*2/(3+2)=0.8, 2*1/(1+2)=2/3
    assert macro_f1(pred, target, classes=3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    torch.manual_seed(0)
    x = torch.randn(400, 3) @ torch.randn(3, 20)
    _, components, variances = pca(x)
    assert pca_elbow(variances) == 3 == components_for(variances, 0.999)
    assert torch.allclose(components @ components.T, torch.eye(20, dtype=torch.float64), atol=1e-8)


# ---- peer check against the official code (jayroxis/dam-pytorch, Network Pruning/models/dam.py)
class OfficialDAM(nn.Module):
    """Faithful transcription of the official ``DAM`` (1-D) and ``DAM_2d`` mask: mu =
    arange(n)/n*5 (reshaped to (1, n, 1, 1) for 2-D), beta init 1 (0.1 for the linear gates),
    alpha 1, and the three gate formulas with torch.min(ones, relu(.)) for piecewise_linear."""

    def __init__(self, n, gate_type="relu_tanh", two_d=False):
        super().__init__()
        mu = torch.arange(n).float() / n * 5
        self.mu = nn.Parameter(mu.reshape(-1, n, 1, 1) if two_d else mu, requires_grad=False)
        self.beta = nn.Parameter(torch.ones(1) * (1 if gate_type == "relu_tanh" else 0.1))
        self.alpha = nn.Parameter(torch.ones(1))
        self.gate_type = gate_type

    def forward(self, x):
        return x * self.mask()

    def mask(self):
        if self.gate_type == "relu_tanh":
            return torch.relu(torch.tanh((self.alpha ** 2) * (self.mu + self.beta)))
        if self.gate_type == "linear":
            return torch.relu((self.alpha ** 2) * (self.mu + self.beta))
        return torch.min(torch.ones_like(self.mu), torch.relu((self.alpha ** 2) * (self.mu + self.beta)))


@pytest.mark.parametrize("gate_type", ["relu_tanh", "linear", "piecewise_linear"])
def test_official_gate_peer(gate_type):
    generator = torch.Generator().manual_seed(0)
    for n in (1, 7, 50, 64):
        official, ours = OfficialDAM(n, gate_type), DAMGate(n, gate=gate_type)
        official_2d = OfficialDAM(n, gate_type, two_d=True)
        assert ours.beta.item() == pytest.approx(official.beta.item())  # same initial beta
        betas = torch.cat([torch.tensor([official.beta.item()]), torch.linspace(-5.5, 1.5, 29),
                           torch.empty(20).uniform_(-5, 2, generator=generator)])
        for beta in betas:
            for module in (official, official_2d, ours):
                with torch.no_grad():
                    module.beta.fill_(beta.item())
            official_mask = official.mask()  # mu differs by <= 1 ulp: j/n*5 there, 5*j/n here
            torch.testing.assert_close(ours.mask(), official_mask, rtol=1e-6, atol=1e-6)
            assert torch.equal(ours.mask() > 0, official_mask > 0)  # same dead units
            x, maps = torch.randn(4, n, generator=generator), torch.randn(2, n, 3, 3, generator=generator)
            torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours(maps), official_2d(maps), rtol=1e-5, atol=1e-5)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    """An experiment whose extra is not installed fails alone, with the pip line to run."""
    import builtins
    import sys

    real_import = builtins.__import__

    def no_geometric(name, *args, **kwargs):
        if name.partition(".")[0] == "torch_geometric":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m.startswith(("reproduce.graph", "torch_geometric"))]:
        monkeypatch.delitem(sys.modules, mod)
    # a module imported earlier in this process registered the experiment: import it afresh
    monkeypatch.delitem(EXPERIMENTS._items, "graph-representation", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_geometric)
    with pytest.raises(SystemExit) as exit_info:
        main(["graph-representation", "--quick"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[graph]'" in err[0] and "torch_geometric" in err[0]
