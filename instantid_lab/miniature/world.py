"""The miniature's procedural face world: cartoon faces that have an identity, a pose and a caption.

An **identity** is a set of face parameters (shape, skin, eyes, brows, nose, mouth, hair); a **pose**
is where the face sits (centre, scale, roll, a yaw-like shift of the features); a **caption** is what
the text prompt would say (background, expression, accessory, drawing style). `render` draws one
face and returns the image, its 5 InstantID keypoints and the caption text — everything the real
method gets from a photo, a face analyser and a prompt.

Identities are deterministic functions of an integer id. Training and held-out identities come from
disjoint id ranges (`TRAIN_IDS`, `HELDOUT_IDS`), so "zero-shot" means what it means in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

#: Identity ids used for training; held-out ids never appear in training.
TRAIN_IDS = range(0, 100_000)
HELDOUT_IDS = range(1_000_000, 1_100_000)

BACKGROUNDS = ("blue", "green", "red", "yellow", "purple", "stripes")
EXPRESSIONS = ("neutral", "smiling")
ACCESSORIES = ("none", "glasses", "hat")
STYLES = ("flat", "outline")

#: The colour of each plain background ("stripes" is grey with dark stripes).
BACKGROUND_RGB = {
    "blue": (70, 110, 200), "green": (80, 160, 90), "red": (190, 70, 70),
    "yellow": (220, 200, 80), "purple": (130, 80, 170), "stripes": (200, 200, 200),
}
_SKIN = np.array([[255, 224, 196], [234, 192, 150], [200, 150, 110], [150, 100, 70], [100, 65, 45]], float)
_HAIR = np.array([[30, 25, 20], [90, 60, 30], [200, 170, 90], [160, 60, 30], [140, 140, 140], [240, 240, 230]], float)
_EYES = np.array([[40, 90, 160], [60, 130, 70], [90, 60, 30], [30, 30, 30]], float)

CANVAS = 128  # drawing resolution; images are box-downsampled to the requested size


@dataclass(frozen=True)
class Identity:
    """Face parameters; all are fractions of the face size unless they are colours or styles."""

    face_width: float
    face_height: float
    skin: tuple
    eye_spacing: float
    eye_size: float
    eye_color: tuple
    brow_thickness: float
    brow_tilt: float
    nose_length: float
    nose_width: float
    mouth_width: float
    hair_style: int
    hair_color: tuple
    jaw: float

    @classmethod
    def from_id(cls, identity_id: int) -> "Identity":
        """The identity with integer id `identity_id` (same id, same face)."""
        rng = np.random.default_rng([identity_id, 7919])
        mix = lambda table: tuple(int(c) for c in table[rng.integers(len(table))] * rng.uniform(0.85, 1.0))
        return cls(
            face_width=rng.uniform(0.62, 0.82), face_height=rng.uniform(0.82, 1.0), skin=mix(_SKIN),
            eye_spacing=rng.uniform(0.28, 0.44), eye_size=rng.uniform(0.07, 0.13), eye_color=mix(_EYES),
            brow_thickness=rng.uniform(0.02, 0.06), brow_tilt=rng.uniform(-0.06, 0.06),
            nose_length=rng.uniform(0.12, 0.24), nose_width=rng.uniform(0.06, 0.14),
            mouth_width=rng.uniform(0.22, 0.42), hair_style=int(rng.integers(5)), hair_color=mix(_HAIR),
            jaw=rng.uniform(0.0, 1.0),
        )

    def as_vector(self) -> np.ndarray:
        """All parameters flattened into one float vector (colours scaled to [0, 1])."""
        values = []
        for f in fields(self):
            v = getattr(self, f.name)
            values.extend(np.asarray(v, float).ravel() / (255.0 if isinstance(v, tuple) else 1.0))
        return np.asarray(values, dtype=np.float32)


@dataclass(frozen=True)
class Pose:
    """Where the face sits: centre (fractions of the image), scale (face height / image), roll (degrees),
    yaw in [-1, 1] (features shift sideways, the far eye narrows)."""

    cx: float = 0.5
    cy: float = 0.52
    scale: float = 0.62
    roll: float = 0.0
    yaw: float = 0.0

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Pose":
        return cls(cx=rng.uniform(0.4, 0.6), cy=rng.uniform(0.44, 0.6), scale=rng.uniform(0.5, 0.72),
                   roll=rng.uniform(-20, 20), yaw=rng.uniform(-0.6, 0.6))


@dataclass(frozen=True)
class Caption:
    """What a prompt would say about the image (everything but the identity)."""

    background: str = "blue"
    expression: str = "neutral"
    accessory: str = "none"
    style: str = "flat"

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Caption":
        pick = lambda options: options[rng.integers(len(options))]
        return cls(pick(BACKGROUNDS), pick(EXPRESSIONS), pick(ACCESSORIES), pick(STYLES))

    def text(self) -> str:
        """The caption as a prompt, e.g. "a smiling face with glasses, blue background, outline style"."""
        wearing = "" if self.accessory == "none" else f" with {'a ' if self.accessory == 'hat' else ''}{self.accessory}"
        return f"a {self.expression} face{wearing}, {self.background} background, {self.style} style"


@dataclass
class Sample:
    """One rendered face: the image, its 5 keypoints [5, 2] in image pixels, and its conditions."""

    image: Image.Image
    kps: np.ndarray
    identity_id: int
    pose: Pose
    caption: Caption


def render(identity: Identity, pose: Pose = Pose(), caption: Caption = Caption(), size: int = 32) -> Sample:
    """Draw one face at `size` x `size` pixels (drawn at 128 px, box-downsampled).

    :returns: a `Sample` whose `kps` are in InstantID order (left eye, right eye, nose tip, left mouth
        corner, right mouth corner; "left" = image left), in pixels of the returned image.
    """
    canvas = _background(caption.background)
    layer, kps = _face_layer(identity, pose, caption)
    layer, kps = _place(layer, kps, pose)
    canvas.alpha_composite(layer)
    image = canvas.convert("RGB").resize((size, size), Image.BOX)
    return Sample(image, (kps * size / CANVAS).astype(np.float32), -1, pose, caption)


def render_id(identity_id: int, pose: Pose = Pose(), caption: Caption = Caption(), size: int = 32) -> Sample:
    """`render` for the identity with integer id `identity_id`."""
    sample = render(Identity.from_id(identity_id), pose, caption, size)
    sample.identity_id = identity_id
    return sample


def random_samples(identity_ids: Sequence[int], n: int, seed: int, size: int = 32) -> list[Sample]:
    """`n` renders of identities drawn from `identity_ids`, each with a random pose and caption."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.asarray(identity_ids), size=n)
    return [render_id(int(i), Pose.sample(rng), Caption.sample(rng), size) for i in ids]


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor [B, 3, H, W] in [-1, 1] (what the miniature's networks read)."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # [B, H, W, 3]
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def _background(name: str) -> Image.Image:
    canvas = Image.new("RGBA", (CANVAS, CANVAS), BACKGROUND_RGB[name] + (255,))
    if name == "stripes":
        draw = ImageDraw.Draw(canvas)
        for x in range(0, CANVAS, 16):
            draw.rectangle([x, 0, x + 7, CANVAS], fill=(90, 90, 90, 255))
    return canvas


def _face_layer(ident: Identity, pose: Pose, caption: Caption) -> tuple[Image.Image, np.ndarray]:
    """The face drawn upright and centred on a transparent layer; returns it and its keypoints."""
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    h = CANVAS * 0.62  # canonical face height in canvas pixels; `_place` rescales to pose.scale
    c = CANVAS / 2
    w = h * ident.face_width
    top, bottom = c - h * ident.face_height / 2, c + h * ident.face_height / 2
    outline = (20, 20, 20, 255) if caption.style == "outline" else None
    _draw_hair_back(draw, ident, c, w, top, h)
    draw.ellipse([c - w / 2, top, c + w / 2, bottom], fill=ident.skin + (255,), outline=outline, width=2)
    if ident.jaw > 0.5:  # a squarer jaw
        draw.rectangle([c - w * 0.38, c + h * 0.1, c + w * 0.38, bottom - h * 0.04], fill=ident.skin + (255,))
    _draw_hair_front(draw, ident, c, w, top, h)
    kps = _draw_features(draw, ident, pose, caption, c, w, h)
    if caption.accessory == "hat":
        draw.rectangle([c - w * 0.62, top - h * 0.02, c + w * 0.62, top + h * 0.08], fill=(40, 40, 60, 255))
        draw.rectangle([c - w * 0.4, top - h * 0.3, c + w * 0.4, top + h * 0.04], fill=(40, 40, 60, 255))
    return layer, kps


def _draw_hair_back(draw, ident, c, w, top, h):
    if ident.hair_style in (2, 4):  # long hair behind the face
        draw.rectangle([c - w * 0.62, top + h * 0.1, c + w * 0.62, top + h * 0.95], fill=ident.hair_color + (255,))


def _draw_hair_front(draw, ident, c, w, top, h):
    color = ident.hair_color + (255,)
    if ident.hair_style == 0:  # bald
        return
    if ident.hair_style == 3:  # spiky
        for i in range(5):
            x = c - w * 0.45 + i * w * 0.225
            draw.polygon([(x - w * 0.12, top + h * 0.12), (x, top - h * 0.12), (x + w * 0.12, top + h * 0.12)], fill=color)
        return
    depth = {1: 0.18, 2: 0.22, 4: 0.3}[ident.hair_style]
    draw.chord([c - w * 0.55, top - h * 0.08, c + w * 0.55, top + h * depth * 2], 180, 360, fill=color)


def _draw_features(draw, ident, pose, caption, c, w, h) -> np.ndarray:
    shift = pose.yaw * w * 0.18  # yaw moves the features sideways
    eye_y, half = c - h * 0.08, ident.eye_spacing * w
    eyes = []
    for side in (-1, 1):
        narrow = 1.0 - 0.35 * max(0.0, side * pose.yaw)  # the far eye narrows
        ex, r = c + shift + side * half, ident.eye_size * h
        draw.ellipse([ex - r * narrow, eye_y - r * 0.7, ex + r * narrow, eye_y + r * 0.7], fill=(255, 255, 255, 255))
        draw.ellipse([ex - r * 0.5 * narrow, eye_y - r * 0.5, ex + r * 0.5 * narrow, eye_y + r * 0.5], fill=ident.eye_color + (255,))
        brow_y = eye_y - r * 1.4 + side * ident.brow_tilt * h
        draw.line([ex - r * 1.1, brow_y - side * ident.brow_tilt * h, ex + r * 1.1, brow_y], fill=ident.hair_color + (255,),
                  width=max(1, int(ident.brow_thickness * h)))
        eyes.append((ex, eye_y))
    if caption.accessory == "glasses":
        r = ident.eye_size * h * 1.5
        for ex, ey in eyes:
            draw.ellipse([ex - r, ey - r, ex + r, ey + r], outline=(20, 20, 20, 255), width=2)
        draw.line([eyes[0][0] + r, eye_y, eyes[1][0] - r, eye_y], fill=(20, 20, 20, 255), width=2)
    nose_tip = (c + shift * 1.3, eye_y + ident.nose_length * h + h * 0.05)
    nw = ident.nose_width * w
    draw.polygon([(nose_tip[0], eye_y + h * 0.03), (nose_tip[0] - nw / 2, nose_tip[1]), (nose_tip[0] + nw / 2, nose_tip[1])],
                 fill=tuple(int(v * 0.8) for v in ident.skin) + (255,))
    mouth_y, mw = nose_tip[1] + h * 0.12, ident.mouth_width * w / 2
    left, right = (c + shift - mw, mouth_y), (c + shift + mw, mouth_y)
    if caption.expression == "smiling":
        draw.chord([left[0], mouth_y - h * 0.08, right[0], mouth_y + h * 0.08], 0, 180, fill=(150, 40, 50, 255))
    else:
        draw.line([left, right], fill=(150, 40, 50, 255), width=max(2, int(h * 0.03)))
    return np.array([eyes[0], eyes[1], nose_tip, left, right], dtype=np.float64)


def _place(layer: Image.Image, kps: np.ndarray, pose: Pose) -> tuple[Image.Image, np.ndarray]:
    """Scale, roll and move the canonical face layer to `pose`; the keypoints follow exactly."""
    s = pose.scale / 0.62
    theta = math.radians(pose.roll)
    # forward map: p' = R(theta) * s * (p - c) + t, with t the target centre (image y points down)
    c = np.array([CANVAS / 2, CANVAS / 2])
    t = np.array([pose.cx * CANVAS, pose.cy * CANVAS])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    forward = s * rot
    inverse = np.linalg.inv(forward)
    offset = c - inverse @ t  # PIL wants the output -> input map: p = inverse @ p' + offset
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    placed = layer.transform(layer.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return placed, (kps - c) @ forward.T + t
