"""dimensionality-reduction and graph-representation are resumable sweeps like the
autoencoders': finished runs live in runs.jsonl and are never trained again, --report-only
rebuilds the same results from it, and a folder of another protocol is refused."""
import json
from dataclasses import replace

import pytest

import reproduce.dimred as dimred
import reproduce.graph as graph
from reproduce.__main__ import main
from torchdam.errors import ConfigError, DataError


class Killed(Exception):
    """Stands in for the process being killed."""


def fake_run_case(calls, kill_after=None):
    def run_case(name, case, seed, n, steps):
        if kill_after is not None and len(calls) == kill_after:
            raise Killed
        calls.append((name, seed, n, steps))
        return {"case": name, "seed": seed, "k": case.k, "n_train": n, "steps": steps, "width": case.k + seed,
                "beta": -3.0, "train_mse": 0.01, "test_mse": 0.02 + seed, "relative_test_mse": 0.1,
                "pca_elbow": case.k, "pca_99": case.k + 1, "pca_variances": [2.0 ** -i for i in range(50)],
                "trajectory": [[1, 50], [steps, case.k + seed]], "seconds": 0.0}
    return run_case


def cli(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_dimred_protocols():
    assert all(n == dimred.PAPER_N for n in dimred.PAPER.n.values()) and dimred.PAPER.seeds == 5
    assert dimred.PAPER.steps == {name: c.steps for name, c in dimred.CASES.items()}
    assert dimred.SHORT.n == {"linear": 5000, "mlp-kernel": 1000, "quadratic-kernel": 1000}
    assert dimred.SHORT.steps == dimred.PAPER.steps and dimred.SHORT.seeds == 5
    assert dimred.DEFAULT_PROTOCOL == "short"


def test_dimred_killed_sweep_trains_only_the_missing_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dimred, "run_case", fake_run_case(calls, kill_after=3))
    with pytest.raises(Killed):
        dimred.run(tmp_path, protocol="quick", seeds=2)
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert [(json.loads(line)["case"], json.loads(line)["seed"]) for line in lines] == [
        ("linear", 0), ("linear", 1), ("mlp-kernel", 0)]
    partial = dimred.run(tmp_path, protocol="quick", seeds=2, report_only=True)
    assert partial["runs_done"] == 3 and not partial["complete"] and len(calls) == 3  # nothing trained
    assert "Partial: 3 of 6 runs" in (tmp_path / "results.md").read_text()

    calls.clear()
    monkeypatch.setattr(dimred, "run_case", fake_run_case(calls))
    results = dimred.run(tmp_path, protocol="quick", seeds=2)
    assert [(c[0], c[1]) for c in calls] == [("mlp-kernel", 1), ("quadratic-kernel", 0), ("quadratic-kernel", 1)]
    assert all(c[2] == 500 for c in calls)  # the quick protocol's N
    assert results["complete"] and results["runs_done"] == 6
    assert [(r["case"], r["seed"]) for r in results["runs"]] == dimred.sweep_jobs([0, 1])
    md = (tmp_path / "results.md").read_text()
    assert "Protocol 'quick'" in md and "linear 500, mlp-kernel 500, quadratic-kernel 500" in md

    calls.clear()  # everything done: another start trains nothing
    assert dimred.run(tmp_path, protocol="quick", seeds=2) == results and calls == []
    monkeypatch.setattr(dimred, "run_case", None)  # --report-only must not train
    assert cli(["dimensionality-reduction", "--protocol", "quick", "--seeds", "2", "--report-only",
                "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "results.md").read_text() == md


def test_dimred_folder_refuses_another_protocol(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dimred, "run_case", fake_run_case([]))
    dimred.run(tmp_path, quick=True)
    with pytest.raises(ConfigError, match="another sweep.*n_train: 500 -> 5000"):
        dimred.run(tmp_path, protocol="paper")
    with pytest.raises(ConfigError, match="cannot be combined"):
        dimred.run(tmp_path, quick=True, protocol="paper")
    capsys.readouterr()  # drop the first run's progress bars
    assert cli(["dimensionality-reduction", "--protocol", "paper", "--report-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another sweep" in err[0]
    assert cli(["dimensionality-reduction", "--protocol", "nonsense", "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown protocol 'nonsense'" in err[0] and "short, paper, quick" in err[0]


# ---------------------------------------------------------------- graph-representation

def fake_train_one(calls, kill_after=None):
    def train_one(g, job, dim, cfg, progress):
        if kill_after is not None and len(calls) == kill_after:
            raise Killed
        calls.append((job, dim))
        name, enc, variant, seed = job
        width = 5 + seed if variant == "DAM" else dim
        metrics = {"auc": 0.9, "ap": 0.8} if enc == "GAE" else {"acc": 0.7 + 0.01 * seed}
        return {"dataset": name, "encoder": enc, "variant": variant, "seed": seed, "dim": dim, "width": width,
                **metrics, "history": [{"epoch": 1, "loss": 1.0, "width": width}], "seconds": 0.0}
    return train_one


def fake_load(name):
    if name == "pubmed":
        raise DataError("PubMed is not available offline: ind.pubmed.allx is missing")
    return object()


@pytest.fixture
def fake_graph(monkeypatch):
    """Quick protocol on Cora and an absent PubMed, without reading any data."""
    monkeypatch.setattr(graph, "load_planetoid", fake_load)
    monkeypatch.setitem(graph.PROTOCOLS, "quick", replace(graph.QUICK, datasets=("cora", "pubmed")))


def test_graph_protocols():
    assert graph.PAPER.dgi_dim == 512 and graph.PAPER.dgi_epochs == graph.PAPER_DGI_EPOCHS
    assert graph.PAPER.gae_epochs == 200 and graph.PAPER.seeds == graph.SHORT.seeds == 2
    assert replace(graph.PAPER, dgi_dim=128, dgi_epochs=60, gae_epochs=100) == graph.SHORT
    assert graph.DEFAULT_PROTOCOL == "short"


def test_graph_killed_sweep_trains_only_the_missing_runs(tmp_path, monkeypatch, fake_graph):
    calls = []
    monkeypatch.setattr(graph, "train_one", fake_train_one(calls, kill_after=4))
    with pytest.raises(Killed):
        graph.run(tmp_path, protocol="quick", seeds=2)
    assert [c[0] for c in calls] == [("cora", "GAE", v, 0) for v in graph.VARIANTS] + [("cora", "GAE", "DAM", 1)]
    assert calls[2][1] == 5  # dense at DAM width trains at seed 0's DAM width
    partial = graph.run(tmp_path, protocol="quick", seeds=2, report_only=True)
    assert partial["runs_done"] == 4 and partial["runs_expected"] == 12 and not partial["complete"]
    assert "not_run" in partial["datasets"]["pubmed"]
    assert "Partial: 4 of 12 runs" in (tmp_path / "results.md").read_text()

    calls.clear()  # the restart takes seed 1's DAM width from runs.jsonl
    monkeypatch.setattr(graph, "train_one", fake_train_one(calls))
    results = graph.run(tmp_path, protocol="quick", seeds=2)
    assert calls[:2] == [(("cora", "GAE", "dense full width", 1), 64), (("cora", "GAE", "dense at DAM width", 1), 6)]
    assert len(calls) == 8 and all(job[1] == "DGI" for job, _ in calls[2:])
    assert results["complete"] and results["runs_done"] == 12
    assert results["datasets"]["cora"]["DGI"]["summary"]["dense at DAM width"]["width"] == "5.5 +- 0.7"
    md = (tmp_path / "results.md").read_text()
    assert "Protocol 'quick'" in md and "| cora | DGI | DAM | 2 |" in md and "| pubmed | - | not run |" in md

    calls.clear()
    assert graph.run(tmp_path, protocol="quick", seeds=2) == results and calls == []
    monkeypatch.setattr(graph, "train_one", None)  # --report-only must not train
    assert cli(["graph-representation", "--protocol", "quick", "--seeds", "2", "--report-only",
                "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "results.md").read_text() == md


def test_graph_folder_refuses_another_protocol(tmp_path, monkeypatch, capsys, fake_graph):
    monkeypatch.setattr(graph, "train_one", fake_train_one([]))
    graph.run(tmp_path, quick=True)
    with pytest.raises(ConfigError, match="another sweep.*config.dgi_dim: 32 -> 512"):
        graph.run(tmp_path, protocol="paper")
    capsys.readouterr()  # drop the first run's progress bars
    assert cli(["graph-representation", "--protocol", "paper", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another sweep" in err[0]
    assert cli(["graph-representation", "--protocol", "nonsense", "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown protocol 'nonsense'" in err[0]
