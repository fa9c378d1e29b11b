"""Stage `base`: the caption-conditioned base model (text encoder + UNet), trained jointly, then frozen.

The loss is `objective.denoising_loss` of the pipeline without adapter and IdentityNet, i.e. the
plain text-to-image model; what ships is the EMA of the weights. The report samples random captions
with the same pipeline and says how often the background matches.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ...images import image_sheet
from ...pipeline import InstantIDPipeline
from ..autoencoder import load_vae
from ..base import (GUIDANCE_SCALE, SAMPLING_STEPS, BaseConfig, build_text_encoder, build_unet, caption_tokenizer,
                    sampling_scheduler, save_base, tokenize, training_scheduler)
from ..evaluate import background_of, caption_accuracy
from ..inspector import inspect, load_inspector
from ..objective import Shard, denoising_loss, drop_conditions
from ..world import Caption
from .data import cached, caption_batch
from .loop import LoopSettings, is_main_process, train_loop, training_device
from .report import follower, loss_summary, unfinished, write_report


def train_base(config: BaseConfig, out: Path, stop_after: Optional[int] = None, progress: bool = True) -> dict:
    """Train the text encoder + UNet on the autoencoder's latents in `out`; save the EMA weights to `out`.

    :return: the report, or `report.unfinished` when `stop_after` interrupted the run.
    """
    vae, tokenizer = load_vae(out), caption_tokenizer(config.max_length)
    data = cached(Path(out) / "base_data.pt", lambda: caption_batch(vae, tokenizer, config.train_images, seed=3)[0])
    pipe = InstantIDPipeline(vae, build_text_encoder(config, tokenizer), None, tokenizer, None, build_unet(config, vae.config.latent_channels),
                             None, sampling_scheduler()).to(training_device())
    model = nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    scheduler, empty = training_scheduler(), tokenize(tokenizer, [""])[0]

    def loss_fn(generator: torch.Generator, shard: Shard) -> torch.Tensor:
        index = torch.randint(len(data), (config.batch_size,), generator=generator)
        batch = drop_conditions(data.rows(index), empty, config.caption_dropout, 0.0, generator)
        return denoising_loss(pipe, batch, scheduler, generator, config.min_snr_gamma, shard)

    settings = LoopSettings(config.steps, config.lr, config.warmup, ema_decay=config.ema_decay,
                            checkpoint_every=config.checkpoint_every)
    state = train_loop("base", model, loss_fn, settings, out, stop_after=stop_after, progress=progress)
    if not state.finished:
        return unfinished(state)
    if not is_main_process():
        return follower(state)
    save_base(pipe, out)
    return write_report(out, "base", {
        "config": asdict(config), "steps": state.step, "train_seconds": round(state.seconds, 1),
        "loss": loss_summary(state.losses), **evaluate_base(pipe, out, config.eval_captions)})


@torch.no_grad()
def evaluate_base(pipe: InstantIDPipeline, out: Path, n: int = 48, steps: int = SAMPLING_STEPS,
                  guidance: float = GUIDANCE_SCALE) -> dict:
    """Sample `n` random captions; report how often the background matches (and, when `out` holds the
    inspector, how often each caption attribute and all four are right); save `out/base_samples.png`."""
    captions = [Caption.sample(np.random.default_rng([7, i])) for i in range(n)]
    pipe.set_progress_bar_config(disable=True)
    images = pipe([c.text() for c in captions], num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1  # [n, 3, 32, 32]
    image_sheet(images, columns=8, scale=2).save(Path(out) / "base_samples.png")
    hits = [got == c.background for got, c in zip(background_of(images), captions)]
    report = {"background_accuracy": float(np.mean(hits)), "evaluated_captions": n,
              "sampler": f"DDIM {steps} steps, guidance {guidance}"}
    if (Path(out) / "inspector.safetensors").exists():
        read = inspect(load_inspector(Path(out) / "inspector.safetensors"), images)
        report["caption_accuracy"] = caption_accuracy(read, captions)
    return report
