"""The kit's shared type names, and the one check of a scale against a batch.

- `PathLike`: a file or folder argument (a string or a `pathlib.Path`).
- `Scale`: a scale that is one number for every sample (float) or one per sample (Tensor [B]).

`per_sample_scale` is where every scale (the adapter scale, the IdentityNet conditioning scale,
the identity scale inside the attention equation) is checked against the batch it multiplies.
This module imports nothing from the kit but its errors, so every layer can use it.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Union

import torch
from torch import Tensor

from .errors import InputError

PathLike = Union[str, os.PathLike]
Scale = Union[float, Tensor]


def per_sample_scale(scale, batch: int, *, name: str = "scale") -> Scale:
    """A scale for a batch of `batch` samples: a float, or a Tensor of shape [batch].

    A number stays one float. A tensor (or a list) of 1 or `batch` entries becomes a Tensor of
    shape [batch]; its dtype, device and autograd graph are kept (lists become float32).

    :param scale: a number; or a tensor / list of shape [], [1] or [batch].
    :param batch: B, the number of samples the scale multiplies.
    :param name: the argument's name, for the error message.
    :raises InputError: any other shape, or a value that is not finite, naming `name`.
    """
    if isinstance(scale, numbers.Number) and not isinstance(scale, bool):
        if not math.isfinite(float(scale)):
            raise InputError(f"{name} must be a finite number, got {scale!r}")
        return float(scale)
    t = scale if isinstance(scale, Tensor) else _as_float_tensor(scale, name)
    if not bool(torch.isfinite(t.detach()).all()):
        raise InputError(f"{name} holds NaN or infinite values; give finite numbers")
    if t.ndim > 1 or t.numel() not in (1, batch):
        raise InputError(
            f"{name} must be a number, or a tensor of shape [{batch}] (one per sample); got shape {list(t.shape)}"
        )
    return t.reshape(-1).expand(batch)  # [] / [1] / [B] -> [B]


def _as_float_tensor(values, name: str) -> Tensor:
    try:
        return torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{name} must be a number or a list / tensor of numbers, got {type(values).__name__}") from e
