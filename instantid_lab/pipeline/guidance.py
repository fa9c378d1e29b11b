"""What the denoiser sees at every step, and classifier-free guidance (CFG).

With guidance every per-sample tensor is batched [uncond, cond] (B' = 2B): the negative text
(zeros for SDXL without a negative prompt), the negative identity (the Resampler applied to
`negative_embedding`, a zero embedding by default), and the same keypoint image, scales and
masks for both halves. The two noise predictions are mixed as

    eps = eps_uncond + w * (eps_cond - eps_uncond)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..identitynet import Residuals, add_residuals, controlnet_residuals, zero_pad_uncond
from ..types import Scale
from .records import ControlWindow


@dataclass(frozen=True)
class Control:
    """One ControlNet's inputs for a whole generation, batched like the UNet input (B').

    :param net: a diffusers `ControlNetModel`.
    :param context: what its cross-attention sees, [B', L, C]: identity tokens for IdentityNet,
        text tokens for extra ControlNets.
    :param image: its spatial condition, [B', 3, H, W] in [0, 1].
    :param scale: conditioning scale, float or Tensor [B'].
    :param mask: optional region mask [B', 1, H, W] multiplying its residuals.
    :param window: the fraction of the steps during which it acts.
    """

    net: nn.Module
    context: Tensor
    image: Tensor
    scale: Scale = 1.0
    mask: Optional[Tensor] = None
    window: ControlWindow = ControlWindow()

    def active(self, step: int, num_steps: int) -> bool:
        """Whether the ControlNet acts at `step` (diffusers' `control_guidance_start/end` rule)."""
        return self.window.active(step, num_steps)

    @cached_property
    def dtype(self) -> torch.dtype:
        """The net's dtype, read once per generation (diffusers' `model.dtype` walks every submodule)."""
        return self.net.dtype


@dataclass(frozen=True)
class Conditioning:
    """Everything the UNet and ControlNets see besides the latents.

    Built whole, once per generation (`InstantIDPipeline.prepare_conditioning`), or from tensors
    for training (`InstantIDPipeline.tensor_conditioning`).

    :param text_tokens: [B', Lt, C].
    :param identity_tokens: [B', N, C] (the UNet's identity branch), or None (the plain model).
    :param added_cond_kwargs: SDXL {"text_embeds": [B', P], "time_ids": [B', 6]}, or None.
    :param adapter_scale: float or Tensor [B'].
    :param face_mask: [B', 1, H, W] or None: limits the identity attention to the face region.
    :param controls: IdentityNet first (if any), then the extra ControlNets.
    :param guided: whether the batch is [uncond, cond].
    :param guess_mode: ControlNets see only the cond half; the uncond half gets zero residuals.
    :param identity_attention: whether the UNet has identity processors to pass tokens to.
    """

    text_tokens: Tensor
    identity_tokens: Optional[Tensor]
    added_cond_kwargs: Optional[dict]
    adapter_scale: Scale = 1.0
    face_mask: Optional[Tensor] = None
    controls: tuple[Control, ...] = ()
    guided: bool = True
    guess_mode: bool = False
    identity_attention: bool = True

    def cross_attention_kwargs(self) -> Optional[dict]:
        """The identity arguments of the UNet's attention processors (None without the adapter)."""
        if not self.identity_attention or self.identity_tokens is None:
            return None
        return {"identity_tokens": self.identity_tokens, "adapter_scale": self.adapter_scale,
                "region_mask": self.face_mask}


def control_residuals(model_input: Tensor, t, cond: Conditioning, step: int = 0,
                      num_steps: int = 1) -> Optional[Residuals]:
    """The summed residuals of the ControlNets active at `step` of `num_steps` (None if none is).

    In guess mode with guidance they run on the conditional half only and the unconditional
    half gets zeros, so the residual batch always equals the UNet's.

    :param model_input: the UNet's input, shape [B', 4, h, w].
    :return: (down residuals, mid residual), each with batch B'.
    """
    total = None
    for control in cond.controls:
        if control.active(step, num_steps):
            total = add_residuals(total, run_control(control, model_input, t, cond))
    return total


def run_control(control: Control, model_input: Tensor, t, cond: Conditioning) -> Residuals:
    """One ControlNet's residuals, in its dtype (the conditional half only in guess mode with guidance)."""
    half = cond.guess_mode and cond.guided
    pick = cond_half if half else (lambda x: x)
    dtype = control.dtype
    residuals = controlnet_residuals(
        control.net, pick(model_input).to(dtype), t, pick(control.context).to(dtype), pick(control.image),
        pick(control.scale), pick(cond.added_cond_kwargs), pick(control.mask), guess_mode=cond.guess_mode,
    )
    return zero_pad_uncond(residuals) if half else residuals


def with_uncond(uncond: Tensor, cond: Tensor, guided: bool) -> Tensor:
    """[uncond, cond] stacked on the batch axis when guided, else `cond`: [B, ...] -> [2B, ...]."""
    return torch.cat([uncond, cond]) if guided else cond


def repeat_per_image(x: Optional[Tensor], n: int) -> Optional[Tensor]:
    """Per prompt -> per generated image, prompt-major: [B, ...] -> [B * n, ...] (None passes)."""
    return x if x is None or n == 1 else x.repeat_interleave(n, dim=0)


def same_for_both(x: Any, guided: bool) -> Any:
    """A per-sample tensor repeated for both halves when guided (floats and None pass through)."""
    return torch.cat([x, x]) if guided and isinstance(x, Tensor) else x


def cond_half(x: Any) -> Any:
    """The conditional half of a [uncond, cond] batch (tensors and dicts of tensors; others pass)."""
    if isinstance(x, Tensor):
        return x.chunk(2)[1]
    if isinstance(x, dict):
        return {k: cond_half(v) for k, v in x.items()}
    return x


def guide(noise_pred: Tensor, guidance_scale: float) -> Tensor:
    """eps_uncond + w * (eps_cond - eps_uncond).

    :param noise_pred: shape [2B, C, h, w], batched [uncond, cond].
    :return: shape [B, C, h, w].
    """
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def negative_embedding(embeds: Tensor, kind: str = "zeros", strength: float = 0.35, seed: int = 0) -> Tensor:
    """The negative identity embedding for guidance: zeros (the reference), or seeded Gaussian noise
    times `strength` (a community variant said to reduce over-saturation, "burn").
    `records.NegativeIdentity` holds these three settings.

    :param embeds: the positive embeddings, shape [B, D] (only shape, device and dtype are used).
    :return: shape [B, D].
    """
    if kind == "zeros":
        return torch.zeros_like(embeds)
    noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(seed))
    return (noise * strength).to(device=embeds.device, dtype=embeds.dtype)
