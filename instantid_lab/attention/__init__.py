"""Decoupled cross-attention: every cross-attention layer attends to the text and, separately, to the identity tokens.

    out = Attn(Q, K_text, V_text) + scale * region * Attn(Q, K_id, V_id)
    K_id = to_k_ip(identity tokens),  V_id = to_v_ip(identity tokens)

Q is the layer's own query; the text keys/values are the layer's own (frozen) projections; only
`to_k_ip` and `to_v_ip` are new. The two softmaxes are separate, so the identity tokens never
compete with the text tokens for attention. `decoupled_cross_attention` is that equation; the
processors only wire it into diffusers' `Attention` layers.

The UNet receives the identity tokens next to the text, never packed into it::

    unet(latents, t, encoder_hidden_states=text_tokens,
         cross_attention_kwargs={"identity_tokens": id_tokens,     # [B, N, C]
                                 "adapter_scale": 0.8,             # float or Tensor [B], optional
                                 "region_mask": mask})             # [B, 1, H, W] in [0, 1], optional

A layer's identity scale = its processor's `layer_scale` (per layer/block, `set_layer_scale`)
times the per-call `adapter_scale` (one number, or one per sample). Several identities, each in its own
region (`regional_identity_attention`): `{"regional_identities": [RegionalIdentity(tokens_A, mask_A), ...]}`.
The identity keys and values do not change over the denoising steps: `prepare_identity_attention(unet,
kwargs)` computes them once per generation (the pipeline does), and the steps reuse them.

The modules, one role each:

- `equation`    the equation as pure functions on tensors in heads; region masks on a layer's token grid
- `processors`  `PlainAttnProcessor` (self-attention), `IdentityAttnProcessor` (cross-attention)
- `install`     putting them on a UNet (or `torch.compile(unet)`), finding them, scales, `prepare_identity_attention`
- `capture`     recording the attention probabilities to look at (`capture_attention`, `AttentionMaps`)
"""

from .capture import AttentionMaps, capture_attention
from .equation import (RegionalIdentity, attention_probs, batch_scale, decoupled_cross_attention, merge_heads,
                       regional_identity_attention, resize_region, split_heads, token_grid)
from .install import (IDENTITY_ARGUMENTS, adapter_processors, attention_layers, has_prefix, identity_processors,
                      install_adapter, is_cross_attention, prepare_identity_attention, remove_adapter, set_layer_scale,
                      unwrap)
from .processors import IdentityAttnProcessor, PlainAttnProcessor, PreparedIdentity

__all__ = [
    "IDENTITY_ARGUMENTS", "AttentionMaps", "IdentityAttnProcessor", "PlainAttnProcessor", "PreparedIdentity",
    "RegionalIdentity", "adapter_processors", "attention_layers", "attention_probs", "batch_scale",
    "capture_attention", "decoupled_cross_attention", "has_prefix", "identity_processors", "install_adapter",
    "is_cross_attention", "merge_heads", "prepare_identity_attention", "regional_identity_attention",
    "remove_adapter", "resize_region", "set_layer_scale", "split_heads", "token_grid", "unwrap",
]
