"""Save a (compacted) model so it reloads without its construction code and without pickle.

A compacted model has narrower layers than its class's ``__init__`` would build, so it
cannot be rebuilt by calling the constructor. :func:`save` writes a directory with

* ``model.safetensors``: the ``state_dict`` tensors (plus non-persistent buffers, so the
  reloaded model computes exactly what the saved one did), and
* ``architecture.json``: the module tree, each node naming its class, its plain
  attributes (``in_features``, ``kernel_size``, ...), its parameter and buffer shapes and
  its children, plus a table of the few non-module objects modules refer to (Hugging
  Face config objects, stored once so modules sharing one config still share it).

:func:`load` rebuilds every node with ``cls.__new__`` + ``nn.Module.__init__``, so no
constructor runs, and sets each node's attributes to the saved values, so a narrowed
layer keeps its narrowed attributes (``num_attention_heads``, ``hidden_size``, ...) rather
than what a config would recompute. Only allow-listed names are ever looked up:

* module classes from ``torch.nn``, ``torchdam``, Hugging Face ``transformers`` model code
  (:data:`HF_MODULE_CLASSES`), classes passed to :func:`register_module`, and modules the
  caller lists in ``trusted_modules``;
* config objects of Hugging Face config classes (:data:`HF_OBJECT_CLASSES`), rebuilt with
  ``object.__new__`` and their saved ``__dict__``;
* functions held as attributes (a ``TransformerEncoderLayer``'s ``activation``) by their
  key in :data:`FUNCTIONS` (extend it with :func:`register_function`).

Nothing is unpickled, and ``transformers`` is imported only when a file names its classes.
Nothing in the files is trusted either: :func:`load` checks their structure before it
uses them (regular files within size limits, the architecture's layout, nesting and
references, attribute names that would shadow methods, tensor shapes and dtypes against
the weights file's header, size attributes against the tensors; see :func:`load`), and
every refusal is a :class:`~torchdam.errors.CheckpointError` naming the file and why.
:func:`save` applies the same checks, so it never writes a model that load would refuse.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from torchdam.serialize import save, load
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    >>> d = save(net, tempfile.mkdtemp(), metadata={"model": "toy"})
    >>> x = torch.randn(5, 4)
    >>> torch.equal(load(d)(x), net(x))
    True
"""
from __future__ import annotations

from torchdam.serialize.limits import ARCH_FILE, WEIGHTS_FILE
from torchdam.serialize.limits import FORMAT as FORMAT
from torchdam.serialize.limits import READABLE_VERSIONS as READABLE_VERSIONS
from torchdam.serialize.limits import VERSION as VERSION
from torchdam.serialize.loading import load, load_metadata
from torchdam.serialize.registry import BUILTIN_TRUSTED as BUILTIN_TRUSTED
from torchdam.serialize.registry import (
    FUNCTIONS,
    METHODS,
    register_function,
    register_module,
)
from torchdam.serialize.registry import HF_MODULE_CLASSES as HF_MODULE_CLASSES
from torchdam.serialize.registry import HF_OBJECT_CLASSES as HF_OBJECT_CLASSES
from torchdam.serialize.rules import RULES, Rule
from torchdam.serialize.saving import save

# FORMAT, VERSION, READABLE_VERSIONS, BUILTIN_TRUSTED and HF_*_CLASSES are public too, but
# (as before the split) not in __all__; hence their ``X as X`` imports. The size limits have
# one home, :mod:`torchdam.serialize.limits` (set them there: ``limits.MAX_MODULES = ...``).
__all__ = ["ARCH_FILE", "FUNCTIONS", "METHODS", "RULES", "WEIGHTS_FILE", "Rule", "load", "load_metadata",
           "register_function", "register_module", "save"]
