"""The recommendation (IGMC) sweep is resumable: a run cut part-way continues from its
epoch checkpoint and ends exactly as an uninterrupted run, finished runs live in
runs.jsonl and are never trained again, a folder of another protocol is refused, and a
partial runs.jsonl can be written up at any time (--report-only)."""
import json
import os
import warnings
from dataclasses import replace

import pytest

import reproduce.igmc as igmc
from reproduce.__main__ import main
from torchdam.errors import ConfigError, DataError


class Killed(Exception):
    """Stands in for the process being killed."""


@pytest.fixture(scope="module")
def yahoo_quick(tmp_path_factory):
    """YahooMusic's QUICK subgraphs (100 train / 100 test pairs), extracted into a fresh cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHDAM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        try:
            levels, train, test, _ = igmc.load_dataset("yahoo_music", igmc.QUICK.for_dataset("yahoo_music"), False)
        except DataError as err:
            if os.environ.get("CI"):  # CI has ../shared: missing data there is a failure
                raise
            pytest.skip(str(err))
    return levels, train, test


def without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize("dam", [False, True], ids=["IGMC", "IGMC-DAM"])
def test_run_cut_after_an_epoch_resumes_exactly(yahoo_quick, tmp_path, monkeypatch, dam):
    levels, train, test = yahoo_quick
    # QUICK sizes, 4 epochs: the cut falls after the lr drop (so the schedule's position must
    # be restored) and after the first ensemble checkpoint (so its predictions must be)
    cfg = replace(igmc.QUICK.for_dataset("yahoo_music"), epochs=4, ensemble_at=(0.5, 1.0))
    assert cfg.ensemble_epochs() == [2, 4]
    args = (train, test, levels, dam, cfg.lambdas["yahoo_music"], 0, cfg)
    whole = igmc.train_igmc(*args, progress=False, run_dir=tmp_path / "whole")

    real, trained, kill = igmc._train_epoch, [], [True]

    def train_epoch(*a):
        epoch = a[7]  # _train_epoch(model, train, order, optimizer, policy, cfg, dam, epoch, device)
        if epoch == 2 and kill[0]:  # killed in epoch 3, after epoch 2's checkpoint
            raise Killed
        trained.append(epoch)
        return real(*a)

    monkeypatch.setattr(igmc, "_train_epoch", train_epoch)
    with pytest.raises(Killed):
        igmc.train_igmc(*args, progress=False, run_dir=tmp_path / "cut")
    assert trained == [0, 1]
    kill[0] = False
    trained.clear()
    with pytest.raises(ConfigError, match="another run.*seed"):  # a checkpoint of seed 0 is not seed 1's
        igmc.train_igmc(*args[:5], 1, cfg, progress=False, run_dir=tmp_path / "cut")
    resumed = igmc.train_igmc(*args, progress=False, run_dir=tmp_path / "cut")
    assert trained == [2, 3]  # epochs 1 and 2 came from the checkpoint
    assert resumed["resumed"] and not whole["resumed"]
    for key in ("rmse_ensemble", "rmse_last", "width"):
        assert resumed[key] == whole[key], key
    assert without_seconds(resumed["history"]) == without_seconds(whole["history"])


def test_sweep_restarted_after_a_kill_continues_the_cut_run(yahoo_quick, tmp_path, monkeypatch):
    """The same command again finds the cut run's checkpoint and ends with the records an
    uninterrupted sweep writes."""
    monkeypatch.setenv("TORCHDAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(igmc.PROTOCOLS, "quick", replace(igmc.QUICK, datasets=("yahoo_music",)))
    whole = igmc.run(tmp_path / "whole", quick=True)
    real, kill = igmc._train_epoch, [True]

    def train_epoch(*a):
        dam, epoch = a[6], a[7]
        if dam and epoch == 1 and kill[0]:  # IGMC-DAM's epoch 2 (IGMC is recorded by then)
            raise Killed
        return real(*a)

    monkeypatch.setattr(igmc, "_train_epoch", train_epoch)
    with pytest.raises(Killed):
        igmc.run(tmp_path / "cut", quick=True)
    assert len((tmp_path / "cut" / "runs.jsonl").read_text().splitlines()) == 1
    kill[0] = False
    cut = igmc.run(tmp_path / "cut", quick=True)
    assert [r["resumed"] for r in cut["datasets"]["yahoo_music"]["runs"]["IGMC-DAM"]] == [True]
    assert not (tmp_path / "cut" / igmc.TRAIN_DIR / "yahoo_music-IGMC-DAM-seed0").exists()  # recorded: cleaned up
    for method in igmc.METHODS:
        a, b = (r["datasets"]["yahoo_music"]["runs"][method][0] for r in (whole, cut))
        assert (a["rmse_ensemble"], a["rmse_last"], a["width"]) == (b["rmse_ensemble"], b["rmse_last"], b["width"])
        assert without_seconds(a["history"]) == without_seconds(b["history"])


def fake_load(name, cfg, progress):
    pairs = {"pairs": 10, "seconds": 0.0, "us_per_subgraph": 1.0, "from_cache": True, "mean_nodes": 3.0,
             "mean_edges": 2.0}
    return 5, name, name, {"train": pairs, "test": pairs}  # the "subgraphs" name their dataset


def fake_train(calls, kill_after=None):
    def train_igmc(train, test, levels, dam, lam, seed, cfg, progress=True, run_dir=None):
        if kill_after is not None and len(calls) == kill_after:
            raise Killed
        calls.append((train, igmc.METHODS[int(dam)], seed))
        width = 100 if dam else igmc.HIDDEN
        return {"rmse_ensemble": 0.9 - 0.01 * dam + 0.001 * seed, "rmse_last": 0.95, "width": width,
                "history": [{"epoch": e + 1, "train_mse": 1.0, **({"width": width} if dam else {})}
                            for e in range(cfg.epochs)], "seconds": 1.0, "resumed": False}
    return train_igmc


def test_longer_protocol_and_its_order():
    longer = igmc.PROTOCOLS["longer"]
    assert longer.datasets == ("douban", "ml_100k") and longer.epochs == 20 and longer.seeds == 2
    assert longer.ensemble_epochs() == [14, 16, 18, 20] and longer.beta_lr is None
    assert longer.for_dataset("ml_100k").max_nodes_per_hop == 30
    assert longer.for_dataset("douban").max_nodes_per_hop is None
    assert {longer.lambdas[d] for d in longer.datasets} == {0.1}
    # an early stop leaves complete IGMC / IGMC-DAM pairs: seed 0 everywhere before seed 1
    assert igmc.sweep_jobs(longer) == [
        ("douban", "IGMC", 0), ("douban", "IGMC-DAM", 0), ("ml_100k", "IGMC", 0), ("ml_100k", "IGMC-DAM", 0),
        ("douban", "IGMC", 1), ("douban", "IGMC-DAM", 1), ("ml_100k", "IGMC", 1), ("ml_100k", "IGMC-DAM", 1)]
    # per-dataset seeds: a dataset with fewer seeds drops out of the later rounds
    assert [job for job in igmc.sweep_jobs(igmc.CPU_BUDGET) if job[2] == 2] == [
        ("yahoo_music", "IGMC", 2), ("yahoo_music", "IGMC-DAM", 2)]


def test_killed_sweep_trains_only_the_missing_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(igmc, "load_dataset", fake_load)
    monkeypatch.setattr(igmc, "train_igmc", fake_train(calls, kill_after=3))
    with pytest.raises(Killed):
        igmc.run(tmp_path, protocol="quick", seeds=2)
    assert [json.loads(line)["seed"] for line in (tmp_path / "runs.jsonl").read_text().splitlines()] == [0, 0, 0]

    monkeypatch.setattr(igmc, "train_igmc", None)  # --report-only must not train
    partial = igmc.run(tmp_path, protocol="quick", seeds=2, report_only=True)
    assert partial["runs_done"] == 3 and not partial["complete"]
    assert partial["missing"] == ["ml_100k-IGMC-DAM-seed0", "yahoo_music-IGMC-seed1", "yahoo_music-IGMC-DAM-seed1",
                                  "ml_100k-IGMC-seed1", "ml_100k-IGMC-DAM-seed1"]
    text = (tmp_path / "results.md").read_text()
    assert "Partial: 3 of 8 runs done" in text and "ml_100k-IGMC-DAM-seed0" in text
    assert partial["plots"] == ["igmc_width.png", "igmc_rmse.png"]  # ml_100k has no pair yet: left out

    monkeypatch.setattr(igmc, "train_igmc", fake_train(calls))
    calls.clear()
    results = igmc.run(tmp_path, protocol="quick", seeds=2)
    assert calls == [("ml_100k", "IGMC-DAM", 0), ("yahoo_music", "IGMC", 1), ("yahoo_music", "IGMC-DAM", 1),
                     ("ml_100k", "IGMC", 1), ("ml_100k", "IGMC-DAM", 1)]
    assert results["complete"] and results["runs_done"] == 8
    assert "Complete: 8 runs" in (tmp_path / "results.md").read_text()
    assert results["datasets"]["yahoo_music"]["summary"]["IGMC-DAM"]["runs"] == 2

    calls.clear()  # everything done: a third start trains nothing and writes the same results
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = igmc.run(tmp_path, protocol="quick", seeds=2)
    assert calls == [] and again["datasets"] == results["datasets"]


def test_folder_of_another_protocol_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(igmc, "load_dataset", fake_load)
    monkeypatch.setattr(igmc, "train_igmc", fake_train([]))
    igmc.run(tmp_path, quick=True)
    with pytest.raises(ConfigError, match="another sweep.*protocol: 'quick' -> 'longer'"):
        igmc.run(tmp_path, protocol="longer")
    igmc.run(tmp_path, protocol="quick", seeds=2)  # more seeds of the same protocol pool
    with pytest.raises(ConfigError, match="unknown protocol"):
        igmc.run(tmp_path, protocol="nope")
    with pytest.raises(ConfigError, match="cannot be combined"):
        igmc.run(tmp_path, quick=True, protocol="paper")
    monkeypatch.setenv("TORCHDAM_IGMC_PROTOCOL", "1")  # the old switch is refused, not ignored
    with pytest.raises(ConfigError, match="--protocol paper"):
        igmc.run(tmp_path / "paper")


def test_cli_protocol_and_report_only(tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["recommendation", "--protocol", "quick", "--report-only", "--out", out])
    assert exit_info.value.code == 2 and "no runs to report" in capsys.readouterr().err
    monkeypatch.setattr(igmc, "load_dataset", fake_load)
    monkeypatch.setattr(igmc, "train_igmc", fake_train([]))
    with pytest.raises(SystemExit) as exit_info:
        main(["recommendation", "--protocol", "quick", "--threads", "1", "--out", out])
    assert exit_info.value.code == 0
    monkeypatch.setattr(igmc, "train_igmc", None)
    monkeypatch.setattr(igmc, "load_dataset", None)  # a write-up needs no data
    (tmp_path / "results.md").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["recommendation", "--protocol", "quick", "--report-only", "--out", out])
    assert exit_info.value.code == 0 and "`python -m reproduce recommendation --quick`" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["recommendation", "--protocol", "longer", "--report-only", "--out", out])
    assert exit_info.value.code == 2 and "another sweep" in capsys.readouterr().err
