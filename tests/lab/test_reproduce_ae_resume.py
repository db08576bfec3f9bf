"""The autoencoder sweep is resumable: finished runs live in runs.jsonl and are never
trained again, a run killed part-way continues from its epoch checkpoint, and a partial
runs.jsonl can be written up at any time (--report-only)."""
import json
import warnings
from dataclasses import replace

import pytest

import reproduce.autoencoder as ae
from reproduce.__main__ import main
from torchdam.errors import ConfigError
from torchdam.train import Trainer


class Killed(Exception):
    """Stands in for the process being killed."""


def fake_train_one(calls, kill_after=None):
    def train_one(method, lam, seed, protocol, data, run_dir=None):
        if kill_after is not None and len(calls) == kill_after:
            raise Killed
        calls.append((method, lam, seed))
        return {"method": method, "lambda": lam, "seed": seed, "width": 3 if method == "dam" else 4,
                "test_mse": 0.1 + 0.01 * seed, "macro_f1": 0.5, "seconds": 0.0}
    return train_one


def test_sweep_order_is_seed_major():
    jobs = ae.sweep_jobs(ae.PAPER, [0, 1])
    assert jobs[:4] == [("dam", 0.01, 0), ("l1", 0.01, 0), ("dam", 0.05, 0), ("l1", 0.05, 0)]
    assert {s for _, _, s in jobs[:18]} == {0} and len(jobs) == 36 == len(set(jobs))
    assert ae.PAPER.epochs == 100 and ae.PAPER.runs == 5 and ae.PAPER.gate_lr_scale == 1.0
    assert ae.PAPER.lambdas == ae.PAPER_LAMBDAS and ae.SHORT.epochs == 6


def test_killed_sweep_trains_only_the_missing_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ae, "train_one", fake_train_one(calls, kill_after=3))
    with pytest.raises(Killed):
        ae.run_autoencoder("mnist", tmp_path, protocol="quick", seeds=2)
    assert [json.loads(line)["seed"] for line in (tmp_path / "runs.jsonl").read_text().splitlines()] == [0, 0, 0]
    # a kill in the middle of writing the 4th line leaves half a line behind
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"method": "l1", "lambda": 5.0, "se')
    with pytest.warns(UserWarning, match="not a complete run record"):
        partial = ae.run_autoencoder("mnist", tmp_path, protocol="quick", seeds=2, report_only=True)
    assert partial["runs_done"] == 3 and not partial["complete"] and len(calls) == 3  # nothing trained
    assert partial["smaller_width_at_equal_lambda"]["missing"] == [5.0]
    assert "Partial: 3 of 8 runs" in (tmp_path / "results.md").read_text()

    calls.clear()
    monkeypatch.setattr(ae, "train_one", fake_train_one(calls))
    with pytest.warns(UserWarning, match="not a complete run record"):  # read once, then dropped
        results = ae.run_autoencoder("mnist", tmp_path, protocol="quick", seeds=2)
    assert all(json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines())
    assert calls == [("l1", 5.0, 0), ("dam", 0.1, 1), ("l1", 0.1, 1), ("dam", 5.0, 1), ("l1", 5.0, 1)]
    assert results["complete"] and results["runs_done"] == 8
    assert [(r["method"], r["lambda"], r["seed"]) for r in results["runs"]] == ae.sweep_jobs(ae.QUICK, [0, 1])

    calls.clear()  # everything done: a third start trains nothing and writes the same results
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ae.run_autoencoder("mnist", tmp_path, protocol="quick", seeds=2)
    assert calls == [] and again["runs"] == results["runs"]


def test_sweep_folder_refuses_another_protocol(tmp_path, monkeypatch):
    monkeypatch.setattr(ae, "train_one", fake_train_one([]))
    ae.run_autoencoder("mnist", tmp_path, protocol="quick")
    with pytest.raises(ConfigError, match="another sweep"):
        ae.run_autoencoder("fashion-mnist", tmp_path, protocol="quick")
    with pytest.raises(ConfigError, match="unknown protocol"):
        ae.run_autoencoder("mnist", tmp_path, protocol="nope")


def test_cli_report_only_and_protocol_option(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["mnist-autoencoder", "--protocol", "quick", "--report-only", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "no runs to report" in capsys.readouterr().err
    monkeypatch.setattr(ae, "train_one", fake_train_one([]))
    with pytest.raises(SystemExit) as exit_info:
        main(["mnist-autoencoder", "--protocol", "quick", "--seeds", "1", "--threads", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    monkeypatch.setattr(ae, "train_one", None)  # --report-only must not train
    with pytest.raises(SystemExit) as exit_info:
        main(["mnist-autoencoder", "--protocol", "quick", "--report-only", "--out", str(tmp_path)])
    assert exit_info.value.code == 0


def test_report_only_without_runs_is_one_line(tmp_path, capsys):
    """Every experiment is a resumable sweep now: --report-only on a folder with no runs
    says so in one line instead of training or writing empty tables."""
    pytest.importorskip("torch_geometric")
    with pytest.raises(SystemExit) as exit_info:
        main(["recommendation", "--report-only", "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "no runs to report yet" in capsys.readouterr().err
    assert not (tmp_path / "r" / "results.md").exists()


def test_an_option_the_experiment_lacks_is_refused(tmp_path):
    from reproduce import run_experiment
    from torchdam.errors import ConfigError

    with pytest.raises(ConfigError, match="has no option --no-such-option"):
        run_experiment("dimensionality-reduction", tmp_path, quick=True, no_such_option=True)


def test_run_killed_mid_training_resumes_from_its_epoch_checkpoint(tmp_path, monkeypatch):
    protocol = replace(ae.QUICK, epochs=3)
    data = ae.load_images("mnist", protocol)
    whole = ae.train_one("dam", 5.0, 0, protocol, data, run_dir=tmp_path / "whole")

    real_run_epoch = Trainer._run_epoch

    def run_epoch(self, epoch, *args):
        if epoch == 2:
            raise Killed
        return real_run_epoch(self, epoch, *args)

    monkeypatch.setattr(Trainer, "_run_epoch", run_epoch)
    with pytest.raises(Killed):
        ae.train_one("dam", 5.0, 0, protocol, data, run_dir=tmp_path / "cut")
    monkeypatch.setattr(Trainer, "_run_epoch", real_run_epoch)
    resumed = ae.train_one("dam", 5.0, 0, protocol, data, run_dir=tmp_path / "cut")
    assert resumed["resumed"] and not whole["resumed"]
    for key in ("width", "test_mse", "macro_f1", "gate"):
        assert resumed[key] == whole[key], key
    log = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]
