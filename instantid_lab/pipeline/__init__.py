"""The InstantID pipeline, split by stage:

- `instantid`  `InstantIDPipeline`: the stages as methods, `__call__` chains them
- `inputs`     flexible arguments -> tensors of known shape and records (or a clear `InputError`)
- `records`    the small records the stages pass (below)
- `guidance`   what the denoiser sees (`Conditioning`, `Control`), ControlNet residuals and
               classifier-free guidance
- `latents`    where denoising starts (noise, img2img, inpainting)
- `compat`     what makes it a diffusers pipeline like the others (`DiffusersNativeMixin`), from:
  `lora` (diffusers' LoRA loader), `saving` (`save_pretrained` / `from_pretrained` with the adapter),
  `memory` (VAE slicing / tiling; options that would replace the identity attention are refused)

The records (dataclasses with named fields, instead of positional tuples):

- `BatchGeometry(n_prompts, n_per_prompt, height, width, guided)`: the shape of a generation;
  `.batch` = n_prompts * n_per_prompt images (the UNet sees twice that when guided).
- `ControlWindow(start=0.0, end=1.0)`: the fraction of the steps a ControlNet acts in.
- `NegativeIdentity(kind="zeros", strength=0.35, seed=0)`: the unconditional half's identity
  (`negative_embedding`).
- `ExtraControlNet(net, image, scale=0.4, window=ControlWindow())`: one more ControlNet that sees
  the text; a list of them may be passed as `extra_controlnets`.
- `References(embeddings, combine="mean", weights=None)`: N reference embeddings [N, D] of one person
  and how to use them ("mean", "norm_mean", "weighted" or "concat", see `instantid_lab.references`);
  passed as `face_embedding` (alone, or one per prompt in a list).
- `Control`: one ControlNet's tensors for a whole generation; `Conditioning`: everything the UNet
  and the ControlNets see besides the latents (built once, by `prepare_conditioning` from the call's
  arguments or by `tensor_conditioning` from tensors, for training).
"""

from .guidance import Conditioning, Control, negative_embedding
from .instantid import InstantIDPipeline, InstantIDPipelineOutput
from .records import BatchGeometry, ControlWindow, ExtraControlNet, NegativeIdentity, References

__all__ = [
    "BatchGeometry",
    "Conditioning",
    "Control",
    "ControlWindow",
    "ExtraControlNet",
    "InstantIDPipeline",
    "InstantIDPipelineOutput",
    "NegativeIdentity",
    "References",
    "negative_embedding",
]
