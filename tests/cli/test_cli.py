"""The CLI end to end on real MNIST (a small slice), and its bad-input contract."""
import json
import shutil

import pytest
import torch

import torchdam
from torchdam.cli import main
from torchdam.data import load_dataset


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune")
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--limit", "3000", "--epochs", "2", "--lam", "2", "--beta-lr", "0.01",
              "--latency-repeats", "3", "--no-progress", "--out", str(out)])
    assert exit_info.value.code == 0
    return out


def test_prune_writes_report_plots_log_and_compacted_model(smoke_run):
    for name in ["report.md", "report.json", "log.jsonl", "widths.png", "history.png",
                 "compacted/model.safetensors", "compacted/architecture.json", "best.safetensors",
                 "gated.safetensors"]:
        assert (smoke_run / name).exists(), name
    report = json.loads((smoke_run / "report.json").read_text())
    assert report["test_acc_gated"] == report["test_acc_compacted"] > 0.5
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["flops"] < report["before"]["flops"]
    assert len((smoke_run / "log.jsonl").read_text().splitlines()) == 2


def test_reloaded_compacted_model_gives_the_same_predictions(smoke_run):
    from safetensors.torch import load_file

    from torchdam.models import build_model

    report = json.loads((smoke_run / "report.json").read_text())
    small = torchdam.load(smoke_run / "compacted")
    assert torchdam.serialize.load_metadata(smoke_run / "compacted")["widths"] == report["widths"]
    gated = build_model("lenet300")
    torchdam.attach(gated)
    gated.load_state_dict(load_file(str(smoke_run / "gated.safetensors")))
    gated.eval()
    x, y = load_dataset("mnist").test.tensors
    with torch.no_grad():
        pred_small, pred_gated = small(x).argmax(1), gated(x).argmax(1)
    assert torch.equal(pred_small, pred_gated)
    assert (pred_small == y).sum().item() == round(report["test_acc_compacted"] * len(y))


def test_evaluate_command_reloads(smoke_run, capsys):
    code, out, _ = run_cli(["evaluate", str(smoke_run / "compacted")], capsys)
    report = json.loads((smoke_run / "report.json").read_text())
    assert code == 0 and f"{100 * report['test_acc_compacted']:.2f}%" in out and "on mnist" in out


def test_evaluate_scores_on_the_recorded_dataset_and_refuses_another(smoke_run, capsys, tmp_path):
    code, _, err = run_cli(["evaluate", str(smoke_run / "compacted"), "--data", "fashion_mnist"], capsys)
    assert code == 2 and err.count("\n") == 1 and "trained on mnist, not fashion_mnist" in err
    # the same folder as a Fashion-MNIST run would have written it: scored on Fashion-MNIST
    folder = tmp_path / "compacted"
    shutil.copytree(smoke_run / "compacted", folder)
    arch = json.loads((folder / "architecture.json").read_text())
    arch["metadata"]["data"] = "fashion_mnist"
    (folder / "architecture.json").write_text(json.dumps(arch))
    code, out, _ = run_cli(["evaluate", str(folder)], capsys)
    assert code == 0 and "on fashion_mnist" in out
    code, _, err = run_cli(["evaluate", str(folder), "--data", "mnist"], capsys)
    assert code == 2 and "trained on fashion_mnist, not mnist" in err
    del arch["metadata"]["data"]
    (folder / "architecture.json").write_text(json.dumps(arch))
    code, _, err = run_cli(["evaluate", str(folder)], capsys)
    assert code == 2 and "records no dataset; pass --data" in err


def test_prune_vit_tiny_end_to_end(tmp_path, capsys):
    """The zoo's transformer through the whole job: heads and FFN units gated, trained,
    compacted (a head removed: PrunedMultiheadAttention), saved, reloaded, reported."""
    out = tmp_path / "vit"
    code, stdout, _ = run_cli(["prune", "--model", "vit-tiny", "--data", "mnist", "--epochs", "1", "--limit", "500",
                               "--no-progress", "--optimizer", "adam", "--lr", "0.001", "--beta-lr", "0.5",
                               "--lam", "1", "--latency-repeats", "1", "--out", str(out)], capsys)
    assert code == 0 and "vit-tiny on mnist" in stdout
    report = json.loads((out / "report.json").read_text())
    assert list(report["widths"]) == [f"encoder.layers.{i}.{n}" for i in range(4) for n in ("self_attn", "linear1")]
    assert all(total == (3 if "attn" in name else 192) for name, (_, total) in report["widths"].items())
    assert report["test_acc_gated"] == report["test_acc_compacted"]
    assert report["units_kept"] < report["units_total"]  # 4 steps of beta lr 0.5 remove heads and units
    assert report["after"]["flops"] < report["before"]["flops"]
    from safetensors.torch import load_file

    from torchdam.models import build_model

    small = torchdam.load(out / "compacted")
    assert any(type(m).__name__ == "PrunedMultiheadAttention" for m in small.modules())
    gated = build_model("vit-tiny", in_channels=1, num_classes=10, image_size=28)
    torchdam.attach(gated)
    gated.load_state_dict(load_file(str(out / "gated.safetensors")))
    x = load_dataset("mnist", limit=1).test.tensors[0][:256]
    with torch.no_grad():
        assert torch.allclose(small(x), gated.eval()(x), rtol=0, atol=1e-4)


