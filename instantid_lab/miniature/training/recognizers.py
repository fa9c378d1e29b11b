"""Stage `recognizers`: the conditioning and the evaluating face recogniser (ArcFace loss).

Both train on the same pre-rendered faces of training identities; they differ in width and seed
(`RecognizerConfig.conditioner()` / `.evaluator()`). The report gives each one's verification
scores on held-out identities.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..recognizer import (FaceRecognizer, RecognizerConfig, arcface_logits, config_dict, embed_images, save_recognizer,
                          verification_scores)
from ..objective import Shard
from .data import labelled_renders
from .loop import LoopSettings, is_main_process, train_loop
from .report import write_report


@dataclass(frozen=True)
class RecognizerPreset:
    """How many renders both recognisers train on, and for how long."""

    identities: int = 1000
    renders_per_identity: int = 20
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    heldout_identities: int = 48
    heldout_renders: int = 10

    @classmethod
    def quick(cls) -> "RecognizerPreset":
        return cls(identities=100, renders_per_identity=10, steps=150, batch_size=64)

    @classmethod
    def full(cls) -> "RecognizerPreset":
        return cls()


class ArcFaceTraining(nn.Module):
    """A recogniser and its ArcFace class centres [K, E]: what the ArcFace loss trains."""

    def __init__(self, recognizer: FaceRecognizer, n_classes: int):
        super().__init__()
        self.recognizer = recognizer
        self.centres = nn.Parameter(torch.randn(n_classes, recognizer.config.embedding_dim))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the ArcFace logits of `images` [B, 3, H, W] for their `labels` [B]."""
        return F.cross_entropy(arcface_logits(self.recognizer(images), self.centres, labels), labels)


def train_recognizer(config: RecognizerConfig, images: torch.Tensor, labels: torch.Tensor, steps: int = 1000,
                     batch_size: int = 256, lr: float = 2e-3, progress: bool = True) -> tuple[FaceRecognizer, list]:
    """Train a `FaceRecognizer` with the ArcFace loss on pre-rendered faces; return it and its losses."""
    torch.manual_seed(config.seed)
    model = ArcFaceTraining(FaceRecognizer(config), int(labels.max()) + 1)

    def loss_fn(generator: torch.Generator, shard: Shard) -> torch.Tensor:
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        return model.loss(shard.take(images[index]), shard.take(labels[index]))

    settings = LoopSettings(steps, lr, weight_decay=1e-4, schedule="one_cycle", clip_grad_norm=None)
    state = train_loop("recognizer", model, loss_fn, settings, seed=config.seed, progress=progress)
    return model.recognizer.eval(), state.losses


def train_recognizers(preset: RecognizerPreset, out: Path, progress: bool = True) -> dict:
    """Train the conditioning and the evaluating recogniser; save them to `out`; return their report."""
    out.mkdir(parents=True, exist_ok=True)
    images, labels = labelled_renders(preset.identities, preset.renders_per_identity, seed=0)
    held_x, held_y = labelled_renders(preset.heldout_identities, preset.heldout_renders, seed=12345, heldout=True)
    report = {}
    for role, config in (("conditioner", RecognizerConfig.conditioner()), ("evaluator", RecognizerConfig.evaluator())):
        start = time.perf_counter()
        model, losses = train_recognizer(config, images, labels, preset.steps, preset.batch_size, preset.lr, progress)
        seconds = time.perf_counter() - start
        if is_main_process():
            save_recognizer(model, out / f"recognizer_{role}.safetensors")
        report[role] = {"config": config_dict(config), "train_seconds": round(seconds, 1),
                        "final_loss": float(np.mean(losses[-20:])),
                        "heldout": verification_scores(embed_images(model, held_x), held_y)}
    return write_report(out, "recognizers", {**report, "preset": asdict(preset)})
