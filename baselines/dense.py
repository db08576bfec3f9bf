"""The unpruned reference: the same model, trainer, data and epochs, nothing removed."""
from __future__ import annotations

from baselines.common import Result, Setup, Trained, find_sites, finish, fit


def train(setup: Setup) -> Trained:
    """Train the dense model for ``setup.config.epochs`` (also the pretraining stage of
    train-prune-fine-tune methods, which can reuse one dense run for every strength)."""
    return fit(setup.build(), setup.config, setup)


def run(setup: Setup, strength: float = 0.0) -> Result:
    """Train the dense model; ``strength`` is ignored (recorded as given)."""
    trained = train(setup)
    widths = {name: (s.units, s.units) for name, s in find_sites(trained.model, setup).items()}
    trained.model.eval()
    return finish("dense", strength, trained.model, [trained], setup, widths)
