"""The three worlds a notebook runs in, behind one call.

    lab = open_world(MODE, ci=CI)   # MODE: "miniature" (default), "tiny" or "sdxl"
    face = lab.analyzer.get_face(reference)
    kps_image = lab.keypoint_image(face.kps, reference.size)
    image = lab.pipe(lab.prompt, face.embedding, kps_image, num_inference_steps=lab.steps,
                     guidance_scale=lab.guidance).images[0]

- "miniature": the trained 32-px miniature shipped in `data/miniature`, any machine: real identity
  and pose behaviour on cartoon faces; its face analyzer, its keypoint drawing, guidance 3.5.
- "tiny": random tiny SDXL-shaped weights, any machine: shapes and mechanics only.
- "sdxl": SDXL + the released InstantID weights placed locally (`loading.load_sdxl_instantid`),
  antelopev2 for faces; float16 on a GPU.

This module sits at the top of the package (beside `viz`, `widgets`, `notebooks`): it may use the
miniature and the tiny stack; nothing below imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .data import MINIATURE_DIR
from .errors import InputError
from .face_analysis import FaceAnalyzer, get_face_analyzer
from .keypoints import draw_kps, fit_size, resize_kps
from .loading import load_sdxl_instantid
from .miniature.base import GUIDANCE_SCALE, SAMPLING_STEPS
from .miniature.instantid import keypoint_image as miniature_keypoint_image
from .miniature.instantid import load_miniature
from .miniature.world import Caption
from .pipeline import InstantIDPipeline
from .tiny import tiny_pipeline
from .viz import draw_faces

MODES = ("miniature", "tiny", "sdxl")


def load_pipeline(mode: str = "miniature", embedding_dim: int = 512, seed: int = 0, **kwargs) -> InstantIDPipeline:
    """The pipeline of a world.

    :param mode: "miniature" (the trained miniature in `data/miniature`; `kwargs` may give `folder`),
        "tiny" (random weights, for looking at shapes) or "sdxl" (the real weights,
        `load_sdxl_instantid(**kwargs)`).
    :param embedding_dim: width of the identity embedding the tiny Resampler takes (the face
        analyzer's: 512 for insightface, 128 for dlib); "sdxl" always takes 512, "miniature" 64.
    :param seed: seeds the tiny weights.
    :raises ModelFilesMissingError: "sdxl" and the files are missing (the message lists them).
    """
    if mode == "miniature":
        return load_miniature(kwargs.get("folder", MINIATURE_DIR))
    if mode == "tiny":
        return tiny_pipeline("sdxl", seed=seed, embedding_dim=embedding_dim)
    if mode == "sdxl":
        return load_sdxl_instantid(**kwargs)
    raise InputError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass
class World:
    """A pipeline with the face analyzer and the settings that go with it.

    :param short_side, multiple: output images have this short side, each side a multiple of `multiple`.
    :param steps, guidance: the sampler's defaults in this world (fewer steps when `ci`).
    :param prompt, prompt_word: an example prompt, and one of its words to follow in attention maps.
    """

    mode: str
    pipe: InstantIDPipeline
    analyzer: FaceAnalyzer
    short_side: int
    multiple: int
    steps: int
    guidance: float
    prompt: str
    prompt_word: str

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the output for a reference of `image_size` (its aspect, this world's short side)."""
        if self.mode == "miniature":
            return self.short_side, self.short_side
        return fit_size(image_size, target_short=self.short_side, multiple=self.multiple)

    def keypoint_image(self, kps: np.ndarray, size: tuple[int, int]) -> Image.Image:
        """The keypoint image of `kps` [5, 2] (pixels of an image of `size` = (width, height)) at `size`."""
        if self.mode == "miniature":
            return miniature_keypoint_image(kps, size[0])
        return draw_kps(kps, size)

    def reference_keypoint_image(self, face, image_size: tuple[int, int]) -> tuple[np.ndarray, Image.Image]:
        """The reference face's keypoints moved to the output size, and their keypoint image."""
        size = self.output_size(image_size)
        kps = resize_kps(face.kps, image_size, size)
        return kps, self.keypoint_image(kps, size)

    def show_face(self, image, face) -> Image.Image:
        """`image` with the face's box and keypoints drawn (the miniature's 32-px images enlarged 8x)."""
        return draw_faces(image, face, enlarge=8 if self.mode == "miniature" else 1)


def open_world(mode: str = "miniature", ci: bool = False, device: Optional[str] = None, **kwargs) -> World:
    """The world a notebook runs in (see the module docstring).

    :param ci: short runs (fewer sampling steps), as the tests run the notebooks.
    :param device: where the pipeline runs (default: "cuda" if available, else "cpu").
    :param kwargs: for "sdxl", `load_sdxl_instantid`'s arguments (base=, instantid_dir=, ...).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if mode == "miniature":
        world = World(mode, load_pipeline("miniature").to(device), get_face_analyzer("miniature"), 32, 32,
                      10 if ci else SAMPLING_STEPS, GUIDANCE_SCALE,
                      Caption(background="green", expression="smiling").text(), "smiling")
    elif mode == "tiny":
        torch.set_num_threads(1)  # tiny models run fastest on one thread
        analyzer = get_face_analyzer("auto")
        world = World(mode, load_pipeline("tiny", embedding_dim=analyzer.embedding_dim), analyzer, 256, 64, 4, 5.0,
                      "a photo of an astronaut", "astronaut")
    elif mode == "sdxl":
        dtype = torch.float16 if device == "cuda" else torch.float32
        world = World(mode, load_pipeline("sdxl", torch_dtype=dtype, device=device, **kwargs),
                      get_face_analyzer("insightface"), 1024, 64, 8 if ci else 30, 5.0, "a photo of an astronaut",
                      "astronaut")
    else:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "sdxl":
        world.pipe.set_progress_bar_config(disable=True)
    return world
