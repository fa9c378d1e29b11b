"""The miniature's training objective: one denoising loss for the base and for InstantID.

v-prediction with min-SNR weighting (Hang et al. 2023). With alpha_bar_t from the training schedule,
x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps and SNR_t = alpha_bar / (1 - alpha_bar):

    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0,
    L = E_t[ min(SNR_t, gamma) / (SNR_t + 1) * |v_theta(x_t, t, c) - v|^2 ],   gamma = 5.

The base draws t uniformly; InstantID draws each t as the noisier of two uniform draws
(`sample_timesteps`, `InstantIDConfig.timestep_draws`), since its conditions decide the image while the
latent is still mostly noise (held-out rank-1 0.49 -> 0.65 at 6000 steps, `data/miniature/MODEL_CARD.md`).

`v_theta` is the pipeline's own denoising stage (`InstantIDPipeline.predict_noise` on a
`tensor_conditioning`), so training, the fixed-batch curve and sampling run the same code: the base
is the pipeline without adapter and IdentityNet, InstantID the pipeline with them.

Classifier-free guidance needs the model to know "no caption" and "no identity": a training batch
replaces a caption by the empty prompt (`drop_captions`) and an identity embedding by the zero
vector, the pipeline's negative identity (`drop_identities`), each with a small probability.

An optional identity term (`IdentityTerm`, `InstantIDConfig.identity_loss`) scores what the prediction
implies: the clean latents it solves for, x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v_theta, decoded and
embedded by the conditioning recogniser R, against the identity embedding e it was conditioned on:

    L_id = mean over rows with an identity of ( 1 - cos(R(D(x_0)), e) ),     L = L_v + lambda * L_id.

Data-parallel training (several processes, `accelerate launch`): every process draws the same
*global* batch, dropout, noise and timesteps with the same generator, then computes the loss on its
own equal part (`Shard`); the gradients are averaged across processes, so one step equals one process
on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError


@dataclass(frozen=True)
class Shard:
    """This process's part of a global batch: the `index`-th of `count` equal chunks, on `device`.

    The default (one process) takes the whole batch, unchanged.
    """

    index: int = 0
    count: int = 1
    device: torch.device = torch.device("cpu")

    def take(self, x: Optional[Tensor]) -> Optional[Tensor]:
        """Rows of this shard of `x` [B, ...] (B divisible by `count`), on the shard's device."""
        if x is None:
            return None
        if len(x) % self.count:
            raise InputError(f"a batch of {len(x)} does not split into {self.count} equal parts: make the batch size "
                             f"a multiple of the number of processes ({self.count})")
        return (x if self.count == 1 else x.chunk(self.count)[self.index]).to(self.device)


@dataclass(frozen=True)
class TrainingBatch:
    """What one denoising step trains on (rows are samples).

    :param latents: scaled autoencoder latents, [B, 4, h, w].
    :param ids: caption token ids, [B, L].
    :param embeds: identity embeddings of the conditioning recogniser, [B, E] (InstantID only).
    :param kps_images: keypoint images, uint8 [B, 3, H, W] (InstantID only).
    :param adapter_scale, identitynet_scale: per-sample scales of the two identity paths, [B]
        (`drop_paths`); None: 1 for every sample.
    """

    latents: Tensor
    ids: Tensor
    embeds: Optional[Tensor] = None
    kps_images: Optional[Tensor] = None
    adapter_scale: Optional[Tensor] = None
    identitynet_scale: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.latents)

    def rows(self, index) -> "TrainingBatch":
        """The rows `index` (a slice or an index tensor) of every field."""
        return TrainingBatch(**{f.name: _rows(getattr(self, f.name), index) for f in fields(self)})

    def as_dict(self) -> dict:
        """The tensors by field name, None fields left out (for `torch.save`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _rows(x: Optional[Tensor], index) -> Optional[Tensor]:
    return None if x is None else x[index]


def drop_captions(ids: Tensor, empty_ids: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Replace each row of `ids` [B, L] by `empty_ids` [L] with probability p (for classifier-free guidance)."""
    drop = torch.rand(len(ids), generator=generator) < p  # [B]
    return torch.where(drop[:, None], empty_ids[None].to(ids.device), ids)


