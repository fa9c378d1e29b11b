"""Decoupled cross-attention: every cross-attention layer attends to the text and, separately, to the identity tokens.

    out = Attn(Q, K_text, V_text) + scale * region * Attn(Q, K_id, V_id)
    K_id = to_k_ip(identity tokens),  V_id = to_v_ip(identity tokens)

Q is the layer's own query; the text keys/values are the layer's own (frozen) projections; only
`to_k_ip` and `to_v_ip` are new. The two softmaxes are separate, so the identity tokens never
compete with the text tokens for attention. `decoupled_cross_attention` is that equation; the
processors below only wire it into diffusers' `Attention` layers.

The UNet receives the identity tokens next to the text, never packed into it::

    unet(latents, t, encoder_hidden_states=text_tokens,
         cross_attention_kwargs={"identity_tokens": id_tokens,     # [B, N, C]
                                 "adapter_scale": 0.8,             # float or Tensor [B], optional
                                 "region_mask": mask})             # [B, 1, H, W] in [0, 1], optional

A layer's identity scale = its processor's `layer_scale` (per layer/block, `set_layer_scale`)
times the per-call `adapter_scale` (one number, or one per sample). Several identities, each in its own
region (`regional_identity_attention`): `{"regional_identities": [RegionalIdentity(tokens_A, mask_A), ...]}`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError
from .types import Scale, per_sample_scale


# ------------------------------------------------------------------------------------ The equation

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
    One identity whose region is everywhere (None) is `decoupled_cross_attention`.

    :param k_ids, v_ids: R identity keys / values, each shape [B, h, Li, d]
    :param regions: R weights in [0, 1] per query position, each shape [B, Lq] or None (everywhere)
    :param q, k, v, scale, attention_mask: as `decoupled_cross_attention`
    :return: shape [B, h, Lq, d]
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
    if not isinstance(scale, Tensor) and scale == 0:
        return out
    weight = per_sample_scale(scale, q.shape[0], name="scale")         # float or [B]
    if isinstance(weight, Tensor):
        weight = weight.to(q.device, q.dtype).reshape(-1, 1, 1, 1)     # [B] -> [B, 1, 1, 1]
    for k_r, v_r, region in zip(k_ids, v_ids, regions, strict=True):
        w = weight if region is None else weight * region.to(q.dtype)[:, None, :, None]  # [B, Lq] -> [B, 1, Lq, 1]
        out = out + w * F.scaled_dot_product_attention(q, k_r, v_r)
    return out


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


# ----------------------------------------------- Region masks: image space -> a layer's token grid

@lru_cache(maxsize=256)
def token_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) grid with rows * cols = `num_tokens` whose aspect is closest to height/width.

    :param num_tokens: number of query tokens of a layer (its flattened feature map).
    :param height, width: size of the image (or latent, or mask) the grid is a downsampling of.
    """
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


# ----------------------- Wiring into diffusers' Attention (the same steps as its AttnProcessor2_0)

def _enter(attn, hidden_states: Tensor, temb: Optional[Tensor]) -> tuple[Tensor, Optional[tuple]]:
    """spatial_norm, [B, C, H, W] -> [B, HW, C], group_norm. Returns the tokens and the 4-D shape (or None)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = hidden_states.shape
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, shape


def _project(attn, x: Tensor, context: Optional[Tensor], attention_mask: Optional[Tensor]):
    """Queries from `x`, keys/values from `context` (or `x`), in heads; the mask in SDPA's layout."""
    b = x.shape[0]
    if context is None:
        context = x
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)  # [B*h, Lq, Lt]
        attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])   # [B, h, Lq, Lt]
    q, k, v = (split_heads(t, attn.heads) for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v, attention_mask


def _exit(attn, out: Tensor, residual: Tensor, shape: Optional[tuple], dtype: torch.dtype) -> Tensor:
    """Merge heads, output projection, back to [B, C, H, W] if needed, residual, rescale."""
    out = merge_heads(out).to(dtype)                                   # [B, h, L, d] -> [B, L, h*d]
    out = attn.to_out[1](attn.to_out[0](out))                          # linear, dropout
    if shape is not None:
        out = out.transpose(-1, -2).reshape(shape)                     # [B, HW, C] -> [B, C, H, W]
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def split_heads(t: Tensor, heads: int) -> Tensor:
    """[B, L, h*d] -> [B, h, L, d]."""
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """[B, h, L, d] -> [B, L, h*d]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class PlainAttnProcessor(nn.Module):
    """Ordinary attention (for self-attention layers). No parameters; ignores the identity arguments."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None,
                 identity_tokens: Optional[Tensor] = None, adapter_scale: Optional[Scale] = None,
                 region_mask: Optional[Tensor] = None,
                 regional_identities: Sequence[RegionalIdentity] = ()) -> Tensor:
        x, shape = _enter(attn, hidden_states, temb)
        q, k, v, mask = _project(attn, x, encoder_hidden_states, attention_mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, Lq, d]
        return _exit(attn, out, hidden_states, shape, q.dtype)


