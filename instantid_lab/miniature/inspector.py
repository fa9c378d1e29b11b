"""The miniature's face inspector: a small CNN that reads a generated face's keypoints and caption.

It scores the two things besides identity that InstantID must respect (issue: evaluation on held-out
identities): *keypoint adherence* (where the generated face's eyes, nose and mouth corners are,
compared with the keypoints that were requested) and *caption adherence* (background, expression,
accessory and drawing style, compared with the prompt). It is trained on rendered faces, where the
renderer's own ground truth gives both answers, and never sees generated images in training.

One trunk, five heads: 10 keypoint coordinates (fractions of the image size) and one classifier per
caption attribute.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ModelFilesMissingError
from .recognizer import conv_trunk
from .world import ACCESSORIES, BACKGROUNDS, EXPRESSIONS, STYLES

#: Caption attribute -> its possible values, in the order of the classifier's logits.
ATTRIBUTES = {"background": BACKGROUNDS, "expression": EXPRESSIONS, "accessory": ACCESSORIES, "style": STYLES}


@dataclass(frozen=True)
class InspectorConfig:
    """Sizes and training settings of the inspector."""

    widths: tuple = (32, 64, 128)
    image_size: int = 32
    seed: int = 2
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    train_images: int = 12000

    @classmethod
    def quick(cls) -> "InspectorConfig":
        return cls(widths=(8, 16), steps=30, batch_size=32, train_images=256)

    @classmethod
    def full(cls) -> "InspectorConfig":
        return cls()


class FaceInspector(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] -> {"kps": [B, 5, 2] in pixels, attribute name: logits [B, n_values]}.

    The trunk keeps the spatial layout (the last feature map is flattened, not pooled) because the
    keypoints are positions.
    """

    def __init__(self, config: InspectorConfig = InspectorConfig()):
        super().__init__()
        self.config = config
        self.features = conv_trunk(config.widths)
        side = config.image_size // 2 ** len(config.widths)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(config.widths[-1] * side * side, 256), nn.SiLU())
        self.kps = nn.Linear(256, 10)
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: Tensor) -> dict:
        h = self.hidden(self.features(images))  # [B, 256]
        kps = (self.kps(h).view(-1, 5, 2) + 0.5) * self.config.image_size  # [B, 5, 2] pixels
        return {"kps": kps, **{name: head(h) for name, head in self.heads.items()}}


@torch.no_grad()
def inspect(model: FaceInspector, images: Tensor, batch_size: int = 512) -> dict:
    """Read faces: {"kps": [N, 5, 2] pixels, attribute name: list of predicted values}.

    :param images: shape [N, 3, H, W] in [-1, 1]
    """
    model.eval()
    parts = [model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    out = {"kps": torch.cat([p["kps"] for p in parts])}
    for name, values in ATTRIBUTES.items():
        out[name] = [values[k] for k in torch.cat([p[name] for p in parts]).argmax(1).tolist()]
    return out


def save_inspector(model: FaceInspector, path: Path) -> None:
    """Save the weights as float16 (half the bytes; it only scores images) with its config as metadata."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(model.config))})


def load_inspector(path: Path) -> FaceInspector:
    """An inspector saved by `save_inspector` (its config is read from the file's metadata)."""
    path = Path(path)
    if not path.exists():
        raise ModelFilesMissingError(f"{path} is missing: run `python -m instantid_lab.miniature.train inspector`")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    config["widths"] = tuple(config["widths"])
    model = FaceInspector(InspectorConfig(**config))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return model.eval()
