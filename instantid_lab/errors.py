"""The kit's exceptions: one base class, `LabError`, and one subclass per kind of bad input.

Every error says what went wrong *and what to do*. Catch `LabError` to handle all of them.
"""

from __future__ import annotations


class LabError(Exception):
    """Base class of every error the kit raises on purpose."""


class InputError(LabError, TypeError, ValueError):
    """An argument has the wrong type, shape or value."""


class ImageReadError(LabError):
    """A file or array could not be read as an image (missing, corrupt, not an image, too large)."""


class NoFaceError(LabError):
    """Face analysis found no face; the message says what was tried."""


class ModelFilesMissingError(LabError, FileNotFoundError):
    """Model weights are not where the kit looks; the message says where to put them."""


class CheckpointError(LabError):
    """A checkpoint does not fit the model (missing or unexpected keys, wrong shapes)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint tried to load something other than plain tensors; nothing was executed."""
