"""diffusers' memory options on `InstantIDPipeline`, none of which may silently drop the identity.

The image adapter lives in the UNet's attention processors (`attention.IdentityAttnProcessor`).
diffusers' attention options work by *replacing* processors: attention slicing puts
`SlicedAttnProcessor` on every layer, xFormers `XFormersAttnProcessor`, `set_default_attn_processor`
`AttnProcessor`, QKV fusion `FusedAttnProcessor2_0`. On a UNet with the adapter each of these would
remove the identity attention and keep going, so here they are refused with an `InputError` that
says why and what to use instead. They are not needed: the identity processors already run
PyTorch's `scaled_dot_product_attention`, which picks a memory-efficient (flash / xFormers-like)
kernel by itself.

What works and changes nothing in the image (up to float noise):

    pipe.enable_vae_slicing()         # decode a batch one image at a time
    pipe.enable_vae_tiling()          # decode (and encode) large images in overlapping tiles
    pipe.enable_model_cpu_offload()   # accelerate: each model on the GPU only while it runs (needs a GPU)

Turning an option *off* (`disable_attention_slicing`, `disable_xformers_memory_efficient_attention`)
is allowed: it is a no-op on the UNet's identity layers (they are never sliced) and applies to the
other models. Processors that have their own identity branch (`to_k_ip`, as IP-Adapter processors do)
may replace the identity processors; to use any other processors, remove the adapter first
(`attention.remove_adapter(pipe.unet)`): the guard only protects identity attention.
"""

from __future__ import annotations

from types import MethodType
from typing import Callable, Optional

from torch import nn

from ..attention import IdentityAttnProcessor, identity_processors, unwrap
from ..errors import InputError

#: What to do instead, said by every refusal.
INSTEAD = ("The identity processors already use PyTorch's scaled_dot_product_attention (memory-efficient "
           "kernels included). To save memory use pipe.enable_vae_slicing(), pipe.enable_vae_tiling() or "
           "pipe.enable_model_cpu_offload(); to use other processors, remove the adapter first "
           "(instantid_lab.attention.remove_adapter(pipe.unet)).")


def refusal(what: str, n_layers: int) -> InputError:
    """The error for an option that would replace the identity attention of `n_layers` layers."""
    return InputError(f"{what} would replace the identity attention (IdentityAttnProcessor) on {n_layers} "
                      f"cross-attention layers of the UNet and silently drop the identity, so it was refused. "
                      + INSTEAD)


def has_identity_branch(processor) -> bool:
    """Whether a processor attends to identity tokens: ours, or any IP-Adapter-style processor with
    identity projections `to_k_ip` (diffusers' `IPAdapterAttnProcessor2_0`, a reference implementation)."""
    return isinstance(processor, IdentityAttnProcessor) or hasattr(processor, "to_k_ip")


def dropped_identity_layers(unet: nn.Module, processor) -> list[str]:
    """The identity layers that `unet.set_attn_processor(processor)` would leave without an identity branch.

    :param processor: one processor for every layer, or a dict {"<layer>.processor": processor}.
    """
    current = identity_processors(unet)
    if not isinstance(processor, dict):
        return [] if has_identity_branch(processor) else list(current)
    return [n for n in current if not has_identity_branch(processor.get(f"{n}.processor"))]


# ------------------------------------------------------------------------ the guard on the UNet


def _set_attn_processor(unet, processor, *args, **kwargs):
    dropped = dropped_identity_layers(unet, processor)
    if dropped:
        raise refusal(f"unet.set_attn_processor({type(processor).__name__})", len(dropped))
    return type(unet).set_attn_processor(unet, processor, *args, **kwargs)


def _refuse_with_identity(what: str, method: str) -> Callable:
    def guarded(unet, *args, **kwargs):
        n = len(identity_processors(unet))
        if n:
            raise refusal(what, n)
        return getattr(type(unet), method)(unet, *args, **kwargs)
    return guarded


def _only_off_with_identity(what: str, method: str, off: Callable) -> Callable:
    """Turning the option off is a no-op on a UNet with the adapter (its processors never use it);
    turning it on is refused."""
    def guarded(unet, *args, **kwargs):
        n = len(identity_processors(unet))
        if n and not off(*args, **kwargs):
            raise refusal(what, n)
        if not n:
            return getattr(type(unet), method)(unet, *args, **kwargs)
    return guarded


