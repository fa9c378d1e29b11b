"""Stage `inspector`: the CNN that reads keypoints and caption attributes off a face (evaluation only).

Trained on renders of training identities, where the renderer's ground truth gives both answers;
the report gives its keypoint error and attribute accuracy on held-out renders.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..evaluate import caption_accuracy, keypoint_distances
from ..inspector import ATTRIBUTES, FaceInspector, InspectorConfig, inspect, save_inspector
from ..objective import Shard
from ..world import HELDOUT_IDS, TRAIN_IDS, images_to_tensor, random_samples
from .loop import LoopSettings, is_main_process, train_loop
from .report import loss_summary, write_report


def inspector_targets(samples: Sequence) -> dict:
    """Ground truth of rendered samples: keypoints [N, 5, 2] and one class index [N] per attribute."""
    out = {"kps": torch.from_numpy(np.stack([s.kps for s in samples])).float()}
    for name, values in ATTRIBUTES.items():
        out[name] = torch.tensor([values.index(getattr(s.caption, name)) for s in samples])
    return out


def inspector_loss(outputs: dict, targets: dict, image_size: int) -> Tensor:
    """Smooth-L1 on keypoints (in fractions of the image) + the sum of the attribute cross-entropies."""
    loss = F.smooth_l1_loss(outputs["kps"] / image_size, targets["kps"] / image_size, beta=0.02) * 10
    return loss + sum(F.cross_entropy(outputs[name], targets[name]) for name in ATTRIBUTES)


def train_inspector(config: InspectorConfig, progress: bool = True) -> tuple[FaceInspector, list]:
    """Train on `config.train_images` renders of training identities (random pose and caption)."""
    samples = random_samples(TRAIN_IDS, config.train_images, seed=config.seed)
    images, targets = images_to_tensor([s.image for s in samples]), inspector_targets(samples)
    torch.manual_seed(config.seed)
    model = FaceInspector(config)

    def loss_fn(generator: torch.Generator, shard: Shard) -> Tensor:
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        batch = {k: shard.take(v[index]) for k, v in targets.items()}
        return inspector_loss(model(shard.take(images[index])), batch, config.image_size)

    settings = LoopSettings(config.steps, config.lr, weight_decay=1e-4, schedule="one_cycle", clip_grad_norm=None)
    state = train_loop("inspector", model, loss_fn, settings, seed=config.seed, progress=progress)
    return model.eval(), state.losses


def train_inspector_stage(config: InspectorConfig, out: Path, progress: bool = True) -> dict:
    """Train the inspector, save `out/inspector.safetensors`, report it on held-out renders."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, losses = train_inspector(config, progress=progress)
    seconds = time.perf_counter() - start
    if is_main_process():
        save_inspector(model, out / "inspector.safetensors")
    held = random_samples(HELDOUT_IDS, 512, seed=3)
    read = inspect(model, images_to_tensor([s.image for s in held]))
    requested = torch.from_numpy(np.stack([s.kps for s in held]))
    return write_report(out, "inspector", {
        "config": asdict(config), "train_seconds": round(seconds, 1), "loss": loss_summary(losses),
        "heldout_renders": len(held),
        "heldout_keypoint_error_px": round(float(keypoint_distances(read["kps"], requested).mean()), 3),
        "heldout_caption_accuracy": caption_accuracy(read, [s.caption for s in held])})
