"""How torchdam calls a user's model: with a tensor, a tuple of positional inputs or a dict
of keyword inputs (Hugging Face), and which of its outputs are compared (a ``ModelOutput``'s
logits). One home for it: compaction, its checks, the budget's width model and counting all
call models the same way."""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from torchdam.errors import ShapeError


def as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def call(model: nn.Module, example_inputs):
    """``model(**example_inputs)`` for a dict of keyword arguments (Hugging Face style),
    else ``model(*example_inputs)``; a model whose forward takes ``use_cache`` runs without
    a key/value cache unless the inputs say otherwise."""
    kwargs = dict(example_inputs) if isinstance(example_inputs, Mapping) else {}
    args = () if isinstance(example_inputs, Mapping) else as_tuple(example_inputs)
    if "use_cache" not in kwargs:
        try:
            takes_cache = "use_cache" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_cache = False
        if takes_cache:
            kwargs["use_cache"] = False
    return model(*args, **kwargs)


def compared_outputs(out) -> list[Tensor]:
    """The output tensors :func:`compact` compares: for a Hugging Face ``ModelOutput`` (or
    any mapping) its ``logits``, else its ``last_hidden_state`` (and ``pooler_output``),
    else every tensor but caches and per-head attention maps; otherwise every tensor."""
    if isinstance(out, Mapping):
        for keys in (("logits",), ("last_hidden_state", "pooler_output")):
            found = [out[k] for k in keys if isinstance(out.get(k), Tensor)]
            if found:
                return found
        out = [v for k, v in out.items() if "past_key_values" not in k and "attentions" not in k and k != "cache"]
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]


#: The seed every :func:`run_eval` forward starts from.
EVAL_SEED = 0


def run_eval(model: nn.Module, example_inputs) -> list[Tensor]:
    """Outputs of ``model`` in eval mode, as a flat list; restores its training flag. The
    forward draws its random numbers from :data:`EVAL_SEED` (the caller's generator state is
    left as it was), so a model that samples even in eval (ViT-MAE's patch shuffle) gives
    comparable outputs: compact compares the gated and compacted models this way."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(EVAL_SEED)
            out = call(model, example_inputs)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:  # model code asserts shapes too
        inputs = example_inputs.values() if isinstance(example_inputs, Mapping) else as_tuple(example_inputs)
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, Tensor)]
        why = str(exc).splitlines()[0] if str(exc).strip() else f"{type(exc).__name__} in its forward"
        raise ShapeError(f"example_inputs of shape {shapes} do not fit {type(model).__name__}: {why}") from exc
    finally:
        model.train(was_training)
    return compared_outputs(out)