class IdentityAttnProcessor(nn.Module):
    """Decoupled cross-attention for one cross-attention layer: adds `to_k_ip`, `to_v_ip`.

    :param hidden_size: the layer's attention width (its `to_k` output width).
    :param cross_attention_dim: width of the text / identity tokens.
    :param layer_scale: this layer's identity scale (multiplies the per-call `adapter_scale`).
    :param device: where to create the two projections (factory argument, like torch's layers).
    :param dtype: their dtype.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, layer_scale: float = 1.0,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.layer_scale = float(layer_scale)
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, device=device, dtype=dtype)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, device=device, dtype=dtype)
        #: set only inside `capture_attention`: called with (text probs, identity probs or None)
        self.recorder: Optional[Callable[[Tensor, Optional[Tensor]], None]] = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None,
                 identity_tokens: Optional[Tensor] = None, adapter_scale: Optional[Scale] = None,
                 region_mask: Optional[Tensor] = None,
                 regional_identities: Sequence[RegionalIdentity] = ()) -> Tensor:
        """Text attention + each identity's: `identity_tokens` (in `region_mask`, if given), `regional_identities`."""
        x, shape = _enter(attn, hidden_states, temb)
        q, k, v, mask = _project(attn, x, encoder_hidden_states, attention_mask)
        b, heads, lq, _ = q.shape
        single = [] if identity_tokens is None else [RegionalIdentity(identity_tokens, region_mask)]
        identities = single + list(regional_identities)                             # R identities, each in its region
        kvs = [self.identity_keys_values(r.tokens, b, heads) for r in identities]   # R x (K_r, V_r), [B, h, Li, d]
        regions = [None if r.region is None else resize_region(r.region.to(q.device), lq, b) for r in identities]
        scale = self.effective_scale(adapter_scale, b) if kvs else 0.0                # no identity: plain attention
        out = regional_identity_attention(q, k, v, [kv[0] for kv in kvs], [kv[1] for kv in kvs], scale, regions, mask)
        if self.recorder is not None:
            self.recorder(attention_probs(q, k, mask), attention_probs(q, kvs[0][0]) if len(kvs) == 1 else None)
        return _exit(attn, out, hidden_states, shape, q.dtype)

    def identity_keys_values(self, identity_tokens: Tensor, batch: int, heads: int) -> tuple[Tensor, Tensor]:
        """K_id, V_id, each of shape [B, h, Li, d], from `identity_tokens` [B, Li, C] or [1, Li, C]."""
        t = identity_tokens
        if t.ndim != 3 or t.shape[-1] != self.cross_attention_dim or t.shape[0] not in (1, batch):
            raise InputError(
                f"identity_tokens must have shape [B, N, {self.cross_attention_dim}] with B=1 or {batch}, "
                f"got {tuple(t.shape)}. Pass the Resampler's output for this UNet."
            )
        t = t.to(self.to_k_ip.weight.dtype).expand(batch, -1, -1)      # [B, Li, C]
        return split_heads(self.to_k_ip(t), heads), split_heads(self.to_v_ip(t), heads)

    def effective_scale(self, adapter_scale: Optional[Scale], batch: int) -> Scale:
        """This layer's `layer_scale` times the per-call `adapter_scale` (None = 1): a float or a Tensor [B]."""
        if adapter_scale is None:
            return self.layer_scale
        return self.layer_scale * per_sample_scale(adapter_scale, batch, name="adapter_scale")

    @torch.no_grad()
    def init_from(self, attn) -> "IdentityAttnProcessor":
        """Start `to_k_ip`/`to_v_ip` as copies of the layer's text `to_k`/`to_v` (IP-Adapter's training init)."""
        self.to_k_ip.weight.copy_(attn.to_k.weight)
        self.to_v_ip.weight.copy_(attn.to_v.weight)
        return self

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, cross_attention_dim={self.cross_attention_dim}, "
                f"layer_scale={self.layer_scale}")


