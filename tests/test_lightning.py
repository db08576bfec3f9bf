"""DAMCallback on a small LightningModule: penalty, cold start, width logging, compaction."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchdam

if os.environ.get("CI"):  # CI installs the extra: a missing Lightning there is a failure
    import lightning  # noqa: F401
else:
    pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402

from torchdam.errors import AttachError, ConfigError  # noqa: E402
from torchdam.lightning import DAMCallback  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(torchdam.dam_param_groups(self.net, lr=0.05, beta_lr=0.05), lr=0.05, momentum=0.9)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    return x, DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32, shuffle=True)


def fit(callback, epochs=3):
    model = Classifier()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    trainer.fit(model, data()[1])
    return model


def test_callback_penalises_cold_starts_logs_and_compacts(tmp_path):
    x, _ = data()
    callback = DAMCallback(lam=2.0, cold_start=1, module="net", attach={}, example_inputs=x[:8],
                           save_dir=tmp_path / "compacted")
    model = fit(callback)
    assert [r["epoch"] for r in callback.history] == [1, 2, 3]
    first, last = callback.history[0], callback.history[-1]
    assert first["dam/beta/0"] == 1.0 and first["dam/beta/2"] == 1.0  # cold start: untouched
    assert last["dam/beta/0"] < 1.0 and last["dam/width/0"] < 32  # the penalty pruned units
    widths = torchdam.widths(model.net)
    assert last["dam/width/0"] == widths["0"][0]
    model.eval()
    small = callback.compacted
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.net.parameters())
    torch.testing.assert_close(small(x), model.net(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(torchdam.load(tmp_path / "compacted")(x), small(x))


def test_callback_errors_are_torchdam_errors():
    with pytest.raises(ConfigError, match="lam"):
        DAMCallback(lam=-1)
    with pytest.raises(ConfigError, match="module="):
        DAMCallback(lam=1, example_inputs=torch.zeros(1, 10))
    with pytest.raises(AttachError, match="no DAM gates"):
        fit(DAMCallback(lam=1, module="net"), epochs=1)
