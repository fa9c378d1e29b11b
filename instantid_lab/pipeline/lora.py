"""LoRAs on `InstantIDPipeline`: diffusers' own loader, composing with the identity attention.

The pipeline inherits `StableDiffusionXLLoraLoaderMixin`, so everything diffusers documents for SDXL
works as it does there: `load_lora_weights` (a local folder or file, a Hub repo, a state dict; diffusers,
kohya and A1111 key layouts), `set_adapters(names, adapter_weights=...)`, `fuse_lora` / `unfuse_lora`,
`disable_lora` / `enable_lora`, `delete_adapters`, `unload_lora_weights`, `save_lora_weights`.

How it composes with InstantID: peft wraps the UNet's own linear layers (`to_q`, `to_k`, `to_v`,
`to_out.0`, ...) as `lora.Linear`; the identity processors call those layers as before, so a LoRA on a
cross-attention layer's `to_k` / `to_v` changes the text branch only. The identity projections
`to_k_ip` / `to_v_ip` belong to the processors and are never LoRA targets (a LoRA's targets are the
names in its file, and no base model has those). The processors stay the same objects through
loading, fusing and unloading. IdentityNet (`controlnet`) and the Resampler get no LoRA.

SD-shaped pipelines (one text encoder, `text_encoder_2 is None`) use the same mixin: the second encoder's
part of a LoRA is simply absent. A LoRA this pipeline cannot take whole is refused (`InputError`) before
anything is loaded: one with a second-text-encoder part on an SD-shaped pipeline, and one with text-encoder
parts where transformers' PEFT integration refuses the installed `peft` (transformers 5.x asks for a newer
peft than PyPI may offer; UNet-only LoRAs, such as LCM-LoRA and most style LoRAs, need only diffusers').
"""

from __future__ import annotations

from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

from ..errors import InputError


class LoraMixin(StableDiffusionXLLoraLoaderMixin):
    """diffusers' SDXL LoRA loading for `InstantIDPipeline` (UNet and one or two text encoders)."""

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap: bool = False,
                          **kwargs):
        """diffusers' `load_lora_weights` (see `StableDiffusionXLLoraLoaderMixin`), after `check_lora_fits`."""
        self.check_lora_fits(pretrained_model_name_or_path_or_dict, **kwargs)
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, hotswap=hotswap,
                                  **kwargs)

    def check_lora_fits(self, pretrained_model_name_or_path_or_dict, **kwargs) -> None:
        """Read the LoRA's keys (diffusers' `lora_state_dict`) and refuse one this pipeline cannot load whole.

        :raises InputError: a `text_encoder_2` part and one text encoder; text-encoder parts and a `peft`
            that transformers refuses (the message names both versions).
        """
        source = pretrained_model_name_or_path_or_dict
        source = dict(source) if isinstance(source, dict) else source
        kwargs = {k: v for k, v in kwargs.items() if k != "low_cpu_mem_usage"}
        state_dict, _ = self.lora_state_dict(source, unet_config=self.unet.config, **kwargs)
        parts = {k.split(".", 1)[0] for k in state_dict}
        if "text_encoder_2" in parts and self.text_encoder_2 is None:
            raise InputError("this LoRA has weights for a second text encoder (an SDXL LoRA) but the pipeline has "
                             "one text encoder (SD-shaped): use a LoRA trained for this base model.")
        problem = transformers_peft_problem() if parts & {"text_encoder", "text_encoder_2"} else None
        if problem:
            raise InputError(f"this LoRA has text-encoder weights, which diffusers loads through transformers' PEFT "
                             f"integration, and that refuses here: {problem}. Install a peft it accepts, or load the "
                             "UNet part only: pipe.load_lora_weights({k: v for k, v in "
                             "pipe.lora_state_dict(path)[0].items() if k.startswith('unet.')}).")


def transformers_peft_problem():
    """Why transformers' PEFT integration (text-encoder LoRAs) refuses the installed peft, or None if it accepts it."""
    from importlib.metadata import PackageNotFoundError, version

    from transformers.integrations import peft as transformers_peft
    from transformers.utils.peft_utils import check_peft_version

    try:
        check_peft_version(min_version=transformers_peft.MIN_PEFT_VERSION)
    except ValueError as e:
        try:
            installed = version("peft")
        except PackageNotFoundError:
            installed = "none"
        return f"{e} (installed peft: {installed})"
    return None
