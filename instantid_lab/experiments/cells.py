"""One cell of an ablation grid in the miniature: what it asks for, its generation and its scores.

A cell (`grid.Cell`) is a setting (`grid.Knobs`) x identity k x prompt p x seed. In the miniature:

- identity k's *reference* render -> its identity embedding (the conditioning recogniser);
- identity k's *target* render p -> the requested keypoints (or the reference's, or a turned copy of
  them: `Knobs.pose`) and the caption, the prompt (or "": `Knobs.prompt`);
- (seed, k, p) -> the starting noise (`cell_noise`), the same in every setting.

`generate` runs many cells that share one call (`Knobs.call_key`) as one batched pipeline call, with
per-sample scales, prompts, identities, keypoint images and noise; `score` judges them with
`metrics.MiniatureScorer` (the evaluating recogniser and the inspector, which did not condition).
Cells and knobs are read by attribute, so this module needs nothing from `grid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..data import MINIATURE_DIR
from ..errors import InputError
from ..keypoints import rotate_kps, translate_kps
from ..miniature import demo
from ..miniature.evaluate import HeldoutTask, keypoint_errors
from ..miniature.instantid import keypoint_image, load_miniature
from ..miniature.recognizer import embed_images, load_recognizer
from ..miniature.world import images_to_tensor
from ..pipeline import ExtraControlNet
from ..types import PathLike
from .metrics import MiniatureScorer, Request

SIZE = 32  # the miniature's images are 32 x 32 px


@dataclass
class Models:
    """The miniature's pipeline, its conditioning recogniser and the scorer (judges that did not condition)."""

    pipe: Any
    conditioner: Any
    scorer: MiniatureScorer
    extra: Any = None

    @classmethod
    def miniature(cls, folder: Optional[PathLike] = None) -> "Models":
        folder = Path(folder) if folder is not None else MINIATURE_DIR
        pipe = load_miniature(folder)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, load_recognizer(folder / "recognizer_conditioner.safetensors"), MiniatureScorer(folder))

    def extra_controlnet(self):
        """The untrained extra ControlNet (`demo.random_controlnet`), built on first use."""
        if self.extra is None:
            channels = self.pipe.controlnet.config.conditioning_embedding_out_channels
            self.extra = demo.random_controlnet(self.pipe.unet, channels, seed=7)
        return self.extra


@dataclass
class GridTask:
    """The renders behind a grid: K references (and their identity embeddings [K, E]) and P x K targets."""

    ids: list
    references: list
    targets: list  # targets[p][k]: identity k's target render p
    embeddings: torch.Tensor

    @classmethod
    def make(cls, identities: int, prompts: int, conditioner, task_seed: int = 0) -> "GridTask":
        """Identity k's reference is `HeldoutTask.make(K, task_seed)`'s; its target p is that of
        `HeldoutTask.make(K, task_seed + p)`."""
        tasks = [HeldoutTask.make(identities, task_seed + p) for p in range(prompts)]
        references = tasks[0].references
        with torch.no_grad():
            embeddings = embed_images(conditioner, images_to_tensor([s.image for s in references]))  # [K, E]
        return cls(tasks[0].ids, references, [t.targets for t in tasks], embeddings)


@dataclass
class CellInputs:
    """What the pipeline and the judges get for one cell."""

    prompt: str
    embedding: torch.Tensor
    keypoint_image: Image.Image
    kps: np.ndarray  # the requested keypoints [5, 2]
    reference_kps: np.ndarray
    caption: Any
    edges: Image.Image  # the extra ControlNet's image: the target's edge map