# ---------------------------------------------------------------------------- Installing on a UNet

def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's attention layers in diffusers' `attn_processors` order (= the checkpoint's key order).

    :return: (name, Attention) pairs, names like "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    """
    modules = dict(model.named_modules())
    if hasattr(model, "attn_processors"):
        return [(n[: -len(".processor")], modules[n[: -len(".processor")]]) for n in model.attn_processors]
    return [(n, m) for n, m in modules.items() if hasattr(m, "set_processor") and hasattr(m, "get_processor")]


def is_cross_attention(name: str, attn: nn.Module) -> bool:
    """True for layers that attend to the text (diffusers names them `attn2`)."""
    return bool(getattr(attn, "is_cross_attention", name.endswith("attn2")))


def install_adapter(unet: nn.Module, layer_scale: float = 1.0) -> nn.ModuleList:
    """Put an `IdentityAttnProcessor` on every cross-attention layer, a `PlainAttnProcessor` elsewhere.

    The new projections start as copies of each layer's text projections; load trained weights
    afterwards (`procs.load_state_dict(checkpoint["ip_adapter"])`). Installing again replaces the
    processors (with fresh weights); it never stacks.

    :param unet: a diffusers UNet (any device, the meta device included).
    :param layer_scale: every layer's identity scale (multiplies the per-call `adapter_scale`).
    :return: all processors in `attn_processors` order; its state-dict keys are the checkpoint's
        ("1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight", ...).
    """
    for name, attn in attention_layers(unet):
        if is_cross_attention(name, attn):
            w = attn.to_k.weight
            proc = IdentityAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, layer_scale,
                                         device=w.device, dtype=w.dtype).init_from(attn)
        else:
            proc = PlainAttnProcessor()
        attn.set_processor(proc)
    return adapter_processors(unet)


def adapter_processors(unet: nn.Module) -> nn.ModuleList:
    """The installed processors in checkpoint order (for `state_dict()` / `load_state_dict`).

    :raises InputError: the adapter is not installed on `unet`.
    """
    procs = [attn.processor for _, attn in attention_layers(unet)]
    if not any(isinstance(p, IdentityAttnProcessor) for p in procs):
        raise InputError("no image adapter is installed on this UNet: call install_adapter(unet) first")
    return nn.ModuleList(procs)


def identity_processors(unet: nn.Module) -> dict[str, IdentityAttnProcessor]:
    """name -> IdentityAttnProcessor for each cross-attention layer that has one."""
    return {n: a.processor for n, a in attention_layers(unet) if isinstance(a.processor, IdentityAttnProcessor)}


