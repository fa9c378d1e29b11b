"""`InstantIDPipeline`: text + identity embedding + keypoint image -> images.

One denoising step (`predict_noise`), with guidance, on a batch [uncond, cond]:

    down, mid = IdentityNet(z_t, t, identity_tokens, keypoint_image) * identitynet_scale
              (+ each extra ControlNet(z_t, t, text_tokens, its image) * its scale)
    eps = UNet(z_t, t, text_tokens, identity_tokens via cross_attention_kwargs, + down, mid)
    eps = eps_uncond + w * (eps_cond - eps_uncond)

The stages are methods named by what they do (`encode_prompt`, `encode_identity`,
`prepare_keypoint_image`, `prepare_latents`, `predict_noise`, `decode_latents`), so a variant
(img2img, inpainting, another guidance) changes one stage, not a copy of the pipeline.
img2img (`image=`, `strength=`) and inpainting (`mask_image=`) are the same pipeline: they only
change where the latents start and what is kept after each step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput

from ..adapter import Resampler
from ..errors import InputError
from ..identitynet import add_residuals, controlnet_residuals, zero_pad_uncond
from .guidance import Conditioning, Control, cond_half, guide, same_for_both, with_uncond
from .inputs import (as_identity_embeddings, as_image_batch, as_mask_batch, as_negative_prompts, as_prompts,
                     as_sample_scale, image_size)
from .latents import LatentState, keep_known_region, random_latents, schedule, start_latents


@dataclass
class InstantIDPipelineOutput(BaseOutput):
    """:param images: PIL images, a numpy array [B, H, W, 3] in [0, 1], or latents [B, 4, h, w]."""

    images: Union[list[PIL.Image.Image], np.ndarray, Tensor]


class InstantIDPipeline(DiffusionPipeline):
    """InstantID on a diffusers text-to-image model (SDXL, or an SD-shaped UNet with one text encoder).

    Constructed like `StableDiffusionXLControlNetPipeline`; `controlnet` is IdentityNet (may be None
    for adapter-only generation), `text_encoder_2` / `tokenizer_2` are None for SD-shaped UNets.
    The image adapter is added with `load_adapter`, which sets `image_proj` (the Resampler) and
    installs decoupled attention on the UNet.

    :param force_zeros_for_empty_prompt: without a negative prompt, use an all-zero negative text
        embedding (SDXL's convention; default: True when there is a second text encoder).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_proj->controlnet->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2", "controlnet", "image_proj"]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,
                 image_proj=None, force_zeros_for_empty_prompt: Optional[bool] = None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, controlnet=controlnet, scheduler=scheduler,
                              image_proj=image_proj)
        zeros = text_encoder_2 is not None if force_zeros_for_empty_prompt is None else force_zeros_for_empty_prompt
        self.register_to_config(force_zeros_for_empty_prompt=zeros)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------------- the adapter

    def load_adapter(self, path_or_state_dict, scale: float = 1.0) -> None:
        """Load the image adapter: the Resampler as `self.image_proj`, decoupled attention on the UNet.

        :param path_or_state_dict: `ip-adapter.bin`, a `.safetensors` file, or a dict
            {"image_proj": ..., "ip_adapter": ...} (see `checkpoint.load_adapter_state`).
        :param scale: every layer's identity scale (multiplies the per-call `adapter_scale`).
        :raises CheckpointError: the checkpoint does not fit this UNet (names the keys).
        """
        from ..attention import install_adapter
        from ..checkpoint import check_ip_adapter_state, load_adapter_state

        state = load_adapter_state(path_or_state_dict)
        image_proj = Resampler.from_state_dict(state["image_proj"])
        check_ip_adapter_state(self.unet, state["ip_adapter"])
        layers = install_adapter(self.unet, scale=scale)
        layers.load_state_dict(state["ip_adapter"])
        layers.to(device=self.unet.device, dtype=self.unet.dtype)
        self.register_modules(image_proj=image_proj.to(device=self.unet.device, dtype=self.unet.dtype).eval())

    @property
    def has_identity_attention(self) -> bool:
        """Whether the UNet carries the adapter's identity processors."""
        from ..attention import identity_processors

        return bool(identity_processors(self.unet))

    # ------------------------------------------------------------------------- the call

    @torch.no_grad()
    def __call__(self, prompt, face_embedding, keypoint_image=None, adapter_scale=0.8, identitynet_scale=0.8,
                 negative_prompt=None, num_inference_steps: int = 30, guidance_scale: float = 5.0, generator=None,
                 height: Optional[int] = None, width: Optional[int] = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", control_guidance_start=0.0, control_guidance_end=1.0,
                 negative_identity: str = "zeros", negative_identity_strength: float = 0.35,
                 negative_identity_seed: int = 0, reference_mode: str = "mean", face_mask=None,
                 extra_controlnets: Sequence = (), extra_images: Sequence = (), extra_scales=0.4, image=None,
                 strength: float = 0.8, mask_image=None, guess_mode: bool = False, latents: Optional[Tensor] = None,
                 callback_on_step_end: Optional[Callable] = None, return_dict: bool = True):
        """Generate images of the person whose identity embedding is `face_embedding`.

        :param prompt: a string or a list of B strings.
        :param face_embedding: [D]; [N, D] (N references, combined by `reference_mode`); or one per
            prompt ([B, N, D] or a list). D must be the Resampler's `embedding_dim` (512 for antelopev2).
        :param keypoint_image: the keypoint image (`keypoints.draw_kps`), one or one per prompt.
        :param adapter_scale: identity-attention scale: a number, or one per prompt / per image.
        :param identitynet_scale: IdentityNet conditioning scale: a number, or one per prompt / per image.
        :param height, width: output size; default: the keypoint image's aspect with the short side at the
            model's native size (1024 for SDXL), each side a multiple of 8 latent pixels.
        :param control_guidance_start, control_guidance_end: the fraction of steps the ControlNets act in
            (a number, or a list: IdentityNet first, then the extras).
        :param negative_identity: "zeros" (the reference: Resampler of a zero vector) or "noise" (seeded
            Gaussian noise times `negative_identity_strength`).
        :param face_mask: optional region (white = face) limiting identity attention and IdentityNet.
        :param extra_controlnets, extra_images, extra_scales: more ControlNets; they see the text tokens.
        :param image, strength: img2img source image and how much of the schedule to run (0 < s <= 1).
        :param mask_image: inpainting mask (white = repaint), with `image`.
        :param guess_mode: the ControlNets see only the conditional half (with guidance).
        :param latents: starting noise [B * n, 4, h, w] instead of sampling it.
        :param callback_on_step_end: `f(pipe, step, t, {"latents": ...}) -> dict`; a returned "latents" replaces them.
        :return: `InstantIDPipelineOutput` (or a tuple with the images when `return_dict` is False).
        """
        prompts = as_prompts(prompt)
        height, width = self.default_size(keypoint_image, height, width)
        self.check_inputs(prompts, keypoint_image, height, width, num_images_per_prompt, strength, image, mask_image,
                          negative_identity, extra_controlnets, extra_images)
        cond = self.prepare_conditioning(
            prompts, face_embedding, keypoint_image, height, width, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, guided=guidance_scale > 1.0, adapter_scale=adapter_scale,
            identitynet_scale=identitynet_scale, window=(control_guidance_start, control_guidance_end),
            negative_identity=(negative_identity, negative_identity_strength, negative_identity_seed),
            reference_mode=reference_mode, face_mask=face_mask, extras=(extra_controlnets, extra_images, extra_scales),
            guess_mode=guess_mode)
        timesteps = schedule(self.scheduler, num_inference_steps, strength if image is not None else 1.0, self._execution_device)
        state = self.prepare_latents(len(prompts), num_images_per_prompt, height, width, generator, latents, image,
                                     mask_image, timesteps, strength)
        final = self.denoise(state, timesteps, cond, guidance_scale, generator, callback_on_step_end)
        images = self.decode_latents(final, output_type)
        self.maybe_free_model_hooks()
        return InstantIDPipelineOutput(images=images) if return_dict else (images,)

    # ------------------------------------------------------------------------- checks and sizes

    def default_size(self, keypoint_image, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
        """(height, width): the requested size, else the keypoint image's aspect at the model's native
        short side (`unet.config.sample_size` latents), each side a multiple of 8 latent pixels."""
        from ..keypoints import fit_size

        if height is not None and width is not None:
            return int(height), int(width)
        native = int(self.unet.config.sample_size) * self.vae_scale_factor
        fitted_w, fitted_h = (native, native)
        if keypoint_image is not None:
            fitted_w, fitted_h = fit_size(image_size(keypoint_image), target_short=native, multiple=8 * self.vae_scale_factor)
        return int(height or fitted_h), int(width or fitted_w)

    def check_inputs(self, prompts, keypoint_image, height, width, num_images_per_prompt, strength, image,
                     mask_image, negative_identity, extra_controlnets, extra_images) -> None:
        """Raise `InputError` (saying what to do) for arguments that cannot work together."""
        problems = [
            (self.image_proj is None, "no image adapter loaded: call pipe.load_adapter('ip-adapter.bin') first"),
            (self.controlnet is not None and keypoint_image is None,
             "keypoint_image is required with IdentityNet (keypoints.draw_kps(face.kps, size))"),
            (height % self.vae_scale_factor or width % self.vae_scale_factor,
             f"height and width must be multiples of {self.vae_scale_factor} (the VAE factor); got {height}x{width}"),
            (num_images_per_prompt < 1, f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}"),
            (image is not None and not 0.0 < strength <= 1.0, f"strength must be in (0, 1], got {strength}"),
            (mask_image is not None and image is None, "mask_image needs the source image: pass image= too"),
            (negative_identity not in ("zeros", "noise"), f"negative_identity must be 'zeros' or 'noise', got {negative_identity!r}"),
            (len(extra_controlnets) != len(extra_images),
             f"got {len(extra_controlnets)} extra ControlNets but {len(extra_images)} extra images; give one image each"),
        ]
        for failed, message in problems:
            if failed:
                raise InputError(message)

    # ------------------------------------------------------------------------- conditioning

    def prepare_conditioning(self, prompts: list[str], face_embedding, keypoint_image, height: int, width: int, *,
                             negative_prompt=None, num_images_per_prompt: int = 1, guided: bool = True,
                             adapter_scale=0.8, identitynet_scale=0.8, window=(0.0, 1.0),
                             negative_identity=("zeros", 0.35, 0), reference_mode: str = "mean", face_mask=None,
                             extras=((), (), 0.4), guess_mode: bool = False) -> Conditioning:
        """All the conditioning tensors, batched [uncond, cond] when `guided` (see `Conditioning`).

        :param window: (control_guidance_start, control_guidance_end).
        :param negative_identity: (kind, strength, seed), see `negative_embedding`.
        :param extras: (extra ControlNets, their images, their scales).
        """
        b, n = len(prompts), num_images_per_prompt
        text, pooled = self.encode_prompt(prompts, negative_prompt, n, guided)
        identity = self.encode_identity(face_embedding, b, n, guided, *negative_identity, reference_mode)
        mask = None if face_mask is None else self._per_image(as_mask_batch(face_mask, b, height, width), n, guided)
        cond = Conditioning(
            text_tokens=text, identity_tokens=identity, added_cond_kwargs=self.prepare_added_cond(pooled, height, width),
            adapter_scale=same_for_both(self._scale_on_device(as_sample_scale(adapter_scale, b, n)), guided),
            face_mask=mask, guided=guided, guess_mode=guess_mode, identity_attention=self.has_identity_attention)
        cond.controls = self.prepare_controls(cond, keypoint_image, identitynet_scale, window, extras, b, n, height, width)
        return cond

    def encode_prompt(self, prompts: list[str], negative_prompt=None, num_images_per_prompt: int = 1,
                      guided: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """Text tokens (and SDXL's pooled text embedding), repeated per image, [uncond, cond] if guided.

        :return: text tokens [B', Lt, C]; pooled [B', P] or None (SD-shaped).
        """
        tokens, pooled = self._encode_text(prompts)
        if guided:
            neg_tokens, neg_pooled = self._encode_negative_text(negative_prompt, tokens, pooled, len(prompts))
        tokens, pooled = (_repeat(x, num_images_per_prompt) for x in (tokens, pooled))
        if not guided:
            return tokens, pooled
        neg_tokens, neg_pooled = (_repeat(x, num_images_per_prompt) for x in (neg_tokens, neg_pooled))
        return with_uncond(neg_tokens, tokens, True), None if pooled is None else with_uncond(neg_pooled, pooled, True)

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Optional[Tensor]]:
        """SDXL: penultimate hidden states of both encoders, concatenated; pooled from the second.
        SD-shaped: the last hidden state of the one encoder.

        :return: [B, Lt, C], [B, P] or None.
        """
        pairs = [(t, e) for t, e in [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)] if e]
        sdxl, hidden, pooled = self.text_encoder_2 is not None, [], None
        for tokenizer, encoder in pairs:
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2] if sdxl else out.last_hidden_state)  # [B, Lt, c_i]
            pooled = getattr(out, "text_embeds", None)
        dtype = self.unet.dtype
        return torch.cat(hidden, dim=-1).to(dtype), None if pooled is None else pooled.to(dtype)  # [B, Lt, sum c_i]

    def _encode_negative_text(self, negative_prompt, tokens: Tensor, pooled: Optional[Tensor], n_prompts: int):
        if negative_prompt is None and self.config.force_zeros_for_empty_prompt:
            return torch.zeros_like(tokens), None if pooled is None else torch.zeros_like(pooled)
        return self._encode_text(as_negative_prompts(negative_prompt, n_prompts))

    def encode_identity(self, face_embedding, n_prompts: int, num_images_per_prompt: int = 1, guided: bool = True,
                        negative_identity: str = "zeros", strength: float = 0.35, seed: int = 0,
                        reference_mode: str = "mean") -> Tensor:
        """Identity tokens: the Resampler applied to each prompt's identity embedding (and to the
        negative identity when guided).

        :return: shape [B', N, C] (N = num_queries, C = the UNet's cross-attention width).
        """
        dim = self.image_proj.config.embedding_dim
        embeds = as_identity_embeddings(face_embedding, n_prompts, dim, reference_mode)  # [B, D]
        embeds = embeds.to(device=self._execution_device, dtype=self.image_proj.dtype)
        tokens = _repeat(self.image_proj(embeds), num_images_per_prompt)                # [B * n, N, C]
        if not guided:
            return tokens.to(self.unet.dtype)
        negative = self.image_proj(negative_embedding(embeds, negative_identity, strength, seed))
        return with_uncond(_repeat(negative, num_images_per_prompt), tokens, True).to(self.unet.dtype)

    def prepare_keypoint_image(self, keypoint_image, n_prompts: int, num_images_per_prompt: int, height: int,
                               width: int, guided: bool) -> Tensor:
        """The keypoint image at the output size, RGB in [0, 1] (no [-1, 1] normalisation).

        :return: shape [B', 3, height, width].
        """
        return self._per_image(as_image_batch(keypoint_image, n_prompts, height, width), num_images_per_prompt, guided)

    def prepare_added_cond(self, pooled: Optional[Tensor], height: int, width: int) -> Optional[dict]:
        """SDXL's "text_time" inputs: the pooled text embedding and the time ids; None for SD-shaped UNets."""
        if self.unet.config.addition_embed_type != "text_time":
            return None
        return {"text_embeds": pooled, "time_ids": self.prepare_time_ids(height, width, pooled.shape[0])}

    def prepare_time_ids(self, height: int, width: int, batch: int) -> Tensor:
        """SDXL micro-conditioning: (original size, crop top-left, target size) = (h, w, 0, 0, h, w).

        :return: shape [batch, 6].
        """
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.unet.dtype, device=self._execution_device)
        return ids.repeat(batch, 1)  # [1, 6] -> [B', 6]

    def prepare_controls(self, cond: Conditioning, keypoint_image, identitynet_scale, window, extras, n_prompts: int,
                         n_per: int, height: int, width: int) -> list[Control]:
        """IdentityNet (identity tokens, keypoint image, face mask), then each extra ControlNet (text tokens)."""
        nets, images, scales = extras
        windows = list(zip(*(_per_control(x, 1 + len(nets)) for x in window)))  # (start, end), IdentityNet first
        specs = [(net, cond.text_tokens, img, s, None, w)
                 for net, img, s, w in zip(nets, images, _per_control(scales, len(nets)), windows[1:])]
        if self.controlnet is not None:
            specs.insert(0, (self.controlnet, cond.identity_tokens, keypoint_image, identitynet_scale, cond.face_mask,
                             windows[0]))
        return [self._control(*spec, cond.guided, n_prompts, n_per, height, width) for spec in specs]

    def _control(self, net, context, image, scale, mask, window, guided, n_prompts, n_per, height, width) -> Control:
        image = self.prepare_keypoint_image(image, n_prompts, n_per, height, width, guided).to(net.dtype)
        scale = same_for_both(self._scale_on_device(as_sample_scale(scale, n_prompts, n_per)), guided)
        return Control(net, context, image, scale, mask, tuple(window))

    def _per_image(self, x: Tensor, n: int, guided: bool) -> Tensor:
        """Per-prompt tensor [B, ...] -> per generated image, both halves: [B', ...] on the device."""
        return same_for_both(_repeat(x, n), guided).to(device=self._execution_device, dtype=self.unet.dtype)

    def _scale_on_device(self, scale):
        return scale.to(device=self._execution_device, dtype=self.unet.dtype) if isinstance(scale, Tensor) else scale

    # ------------------------------------------------------------------------- latents

    def prepare_latents(self, n_prompts: int, num_images_per_prompt: int, height: int, width: int, generator=None,
                        latents: Optional[Tensor] = None, image=None, mask_image=None,
                        timesteps: Optional[Tensor] = None, strength: float = 1.0) -> LatentState:
        """Starting latents: noise; or, with `image`, the encoded image noised to the first timestep;
        with `mask_image` also the latent-size mask for inpainting (white = repaint).

        :param image, mask_image: one, or one per prompt.
        :return: `LatentState`, latents of shape [B * n, 4, height / f, width / f].
        """
        f = self.vae_scale_factor
        shape = (n_prompts * num_images_per_prompt, self.unet.config.in_channels, height // f, width // f)
        device, dtype = self._execution_device, self.unet.dtype
        noise = random_latents(shape, generator, device, dtype) if latents is None else latents.to(device, dtype)
        if tuple(noise.shape) != shape:
            raise InputError(f"latents must have shape {list(shape)}, got {list(noise.shape)}")
        source = None if image is None else _repeat(self.encode_image(image, n_prompts, height, width), num_images_per_prompt)
        mask = None
        if mask_image is not None:
            mask = _repeat(as_mask_batch(mask_image, n_prompts, *shape[-2:]), num_images_per_prompt).to(device, dtype)
        t_start = None if timesteps is None else timesteps[0]
        return LatentState(start_latents(self.scheduler, noise, source, t_start, strength), source, noise, mask)

    def encode_image(self, image, n_prompts: int, height: int, width: int) -> Tensor:
        """VAE latents (mean of the posterior, times the scaling factor) of the source image(s).

        :return: shape [B, 4, height / f, width / f].
        """
        pixels = as_image_batch(image, n_prompts, height, width) * 2.0 - 1.0      # [B, 3, H, W] in [-1, 1]
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).to(self.unet.dtype)

    # ------------------------------------------------------------------------- denoising

    def denoise(self, state: LatentState, timesteps: Tensor, cond: Conditioning, guidance_scale: float,
                generator=None, callback_on_step_end: Optional[Callable] = None) -> Tensor:
        """The sampling loop: predict noise, scheduler step, keep the known region (inpainting)."""
        latents, step_kwargs = state.latents, self._step_kwargs(generator)
        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.predict_noise(latents, t, cond, guidance_scale, i, len(timesteps))
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            next_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
            latents = keep_known_region(self.scheduler, latents, state, next_t)
            if callback_on_step_end is not None:
                latents = (callback_on_step_end(self, i, t, {"latents": latents}) or {}).get("latents", latents)
        return latents

    def predict_noise(self, latents: Tensor, t, cond: Conditioning, guidance_scale: float = 1.0, step: int = 0,
                      num_steps: int = 1) -> Tensor:
        """One guided noise prediction: ControlNets, then the UNet, then CFG.

        :param latents: shape [B, 4, h, w] (not yet batched for guidance).
        :return: the guided noise prediction, shape [B, 4, h, w].
        """
        model_input = self.scheduler.scale_model_input(with_uncond(latents, latents, cond.guided), t)  # [B', 4, h, w]
        residuals = self.control_residuals(model_input, t, cond, step, num_steps)
        down, mid = residuals if residuals is not None else (None, None)
        noise_pred = self.unet(
            model_input, t, encoder_hidden_states=cond.text_tokens, added_cond_kwargs=cond.added_cond_kwargs,
            cross_attention_kwargs=cond.cross_attention_kwargs(), down_block_additional_residuals=down,
            mid_block_additional_residual=mid, return_dict=False,
        )[0]
        return guide(noise_pred, guidance_scale) if cond.guided else noise_pred

    def control_residuals(self, model_input: Tensor, t, cond: Conditioning, step: int = 0, num_steps: int = 1):
        """The summed residuals of the ControlNets active at this step (None if none is).

        In guess mode with guidance they run on the conditional half only and the unconditional
        half gets zeros, so the residual batch always equals the UNet's.
        """
        total = None
        for control in cond.controls:
            if control.active(step, num_steps):
                total = add_residuals(total, self._run_control(control, model_input, t, cond))
        return total

    def _run_control(self, control: Control, model_input: Tensor, t, cond: Conditioning):
        half = cond.guess_mode and cond.guided
        pick = cond_half if half else (lambda x: x)
        dtype = control.net.dtype
        residuals = controlnet_residuals(
            control.net, pick(model_input).to(dtype), t, pick(control.context).to(dtype), pick(control.image),
            pick(control.scale), pick(cond.added_cond_kwargs), pick(control.mask), guess_mode=cond.guess_mode,
        )
        return zero_pad_uncond(residuals) if half else residuals

    def _step_kwargs(self, generator) -> dict:
        accepted = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in accepted and not isinstance(generator, list) else {}

    # ------------------------------------------------------------------------- output

    def decode_latents(self, latents: Tensor, output_type: str = "pil"):
        """Latents -> images ("pil", "np" in [0, 1], "pt" in [0, 1]) or the latents themselves ("latent")."""
        if output_type == "latent":
            return latents
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(z, return_dict=False)[0]                           # [B, 3, H, W] in ~[-1, 1]
        if upcast:
            self.vae.to(torch.float16)
        return self.image_processor.postprocess(image.float(), output_type=output_type)


def negative_embedding(embeds: Tensor, kind: str = "zeros", strength: float = 0.35, seed: int = 0) -> Tensor:
    """The negative identity embedding for guidance: zeros (the reference), or seeded Gaussian noise
    times `strength` (a community variant said to reduce over-saturation, "burn").

    :param embeds: the positive embeddings, shape [B, D] (only shape, device and dtype are used).
    :return: shape [B, D].
    """
    if kind == "zeros":
        return torch.zeros_like(embeds)
    noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(seed))
    return (noise * strength).to(device=embeds.device, dtype=embeds.dtype)


def _repeat(x: Optional[Tensor], n: int) -> Optional[Tensor]:
    """Per prompt -> per generated image, prompt-major: [B, ...] -> [B * n, ...]."""
    return x if x is None or n == 1 else x.repeat_interleave(n, dim=0)


def _per_control(value, count: int) -> list:
    """A number for every ControlNet, or a list with one per ControlNet."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InputError(f"got {len(value)} values for {count} ControlNets; give one number or one per ControlNet")
        return list(value)
    return [value] * count
