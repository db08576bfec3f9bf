"""Checks every family of the architecture zoo passes once compacted, written once for
``tests/test_zoo_cnn.py`` and ``tests/test_zoo_transformers.py``:

* :func:`assert_no_dam_state`: no gate, gated forward or torchdam hook is left on the
  compacted model (``_sa_block`` pre-hooks, head-gate hooks, ...);
* :func:`assert_save_load_round_trip`: ``torchdam.save`` + ``torchdam.load`` give a model
  whose state and outputs on a fresh input are *identical* (no tolerance);
* :func:`assert_onnx_export`: ``torchdam.count.OnnxModel`` exports the compacted model and
  ONNX Runtime computes the same outputs (atol 1e-4); or, for a family whose ops do not
  export, an :class:`OnnxLimitation` says which op and why, and the check asserts that the
  export still raises it (so the test notices when it starts working).

The zoo exports with torch's TorchScript exporter (``OnnxModel(..., dynamo=False)``): on
these tiny models it takes 0.1-0.5 s, where the ``torch.export`` based default takes 3-10 s
a model (most of it fixed cost: tracing, decompositions, building the op registry), which
would triple the zoo's run time. ``test_zoo_transformers.py`` exports one compacted model
with the default exporter too.
"""
from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

import torchdam as dam
from torchdam.calling import call

#: nn.Module's hook dictionaries (forward, pre-forward, with kwargs, backward, state-dict ...).
HOOK_DICTS = sorted(k for k, v in vars(nn.Module()).items() if "hook" in k and isinstance(v, dict))
#: class modules torchdam.load imports without being told to trust them
_BUILTIN = ("torch.", "torchdam.", "transformers.")


def _origin(hook) -> str:
    fn = getattr(hook, "func", hook)  # functools.partial
    return getattr(fn, "__module__", None) or type(fn).__module__ or ""


def dam_leftovers(model: nn.Module) -> list[str]:
    """What attach/compact left on ``model``: gates, ``dam_gate`` attributes, per-instance
    forwards, torchdam hooks of any kind."""
    found = []
    for name, module in model.named_modules():
        where = name or "<root>"
        if isinstance(module, dam.DAMGate) or "dam_gate" in module._modules or "dam_gate" in vars(module):
            found.append(f"{where}: a DAM gate")
        if "forward" in vars(module):
            found.append(f"{where}: an instance forward {vars(module)['forward']!r}")
        for key in HOOK_DICTS:
            for hook in getattr(module, key).values():
                if _origin(hook).startswith("torchdam"):
                    found.append(f"{where}: {key} {hook!r}")
    return found


def assert_no_dam_state(small: nn.Module) -> None:
    left = dam_leftovers(small)
    assert not left, left


def run_outputs(model: nn.Module, inputs) -> list[Tensor]:
    """Every output tensor of one eval, no-grad forward (HF caches off), in pytree order."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [t for t in tree_flatten(call(model, inputs))[0] if isinstance(t, Tensor)]
    finally:
        model.train(was_training)


def _trusted(model: nn.Module) -> list[str]:
    """The test modules defining the model's own classes (e.g. ``test_zoo_cnn``)."""
    return sorted({type(m).__module__ for m in model.modules()} - {"torch", "torchdam", "transformers"}
                  - {type(m).__module__ for m in model.modules() if type(m).__module__.startswith(_BUILTIN)})


def assert_save_load_round_trip(small: nn.Module, fresh, directory: Path) -> nn.Module:
    """``torchdam.save`` then ``torchdam.load``: same classes, training flag, tied weights,
    state and (exactly) the same outputs on ``fresh``. Classes from torch, torchdam and
    transformers load from the built-in allow-list; only the test's own classes are trusted."""
    dam.save(small, directory)
    loaded = dam.load(directory, trusted_modules=_trusted(small))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in small.modules()]
    assert [m.training for m in loaded.modules()] == [m.training for m in small.modules()]
    assert len(list(loaded.parameters())) == len(list(small.parameters()))  # shared (tied) stay shared
    a, b = small.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert_no_dam_state(loaded)
    expected, got = run_outputs(small, fresh), run_outputs(loaded, fresh)
    assert len(expected) == len(got) > 0
    for x, y in zip(expected, got):
        assert x.shape == y.shape and torch.equal(x, y), (x - y).abs().max()
    return loaded


@dataclass(frozen=True)
class OnnxLimitation:
    """A family whose compacted model does not export to ONNX as the zoo calls it.

    ``error`` and ``match`` are what the export raises (checked, so the test fails once it
    exports); ``reason`` says which op and why. ``workaround``, if given, turns the zoo's
    inputs into inputs that do export, and those are then checked like any family's."""

    error: type[Exception]
    match: str
    reason: str
    workaround: Callable[[object], object] | None = None


def onnx_inputs(model: nn.Module, inputs):
    """What :class:`OnnxModel` gets: as :func:`torchdam.calling.call` calls the model
    (``use_cache=False`` for a forward that takes it)."""
    if not isinstance(inputs, Mapping):
        return inputs
    kwargs = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return kwargs


def export_and_compare(small: nn.Module, example, fresh, path: Path, atol: float = 1e-4,
                       dynamo: bool = False) -> None:
    """Exports ``small`` on ``example`` (batch dim dynamic) and compares ONNX Runtime's
    outputs on ``fresh`` (another batch size) with the model's."""
    from torchdam.count import OnnxModel

    with warnings.catch_warnings():
        # the exporters' notices: the export is checked below, on another batch size
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size other than 1", UserWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator of advanced indexing", UserWarning)
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        onnx_model = OnnxModel(small, onnx_inputs(small, example), path, threads=1, dynamo=dynamo)
    got = onnx_model(**fresh) if isinstance(fresh, Mapping) else onnx_model(*(fresh if isinstance(fresh, tuple)
                                                                              else (fresh,)))
    got = [got] if isinstance(got, Tensor) else got
    expected = run_outputs(small, fresh)
    assert len(got) == len(expected), (len(got), len(expected))
    for ref, out in zip(expected, got):
        assert out.shape == ref.shape
        assert (out.to(ref.dtype) - ref).abs().max().item() <= atol * max(1.0, ref.abs().max().item())


def assert_onnx_export(small: nn.Module, example, fresh, path: Path, limitation: OnnxLimitation | None) -> None:
    """The compacted model exports and ONNX Runtime matches it; or, for a documented
    limitation, the export raises what it says (then the workaround inputs export)."""
    import pytest

    if limitation is None:
        export_and_compare(small, example, fresh, path)
        return
    try:
        export_and_compare(small, example, fresh, path)
    except limitation.error as err:
        assert re.search(limitation.match, str(err)), err
    else:
        pytest.fail(f"the ONNX limitation '{limitation.reason}' no longer holds: the model exports; "
                    "drop the family's OnnxLimitation")
    if limitation.workaround is not None:
        export_and_compare(small, limitation.workaround(example), limitation.workaround(fresh),
                           path.with_name(f"workaround_{path.name}"))
