"""The processors that wire the equation into diffusers' `Attention` layers.

- `PlainAttnProcessor` (self-attention layers): diffusers' own `AttnProcessor2_0`, taking (and
  ignoring) the identity arguments, so diffusers never warns about them.
- `IdentityAttnProcessor` (cross-attention layers): the text attention plus each identity's, through
  the layer's own `to_k_ip` / `to_v_ip`.

The identity tokens do not change during a generation, so their keys and values are computed once
per call, the values already times the layer's scale (scale * softmax(Q K^T) V = softmax(Q K^T) (scale V)):

    K_r = to_k_ip(tokens_r),   V_r = layer_scale * adapter_scale * to_v_ip(tokens_r)

`IdentityAttnProcessor.prepare` does it for one layer; `install.prepare_identity_attention` for every
layer, before the denoising loop, and passes the result as `identity_kv`. Given raw `identity_tokens`
instead, a processor prepares its own at each call (the same function). A step then costs the text
attention plus one `scaled_dot_product_attention` and one add per identity: no projection, no scale
arithmetic, nothing that reads a tensor's values on the host.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..types import Scale
from .equation import (RegionalIdentity, attention_probs, batch_scale, merge_heads, regional_identity_attention,
                       resize_region, split_heads)

#: One identity of one layer, for a whole call: (K [n, h, Li, d], scale * V [n, h, Li, d], region [n, 1, H, W]
#: or None), n = 1 or the batch.
PreparedIdentity = tuple[Tensor, Tensor, Optional[Tensor]]


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


def _diffusers_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


class PlainAttnProcessor(nn.Module):
    """Ordinary attention (for self-attention layers): diffusers' `AttnProcessor2_0` itself. No parameters.

    It names the identity arguments in its signature (diffusers passes `cross_attention_kwargs` to every
    layer and warns about the ones a processor does not take) and ignores them.
    """

    def __init__(self):
        super().__init__()
        self.sdpa = _diffusers_processor()                              # a plain object, not a submodule

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None,
                 identity_tokens: Optional[Tensor] = None, adapter_scale: Optional[Scale] = None,
                 region_mask: Optional[Tensor] = None, regional_identities: Sequence[RegionalIdentity] = (),
                 identity_kv: Optional[Mapping] = None) -> Tensor:
        return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class IdentityAttnProcessor(nn.Module):
    """Decoupled cross-attention for one cross-attention layer: adds `to_k_ip`, `to_v_ip`.

    :param hidden_size: the layer's attention width (its `to_k` output width).
    :param cross_attention_dim: width of the text / identity tokens.
    :param layer_scale: this layer's identity scale (multiplies the per-call `adapter_scale`).
    :param device: where to create the two projections (factory argument, like torch's layers).
    :param dtype: their dtype.
    :param layer: the layer's name in the UNet (set by `install_adapter`): its entry in `identity_kv`.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, layer_scale: float = 1.0,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 layer: Optional[str] = None):
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.layer_scale, self.layer = float(layer_scale), layer
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, device=device, dtype=dtype)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, device=device, dtype=dtype)
        self.sdpa = _diffusers_processor()                              # the layer without identity
        #: set only inside `capture_attention`: called with (text probs, identity probs or None)
        self.recorder: Optional[Callable[[Tensor, Optional[Tensor]], None]] = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None,
                 identity_tokens: Optional[Tensor] = None, adapter_scale: Optional[Scale] = None,
                 region_mask: Optional[Tensor] = None, regional_identities: Sequence[RegionalIdentity] = (),
                 identity_kv: Optional[Mapping[str, Sequence[PreparedIdentity]]] = None) -> Tensor:
        """Text attention + each identity's: `identity_tokens` (in `region_mask`, if given), `regional_identities`;
        or, prepared once per call, this layer's entry of `identity_kv` (`prepare_identity_attention`)."""
        if identity_kv is not None:
            identities = self.prepared(identity_kv)
        else:
            identities = self.prepare(attn.heads, identity_tokens, adapter_scale, region_mask, regional_identities,
                                      batch=hidden_states.shape[0])
        if not identities and self.recorder is None:
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        x, shape = _enter(attn, hidden_states, temb)
        q, k, v, mask = _project(attn, x, encoder_hidden_states, attention_mask)
        b, _, lq, _ = q.shape
        k_ids = [_to_batch(k_r, b) for k_r, _, _ in identities]                      # R x [B, h, Li, d]
        v_ids = [_to_batch(v_r, b) for _, v_r, _ in identities]                      # R x [B, h, Li, d], times scale
        regions = [None if m is None else resize_region(m.to(q.device), lq, b) for _, _, m in identities]  # [B, Lq]
        out = regional_identity_attention(q, k, v, k_ids, v_ids, 1.0, regions, mask)  # scale already in v_ids
        if self.recorder is not None:
            self.recorder(attention_probs(q, k, mask), attention_probs(q, k_ids[0]) if len(k_ids) == 1 else None)
        return _exit(attn, out, hidden_states, shape, q.dtype)

    def prepare(self, heads: int, identity_tokens: Optional[Tensor] = None, adapter_scale: Optional[Scale] = None,
                region_mask: Optional[Tensor] = None, regional_identities: Sequence[RegionalIdentity] = (),
                batch: Optional[int] = None) -> tuple[PreparedIdentity, ...]:
        """This layer's identities for a whole call: (K_r, scale * V_r, region_r) each, () when there is none
        or the scale is the number 0.

        :param heads: the layer's number of heads.
        :param batch: the UNet's batch B, if known (else the largest batch of the tokens and the scale).
        :raises InputError: tokens or a scale that do not fit this layer or the batch.
        """
        given = [] if identity_tokens is None else [(identity_tokens, region_mask)]
        given += [(r.tokens, r.region) for r in regional_identities]
        if batch is None:                                               # the UNet's batch, or 1 for "any"
            sizes = [t.shape[0] for t, _ in given if isinstance(t, Tensor) and t.ndim == 3]
            sizes += [adapter_scale.numel()] if isinstance(adapter_scale, Tensor) else []
            batch = max(sizes, default=1)
            if any(n not in (1, batch) for n in sizes):
                raise InputError(f"identity_tokens and adapter_scale disagree on the batch: {sizes}")
        scale = self.effective_scale(adapter_scale, batch)
        if not given or (isinstance(scale, float) and scale == 0.0):
            return ()
        prepared = []
        for tokens, region in given:
            k, v = self.identity_keys_values(tokens, batch, heads)                        # [n, h, Li, d]
            weight = scale if isinstance(scale, float) else scale.to(v.device, v.dtype).reshape(-1, 1, 1, 1)
            prepared.append((k, v if isinstance(weight, float) and weight == 1.0 else v * weight, region))
        return tuple(prepared)

    def prepared(self, identity_kv: Mapping[str, Sequence[PreparedIdentity]]) -> Sequence[PreparedIdentity]:
        """This layer's entry of `identity_kv`. :raises InputError: it has none (prepared for another UNet)."""
        if self.layer not in identity_kv:
            raise InputError(f"identity_kv has no entry for the layer {self.layer!r}: prepare it for this UNet with "
                             "prepare_identity_attention(unet, ...), after install_adapter(unet)")
        return identity_kv[self.layer]

    def identity_keys_values(self, identity_tokens: Tensor, batch: int, heads: int) -> tuple[Tensor, Tensor]:
        """K_id, V_id, each of shape [B, h, Li, d], from `identity_tokens` [B, Li, C] or [1, Li, C]."""
        t = identity_tokens
        if t.ndim != 3 or t.shape[-1] != self.cross_attention_dim or t.shape[0] not in (1, batch):
            raise InputError(
                f"identity_tokens must have shape [B, N, {self.cross_attention_dim}] with B=1 or {batch}, "
                f"got {tuple(t.shape)}. Pass the Resampler's output for this UNet."
            )
        t = t.to(self.to_k_ip.weight.dtype)                            # [1 or B, Li, C]
        k, v = split_heads(self.to_k_ip(t), heads), split_heads(self.to_v_ip(t), heads)   # [1 or B, h, Li, d]
        return _to_batch(k, batch), _to_batch(v, batch)

    def effective_scale(self, adapter_scale: Optional[Scale], batch: int) -> Scale:
        """This layer's `layer_scale` times the per-call `adapter_scale` (None = 1): a float, or a Tensor [1] or [B]."""
        if adapter_scale is None:
            return self.layer_scale
        return self.layer_scale * batch_scale(adapter_scale, batch, name="adapter_scale")

    @torch.no_grad()
    def init_from(self, attn) -> "IdentityAttnProcessor":
        """Start `to_k_ip`/`to_v_ip` as copies of the layer's text `to_k`/`to_v` (IP-Adapter's training init)."""
        self.to_k_ip.weight.copy_(attn.to_k.weight)
        self.to_v_ip.weight.copy_(attn.to_v.weight)
        return self

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, cross_attention_dim={self.cross_attention_dim}, "
                f"layer_scale={self.layer_scale}")


def _to_batch(x: Tensor, batch: int) -> Tensor:
    """[1, ...] or [B, ...] -> [B, ...] (a view). :raises InputError: another batch."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise InputError(f"the identity tokens or adapter_scale are for a batch of {x.shape[0]}, "
                         f"the UNet runs a batch of {batch}")
    return x.expand(batch, *x.shape[1:])
