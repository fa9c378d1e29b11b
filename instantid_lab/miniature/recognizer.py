"""Toy face recognisers for the miniature: small CNNs trained with an additive angular margin (ArcFace).

The miniature needs two of them, like the real kit: one whose embedding conditions generation (the
role antelopev2 plays for InstantID) and a *different* one that only evaluates identity
preservation (the role an independent face model plays in later papers' metrics). They differ in
seed and width (`RecognizerConfig.conditioner()` vs `.evaluator()`).

ArcFace loss (Deng et al. 2019): with unit embedding x and unit class centres W_j,
cos(theta_j) = W_j . x; the logit of the true class y becomes s * cos(theta_y + m), the others
s * cos(theta_j); then ordinary cross-entropy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelFilesMissingError


@dataclass
class RecognizerConfig:
    """A small CNN: conv blocks of `widths`, each halving the resolution, then a linear embedding."""

    widths: tuple = (32, 64, 128)
    embedding_dim: int = 64
    image_size: int = 32
    seed: int = 0

    @classmethod
    def conditioner(cls) -> "RecognizerConfig":
        return cls(widths=(32, 64, 128), embedding_dim=64, seed=0)

    @classmethod
    def evaluator(cls) -> "RecognizerConfig":
        return cls(widths=(24, 48, 96, 128), embedding_dim=64, seed=1)

    @classmethod
    def tiny(cls) -> "RecognizerConfig":
        return cls(widths=(8, 16), embedding_dim=16, seed=0)


def conv_trunk(widths: Sequence[int]) -> nn.Sequential:
    """Per width: two 3x3 conv + BatchNorm + SiLU, then 2x max-pooling; [B, 3, H, W] -> [B, widths[-1], H/2^n, W/2^n]."""
    blocks, in_ch = [], 3
    for width in widths:
        blocks += [nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.SiLU(),
                   nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.SiLU(), nn.MaxPool2d(2)]
        in_ch = width
    return nn.Sequential(*blocks)


class FaceRecognizer(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] -> raw embedding [B, embedding_dim] (compare with cosine)."""

    def __init__(self, config: RecognizerConfig = RecognizerConfig()):
        super().__init__()
        self.config = config
        self.features = conv_trunk(config.widths)
        self.embed = nn.Linear(config.widths[-1], config.embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)  # [B, C, h, w]
        return self.embed(x.mean(dim=(2, 3)))  # global average pool -> [B, C] -> [B, E]


def arcface_logits(embeddings: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor,
                   s: float = 30.0, m: float = 0.35) -> torch.Tensor:
    """ArcFace logits: s * cos(theta_y + m) for the true class, s * cos(theta_j) for the others.

    :param embeddings: shape [B, E] (any norm)
    :param centres: class centres, shape [K, E] (any norm)
    :param labels: class index per row, shape [B]
    """
    cos = F.normalize(embeddings, dim=1) @ F.normalize(centres, dim=1).T  # [B, K]
    theta_y = torch.acos(cos.gather(1, labels[:, None]).clamp(-1 + 1e-6, 1 - 1e-6))  # [B, 1]
    return s * cos.scatter(1, labels[:, None], torch.cos(theta_y + m))


@torch.no_grad()
def embed_images(model: FaceRecognizer, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Unit-norm embeddings [N, E] of images [N, 3, H, W] in [-1, 1]."""
    model.eval()
    out = [model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out), dim=1)


def verification_scores(embeddings: torch.Tensor, labels: torch.Tensor) -> dict:
    """Same-identity vs different-identity cosine statistics and TAR at FAR 1e-3 over all pairs."""
    sims = embeddings @ embeddings.T  # [N, N]
    same = labels[:, None] == labels[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    genuine, impostor = sims[same & upper], sims[~same & upper]
    threshold = torch.quantile(impostor, 1 - 1e-3) if impostor.numel() else torch.tensor(1.0)
    return {
        "same_mean": genuine.mean().item(),
        "different_mean": impostor.mean().item(),
        "tar_at_far_1e-3": (genuine > threshold).float().mean().item(),
        "threshold": threshold.item(),
    }


def config_dict(config: RecognizerConfig) -> dict:
    """`config` as a plain dict (for safetensors metadata and model cards)."""
    return asdict(config)


def save_recognizer(model: FaceRecognizer, path: Path) -> None:
    """Save the weights with the config as safetensors metadata (what `load_recognizer` reads)."""
    save_file(model.state_dict(), str(path), metadata={"config": json.dumps(config_dict(model.config))})


def load_recognizer(path: Path) -> FaceRecognizer:
    """A recogniser saved by `save_recognizer` (config read from the file's metadata), in eval mode.

    :raises ModelFilesMissingError: the file is missing (says how to train it).
    """
    path = Path(path)
    if not path.exists():
        raise ModelFilesMissingError(f"{path} is missing: run `python -m instantid_lab.miniature.train recognizers "
                                     f"--out {path.parent}` or restore data/miniature from the repository")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    config["widths"] = tuple(config["widths"])
    model = FaceRecognizer(RecognizerConfig(**config))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
