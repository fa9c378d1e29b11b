"""Putting the processors on a UNet, finding them again, their scales, and a call's identity keys/values.

Every function takes the UNet itself or `torch.compile(unet)` (whose wrapper hides the layer names
under `_orig_mod.`; `unwrap` looks through it).
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

from torch import nn

from ..errors import InputError
from .processors import IdentityAttnProcessor, PlainAttnProcessor

#: The per-call identity arguments a UNet's `cross_attention_kwargs` may carry (see the package docstring).
IDENTITY_ARGUMENTS = ("identity_tokens", "adapter_scale", "region_mask", "regional_identities")


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself: `torch.compile(model)` returns a wrapper (`OptimizedModule`) around it, `_orig_mod`."""
    return getattr(model, "_orig_mod", model)


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's attention layers in diffusers' `attn_processors` order (= the checkpoint's key order).

    :return: (name, Attention) pairs, names like "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    """
    model = unwrap(model)
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

    :param unet: a diffusers UNet (any device, the meta device included), or `torch.compile(unet)`.
    :param layer_scale: every layer's identity scale (multiplies the per-call `adapter_scale`).
    :return: all processors in `attn_processors` order; its state-dict keys are the checkpoint's
        ("1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight", ...).
    """
    for name, attn in attention_layers(unet):
        if is_cross_attention(name, attn):
            w = attn.to_k.weight
            proc = IdentityAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, layer_scale,
                                         device=w.device, dtype=w.dtype, layer=name).init_from(attn)
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


def prepare_identity_attention(unet: nn.Module, cross_attention_kwargs: Optional[Mapping] = None,
                               **identity) -> Optional[dict]:
    """`cross_attention_kwargs` for a whole generation: the identity arguments turned, once, into every
    identity layer's keys and scaled values (`IdentityAttnProcessor.prepare`), passed as `identity_kv`.

    The UNet's output is the same as with the raw arguments; the denoising steps then skip the identity
    projections and the scale arithmetic. Prepare again when the tokens, scales or layer scales change::

        kwargs = prepare_identity_attention(unet, identity_tokens=tokens, adapter_scale=0.8)
        for t in timesteps:
            eps = unet(z, t, text_tokens, cross_attention_kwargs=kwargs).sample

    :param cross_attention_kwargs: the raw arguments (`identity_tokens`, `adapter_scale`, `region_mask`,
        `regional_identities`) and any others, which pass unchanged; or None.
    :param identity: raw arguments given as keywords instead.
    :return: the kwargs with `identity_kv` instead of the raw identity arguments (None for none at all).
    :raises InputError: tokens or scales that do not fit, or a processor not installed by `install_adapter`.
    """
    kwargs = {**(cross_attention_kwargs or {}), **identity}
    if "identity_kv" in kwargs or not any(k in kwargs for k in IDENTITY_ARGUMENTS):
        return kwargs or None                                          # nothing to prepare (or done already)
    procs = identity_processors(unet)
    if not procs:
        return kwargs
    raw = {k: kwargs.pop(k) for k in IDENTITY_ARGUMENTS if k in kwargs}
    heads = {name: attn.heads for name, attn in attention_layers(unet)}
    misplaced = [n for n, p in procs.items() if p.layer != n]
    if misplaced:
        raise InputError(f"the identity processors of {misplaced[:3]} do not know their layer (set by "
                         "install_adapter); install them with install_adapter(unet)")
    kwargs["identity_kv"] = {name: proc.prepare(heads[name], **raw) for name, proc in procs.items()}
    return kwargs


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
    unused = [p for p in by_prefix if not any(has_prefix(n, p) for n in procs)]
    if unused:
        raise InputError(f"no cross-attention layer matches {unused}; layers look like {next(iter(procs))!r}")
    for name, proc in procs.items():
        matches = [p for p in by_prefix if has_prefix(name, p)]
        proc.layer_scale = float(by_prefix[max(matches, key=len)]) if matches else 0.0
    return {n: p.layer_scale for n, p in procs.items()}


def has_prefix(name: str, prefix: str) -> bool:
    """'up' matches 'up_blocks.0...', 'up_blocks.1' matches 'up_blocks.1.x' but not 'up_blocks.10'."""
    return name.startswith(prefix) and (len(name) == len(prefix) or prefix == "" or name[len(prefix)] in "._")
