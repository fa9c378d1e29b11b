"""What the playground does, without any widget: a request record -> the pipeline's arguments -> a scored image.

The playground's controls fill one `GenerationRequest` (reference(s), prompt, adapter scale, IdentityNet
scale and window, a `PoseEdit` of the keypoints, seed, steps); `Studio` turns it into the arguments of one
`InstantIDPipeline` call and the scored result (`Generation`). A sweep is the same request with one
scale varied: one batched call, every image from the same starting noise (`latents=`), so the images
differ only in that scale.

    studio = Studio(world, MiniatureReferences(world))
    request = GenerationRequest(references=(1000000,), prompt="a smiling face, green background, flat style")
    studio.call_args(request)            # exactly what goes to world.pipe(...)
    studio.generate(request).readout     # identity similarity (evaluator), keypoint error, ...
    studio.sweep(request, "adapter_scale", [0.0, 0.5, 1.0, 1.5]).images

Where the references, the target and the scores come from is the job of a *source*
(`widgets.sources`: held-out identities of the miniature, or photos).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..keypoints import as_kps, mirror_kps, rotate_kps, scale_kps, translate_kps
from ..miniature.base import GUIDANCE_SCALE, SAMPLING_STEPS
from ..miniature.world import Caption

#: The request fields a sweep can vary in one batched call (the pipeline takes them per image).
SWEEPABLE = ("adapter_scale", "identitynet_scale")
#: How far a full turn (yaw 1) moves the eyes and mouth sideways, in inter-ocular distances (the nose: 1.3x).
YAW_SHIFT = 0.25
NOSE = 2


def turn_kps(kps, yaw: float) -> np.ndarray:
    """A yaw-like turn of the 5 keypoints: the features slide sideways along the eye line, the nose furthest.

    What the miniature's renderer does to a face turned by `yaw` (its features shift by about a quarter of
    the inter-ocular distance per unit of yaw, the nose 1.3 times as far); on photos a rough stand-in for a
    head turn. :param kps: shape [5, 2]; :param yaw: in [-1, 1], positive = towards image right.
    """
    kps = as_kps(kps).astype(np.float64)
    eye_line = kps[1] - kps[0]                                       # [2]
    shift = yaw * YAW_SHIFT * eye_line                               # along the eye line, |eye_line| * yaw / 4
    weights = np.where(np.arange(5) == NOSE, 1.3, 1.0)[:, None]      # [5, 1]
    return kps + weights * shift


@dataclass(frozen=True)
class PoseEdit:
    """A pose editor's move of the keypoints, applied in this order: turn (yaw), scale, roll, shift, mirror.

    :param roll: degrees, counter-clockwise on screen, about the face centre.
    :param yaw: a yaw-like turn in [-1, 1] (`turn_kps`).
    :param scale: face size factor about the face centre.
    :param dx, dy: shift in output pixels (positive dy moves down).
    :param mirror: mirror the face horizontally (left and right keypoints swap, as in a mirrored photo).
    """

    roll: float = 0.0
    yaw: float = 0.0
    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    mirror: bool = False

    def apply(self, kps, width: int, center: Optional[tuple[float, float]] = None) -> np.ndarray:
        """The edited keypoints [5, 2] of a face whose keypoints are `kps` in an image `width` pixels wide.

        :param center: what scale and roll turn about (default: the keypoints' centroid).
        """
        moved = scale_kps(turn_kps(kps, self.yaw), self.scale, center)
        moved = translate_kps(rotate_kps(moved, self.roll, center), self.dx, self.dy)
        return mirror_kps(moved, width) if self.mirror else moved


@dataclass(frozen=True)
class GenerationRequest:
    """Everything the playground's controls say about one image.

    :param references: the reference keys (miniature: held-out identity ids; photos: file names); several
        are averaged by the pipeline (an [N, D] `face_embedding`).
    :param caption: the miniature caption behind `prompt` (scored by the inspector), or None.
    :param control_start, control_end: IdentityNet's window, fractions of the denoising steps.
    """

    references: tuple
    prompt: str
    caption: Optional[Caption] = None
    adapter_scale: float = 1.0
    identitynet_scale: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0
    pose: PoseEdit = field(default_factory=PoseEdit)
    seed: int = 0
    steps: int = SAMPLING_STEPS
    guidance: float = GUIDANCE_SCALE

    def describe(self) -> str:
        """One line for the readouts and the history strip."""
        return (f"adapter {self.adapter_scale:.2f} · IdentityNet {self.identitynet_scale:.2f} "
                f"({self.control_start:.2f}–{self.control_end:.2f}) · seed {self.seed} · {self.steps} steps")


@dataclass(frozen=True)
class Readout:
    """The judges' scores of one generated image (they took no part in generating it).

    :param identity_similarity: cosine to the references' identities by the evaluating recogniser
        (mean over the references); `per_identity` one per reference.
    :param keypoint_error: requested vs read keypoints, mean distance (`keypoint_unit`).
    :param caption_read: fraction of the caption's 4 attributes the inspector reads back (NaN: no caption).
    :param target_similarity: what the target (the world's own drawing of the request) scores; NaN if none.
    """

    identity_similarity: float
    per_identity: tuple = ()
    keypoint_error: float = math.nan
    keypoint_unit: str = "px"
    caption_read: float = math.nan
    target_similarity: float = math.nan

    def describe(self) -> str:
        if math.isnan(self.identity_similarity):
            return "no face found in the result: nothing to score"
        parts = [f"identity similarity {self.identity_similarity:.3f}"]
        if not math.isnan(self.target_similarity):
            parts[0] += f" (target drawing: {self.target_similarity:.3f})"
        parts.append(f"keypoint error {self.keypoint_error:.2f} {self.keypoint_unit}")
        if not math.isnan(self.caption_read):
            parts.append(f"caption read {self.caption_read * 4:.0f}/4")
        return " · ".join(parts)


@dataclass(frozen=True)
class Generation:
    """One generated image with its request, keypoint image, target (or None) and readout."""

    request: GenerationRequest
    image: Image.Image
    keypoint_image: Image.Image
    target: Optional[Image.Image]
    readout: Readout
    seconds: float  # the pipeline call alone


@dataclass(frozen=True)
class Sweep:
    """One request with `field` set to each of `values`: images and readouts in that order."""

    request: GenerationRequest
    field: str
    values: tuple
    images: tuple
    readouts: tuple
    seconds: float  # the one batched pipeline call


class Studio:
    """Turns requests into pipeline calls and scored images, for one world and one source of references.

    :param world: a `worlds.World` (its pipe, keypoint drawing and sampler defaults).
    :param source: where references, base keypoints, targets and scores come from (`widgets.sources`).
    """

    def __init__(self, world, source):
        self.world, self.source = world, source

    def default_request(self, **changes) -> GenerationRequest:
        """The first reference, the world's example prompt and sampler settings, scales 1, no pose edit."""
        caption = Caption(background="green", expression="smiling") if self.source.captioned else None
        request = GenerationRequest(references=(self.source.keys[0],), prompt=caption.text() if caption else
                                    self.world.prompt, caption=caption, steps=self.world.steps,
                                    guidance=self.world.guidance)
        return replace(request, **changes)

    # ------------------------------------------------------------------ request -> pipeline arguments

    def keypoints(self, request: GenerationRequest) -> np.ndarray:
        """The requested keypoints [5, 2] in output pixels: the source's base keypoints, moved by `request.pose`."""
        width, _ = self.source.size(request.references)
        base = self.source.base_kps(request.references)
        return request.pose.apply(base, width, self.source.pose_center(request.references))

    def keypoint_image(self, request: GenerationRequest) -> Image.Image:
        """The keypoint image IdentityNet will see for this request."""
        return self.world.keypoint_image(self.keypoints(request), self.source.size(request.references))

    def noise(self, seed: int, n: int, size: tuple[int, int]) -> torch.Tensor:
        """The starting latents of `seed`, the same for each of `n` images: [n, C, h, w]."""
        pipe, (width, height) = self.world.pipe, size
        f = pipe.vae_scale_factor
        one = torch.randn(1, pipe.unet.config.in_channels, height // f, width // f,
                          generator=torch.Generator().manual_seed(seed))       # [1, C, h, w]
        return one.repeat(n, 1, 1, 1)                                           # [n, C, h, w]

    def call_args(self, request: GenerationRequest, n: int = 1) -> dict:
        """The keyword arguments of the pipeline call for `request` (`n` images from the same noise)."""
        if not request.references:
            raise InputError("choose at least one reference")
        width, height = size = self.source.size(request.references)
        return dict(
            prompt=request.prompt, face_embedding=self.source.embeddings(request.references),   # [N, D]
            keypoint_image=self.keypoint_image(request), adapter_scale=request.adapter_scale,
            identitynet_scale=request.identitynet_scale, control_guidance_start=request.control_start,
            control_guidance_end=request.control_end, num_inference_steps=request.steps,
            guidance_scale=request.guidance, height=height, width=width, num_images_per_prompt=n,
            latents=self.noise(request.seed, n, size))

    def sweep_args(self, request: GenerationRequest, field: str, values: Sequence[float]) -> dict:
        """One batched call: `request` with `field` (one of `SWEEPABLE`) taking each of `values`, one image each."""
        if field not in SWEEPABLE:
            raise InputError(f"a sweep varies one of {SWEEPABLE} (per-image scales); got {field!r}")
        if not values:
            raise InputError("a sweep needs at least one value")
        args = self.call_args(request, n=len(values))
        args[field] = torch.tensor([float(v) for v in values])    # [S], one scale per image
        return args

    # ------------------------------------------------------------------ running

    def generate(self, request: GenerationRequest, callback_on_step_end: Optional[Callable] = None) -> Generation:
        """Generate and score one image (`callback_on_step_end` goes to the pipeline, e.g. to cancel)."""
        args = self.call_args(request)
        start = time.perf_counter()
        image = self.world.pipe(**args, callback_on_step_end=callback_on_step_end).images[0]
        seconds = time.perf_counter() - start
        kps, target = self.keypoints(request), self.source.target(request)
        readout, = self.source.score([image], request, kps, target)
        return Generation(request, image, args["keypoint_image"], target, readout, seconds)

    def sweep(self, request: GenerationRequest, field: str, values: Sequence[float],
              callback_on_step_end: Optional[Callable] = None) -> Sweep:
        """Generate and score `request` at each value of `field`, in one batched call."""
        args = self.sweep_args(request, field, values)
        start = time.perf_counter()
        images = self.world.pipe(**args, callback_on_step_end=callback_on_step_end).images
        seconds = time.perf_counter() - start
        readouts = self.source.score(images, request, self.keypoints(request), self.source.target(request))
        return Sweep(request, field, tuple(float(v) for v in values), tuple(images), tuple(readouts), seconds)
