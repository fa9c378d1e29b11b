"""`InstantIDPipeline` used like any diffusers pipeline, without ever silently losing the identity.

One mixin, `DiffusersNativeMixin`, that the pipeline class inherits, made of three:

- `lora.LoraMixin`      diffusers' SDXL LoRA loading (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...);
                        the identity attention keeps working on top of a LoRA.
- `saving.SavingMixin`  `save_pretrained` / `from_pretrained` that write and restore the image adapter
                        (`ip-adapter.safetensors`, the released layout) beside the components.
- `memory.MemoryMixin`  VAE slicing and tiling; the attention options that would replace the identity
                        processors (attention slicing, xFormers, default processors) are refused with an
                        `InputError` that says what to use instead.

A fine-tuned base from one `.safetensors` file is loaded by `loading.load_sdxl_instantid(base=...)`.
"""

from __future__ import annotations

from .lora import LoraMixin
from .memory import MemoryMixin, guard_identity_attention
from .saving import ADAPTER_FILE, SavingMixin

__all__ = ["ADAPTER_FILE", "DiffusersNativeMixin", "guard_identity_attention"]


class DiffusersNativeMixin(LoraMixin, SavingMixin, MemoryMixin):
    """LoRAs, save / load with the adapter, memory options (see the module docstring)."""