def test_cli_defaults_are_the_apis():
    """Each option has one default: the CLI reads it from TrainConfig / PruneJob."""
    import dataclasses

    import typer

    from torchdam.cli.app import app
    from torchdam.cli.prune import PruneJob
    from torchdam.train import TrainConfig

    params = {p.name: p.default for p in typer.main.get_command(app).commands["prune"].params}
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    # (PruneJob.resume is a flag; the CLI's --resume is the folder that sets it)
    fields.update({f.name: f.default for f in dataclasses.fields(PruneJob) if f.name not in ("train", "resume")})
    fields["out"] = fields.pop("out_dir")
    shared = sorted(set(params) & set(fields))
    assert len(shared) >= 20
    for name in shared:
        expected = list(fields[name]) if isinstance(fields[name], tuple) else fields[name]
        assert params[name] == expected, name
    assert (TrainConfig.lam, TrainConfig.epochs, TrainConfig.lr, TrainConfig.beta_lr) == (0.15, 15, 0.05, 0.002)


BAD = [
    (["prune", "--model", "vgg99"], "unknown model 'vgg99'"),
    (["prune", "--data", "imagenet"], "unknown dataset 'imagenet'"),
    (["prune", "--lam", "-0.5"], "lam (lambda) must be >= 0"),
    (["prune", "--epochs", "0"], "epochs must be >= 1"),
    (["prune", "--optimizer", "rmsprop", "--limit", "100"], "unknown optimizer"),
    (["prune", "--gate", "sigmoid", "--limit", "100"], "unknown gate type"),
    (["prune", "--layers", "nothing.here*", "--limit", "100"], "matched no layer"),
    (["prune", "--layers", "lstm"], "unknown layer selector"),
    (["prune", "--epochs", "abc"], "Invalid value"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys, tmp_path):
    code, _, err = run_cli(args + ["--out", str(tmp_path)], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_dataset_names_the_package_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TORCHDAM_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    from torchdam.data import mnist

    if hasattr(mnist, "_decode_fashion_mnist"):
        mnist._decode_fashion_mnist.cache_clear() if hasattr(mnist._decode_fashion_mnist, "cache_clear") else None
    code, _, err = run_cli(["prune", "--data", "fashion_mnist", "--out", str(tmp_path)], capsys)
    assert code == 2 and "apt-get install -y dataset-fashion-mnist" in err


def test_old_checkpoint_option_still_selects_the_shipped_epoch(tmp_path, capsys):
    """`--checkpoint last|best` was renamed `--ship` (checkpoint means the training state):
    the old name warns and forwards."""
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--checkpoint", "middle", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "--checkpoint is now called --ship" in err and "--ship must be 'last' or 'best'" in err


def test_prune_to_a_flops_target_without_lam_or_beta_lr(tmp_path, capsys):
    """The README's first command with a size: --target-flops alone (no --lam, no --beta-lr)
    lands within +-3% of the target, never above, and the report says target vs reached."""
    code, out, err = run_cli(["prune", "--limit", "3000", "--epochs", "2", "--target-flops", "0.5",
                              "--latency-repeats", "3", "--no-progress", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    reached = report["after"]["flops"] / report["before"]["flops"]
    assert 0.5 * 0.97 <= reached <= 0.5 * 1.03
    assert report["budget"]["ok"] and report["budget"]["target"] == 0.5
    assert report["budget"]["reached"] == pytest.approx(reached)
    assert report["test_acc_gated"] == report["test_acc_compacted"]
    assert "FLOPs target 50.0% of dense -> reached" in out and "within +-3%" in out
