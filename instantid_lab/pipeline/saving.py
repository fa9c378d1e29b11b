"""`save_pretrained` / `from_pretrained` that keep the image adapter.

diffusers saves each registered model in its own folder and lists them in `model_index.json`.
The image adapter does not fit that scheme: the Resampler is not a diffusers model, and the
decoupled-attention weights (`to_k_ip`, `to_v_ip`) live in the UNet's attention processors. So the
adapter is written once, in the released layout, next to the components:

    <folder>/model_index.json, unet/, vae/, text_encoder/, ..., controlnet/   (diffusers, as usual)
    <folder>/ip-adapter.safetensors   {"image_proj": Resampler, "ip_adapter": "{i}.to_k_ip.weight", ...}

The UNet is saved with diffusers' default processors (a plain UNet file any diffusers pipeline can
load); `from_pretrained` loads the components, then the adapter (`load_adapter`) with each layer's
`layer_scale` (kept in the file's header).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..attention import adapter_processors, attention_layers, identity_processors, remove_adapter, set_layer_scale
from ..checkpoint import adapter_metadata, save_adapter_state
from ..errors import InputError

#: The adapter's file in a saved pipeline folder (the name `loading` accepts in an InstantID folder too).
ADAPTER_FILE = "ip-adapter.safetensors"

logger = logging.getLogger(__name__)


class SavingMixin:
    """`save_pretrained` / `from_pretrained` for `InstantIDPipeline`, adapter included."""

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """diffusers' `save_pretrained`, plus the image adapter as `ip-adapter.safetensors` beside the components.

        :raises InputError: only half of the adapter is there (the Resampler without the UNet's identity
            processors, or the reverse), so it cannot be saved in the released layout.
        """
        state = self.adapter_state()
        if state is not None:
            scales = {n: p.layer_scale for n, p in identity_processors(self.unet).items()}
            save_adapter_state(state, Path(save_directory) / ADAPTER_FILE, metadata={"layer_scale": json.dumps(scales)})
        with self._without_image_adapter():
            super().save_pretrained(save_directory, **kwargs)

    def adapter_state(self) -> Optional[dict]:
        """{"image_proj": ..., "ip_adapter": ...} of the loaded image adapter (released layout), or None."""
        has_proj, has_attention = self.image_proj is not None, self.has_identity_attention
        if has_proj != has_attention:
            missing = ("the UNet's identity processors (see remove_adapter)" if has_proj
                       else "image_proj (the Resampler)")
            raise InputError(f"the image adapter is only half there: {missing} is missing, so it cannot be saved. "
                             "Load the whole adapter again (pipe.load_adapter), or remove both halves.")
        if not has_proj:
            return None
        return {"image_proj": self.image_proj.state_dict(), "ip_adapter": adapter_processors(self.unet).state_dict()}

    @contextmanager
    def _without_image_adapter(self) -> Iterator[None]:
        """The pipeline as diffusers knows it: default processors on the UNet, no `image_proj`; restored after."""
        if self.image_proj is None:
            yield
            return
        layers, image_proj = attention_layers(self.unet), self.image_proj
        kept = [attn.processor for _, attn in layers]
        remove_adapter(self.unet)
        self.register_modules(image_proj=None)
        try:
            yield
        finally:
            for (_, attn), processor in zip(layers, kept):
                attn.set_processor(processor)
            self.register_modules(image_proj=image_proj)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, then the image adapter saved beside the components (if any).

        A local folder or a Hugging Face repo id (diffusers' own rules: `local_files_only`, `revision`,
        `cache_dir`, `token` apply to the adapter file too).
        """
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        adapter = saved_adapter_file(pretrained_model_name_or_path, kwargs)
        if adapter is not None:
            pipe.load_adapter(adapter)
            scales = json.loads(adapter_metadata(adapter).get("layer_scale", "{}"))   # layer name -> scale
            if scales:
                set_layer_scale(pipe.unet, scales)
        return pipe


def saved_adapter_file(name_or_path, kwargs: dict) -> Optional[Path]:
    """`ip-adapter.safetensors` of a saved pipeline: in the folder, or in the Hub repo; None if it has none."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder / ADAPTER_FILE if (folder / ADAPTER_FILE).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
           if k in kwargs}
    try:
        return Path(hf_hub_download(str(name_or_path), ADAPTER_FILE, **hub))
    except LocalEntryNotFoundError:
        logger.warning("%s: %s is not in the local cache, so the pipeline has no image adapter; call "
                       "pipe.load_adapter(...) before generating with a face embedding.", name_or_path, ADAPTER_FILE)
    except EntryNotFoundError:  # the repo has no adapter: a plain base model
        pass
    return None