def _slicing_off(slice_size="auto") -> bool:
    return slice_size is None


def _xformers_off(valid: bool, attention_op=None) -> bool:
    return not valid


#: UNet method -> its guarded version (each of diffusers' ways to replace processors).
GUARDED = {
    "set_attn_processor": _set_attn_processor,
    "set_default_attn_processor": _refuse_with_identity("unet.set_default_attn_processor()",
                                                        "set_default_attn_processor"),
    "fuse_qkv_projections": _refuse_with_identity("fuse_qkv_projections()", "fuse_qkv_projections"),
    "set_attention_slice": _only_off_with_identity("attention slicing", "set_attention_slice", _slicing_off),
    "set_use_memory_efficient_attention_xformers": _only_off_with_identity(
        "xFormers attention", "set_use_memory_efficient_attention_xformers", _xformers_off),
}


def guard_identity_attention(unet: nn.Module) -> None:
    """Make `unet` refuse, with an `InputError`, every diffusers call that would replace its identity
    processors (`GUARDED`); while it has none, the calls behave as diffusers' own.

    The guards are set on this UNet object only (as accelerate's offload hooks are), once: guarding
    again changes nothing. For `torch.compile(unet)` they are set on the UNet inside the wrapper, which
    forwards these calls to it. `install_adapter` and `remove_adapter` set processors layer by layer
    (`Attention.set_processor`), so they are not affected.
    """
    unet = unwrap(unet)                                   # torch.compile's wrapper forwards calls to it
    for name, guarded in GUARDED.items():
        if name not in vars(unet) and hasattr(type(unet), name):
            setattr(unet, name, MethodType(guarded, unet))


# ------------------------------------------------------------------------ the pipeline's options


class MemoryMixin:
    """diffusers' memory options for `InstantIDPipeline` (see the module docstring)."""

    def register_modules(self, **kwargs):
        """diffusers' `register_modules`; a UNet registered here is guarded (`guard_identity_attention`)."""
        super().register_modules(**kwargs)
        if kwargs.get("unet") is not None:
            guard_identity_attention(kwargs["unet"])

    def __setattr__(self, name, value):
        """`pipe.unet = torch.compile(pipe.unet)` (or any UNet set so) is guarded too."""
        super().__setattr__(name, value)
        if name == "unet" and isinstance(value, nn.Module):
            guard_identity_attention(value)

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) a batch one image at a time: less memory, the same images."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) in overlapping tiles blended at the seams: large images in little memory;
        the image differs slightly near the seams (`vae.tile_sample_min_size` sets the tile size)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def set_attention_slice(self, slice_size: Optional[int]) -> None:
        """Behind `enable_attention_slicing` / `disable_attention_slicing`: refused (`InputError`) while the
        UNet has the adapter; turning it off then applies to the other models only."""
        self._set_on_models("set_attention_slice", "attention slicing", slice_size is None, slice_size)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Optional[Callable] = None):
        """Behind `enable_xformers_memory_efficient_attention` / `disable_...`: refused (`InputError`) while
        the UNet has the adapter; turning it off then applies to the other models only."""
        self._set_on_models("set_use_memory_efficient_attention_xformers", "xFormers attention", not valid,
                            valid, attention_op)

    def _set_on_models(self, method: str, what: str, off: bool, *args) -> None:
        n = len(identity_processors(self.unet)) if self.unet is not None else 0
        if n and not off:
            raise refusal(f"enabling {what}", n)
        if not n:
            return getattr(super(), method)(*args)
        for model in self._attention_models():            # off: every model but the UNet's identity layers
            if model is not self.unet:
                _apply_recursively(model, method, *args)

    def _attention_models(self) -> list[nn.Module]:
        names, _ = self._get_signature_keys(self)
        return [m for m in (getattr(self, n, None) for n in names) if isinstance(m, nn.Module)]


def _apply_recursively(module: nn.Module, method: str, *args) -> None:
    """`module.<method>(*args)` if it has it (diffusers models), else on its children."""
    if hasattr(module, method):
        getattr(module, method)(*args)
        return
    for child in module.children():
        _apply_recursively(child, method, *args)