def turned_kps(kps: np.ndarray, degrees: float = 25.0, shift: float = 5.0) -> np.ndarray:
    """A pose the face does not have: `kps` [5, 2] rotated by `degrees` towards and past upright (about
    their centroid) and moved `shift` px sideways towards and past the image centre."""
    eyes = kps[1] - kps[0]
    roll = math.degrees(math.atan2(eyes[1], eyes[0]))        # image coordinates: y down
    turned = rotate_kps(kps, degrees if roll >= 0 else -degrees)  # counter-clockwise on screen lowers the angle
    return translate_kps(turned, shift if kps[:, 0].mean() < SIZE / 2 else -shift, 0.0)


def cell_inputs(task: GridTask, cell) -> CellInputs:
    knobs, reference = cell.setting.knobs, task.references[cell.identity]
    target = task.targets[cell.prompt][cell.identity]
    kps = {"target": target.kps, "reference": reference.kps, "turned": turned_kps(reference.kps)}[knobs.pose]
    drawn = keypoint_image(kps, SIZE) if knobs.keypoint_image == "drawn" else Image.new("RGB", (SIZE, SIZE))
    prompt = target.caption.text() if knobs.prompt == "caption" else ""
    edges = Image.fromarray(cv2.Canny(np.asarray(target.image), 100, 200)).convert("RGB")
    return CellInputs(prompt, task.embeddings[cell.identity], drawn, np.asarray(kps, np.float32), reference.kps,
                      target.caption, edges)


def cell_noise(cell, shape: tuple) -> torch.Tensor:
    """The starting noise of (seed, identity, prompt): the same in every setting."""
    seed = int(np.random.SeedSequence([cell.seed, cell.identity, cell.prompt]).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- generating and scoring


@torch.no_grad()
def generate(models: Models, task: GridTask, cells: Sequence) -> np.ndarray:
    """One denoising call for cells that share `Knobs.call_key`: images [N, H, W, 3] in [0, 1]."""
    pipe, knobs = models.pipe, cells[0].setting.knobs
    if any(c.setting.knobs.call_key() != knobs.call_key() for c in cells):
        raise InputError("cells of one call must share window, extra ControlNet, negative identity, steps, guidance")
    inputs = [cell_inputs(task, c) for c in cells]
    per_sample = lambda name: torch.tensor([float(getattr(c.setting.knobs, name)) for c in cells])  # [N]
    f = pipe.vae_scale_factor
    noise = torch.stack([cell_noise(c, (pipe.unet.config.in_channels, SIZE // f, SIZE // f)) for c in cells])
    extras = [] if knobs.extra_controlnet <= 0 else [
        ExtraControlNet(models.extra_controlnet(), [i.edges for i in inputs], per_sample("extra_controlnet"))]
    return pipe([i.prompt for i in inputs], [i.embedding for i in inputs], [i.keypoint_image for i in inputs],
                adapter_scale=per_sample("adapter_scale"), identitynet_scale=per_sample("identitynet_scale"),
                num_inference_steps=knobs.num_inference_steps, guidance_scale=knobs.guidance_scale,
                control_guidance_start=knobs.control_guidance_start, control_guidance_end=knobs.control_guidance_end,
                negative_identity=knobs.negative_identity, extra_controlnets=extras, height=SIZE, width=SIZE,
                latents=noise.to(pipe.device, pipe.unet.dtype), output_type="np").images


@torch.no_grad()
def score(models: Models, task: GridTask, cells: Sequence, images: Sequence[Image.Image]) -> pd.DataFrame:
    """The judges' scores, one row per cell (rank-1 among all the grid's identities)."""
    inputs = [cell_inputs(task, c) for c in cells]
    requests = [Request(task.ids[c.identity], i.kps, i.prompt, i.caption) for c, i in zip(cells, inputs)]
    table = models.scorer.score(images, requests, gallery_ids=task.ids).drop(columns="face_detected")
    references = [i.reference_kps for i in inputs]
    table["reference_keypoint_error"] = keypoint_errors(models.scorer.inspector, images, references)
    table["caption_mean"] = table[[c for c in table if c.startswith("caption_") and c != "caption_all"]].mean(axis=1)
    return table