def drop_identities(embeds: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Zero each row of `embeds` [B, E] with probability p (the zero vector is the negative identity)."""
    keep = torch.rand(len(embeds), generator=generator) >= p  # [B]
    return embeds * keep[:, None].to(embeds.device)


def drop_conditions(batch: TrainingBatch, empty_ids: Tensor, caption_p: float, identity_p: float,
                    generator: torch.Generator) -> TrainingBatch:
    """The batch with captions dropped (probability `caption_p`), then identities (`identity_p`, if any)."""
    batch = replace(batch, ids=drop_captions(batch.ids, empty_ids, caption_p, generator))
    if batch.embeds is None:
        return batch
    return replace(batch, embeds=drop_identities(batch.embeds, identity_p, generator))


def drop_paths(batch: TrainingBatch, adapter_only: float, identitynet_only: float,
               generator: torch.Generator) -> TrainingBatch:
    """The batch with one identity path switched off per sample: IdentityNet (scale 0) with probability
    `adapter_only`, else the adapter with probability `identitynet_only`; the other samples train both.

    Trained together, IdentityNet learns identity first and the adapter adds little of its own; samples
    with one path off make each path carry identity alone (and train exactly the ablation rows
    "adapter only" and "IdentityNet only"). Both probabilities 0: the batch unchanged, no number drawn.
    """
    if adapter_only < 0 or identitynet_only < 0 or adapter_only + identitynet_only > 1:
        raise InputError(f"adapter_only ({adapter_only}) and identitynet_only ({identitynet_only}) are probabilities "
                         "of disjoint events: each >= 0 and their sum <= 1")
    if adapter_only == identitynet_only == 0:
        return batch
    u = torch.rand(len(batch), generator=generator)  # [B]
    identitynet_off = u < adapter_only
    adapter_off = (u >= adapter_only) & (u < adapter_only + identitynet_only)
    return replace(batch, adapter_scale=(~adapter_off).float(), identitynet_scale=(~identitynet_off).float())


def min_snr_v_loss(v_pred: Tensor, v_target: Tensor, snr: Tensor, gamma: Optional[float] = 5.0) -> Tensor:
    """L = mean_b[ min(SNR_b, gamma) / (SNR_b + 1) * mean |v_pred - v|^2 ]  (min-SNR weighting for v-prediction).

    gamma = None drops the weighting (every timestep weighs 1: the plain v-prediction loss). min-SNR gives
    the noisiest steps, where SNR -> 0, a weight near 0; the plain loss gives them the same weight as any other.
    :param v_pred: shape [B, C, h, w]
    :param v_target: shape [B, C, h, w]
    :param snr: shape [B]
    """
    per_sample = F.mse_loss(v_pred, v_target, reduction="none").flatten(1).mean(1)  # [B]
    if gamma is None:
        return per_sample.mean()
    return (snr.clamp(max=gamma) / (snr + 1) * per_sample).mean()


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, draws: int = 1) -> Tensor:
    """n training timesteps, each the noisiest of `draws` uniform draws from [0, num_train_timesteps).

    draws = 1 is the usual uniform sampling. draws = k gives t / T the density k (t / T)^(k - 1): more of
    the noisy steps, where a condition (the identity) decides what the image becomes and the noisy latent
    does not yet; the per-step weighting (`min_snr_v_loss`) is unchanged.
    """
    if draws < 1:
        raise InputError(f"timestep draws must be >= 1 (1 = uniform timesteps), got {draws}")
    t = torch.randint(0, num_train_timesteps, (draws, n), generator=generator)  # [draws, n]
    return t.amax(0)


def clean_latents(noisy: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v: the clean latents a v-prediction implies.

    :param noisy: x_t, shape [B, C, h, w]
    :param v: the predicted velocity, shape [B, C, h, w]
    :param alpha_bar: shape [B]
    """
    a = alpha_bar.view(-1, 1, 1, 1).to(noisy.dtype)
    return a.sqrt() * noisy - (1 - a).sqrt() * v


def identity_distance(embeddings: Tensor, targets: Tensor) -> Tensor:
    """mean over rows with a target identity of 1 - cos(embeddings_b, targets_b); 0 if no row has one.

    :param embeddings: raw recogniser embeddings, shape [B, E]
    :param targets: the identity embeddings conditioned on, shape [B, E]; a zero row (dropped identity) is skipped
    """
    has_identity = targets.norm(dim=1) > 0  # [B]
    distance = 1 - F.cosine_similarity(embeddings, targets, dim=1)  # [B]
    return (distance * has_identity).sum() / has_identity.sum().clamp(min=1)


@dataclass(frozen=True)
class IdentityTerm:
    """The identity term of the objective: `weight` * `identity_distance` between the conditioning
    recogniser's embedding of the decoded clean-latent prediction and the identity conditioned on.

    :param vae: the frozen autoencoder (decodes `latents / scaling_factor`).
    :param recognizer: the frozen conditioning recogniser (reads images in [-1, 1]).
    """

    vae: nn.Module
    recognizer: nn.Module
    weight: float

    def __call__(self, clean: Tensor, targets: Tensor) -> Tensor:
        images = self.vae.decode(clean / self.vae.config.scaling_factor).sample  # [b, 3, H, W]
        return self.weight * identity_distance(self.recognizer(images), targets)


def diffusion_loss(predict: Callable[[Tensor, Tensor], Tensor], scheduler, latents: Tensor,
                   generator: torch.Generator, gamma: Optional[float] = 5.0, shard: Shard = Shard(),
                   timestep_draws: int = 1, clean_loss: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Noise `latents` [B, 4, h, w] at random timesteps and score `predict(x_t, t)` with `min_snr_v_loss`.

    Noise and timesteps are drawn on the CPU with `generator` for the whole (global) batch, then this
    process's `shard` of it is scored (the same numbers on every device and process count).
    :param timestep_draws: each timestep is the noisiest of this many uniform draws (`sample_timesteps`).
    :param clean_loss: if given, added to the loss: `clean_loss(x_0)` of the predicted clean latents
        (`clean_latents`), e.g. an `IdentityTerm` on the batch's identities.
    """
    noise = shard.take(torch.randn(latents.shape, generator=generator))
    t = sample_timesteps(len(latents), scheduler.config.num_train_timesteps, generator, timestep_draws)
    alpha_bar = shard.take(scheduler.alphas_cumprod[t])  # [b]
    t, latents = shard.take(t), shard.take(latents)
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t)
    v = predict(noisy, t)
    loss = min_snr_v_loss(v, target, alpha_bar / (1 - alpha_bar), gamma)
    return loss if clean_loss is None else loss + clean_loss(clean_latents(noisy, v, alpha_bar))


def denoising_loss(pipe, batch: TrainingBatch, scheduler, generator: torch.Generator, gamma: Optional[float] = 5.0,
                   shard: Shard = Shard(), timestep_draws: int = 1, identity: Optional[IdentityTerm] = None) -> Tensor:
    """The objective of `pipe` (an `InstantIDPipeline`, with or without adapter and IdentityNet) on `batch`.

    :param batch: the global batch (already dropped); this process scores its `shard` of it.
    :param scheduler: the training (forward-process) scheduler, e.g. `base.training_scheduler()`.
    :param timestep_draws: see `sample_timesteps` (1: uniform timesteps).
    :param identity: if given (and the batch has identities), the identity term is added.
    """
    text = pipe.text_encoder(shard.take(batch.ids)).last_hidden_state  # [b, L, C]
    kps = shard.take(batch.kps_images)
    kps = None if kps is None else kps.float() / 255  # [b, 3, H, W] in [0, 1]
    scales = {name: shard.take(getattr(batch, name)) for name in ("adapter_scale", "identitynet_scale")
              if getattr(batch, name) is not None}
    embeds = shard.take(batch.embeds)
    cond = pipe.tensor_conditioning(text, embeds, kps, **scales)
    clean_loss = None if identity is None or embeds is None else (lambda clean: identity(clean, embeds))
    return diffusion_loss(lambda x, t: pipe.predict_noise(x, t, cond), scheduler, batch.latents, generator, gamma,
                          shard, timestep_draws, clean_loss)
