"""Exceptions a user can act on.

Every error torchdam raises for a user mistake derives from :class:`TorchDAMError`, so
callers (and the CLI, which turns them into one line and exit code 2) can tell them apart
from bugs. Messages name the layer, file or option at fault and say what to do.
"""
from __future__ import annotations


class TorchDAMError(Exception):
    """Base class of every error torchdam raises on purpose."""


class ConfigError(TorchDAMError, ValueError):
    """An option has a value that cannot work (negative lambda, unknown name, ...)."""


class AttachError(TorchDAMError):
    """`attach` could not place gates as asked (e.g. nothing matched)."""


class CompactionError(TorchDAMError):
    """`compact` cannot turn this gated model into a smaller one exactly."""


class UnsupportedLayerError(CompactionError):
    """A gated layer's type has no compaction rule; the message names the layer."""


class ShapeError(TorchDAMError, ValueError):
    """An input does not have the shape a gate or model expects."""


class DataError(TorchDAMError):
    """A dataset is missing, unreadable or malformed; says which package or file to fix."""


class CheckpointError(TorchDAMError):
    """A checkpoint or saved model is missing, truncated or not a torchdam file."""


class DiskFullError(CheckpointError):
    """The disk filled up while writing; what was written before is intact."""


class DivergenceError(TorchDAMError):
    """Training produced a NaN/inf loss; nothing from the diverged steps was saved."""


class DistributedError(TorchDAMError):
    """Ranks of a distributed run disagree (gates differ) or cannot be set up."""
