"""The file format's names and version, and the limits load (and save) enforce.

Code reads these as ``limits.NAME`` when it runs, so a limit raised here
(``torchdam.serialize.limits.MAX_MODULES = 10**6``) takes effect for the next load.
"""
from __future__ import annotations

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"
FORMAT = "torchdam-arch"
VERSION = 2
#: Versions :func:`load` reads (version 1 files have no function/object/set values).
READABLE_VERSIONS = (1, 2)

# Limits :func:`load` (and :func:`save`, so it never writes what load refuses) enforces
# before it imports or allocates what a file asks for. Raise one for a file you trust that
# exceeds it; each refusal names the limit it hit.
#: Largest architecture.json read.
MAX_ARCH_BYTES = 32 * 2**20
#: Largest model.safetensors read (it is read into memory whole).
MAX_WEIGHTS_BYTES = 2**40
#: Most module entries, and module visits when shared modules are walked under every path.
MAX_MODULES = 250_000
#: Most entries in the objects table (Hugging Face configs).
MAX_OBJECTS = 10_000
#: Deepest module nesting.
MAX_DEPTH = 100
#: Deepest nesting inside one attribute value.
MAX_VALUE_DEPTH = 64
#: Longest attribute, parameter, buffer, child, class or module name.
MAX_NAME_LENGTH = 1024
#: An integer attribute of a module may be as large as the number of tensor elements the
#: weights file holds, and at least this large (token ids, cached sequence lengths, ...).
MIN_INT_LIMIT = 4096
# What either file may declare for one tensor: at most _MAX_DIMS dimensions, each size below
# _INT64; every integer in architecture.json must fit in 64 bits too.
_MAX_DIMS = 64
_INT64 = 2**63
