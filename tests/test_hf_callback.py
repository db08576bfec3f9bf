"""torchdam.hf on a real transformers.Trainer run (a tiny model built from a config, random
weights, CPU): penalty, cold start, the betas' own optimizer group, logging, compaction."""
import os
import warnings

import pytest
import torch
from torch import nn

import torchdam

if os.environ.get("CI"):  # CI installs the extra: a missing transformers there is a failure
    import transformers  # noqa: F401
else:
    pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from torchdam.errors import AttachError, ConfigError  # noqa: E402
from torchdam.hf import DAMCallback, dam_optimizer  # noqa: E402
from torchdam.train import BETA_GROUP  # noqa: E402


class TinyConfig(transformers.PretrainedConfig):
    model_type = "torchdam_tiny_mlp"

    def __init__(self, n_in: int = 10, hidden: int = 32, num_labels: int = 2, **kw) -> None:
        super().__init__(num_labels=num_labels, **kw)
        self.n_in, self.hidden = n_in, hidden


class TinyClassifier(transformers.PreTrainedModel):
    """A PreTrainedModel whose gated layers are plain Linear layers in ``net``."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(nn.Linear(config.n_in, config.hidden), nn.ReLU(),
                                 nn.Linear(config.hidden, config.hidden), nn.ReLU(),
                                 nn.Linear(config.hidden, config.num_labels))
        self.post_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def gated_model() -> TinyClassifier:
    torch.manual_seed(0)
    model = TinyClassifier(TinyConfig())
    torchdam.attach(model, exclude=("net.4",))
    return model


def dataset(n: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g)
    return [{"x": x[i], "labels": int(x[i, 0] > 0)} for i in range(n)]


def args(tmp_path, **kw) -> transformers.TrainingArguments:
    # 64 samples in batches of 16: 4 optimizer steps per epoch, 3 epochs
    options = dict(output_dir=str(tmp_path / "hf"), max_steps=12, per_device_train_batch_size=16,
                   learning_rate=0.05, weight_decay=0.01, logging_steps=4, report_to=[], use_cpu=True,
                   save_strategy="no", disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(**{**options, **kw})


def train(model, tmp_path, callback, beta_lr=0.05, **kw) -> transformers.Trainer:
    training_args = args(tmp_path, **kw)
    trainer = transformers.Trainer(model, training_args, train_dataset=dataset(), callbacks=[callback],
                                   optimizers=dam_optimizer(model, training_args, beta_lr=beta_lr))
    trainer.train()
    return trainer


def test_callback_penalises_cold_starts_logs_and_compacts(tmp_path):
    model = gated_model()
    callback = DAMCallback(lam=5.0, cold_start=1, example_inputs=torch.randn(8, 10),
                           save_dir=tmp_path / "compacted", save_module="net")
    trainer = train(model, tmp_path, callback, beta_lr=0.5)
    first, last = callback.history[0], callback.history[-1]
    assert [round(r["epoch"]) for r in callback.history] == [1, 2, 3]
    assert first["dam/beta/net.0"] == 1.0 and first["dam/beta/net.2"] == 1.0  # cold start: untouched
    assert last["dam/beta/net.0"] < 1.0 and last["dam/width/net.0"] < 32  # the penalty pruned units
    assert last["dam/width/net.0"] == torchdam.widths(model)["net.0"][0]
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 3 and all("dam/width/net.0" in r and "dam/beta/net.2" in r for r in logged)
    assert logged[-1]["dam/width/net.0"] == last["dam/width/net.0"]
    small, x = callback.compacted, torch.randn(16, 10)
    assert isinstance(small, TinyClassifier) and not any(True for _ in torchdam.named_gates(small))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    model.eval()
    torch.testing.assert_close(small(x).logits, model(x).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(torchdam.load(tmp_path / "compacted")(x), small(x).logits)


def test_dam_optimizer_gives_the_betas_their_own_group(tmp_path):
    model = gated_model()
    optimizer, scheduler = dam_optimizer(model, args(tmp_path), beta_lr=0.01)
    assert scheduler is None and isinstance(optimizer, torch.optim.AdamW)  # HF's default optim
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["weights", "no_decay", BETA_GROUP]
    betas = groups[BETA_GROUP]
    assert betas["lr"] == 0.01 and betas["weight_decay"] == 0.0
    assert {id(p) for p in betas["params"]} == {id(b) for b in torchdam.gate_parameters(model)}
    assert groups["weights"]["weight_decay"] == 0.01 and groups["weights"]["lr"] == 0.05
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(m.bias) for m in model.net if isinstance(m, nn.Linear)}


def test_lam_zero_and_no_cold_start_leaves_only_the_task_gradient(tmp_path):
    """lam=0: the callback adds nothing, so the run equals one without the callback."""
    runs = []
    for callback in (DAMCallback(lam=0.0), transformers.TrainerCallback()):
        model = gated_model()
        train(model, tmp_path, callback)
        runs.append(torch.cat([b.detach().flatten() for b in torchdam.gate_parameters(model)]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], torch.ones_like(runs[0]))


def test_hf_default_optimizer_is_warned_about_and_errors_are_torchdam_errors(tmp_path):
    model = gated_model()
    trainer = transformers.Trainer(model, args(tmp_path, max_steps=1), train_dataset=dataset(16),
                                   callbacks=[DAMCallback(lam=1.0)])
    with pytest.warns(UserWarning, match="share optimizer group"):
        trainer.train()
    with pytest.raises(ConfigError, match="lam"):
        DAMCallback(lam=-1.0)
    with pytest.raises(ConfigError, match="example_inputs"):
        DAMCallback(lam=1.0, save_dir=tmp_path)
    dense = TinyClassifier(TinyConfig())
    with pytest.raises(AttachError, match="no DAM gates"):
        dam_optimizer(dense, args(tmp_path), beta_lr=0.01)
    trainer = transformers.Trainer(dense, args(tmp_path, max_steps=1), train_dataset=dataset(16),
                                   callbacks=[DAMCallback(lam=1.0)])
    with pytest.raises(AttachError, match="no DAM gates"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