def remove_adapter(unet: nn.Module) -> None:
    """Restore diffusers' default processors on every attention layer (drops the adapter's weights)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for _, attn in attention_layers(unet):
        attn.set_processor(AttnProcessor2_0() if getattr(attn, "scale_qk", True) else AttnProcessor())


def set_layer_scale(unet: nn.Module, layer_scale: Union[float, Mapping[str, float]]) -> dict[str, float]:
    """Set each layer's identity scale (`IdentityAttnProcessor.layer_scale`).

    A float sets every layer. A dict maps name prefixes ("down", "mid", "up", "up_blocks.0",
    "down_blocks.2.attentions.1", ...) to scales: the longest matching prefix wins and layers no
    prefix matches get 0 (so ``{"up": 1.0}`` means "identity in the up blocks only"). The per-call
    `adapter_scale` multiplies these.

    :return: layer name -> its layer scale now.
    :raises InputError: no adapter installed, or a prefix that matches no layer.
    """
    procs = identity_processors(unet)
    if not procs:
        raise InputError("no image adapter is installed on this UNet: call install_adapter(unet) first")
    by_prefix = layer_scale if isinstance(layer_scale, Mapping) else {"": float(layer_scale)}
    unused = [p for p in by_prefix if not any(_has_prefix(n, p) for n in procs)]
    if unused:
        raise InputError(f"no cross-attention layer matches {unused}; layers look like {next(iter(procs))!r}")
    for name, proc in procs.items():
        matches = [p for p in by_prefix if _has_prefix(name, p)]
        proc.layer_scale = float(by_prefix[max(matches, key=len)]) if matches else 0.0
    return {n: p.layer_scale for n, p in procs.items()}


def _has_prefix(name: str, prefix: str) -> bool:
    """'up' matches 'up_blocks.0...', 'up_blocks.1' matches 'up_blocks.1.x' but not 'up_blocks.10'."""
    return name.startswith(prefix) and (len(name) == len(prefix) or prefix == "" or name[len(prefix)] in "._")


# ---------------------------------------------------------------------------- Looking at attention

@dataclass
class AttentionMaps:
    """Attention probabilities recorded by `capture_attention`, mean over heads, on the CPU.

    `text[layer]` and `identity[layer]` hold one tensor per UNet call: [B, Lq, Lt] and [B, Lq, Li].
    Each row sums to 1 (the two softmaxes are separate).
    """

    text: dict[str, list[Tensor]] = field(default_factory=dict)
    identity: dict[str, list[Tensor]] = field(default_factory=dict)

    def record(self, layer: str, text_probs: Tensor, identity_probs: Optional[Tensor] = None) -> None:
        """:param text_probs: shape [B, h, Lq, Lt]; :param identity_probs: shape [B, h, Lq, Li] or None."""
        self.text.setdefault(layer, []).append(text_probs.mean(1).detach().float().cpu())
        if identity_probs is not None:
            self.identity.setdefault(layer, []).append(identity_probs.mean(1).detach().float().cpu())

    @property
    def layers(self) -> list[str]:
        return list(self.text)

    def token_maps(self, size: tuple[int, int], kind: str = "identity",
                   layers: Optional[Sequence[str]] = None) -> Tensor:
        """Where each token is looked at: per-token spatial maps, averaged over layers and calls.

        :param size: (H, W) of the output maps (the image or latent size; fixes each layer's grid).
        :param kind: "identity" or "text".
        :param layers: name prefixes to include (default: all recorded layers).
        :return: shape [B, N, H, W] (N = number of identity or text tokens)
        """
        store = {"identity": self.identity, "text": self.text}[kind]
        chosen = [n for n in store if layers is None or any(_has_prefix(n, p) for p in layers)]
        if not chosen:
            raise InputError(f"no {kind} attention recorded for layers {layers}: run the UNet inside capture_attention")
        maps = [_to_image(p, size) for n in chosen for p in store[n]]
        return torch.stack(maps).mean(0)

    def clear(self) -> None:
        self.text.clear()
        self.identity.clear()


def _to_image(probs: Tensor, size: tuple[int, int]) -> Tensor:
    b, lq, n = probs.shape
    rows, cols = token_grid(lq, *size)
    grid = probs.transpose(1, 2).reshape(b, n, rows, cols)            # [B, Lq, N] -> [B, N, rows, cols]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)  # [B, N, H, W]


@contextmanager
def capture_attention(unet: nn.Module, layers: Optional[Sequence[str]] = None) -> Iterator[AttentionMaps]:
    """Record text and identity attention of the cross-attention layers while the block runs.

    The UNet's output is unchanged; the probabilities are computed a second time, explicitly, only
    while capturing. On exit every processor is as before (nothing stays attached). At SDXL size a
    map is large (4096 x 77 per layer per call): pass `layers` prefixes to record fewer.

    :param unet: a UNet with the adapter installed.
    :param layers: name prefixes of the layers to record (default: all cross-attention layers).
    """
    procs = {n: p for n, p in identity_processors(unet).items()
             if layers is None or any(_has_prefix(n, pre) for pre in layers)}
    if not procs:
        raise InputError("nothing to capture: install_adapter(unet) first, and check the `layers` prefixes")
    maps = AttentionMaps()
    before = {n: p.recorder for n, p in procs.items()}
    for name, proc in procs.items():
        proc.recorder = partial(maps.record, name)
    try:
        yield maps
    finally:
        for name, proc in procs.items():
            proc.recorder = before[name]
