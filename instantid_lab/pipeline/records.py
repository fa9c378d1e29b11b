"""The small records the pipeline's stages pass to each other (instead of positional tuples).

- `BatchGeometry`     how many images of what size, and whether the batch is [uncond, cond]
- `ControlWindow`     the fraction of the denoising steps a ControlNet acts in
- `NegativeIdentity`  the identity classifier-free guidance pushes away from
- `ExtraControlNet`   one more ControlNet (pose, canny, depth) with its image, scale and window
- `References`        N reference embeddings of one person and how to use them (defined in
                      `instantid_lab.references`, re-exported here): `References(embeddings [N, D],
                      combine="mean" | "norm_mean" | "weighted" | "concat", weights=None | [N])`, passed
                      as `face_embedding` (alone, or one per prompt in a list)

`pipeline.inputs` builds them once from `InstantIDPipeline.__call__`'s flexible arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import PIL.Image
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from ..errors import InputError
from ..references import References

__all__ = ["BatchGeometry", "ControlWindow", "ExtraControlNet", "NegativeIdentity", "References"]

NEGATIVE_IDENTITIES = ("zeros", "noise")


@dataclass(frozen=True)
class BatchGeometry:
    """The shape of one generation.

    :param n_prompts: B, the number of prompts.
    :param n_per_prompt: images per prompt (`num_images_per_prompt`); images are prompt-major.
    :param height: output height in pixels.
    :param width: output width in pixels.
    :param guided: classifier-free guidance: every per-sample tensor is batched [uncond, cond], so
        the UNet sees B' = 2 * batch samples (else B' = batch).
    """

    n_prompts: int
    n_per_prompt: int
    height: int
    width: int
    guided: bool = True

    @property
    def batch(self) -> int:
        """The number of generated images, n_prompts * n_per_prompt."""
        return self.n_prompts * self.n_per_prompt


@dataclass(frozen=True)
class ControlWindow:
    """The fraction of the denoising steps during which a ControlNet acts
    (diffusers' `control_guidance_start` / `control_guidance_end`).

    :param start: it acts from step `start * num_steps` on.
    :param end: it stops after step `end * num_steps`; start = end = 0 never acts.
    """

    start: float = 0.0
    end: float = 1.0

    def active(self, step: int, num_steps: int) -> bool:
        """Whether a ControlNet with this window acts at `step` (0-based) of `num_steps`."""
        return not (step / num_steps < self.start or (step + 1) / num_steps > self.end)


@dataclass(frozen=True)
class NegativeIdentity:
    """The identity embedding of the unconditional half (see `guidance.negative_embedding`).

    :param kind: "zeros" (the reference: the Resampler of a zero vector) or "noise" (seeded
        Gaussian noise times `strength`).
    :param strength: the noise's scale ("noise" only).
    :param seed: the noise's seed ("noise" only).
    :raises InputError: another `kind`.
    """

    kind: str = "zeros"
    strength: float = 0.35
    seed: int = 0

    def __post_init__(self):
        if self.kind not in NEGATIVE_IDENTITIES:
            raise InputError(f"negative_identity must be 'zeros' or 'noise', got {self.kind!r}")


@dataclass
class ExtraControlNet:
    """One more ControlNet (pose, canny, depth, ...); its cross-attention sees the text tokens.

    :param net: a diffusers `ControlNetModel` of the base model's shape.
    :param image: its condition image: path, PIL image, array or Tensor [3, H, W] in [0, 1], or one per prompt.
    :param scale: its conditioning scale: a number, or one per prompt / per generated image.
    :param window: the fraction of the steps it acts in.
    """

    net: nn.Module
    image: Any
    scale: Union[float, Sequence[float], Tensor] = 0.4
    window: ControlWindow = ControlWindow()


@dataclass
class InstantIDPipelineOutput(BaseOutput):
    """What the pipeline returns. :param images: PIL images, a numpy array [B, H, W, 3] in [0, 1], or latents [B, 4, h, w]."""

    images: Union[list[PIL.Image.Image], np.ndarray, Tensor]
