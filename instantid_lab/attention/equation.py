"""The equation of decoupled cross-attention, as pure functions on tensors in heads.

    out = softmax(Q K^T / sqrt(d)) V  +  sum_r scale * m_r * softmax(Q K_r^T / sqrt(d)) V_r

and what it needs around it: splitting into heads, region masks on a layer's token grid, the
probabilities to look at, and the shape check of a per-sample scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..types import Scale, per_sample_scale


@dataclass(frozen=True)
class RegionalIdentity:
    """One of several identities in an image: its tokens act only where its region is.

    :param tokens: identity tokens, shape [B, N, C] or [1, N, C]
    :param region: weights in [0, 1], shape [B, 1, H, W] or [1, 1, H, W] (image or latent space); None = everywhere
    """

    tokens: Tensor
    region: Optional[Tensor] = None


def decoupled_cross_attention(
    q: Tensor, k: Tensor, v: Tensor, k_id: Tensor, v_id: Tensor,
    scale: Scale = 1.0, region: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V  +  scale * region * softmax(Q K_id^T / sqrt(d)) V_id.

    :param q: queries, shape [B, h, Lq, d]
    :param k, v: text keys and values, each shape [B, h, Lt, d]
    :param k_id, v_id: identity keys and values, each shape [B, h, Li, d]
    :param scale: identity scale, a float or a Tensor of shape [B] (one per sample) or []
    :param region: optional weights in [0, 1] per query position, shape [B, Lq]
    :param attention_mask: optional mask for the text branch only (as for
        `F.scaled_dot_product_attention`), broadcastable to [B, h, Lq, Lt]
    :return: shape [B, h, Lq, d]
    """
    return regional_identity_attention(q, k, v, [k_id], [v_id], scale, [region], attention_mask)


def regional_identity_attention(
    q: Tensor, k: Tensor, v: Tensor, k_ids: Sequence[Tensor], v_ids: Sequence[Tensor],
    scale: Scale, regions: Sequence[Optional[Tensor]], attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V  +  sum_r scale * m_r * softmax(Q K_r^T / sqrt(d)) V_r.

    R identities, each weighted by its region m_r: where m_r = 0 its tokens add exactly nothing.
    One identity whose region is everywhere (None) is `decoupled_cross_attention`. A scale of 1.0
    adds each identity's attention as it is (the processors pass values already times the scale).

    :param k_ids, v_ids: R identity keys / values, each shape [B, h, Li, d]
    :param regions: R weights in [0, 1] per query position, each shape [B, Lq] or None (everywhere)
    :param q, k, v, scale, attention_mask: as `decoupled_cross_attention`
    :return: shape [B, h, Lq, d]
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
    if not isinstance(scale, Tensor) and scale == 0:
        return out
    weight = batch_scale(scale, q.shape[0], name="scale")               # float or [B] (or [1])
    if isinstance(weight, Tensor):
        weight = weight.to(q.device, q.dtype).reshape(-1, 1, 1, 1)      # [B] -> [B, 1, 1, 1]
    for k_r, v_r, region in zip(k_ids, v_ids, regions, strict=True):
        w = weight if region is None else weight * region.to(q.dtype)[:, None, :, None]  # [B, Lq] -> [B, 1, Lq, 1]
        attended = F.scaled_dot_product_attention(q, k_r, v_r)                            # [B, h, Lq, d]
        out = out + (attended if isinstance(w, float) and w == 1.0 else w * attended)
    return out


def batch_scale(scale, batch: int, *, name: str = "scale") -> Scale:
    """A scale for `batch` samples, checked by its shape only: a float, or a Tensor of shape [1] or [batch].

    Unlike `types.per_sample_scale` it never reads a tensor's values (no device-to-host copy), so it
    may run at every step; the pipeline checks values once per call with `per_sample_scale`.

    :raises InputError: a tensor of another size, naming `name`.
    """
    if not isinstance(scale, Tensor):
        return per_sample_scale(scale, batch, name=name)                    # numbers, lists: no tensor to read
    if scale.ndim > 1 or scale.numel() not in (1, batch):
        raise InputError(f"{name} must be a number, or a tensor of shape [{batch}] (one per sample); "
                         f"got shape {list(scale.shape)}")
    return scale.reshape(-1)                                                # [] / [1] / [B] -> [1] / [B]


def attention_probs(q: Tensor, k: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """softmax(Q K^T / sqrt(d) + mask), computed explicitly in float32 (to look at, not to run on).

    :param q: shape [B, h, Lq, d]
    :param k: shape [B, h, Lk, d]
    :param attention_mask: boolean (True = attend) or additive, broadcastable to [B, h, Lq, Lk]
    :return: shape [B, h, Lq, Lk]; each row sums to 1
    """
    logits = q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5   # [B, h, Lq, Lk]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, float("-inf"))
    elif attention_mask is not None:
        logits = logits + attention_mask.float()
    return logits.softmax(dim=-1)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """[B, L, h*d] -> [B, h, L, d]."""
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """[B, h, L, d] -> [B, L, h*d]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


# ----------------------------------------------- Region masks: image space -> a layer's token grid

@torch.compiler.assume_constant_result
def token_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) grid with rows * cols = `num_tokens` whose aspect is closest to height/width.

    Plain integers in, integers out: `torch.compile` calls it while tracing instead of tracing it.

    :param num_tokens: number of query tokens of a layer (its flattened feature map).
    :param height, width: size of the image (or latent, or mask) the grid is a downsampling of.
    """
    return _token_grid(int(num_tokens), int(height), int(width))


@lru_cache(maxsize=256)
def _token_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    aspect = math.log(height / width)
    rows = min((r for r in range(1, num_tokens + 1) if num_tokens % r == 0),
               key=lambda r: abs(math.log(r / (num_tokens // r)) - aspect))
    return rows, num_tokens // rows


def resize_region(region_mask: Tensor, num_tokens: int, batch: int) -> Tensor:
    """Average-pool a region mask onto a layer's token grid.

    :param region_mask: weights in [0, 1], shape [B, 1, H, W] or [1, 1, H, W], in image or latent space
    :param num_tokens, batch: the layer's number of query tokens Lq and its batch size B
    :return: shape [B, Lq]
    """
    if region_mask.ndim != 4 or region_mask.shape[1] != 1 or region_mask.shape[0] not in (1, batch):
        raise InputError(f"region_mask must have shape [B, 1, H, W] with B=1 or {batch}, "
                         f"got {tuple(region_mask.shape)}")
    rows, cols = token_grid(num_tokens, *region_mask.shape[-2:])
    pooled = F.interpolate(region_mask.float(), size=(rows, cols), mode="area")   # [B, 1, rows, cols]
    return pooled.reshape(pooled.shape[0], rows * cols).expand(batch, -1)      # [B, Lq]
