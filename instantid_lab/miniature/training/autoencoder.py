"""Stage `autoencoder`: images <-> latents, in two resumable phases.

(1) Encoder and decoder jointly (`config.steps`), after which the latent scale is fixed to
1 / std(latents); (2) the decoder alone on the frozen encoder's posterior means
(`config.decoder_steps`): the latents, hence everything later trained on them, stay exactly as they
are while reconstructions sharpen.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..autoencoder import AutoencoderConfig, build_autoencoder, latent_std, psnr, reconstruction_loss, save_vae
from ..objective import Shard
from ..world import HELDOUT_IDS, TRAIN_IDS
from .data import render_images
from .loop import LoopSettings, LoopState, is_main_process, train_loop
from .report import follower, loss_summary, unfinished, write_report


def train_autoencoder(config: AutoencoderConfig, out: Path, stop_after: Optional[int] = None,
                      progress: bool = True) -> dict:
    """Train the autoencoder, set its latent scaling factor, fine-tune its decoder, save it to `out/vae`.

    :return: the report, or `report.unfinished` of the phase `stop_after` interrupted.
    """
    images = render_images(TRAIN_IDS, config.train_images, seed=1)
    vae = build_autoencoder(config)

    def loss_fn(generator: torch.Generator, shard: Shard) -> torch.Tensor:
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        return reconstruction_loss(vae, images[index], config.kl_weight, generator, shard)

    settings = LoopSettings(config.steps, config.lr, warmup=config.steps // 20, weight_decay=1e-4,
                            checkpoint_every=config.checkpoint_every)
    joint = train_loop("autoencoder", vae, loss_fn, settings, out, stop_after=stop_after, progress=progress)
    if not joint.finished:
        return unfinished(joint)
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae, images[:1024]))
    held = render_images(HELDOUT_IDS, 256, seed=2)
    joint_psnr = psnr(vae, held)
    decoder = finetune_decoder(vae, config, out, progress=progress)
    if not decoder.finished:
        return unfinished(decoder)
    if not is_main_process():
        return follower(decoder)
    save_vae(vae, out)
    return write_report(out, "autoencoder", {
        "config": asdict(config), "steps": joint.step, "train_seconds": round(joint.seconds, 1),
        "loss": loss_summary(joint.losses), "scaling_factor": vae.config.scaling_factor,
        "heldout_psnr_db_after_joint_training": round(joint_psnr, 2),
        "decoder_steps": decoder.step, "decoder_train_seconds": round(decoder.seconds, 1),
        "decoder_loss": loss_summary(decoder.losses),
        "heldout_psnr_db": round(psnr(vae, held), 2), "train_psnr_db": round(psnr(vae, images[:256]), 2)})


def finetune_decoder(vae, config: AutoencoderConfig, out: Path, progress: bool = True) -> LoopState:
    """Phase 2: L1 + MSE of decode(posterior mean) with the encoder frozen."""
    images = render_images(TRAIN_IDS, config.decoder_train_images, seed=11)
    vae.requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)

    def loss_fn(generator: torch.Generator, shard: Shard) -> torch.Tensor:
        index = torch.randint(len(images), (config.decoder_batch_size,), generator=generator)
        recon, target = vae.decode(shard.take(means[index])).sample, shard.take(images[index])
        return F.l1_loss(recon, target) + F.mse_loss(recon, target)

    settings = LoopSettings(config.decoder_steps, config.decoder_lr, warmup=min(50, config.decoder_steps // 10),
                            weight_decay=1e-4, checkpoint_every=config.checkpoint_every)
    state = train_loop("autoencoder_decoder", vae, loss_fn, settings, out, progress=progress)
    vae.requires_grad_(False)
    return state
