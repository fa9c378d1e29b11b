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
change where the latents start and what is kept after each step. Without the image adapter and
IdentityNet (no `load_adapter`, `controlnet=None`, no face embedding) it is the plain base model.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor

from ..adapter import Resampler
from ..attention import identity_processors, install_adapter, prepare_identity_attention
from ..checkpoint import check_ip_adapter_state, load_adapter_state
from ..errors import InputError
from ..references import identity_tokens
from ..types import Scale, per_sample_scale
from .guidance import (Conditioning, Control, control_residuals, guide, negative_embedding, repeat_per_image,
                       same_for_both, with_uncond)
from .inputs import (as_controlnets, as_reference_sets, as_image_batch, as_mask_batch, as_negative_prompts,
                     as_prompts, as_sample_scale, identity_problems, output_size, raise_first)
from .compat import DiffusersNativeMixin
from .latents import LatentState, keep_known_region, random_latents, schedule, start_latents, step_kwargs
from .checks import MAX_PIXELS_PER_CALL, check_arguments, check_output_size
from .records import BatchGeometry, ControlWindow, ExtraControlNet, InstantIDPipelineOutput, NegativeIdentity


class InstantIDPipeline(DiffusersNativeMixin, DiffusionPipeline):
    """InstantID on a diffusers text-to-image model (SDXL, or an SD-shaped UNet with one text encoder).

    Constructed like `StableDiffusionXLControlNetPipeline`; `controlnet` is IdentityNet (may be None
    for adapter-only generation), `text_encoder_2` / `tokenizer_2` are None for SD-shaped UNets.
    The image adapter is added with `load_adapter`, which sets `image_proj` (the Resampler) and
    installs decoupled attention on the UNet. With neither, the pipeline is the plain base model.

    :param force_zeros_for_empty_prompt: without a negative prompt, use an all-zero negative text
        embedding (SDXL's convention; default: True when there is a second text encoder).
    """

    #: the most pixels one call may generate (all images together), checked before any allocation
    max_pixels_per_call = MAX_PIXELS_PER_CALL
    #: every model, in `enable_model_cpu_offload`'s chain (a model's call offloads its predecessor); IdentityNet runs
    #: at every step, so it must not be the UNet's predecessor (it would go back and forth): it loads once and stays
    model_cpu_offload_seq = "text_encoder->text_encoder_2->controlnet->image_proj->unet->vae"
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

    def load_adapter(self, path_or_state_dict, layer_scale: float = 1.0) -> None:
        """Load the image adapter: the Resampler as `self.image_proj`, decoupled attention on the UNet.

        :param path_or_state_dict: `ip-adapter.bin`, a `.safetensors` file, or a dict
            {"image_proj": ..., "ip_adapter": ...} (see `checkpoint.load_adapter_state`).
        :param layer_scale: every layer's identity scale (multiplies the per-call `adapter_scale`).
        :raises CheckpointError: the checkpoint does not fit this UNet (names the keys).
        """
        state = load_adapter_state(path_or_state_dict)
        image_proj = Resampler.from_state_dict(state["image_proj"])
        check_ip_adapter_state(self.unet, state["ip_adapter"])
        layers = install_adapter(self.unet, layer_scale=layer_scale)
        layers.load_state_dict(state["ip_adapter"])
        layers.to(device=self.unet.device, dtype=self.unet.dtype)
        self.register_modules(image_proj=image_proj.to(device=self.unet.device, dtype=self.unet.dtype).eval())

    @property
    def has_identity_attention(self) -> bool:
        """Whether the UNet carries the adapter's identity processors."""
        return bool(identity_processors(self.unet))

    # ------------------------------------------------------------------------- the call

    @torch.no_grad()
    def __call__(self, prompt, face_embedding=None, keypoint_image=None, adapter_scale=0.8, identitynet_scale=0.8,
                 negative_prompt=None, num_inference_steps: int = 30, guidance_scale: float = 5.0, generator=None,
                 height: Optional[int] = None, width: Optional[int] = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", control_guidance_start=0.0, control_guidance_end=1.0,
                 negative_identity: str = "zeros", negative_identity_strength: float = 0.35,
                 negative_identity_seed: int = 0, reference_mode: str = "mean", face_mask=None,
                 extra_controlnets: Sequence = (), extra_images: Sequence = (), extra_scales=0.4, image=None,
                 strength: float = 0.8, mask_image=None, guess_mode: bool = False, latents: Optional[Tensor] = None,
                 callback_on_step_end: Optional[Callable] = None, return_dict: bool = True):
        """Generate images of the person whose identity embedding is `face_embedding`.

        The arguments are turned once into records (`pipeline.records`): `BatchGeometry` (prompts,
        images per prompt, size, guided), `ControlWindow` (IdentityNet's start/end), `NegativeIdentity`
        (kind, strength, seed) and one `ExtraControlNet` (net, image, scale, window) per extra
        ControlNet; the stages then see only those records and `Conditioning`.

        :param prompt: a string or a list of B strings.
        :param face_embedding: [D]; [N, D] (N references, combined by `reference_mode`); `References` (N
            references and their combiner, `instantid_lab.references`); or one per prompt ([B, N, D] or a
            list). D must be the Resampler's `embedding_dim` (512 for antelopev2).
            None (the default) without an image adapter and IdentityNet: the plain base model.
        :param keypoint_image: the keypoint image (`keypoints.draw_kps`), one or one per prompt;
            required with IdentityNet.
        :param adapter_scale: identity-attention scale per call: a number, or one per prompt / per image
            (it multiplies each layer's `layer_scale`, see `attention.set_layer_scale`).
        :param identitynet_scale: IdentityNet conditioning scale: a number, or one per prompt / per image.
        :param height, width: output size; default: the keypoint image's aspect with the short side at the
            model's native size (1024 for SDXL), each side a multiple of 8 latent pixels.
        :param control_guidance_start, control_guidance_end: the fraction of steps the ControlNets act in
            (a number, or a list: IdentityNet first, then the extras); with `ExtraControlNet` records,
            numbers that set IdentityNet's window (each record has its own).
        :param negative_identity: "zeros" (the reference: Resampler of a zero vector) or "noise" (seeded
            Gaussian noise times `negative_identity_strength`, seed `negative_identity_seed`).
        :param face_mask: optional region (white = face) limiting identity attention and IdentityNet.
        :param extra_controlnets, extra_images, extra_scales: more ControlNets (they see the text tokens)
            with one image each and a scale (one for all, or one each); or `extra_controlnets` as a list
            of `ExtraControlNet` records, leaving `extra_images` and `extra_scales` at their defaults.
        :param image, strength: img2img source image and how much of the schedule to run (0 < s <= 1).
        :param mask_image: inpainting mask (white = repaint), with `image`.
        :param guess_mode: the ControlNets see only the conditional half (with guidance).
        :param latents: starting noise [B * n, 4, h, w] instead of sampling it.
        :param callback_on_step_end: `f(pipe, step, t, {"latents": ...}) -> dict`; a returned "latents" replaces them.
        :return: `InstantIDPipelineOutput` (or a tuple with the images when `return_dict` is False).
        """
        check_arguments(locals())
        prompts = as_prompts(prompt)
        height, width = self.default_size(keypoint_image, height, width)
        geometry = BatchGeometry(len(prompts), num_images_per_prompt, height, width, guided=guidance_scale > 1.0)
        self.check_inputs(geometry, face_embedding, keypoint_image, strength, image, mask_image)
        window, extras = as_controlnets(control_guidance_start, control_guidance_end, extra_controlnets, extra_images,
                                        extra_scales)
        negative = NegativeIdentity(negative_identity, negative_identity_strength, negative_identity_seed)
        cond = self.prepare_conditioning(
            prompts, geometry, face_embedding, keypoint_image, negative_prompt=negative_prompt,
            adapter_scale=adapter_scale, identitynet_scale=identitynet_scale, window=window, negative_identity=negative,
            reference_mode=reference_mode, face_mask=face_mask, extras=extras, guess_mode=guess_mode)
        strength = strength if image is not None else 1.0
        timesteps = schedule(self.scheduler, num_inference_steps, strength, self._execution_device)
        state = self.prepare_latents(geometry, generator, latents, image, mask_image, timesteps, strength)
        final = self.denoise(state, timesteps, cond, guidance_scale, generator, callback_on_step_end)
        images = self.decode_latents(final, output_type)
        self.maybe_free_model_hooks()
        return InstantIDPipelineOutput(images=images) if return_dict else (images,)

    # ------------------------------------------------------------------------- checks and sizes

    def default_size(self, keypoint_image, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
        """(height, width): the requested size, else the keypoint image's aspect at the model's native
        short side (`unet.config.sample_size` latents), each side a multiple of 8 latent pixels."""
        native = int(self.unet.config.sample_size) * self.vae_scale_factor
        return output_size(keypoint_image, height, width, native, multiple=8 * self.vae_scale_factor)

    def check_inputs(self, geometry: BatchGeometry, face_embedding=None, keypoint_image=None, strength: float = 1.0,
                     image=None, mask_image=None) -> None:
        """Raise `InputError` (saying what to do) for arguments that cannot work together."""
        f = self.vae_scale_factor
        check_output_size(geometry.height, geometry.width, geometry.batch, self.max_pixels_per_call)
        parts = identity_problems(self.image_proj is not None, self.controlnet is not None, face_embedding is not None,
                                  keypoint_image is not None)
        raise_first(parts + [
            (geometry.height % f or geometry.width % f,
             f"height and width must be multiples of {f} (the VAE factor); got {geometry.height}x{geometry.width}"),
            (geometry.n_per_prompt < 1, f"num_images_per_prompt must be >= 1, got {geometry.n_per_prompt}"),
            (image is not None and not 0.0 < strength <= 1.0, f"strength must be in (0, 1], got {strength}"),
            (mask_image is not None and image is None, "mask_image needs the source image: pass image= too"),
        ])

    # ------------------------------------------------------------------------- conditioning

    def prepare_conditioning(self, prompts: list[str], geometry: BatchGeometry, face_embedding=None,
                             keypoint_image=None, *, negative_prompt=None, adapter_scale=0.8, identitynet_scale=0.8,
                             window: ControlWindow = ControlWindow(),
                             negative_identity: NegativeIdentity = NegativeIdentity(), reference_mode: str = "mean",
                             face_mask=None, extras: Sequence[ExtraControlNet] = (),
                             guess_mode: bool = False) -> Conditioning:
        """All the conditioning tensors, batched [uncond, cond] when `geometry.guided` (see `Conditioning`).

        :param face_embedding: as `__call__`'s, or None (no identity tokens).
        :param window: IdentityNet's `ControlWindow`.
        :param negative_identity: the `NegativeIdentity` of the unconditional half.
        :param extras: the extra ControlNets, `ExtraControlNet` records.
        """
        text, pooled = self.encode_prompt(prompts, geometry, negative_prompt)
        identity = self.encode_identity(face_embedding, geometry, negative_identity, reference_mode)
        mask = self.prepare_face_mask(face_mask, geometry)
        controls = self.prepare_controls(geometry, text, identity, keypoint_image, identitynet_scale, window, mask,
                                         extras)
        return Conditioning(
            text_tokens=text, identity_tokens=identity,
            added_cond_kwargs=self.prepare_added_cond(pooled, geometry.height, geometry.width),
            adapter_scale=self.prepare_scale(adapter_scale, geometry, "adapter_scale"), face_mask=mask,
            controls=tuple(controls), guided=geometry.guided, guess_mode=guess_mode,
            identity_attention=self.has_identity_attention)

    def tensor_conditioning(self, text_tokens: Tensor, identity_embeds: Optional[Tensor] = None,
                            keypoint_images: Optional[Tensor] = None, adapter_scale=1.0,
                            identitynet_scale=1.0) -> Conditioning:
        """An unguided `Conditioning` straight from tensors, for training: no tokenizer, gradients kept.

        With it, `predict_noise(noisy, t, cond)` is the training-time prediction (t may be one
        timestep per sample, [B]; the scheduler's `scale_model_input` must be the identity, e.g. DDIM):

            eps = UNet(z_t, t, text_tokens, Resampler(identity_embeds) + IdentityNet residuals)

        :param text_tokens: the text encoder's output, shape [B, L, C].
        :param identity_embeds: identity embeddings, shape [B, D]; None without the adapter.
        :param keypoint_images: shape [B, 3, H, W] in [0, 1]; required with IdentityNet.
        :param adapter_scale: a number, or a Tensor [B].
        :param identitynet_scale: a number, or a Tensor [B].
        :raises InputError: inputs that do not fit the loaded parts, or an SDXL-shaped ("text_time") UNet.
        """
        parts = identity_problems(self.image_proj is not None, self.controlnet is not None, identity_embeds is not None,
                                  keypoint_images is not None, names=("identity_embeds", "keypoint_images"))
        sdxl = self.unet.config.addition_embed_type == "text_time"
        raise_first(parts + [(sdxl, "tensor_conditioning is for SD-shaped UNets (SDXL's need pooled text, time ids)")])
        batch = text_tokens.shape[0]
        identity = None if identity_embeds is None else self.image_proj(identity_embeds).to(self.unet.dtype)
        controls = ()
        if self.controlnet is not None:
            scale = per_sample_scale(identitynet_scale, batch, name="identitynet_scale")
            controls = (Control(self.controlnet, identity, keypoint_images, scale),)
        return Conditioning(text_tokens, identity, None, per_sample_scale(adapter_scale, batch, name="adapter_scale"),
                            controls=controls, guided=False, identity_attention=self.has_identity_attention)

    def encode_prompt(self, prompts: list[str], geometry: BatchGeometry,
                      negative_prompt=None) -> tuple[Tensor, Optional[Tensor]]:
        """Text tokens (and SDXL's pooled text embedding), repeated per image, [uncond, cond] if guided.

        :return: text tokens [B', Lt, C]; pooled [B', P] or None (SD-shaped).
        """
        tokens, pooled = self._encode_text(prompts)
        if geometry.guided:
            neg_tokens, neg_pooled = self._encode_negative_text(negative_prompt, tokens, pooled, len(prompts))
        tokens, pooled = (repeat_per_image(x, geometry.n_per_prompt) for x in (tokens, pooled))
        if not geometry.guided:
            return tokens, pooled
        neg_tokens, neg_pooled = (repeat_per_image(x, geometry.n_per_prompt) for x in (neg_tokens, neg_pooled))
        return with_uncond(neg_tokens, tokens, True), None if pooled is None else with_uncond(neg_pooled, pooled, True)

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Optional[Tensor]]:
        """SDXL: penultimate hidden states of both encoders, concatenated; pooled from the second.
        SD-shaped: the last hidden state of the one encoder.

        :return: [B, Lt, C], [B, P] or None.
        """
        pairs = [(t, e) for t, e in [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)] if e]
        sdxl, hidden, pooled, device = self.text_encoder_2 is not None, [], None, self._execution_device
        for tokenizer, encoder in pairs:      # (offloaded encoders sit on "meta"/CPU: ids go to the execution device)
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2] if sdxl else out.last_hidden_state)  # [B, Lt, c_i]
            pooled = getattr(out, "text_embeds", None)
        dtype = self.unet.dtype
        return torch.cat(hidden, dim=-1).to(dtype), None if pooled is None else pooled.to(dtype)  # [B, Lt, sum c_i]

    def _encode_negative_text(self, negative_prompt, tokens: Tensor, pooled: Optional[Tensor], n_prompts: int):
        if negative_prompt is None and self.config.force_zeros_for_empty_prompt:
            return torch.zeros_like(tokens), None if pooled is None else torch.zeros_like(pooled)
        return self._encode_text(as_negative_prompts(negative_prompt, n_prompts))

    def encode_identity(self, face_embedding, geometry: BatchGeometry,
                        negative_identity: NegativeIdentity = NegativeIdentity(),
                        reference_mode: str = "mean") -> Optional[Tensor]:
        """Identity tokens: the Resampler on each prompt's identity embedding ("concat": on each reference,
        tokens concatenated, `references.identity_tokens`) and, when guided, on the negative identity.

        :param face_embedding: as `__call__`'s, or None.
        :return: [B', K * Q, C] (K = 1 or N "concat" references, Q = num_queries, C = cross-attention width).
        """
        if face_embedding is None:
            return None
        dim = self.image_proj.config.embedding_dim
        embeds = as_reference_sets(face_embedding, geometry.n_prompts, dim, reference_mode)   # [B, K, D]
        embeds = embeds.to(device=self._execution_device, dtype=self.image_proj.dtype)
        tokens = repeat_per_image(identity_tokens(self.image_proj, embeds), geometry.n_per_prompt)  # [B * n, K * Q, C]
        if not geometry.guided:
            return tokens.to(self.unet.dtype)
        neg = negative_identity
        negative = identity_tokens(self.image_proj, negative_embedding(embeds, neg.kind, neg.strength, neg.seed))
        return with_uncond(repeat_per_image(negative, geometry.n_per_prompt), tokens, True).to(self.unet.dtype)

    def prepare_keypoint_image(self, keypoint_image, geometry: BatchGeometry) -> Tensor:
        """The keypoint image at the output size, RGB in [0, 1] (no [-1, 1] normalisation).

        :return: shape [B', 3, height, width].
        """
        return self._per_image(as_image_batch(keypoint_image, geometry.n_prompts, geometry.height, geometry.width),
                               geometry)

    def prepare_face_mask(self, face_mask, geometry: BatchGeometry) -> Optional[Tensor]:
        """The face region (white = face) at the output size, or None.

        :return: shape [B', 1, height, width] in [0, 1].
        """
        if face_mask is None:
            return None
        return self._per_image(as_mask_batch(face_mask, geometry.n_prompts, geometry.height, geometry.width), geometry)

    def prepare_scale(self, scale, geometry: BatchGeometry, name: str = "scale") -> Scale:
        """A scale per generated image, on the device, for both halves when guided: float or Tensor [B']."""
        scale = as_sample_scale(scale, geometry.n_prompts, geometry.n_per_prompt, name)
        if isinstance(scale, Tensor):
            scale = scale.to(device=self._execution_device, dtype=self.unet.dtype)
        return same_for_both(scale, geometry.guided)

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

    def prepare_controls(self, geometry: BatchGeometry, text_tokens: Tensor, identity_tokens: Optional[Tensor],
                         keypoint_image=None, identitynet_scale=0.8, window: ControlWindow = ControlWindow(),
                         face_mask: Optional[Tensor] = None, extras: Sequence[ExtraControlNet] = ()) -> list[Control]:
        """IdentityNet (identity tokens, keypoint image, face mask), then each extra ControlNet (text tokens)."""
        controls = [self._control(e.net, text_tokens, e.image, e.scale, e.window, geometry) for e in extras]
        if self.controlnet is None:
            return controls
        return [self._control(self.controlnet, identity_tokens, keypoint_image, identitynet_scale, window, geometry,
                              face_mask), *controls]

    def _control(self, net, context: Tensor, image, scale, window: ControlWindow, geometry: BatchGeometry,
                 mask: Optional[Tensor] = None) -> Control:
        image = self.prepare_keypoint_image(image, geometry).to(net.dtype)
        return Control(net, context, image, self.prepare_scale(scale, geometry, "conditioning scale"), mask, window)

    def _per_image(self, x: Tensor, geometry: BatchGeometry) -> Tensor:
        """Per-prompt tensor [B, ...] -> per generated image, both halves: [B', ...] on the device."""
        x = same_for_both(repeat_per_image(x, geometry.n_per_prompt), geometry.guided)
        return x.to(device=self._execution_device, dtype=self.unet.dtype)

    # ------------------------------------------------------------------------- latents

    def prepare_latents(self, geometry: BatchGeometry, generator=None, latents: Optional[Tensor] = None, image=None,
                        mask_image=None, timesteps: Optional[Tensor] = None, strength: float = 1.0) -> LatentState:
        """Starting latents: noise; or, with `image`, the encoded image noised to the first timestep;
        with `mask_image` also the latent-size mask for inpainting (white = repaint).

        :param image, mask_image: one, or one per prompt.
        :return: `LatentState`, latents of shape [B * n, 4, height / f, width / f].
        """
        f, n = self.vae_scale_factor, geometry.n_per_prompt
        shape = (geometry.batch, self.unet.config.in_channels, geometry.height // f, geometry.width // f)
        device, dtype = self._execution_device, self.unet.dtype
        noise = random_latents(shape, generator, device, dtype) if latents is None else latents.to(device, dtype)
        if tuple(noise.shape) != shape:
            raise InputError(f"latents must have shape {list(shape)}, got {list(noise.shape)}")
        b, h, w = geometry.n_prompts, geometry.height, geometry.width
        source = None if image is None else repeat_per_image(self.encode_image(image, b, h, w), n)
        mask = None if mask_image is None else as_mask_batch(mask_image, b, *shape[-2:]).to(device, dtype)
        t_start = None if timesteps is None else timesteps[0]
        start = start_latents(self.scheduler, noise, source, t_start, strength)
        return LatentState(start, source, noise, repeat_per_image(mask, n))

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
        latents, extra = state.latents, step_kwargs(self.scheduler, generator)
        attention = self.prepare_identity_attention(cond)               # identity keys/values, once per call
        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.predict_noise(latents, t, cond, guidance_scale, i, len(timesteps), attention)
            latents = self.scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            next_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
            latents = keep_known_region(self.scheduler, latents, state, next_t)
            if callback_on_step_end is not None:
                latents = (callback_on_step_end(self, i, t, {"latents": latents}) or {}).get("latents", latents)
        return latents

    def predict_noise(self, latents: Tensor, t, cond: Conditioning, guidance_scale: float = 1.0, step: int = 0,
                      num_steps: int = 1, cross_attention_kwargs: Optional[dict] = None) -> Tensor:
        """One guided noise prediction: ControlNets, then the UNet, then CFG.

        :param latents: shape [B, 4, h, w] (not yet batched for guidance).
        :param cross_attention_kwargs: `prepare_identity_attention(cond)`, if already prepared for this call.
        :return: the guided noise prediction, shape [B, 4, h, w].
        """
        cross_attention_kwargs = cross_attention_kwargs or self.prepare_identity_attention(cond)
        model_input = self.scheduler.scale_model_input(with_uncond(latents, latents, cond.guided), t)  # [B', 4, h, w]
        residuals = self.control_residuals(model_input, t, cond, step, num_steps)
        down, mid = residuals if residuals is not None else (None, None)
        noise_pred = self.unet(
            model_input, t, encoder_hidden_states=cond.text_tokens, added_cond_kwargs=cond.added_cond_kwargs,
            cross_attention_kwargs=cross_attention_kwargs, down_block_additional_residuals=down,
            mid_block_additional_residual=mid, return_dict=False,
        )[0]
        return guide(noise_pred, guidance_scale) if cond.guided else noise_pred

    def prepare_identity_attention(self, cond: Conditioning) -> Optional[dict]:
        """The UNet's `cross_attention_kwargs` for a call: identity keys/values computed once (None without)."""
        return prepare_identity_attention(self.unet, cond.cross_attention_kwargs())

    def control_residuals(self, model_input: Tensor, t, cond: Conditioning, step: int = 0, num_steps: int = 1):
        """The summed residuals of the ControlNets active at this step (None if none); `guidance.control_residuals`."""
        return control_residuals(model_input, t, cond, step, num_steps)

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

