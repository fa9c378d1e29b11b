"""The InstantID pipeline, split by stage:

- `instantid`  `InstantIDPipeline`: the stages as methods, `__call__` chains them
- `inputs`     flexible arguments -> tensors of known shape (or a clear `InputError`)
- `guidance`   what the denoiser sees (`Conditioning`, `Control`) and classifier-free guidance
- `latents`    where denoising starts (noise, img2img, inpainting)
"""

from .instantid import InstantIDPipeline, InstantIDPipelineOutput, negative_embedding

__all__ = ["InstantIDPipeline", "InstantIDPipelineOutput", "negative_embedding"]
