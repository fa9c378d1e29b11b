"""Training entry points for the miniature, one per stage.

    python -m instantid_lab.miniature.train encoders --preset quick --out data/miniature

Stages: `encoders` (the conditioning and the evaluating face recogniser). Each writes safetensors
weights plus a JSON record of how they were trained and what they measured.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .recognizer import (
    FaceRecognizer, RecognizerConfig, config_dict, embed_images, images_to_tensor,
    render_training_set, train_recognizer, verification_scores,
)
from .world import HELDOUT_IDS, Caption, Pose, render_id


@dataclass
class EncoderPreset:
    identities: int
    renders_per_identity: int
    steps: int
    batch_size: int
    heldout_identities: int = 48
    heldout_renders: int = 10

    @classmethod
    def named(cls, name: str) -> "EncoderPreset":
        presets = {"quick": cls(100, 10, 150, 64), "full": cls(1000, 20, 800, 128)}
        return presets[name]


def heldout_set(n_identities: int, renders: int, seed: int = 12345):
    """Renders of the first `n_identities` held-out identities: (images [N,3,32,32], labels [N])."""
    rng = np.random.default_rng(seed)
    ids = list(HELDOUT_IDS)[:n_identities]
    images = [render_id(i, Pose.sample(rng), Caption.sample(rng)).image for i in ids for _ in range(renders)]
    return images_to_tensor(images), torch.arange(n_identities).repeat_interleave(renders)


def train_encoders(preset: EncoderPreset, out: Path, progress: bool = True) -> dict:
    """Train the conditioning and the evaluating recogniser; save them to `out`; return their metrics."""
    out.mkdir(parents=True, exist_ok=True)
    images, labels = render_training_set(preset.identities, preset.renders_per_identity, seed=0)
    held_x, held_y = heldout_set(preset.heldout_identities, preset.heldout_renders)
    report = {}
    for role, config in (("conditioner", RecognizerConfig.conditioner()), ("evaluator", RecognizerConfig.evaluator())):
        start = time.perf_counter()
        model, losses = train_recognizer(config, images, labels, preset.steps, preset.batch_size, progress=progress)
        seconds = time.perf_counter() - start
        metrics = verification_scores(embed_images(model, held_x), held_y)
        save_file(model.state_dict(), str(out / f"recognizer_{role}.safetensors"),
                  metadata={"config": json.dumps(config_dict(config))})
        report[role] = {"config": config_dict(config), "train_seconds": round(seconds, 1),
                        "final_loss": float(np.mean(losses[-20:])), "heldout": metrics}
    report["preset"] = preset.__dict__
    (out / "recognizers.json").write_text(json.dumps(report, indent=2))
    return report


def load_recognizer(path: Path) -> FaceRecognizer:
    """A recogniser saved by `train_encoders` (config read from the file's metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    config["widths"] = tuple(config["widths"])
    model = FaceRecognizer(RecognizerConfig(**config))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["encoders"])
    parser.add_argument("--preset", default="quick", choices=["quick", "full"])
    parser.add_argument("--out", type=Path, default=Path("data/miniature"))
    args = parser.parse_args(argv)
    report = train_encoders(EncoderPreset.named(args.preset), args.out)
    print(json.dumps({k: v["heldout"] for k, v in report.items() if k != "preset"}, indent=2))


if __name__ == "__main__":
    main()
