"""What the denoiser sees at every step, and classifier-free guidance (CFG).

With guidance every per-sample tensor is batched [uncond, cond] (B' = 2B): the negative text
(zeros for SDXL without a negative prompt), the negative identity (the Resampler applied to a
zero embedding), and the same keypoint image, scales and masks for both halves. The two noise
predictions are mixed as

    eps = eps_uncond + w * (eps_cond - eps_uncond)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

Scale = Union[float, Tensor]


@dataclass
class Control:
    """One ControlNet's inputs for a whole generation, batched like the UNet input (B').

    :param net: a diffusers `ControlNetModel`.
    :param context: what its cross-attention sees, [B', L, C]: identity tokens for IdentityNet,
        text tokens for extra ControlNets.
    :param image: its spatial condition, [B', 3, H, W] in [0, 1].
    :param scale: conditioning scale, float or Tensor [B'].
    :param mask: optional region mask [B', 1, H, W] multiplying its residuals.
    :param window: (start, end) fractions of the steps during which it acts.
    """

    net: nn.Module
    context: Tensor
    image: Tensor
    scale: Scale = 1.0
    mask: Optional[Tensor] = None
    window: tuple[float, float] = (0.0, 1.0)

    def active(self, step: int, num_steps: int) -> bool:
        """Whether the ControlNet acts at `step` (diffusers' `control_guidance_start/end` rule)."""
        start, end = self.window
        return not (step / num_steps < start or (step + 1) / num_steps > end)


@dataclass
class Conditioning:
    """Everything the UNet and ControlNets see besides the latents.

    :param text_tokens: [B', Lt, C].
    :param identity_tokens: [B', N, C] (the UNet's identity branch), or None.
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
    controls: list[Control] = field(default_factory=list)
    guided: bool = True
    guess_mode: bool = False
    identity_attention: bool = True

    def cross_attention_kwargs(self) -> Optional[dict]:
        """The identity arguments of the UNet's attention processors (None without the adapter)."""
        if not self.identity_attention or self.identity_tokens is None:
            return None
        return {"identity_tokens": self.identity_tokens, "adapter_scale": self.adapter_scale,
                "region_mask": self.face_mask}


def with_uncond(uncond: Tensor, cond: Tensor, guided: bool) -> Tensor:
    """[uncond, cond] stacked on the batch axis when guided, else `cond`: [B, ...] -> [2B, ...]."""
    return torch.cat([uncond, cond]) if guided else cond


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
