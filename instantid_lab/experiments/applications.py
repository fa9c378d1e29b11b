"""InstantID's applications (the paper's Figs. 10-12, whose code was never released), with numbers.

- **identity interpolation** (Fig. 11): images along a path between two identity embeddings, linear
  (`lerp`) or spherical (`slerp`), all from the same starting noise; each image's similarity to both
  ends, judged by an evaluator that did not condition generation;
- **novel views** (Fig. 10): rotate, shift, scale or mirror one reference's keypoints (`keypoints`)
  and keep its identity embedding; one batched call; identity similarity and keypoint error per view;
- **several identities in one image** (Fig. 12): each identity's tokens act only in its own region
  (`attention.regional_identity_attention`, through `RegionalIdentity`), and IdentityNet runs once per
  identity, with that identity's tokens, keypoint image and region mask. Generation is the pipeline's
  own stages (`encode_prompt`, `encode_identity`, `prepare_controls`, `prepare_latents`, `denoise`,
  `decode_latents`); only the conditioning record differs (`RegionalConditioning`).

    who = [Person("A", face_a.embedding, id_a), Person("B", face_b.embedding, id_b)]
    run = interpolate_identities(pipe, scorer, who, keypoint_image, Sampling(prompt))
    run.summary()        # mean similarity to A and to B at each t, per kind of path

Scores come from a `metrics.MiniatureScorer` (the miniature's evaluating recogniser and inspector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from ..attention import RegionalIdentity
from ..identitynet import face_region_mask
from ..keypoints import mirror_kps, rotate_kps, scale_kps, translate_kps
from ..pipeline import BatchGeometry, Conditioning
from ..pipeline.latents import schedule
from .metrics import Request

Embedding = Union[Tensor, np.ndarray, Sequence[float]]
#: Draws the keypoint image of keypoints [5, 2] (in pixels of the face's image).
DrawKeypoints = Callable[[np.ndarray], Image.Image]


@dataclass(frozen=True)
class Person:
    """An identity to generate and to score.

    :param name: a short label ("A", "B") used in tables and column names.
    :param embedding: its identity embedding [D] (from the conditioning face analyzer).
    :param identity: its label in the scorer's gallery (a miniature identity id).
    """

    name: str
    embedding: Embedding
    identity: Any


@dataclass(frozen=True)
class Sampling:
    """How every image of an application is sampled.

    :param copies: starting noises per image (each image is generated once from each; noise c is
        the same for every image, so images differ only in what the application changes).
    """

    prompt: str
    steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0
    copies: int = 4


# ----------------------------------------------------------------------------- interpolation

def lerp(a: Embedding, b: Embedding, t) -> Tensor:
    """(1 - t) * a + t * b.

    :param a, b: embeddings [D]
    :param t: a number or weights [T] in [0, 1]
    :return: [D] or [T, D]; t = 0 gives a, t = 1 gives b, exactly
    """
    a, b, t = _as_path_inputs(a, b, t)
    return (1 - t) * a + t * b


def slerp(a: Embedding, b: Embedding, t) -> Tensor:
    """sin((1 - t) W) / sin W * a  +  sin(t W) / sin W * b,  with cos W = <a / |a|, b / |b|>.

    The great-circle path: unit inputs stay unit length all along (the linear path cuts inside the
    sphere). Nearly parallel inputs (W < 1e-4) fall back to `lerp`.

    :param a, b: embeddings [D]; :param t: a number or weights [T]; :return: [D] or [T, D]
    """
    a, b, t = _as_path_inputs(a, b, t)
    omega = torch.arccos((F.normalize(a, dim=0) @ F.normalize(b, dim=0)).clamp(-1.0, 1.0))   # angle W, []
    if omega < 1e-4:
        return lerp(a, b, t)
    return torch.sin((1 - t) * omega) / torch.sin(omega) * a + torch.sin(t * omega) / torch.sin(omega) * b


INTERPOLATIONS = {"linear": lerp, "spherical": slerp}


def _as_path_inputs(a, b, t) -> tuple[Tensor, Tensor, Tensor]:
    a, b = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (a, b))          # [D] each
    t = torch.as_tensor(t, dtype=torch.float64)
    return a, b, (t[:, None] if t.ndim == 1 else t)                                        # [T] -> [T, 1]


@dataclass
class InterpolationRun:
    """Images along each path, and their scores.

    :param images: kind -> [T][copies] images (point t of the path, starting noise c).
    :param table: one row per image: kind, t, copy, embedding_norm (of the path's embedding at t),
        similarity_<name> for both ends.
    """

    t: np.ndarray
    images: dict[str, list[list[Image.Image]]]
    table: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Mean similarity to each end at each (kind, t), over the starting noises."""
        return self.table.drop(columns="copy").groupby(["kind", "t"], sort=False).mean().reset_index()


def interpolate_identities(pipe, scorer, ends: Sequence[Person], keypoint_image, sampling: Sampling,
                           points: int = 7, kinds: Sequence[str] = ("linear", "spherical")) -> InterpolationRun:
    """Generate along the path from `ends[0]` to `ends[1]` (one batched call per kind, same noises) and
    score every image's similarity to both ends (the scorer's evaluator and gallery).

    :param keypoint_image: the pose, the same for every image.
    :param points: T points t = 0, 1/(T-1), ..., 1.
    """
    t = np.linspace(0.0, 1.0, points)
    images, rows = {}, []
    for kind in kinds:
        path = INTERPOLATIONS[kind](ends[0].embedding, ends[1].embedding, t).float()    # [T, D]
        images[kind] = generate_from_one_noise(pipe, list(path), [keypoint_image] * points, sampling)
        flat = [im for row in images[kind] for im in row]
        scores = similarity_to(scorer, flat, ends)
        rows.append(scores.assign(kind=kind, t=np.repeat(t, sampling.copies),
                                  copy=np.tile(np.arange(sampling.copies), points),
                                  embedding_norm=np.repeat(path.norm(dim=1).numpy(), sampling.copies)))
    table = pd.concat(rows, ignore_index=True)
    return InterpolationRun(t, images, table[["kind", "t", "copy", "embedding_norm", *scores.columns]])


def plot_interpolation(run: InterpolationRun, ends: Sequence[Person]) -> Figure:
    """Mean similarity to each end along each path (error bars: standard error over the noises)."""
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    stats = run.table.drop(columns="copy").groupby(["kind", "t"], sort=False).agg(["mean", "sem"])
    for kind, style in zip(run.images, ("-", "--", ":")):
        for person, colour in zip(ends, ("tab:blue", "tab:orange")):
            column = stats.loc[kind, f"similarity_{person.name}"]
            ax.errorbar(column.index, column["mean"], column["sem"], fmt=style, marker="o", color=colour,
                        capsize=2, label=f"to {person.name}, {kind}")
    ax.set(xlabel=f"t (0 = {ends[0].name}, 1 = {ends[1].name})", ylabel="identity similarity (evaluator)",
           title="Identity interpolation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- novel views

def novel_views(kps: np.ndarray, width: int, degrees: float = 20.0, shift: float = 0.12,
                factor: float = 0.8) -> dict[str, np.ndarray]:
    """New poses of one face by moving its keypoints [5, 2] (in pixels of an image `width` wide).

    :param degrees: rotation both ways (counter-clockwise on screen for +).
    :param shift: a sideways move, as a fraction of the width (positive: to the right).
    :param factor: the scale about the keypoints' centre.
    :return: view name -> keypoints [5, 2]; the first is the reference itself.
    """
    return {"reference": np.asarray(kps), f"rotated +{degrees:g}°": rotate_kps(kps, degrees),
            f"rotated -{degrees:g}°": rotate_kps(kps, -degrees),
            f"shifted {'right' if shift > 0 else 'left'}": translate_kps(kps, shift * width, 0),
            f"scaled {factor:g}": scale_kps(kps, factor), "mirrored": mirror_kps(kps, width)}


@dataclass
class ViewsRun:
    """Images of one identity in several views, and their scores.

    :param images: view -> [copies] images.
    :param table: one row per image: view, copy, identity_similarity, keypoint_error (to the view's
        keypoints, px) and keypoint_error_to_reference (to the unmoved keypoints).
    """

    views: dict[str, np.ndarray]
    images: dict[str, list[Image.Image]]
    table: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Mean of each score per view, over the starting noises."""
        return self.table.drop(columns="copy").groupby("view", sort=False).mean().reset_index()


def generate_views(pipe, scorer, person: Person, views: Mapping[str, np.ndarray], draw: DrawKeypoints,
                   sampling: Sampling) -> ViewsRun:
    """Every view of `person` in one batched call (same noises for every view), scored."""
    rows = generate_from_one_noise(pipe, [person.embedding] * len(views), [draw(k) for k in views.values()],
                                   sampling)
    flat = [im for row in rows for im in row]
    wanted = [k for k in views.values() for _ in range(sampling.copies)]
    asked = scorer.score(flat, [Request(person.identity, kps=k) for k in wanted])
    unmoved = scorer.score(flat, [Request(person.identity, kps=next(iter(views.values())))] * len(flat))
    table = pd.DataFrame({"view": np.repeat(list(views), sampling.copies),
                          "copy": np.tile(np.arange(sampling.copies), len(views)),
                          "identity_similarity": asked.identity_similarity, "keypoint_error": asked.keypoint_error,
                          "keypoint_error_to_reference": unmoved.keypoint_error})
    return ViewsRun(dict(views), dict(zip(views, rows)), table)


# ----------------------------------------------------------------------------- several identities

@dataclass(frozen=True)
class Layout:
    """Faces side by side in one wider image.

    :param width, height: the whole image, in pixels.
    :param boxes: one (left, top, right, bottom) per face, in pixels; each face's region is its box.
    """

    width: int
    height: int
    boxes: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def side_by_side(cls, face_size: int = 32, faces: int = 2) -> "Layout":
        """`faces` square faces of `face_size` px in a row: e.g. 64 x 32 for two 32-px faces."""
        boxes = tuple((r * face_size, 0, (r + 1) * face_size, face_size) for r in range(faces))
        return cls(faces * face_size, face_size, boxes)

    def region(self, r: int) -> Tensor:
        """Face r's region: 1 inside its box, else 0, shape [1, height, width]."""
        return face_region_mask(self.boxes[r], (self.width, self.height))

    def place(self, r: int, image: Image.Image) -> Image.Image:
        """A black image of the whole size with `image` (face-sized, e.g. a keypoint image) in box r."""
        canvas = Image.new("RGB", (self.width, self.height))
        canvas.paste(image, self.boxes[r][:2])
        return canvas

    def crop(self, r: int, image: Image.Image) -> Image.Image:
        """Face r's box cut out of a generated image."""
        return image.crop(self.boxes[r])


@dataclass(frozen=True)
class PlacedIdentity:
    """One identity of a multi-identity image.

    :param embedding: its identity embedding [D].
    :param keypoint_image: the whole image's size, only this identity's keypoints drawn.
    :param region: where its tokens and its IdentityNet act, [1, H, W] in [0, 1].
    """

    embedding: Embedding
    keypoint_image: Image.Image
    region: Tensor

    def preview(self) -> Image.Image:
        """Its keypoint image with its region in grey underneath, to look at."""
        grey = (90 * self.region[0, ..., None].numpy()).astype(np.uint8)                  # [H, W, 1]
        return Image.fromarray(np.maximum(np.asarray(self.keypoint_image), grey))


@dataclass(frozen=True)
class RegionalConditioning(Conditioning):
    """`Conditioning` whose identity attention is regional: one `RegionalIdentity` (tokens [B', N, C],
    region [B', 1, H, W]) per identity, passed to the attention processors as `regional_identities`."""

    regions: tuple[RegionalIdentity, ...] = ()

    def cross_attention_kwargs(self):
        if not self.identity_attention or not self.regions:
            return None
        return {"regional_identities": list(self.regions), "adapter_scale": self.adapter_scale}


def regional_conditioning(pipe, prompt: str, identities: Sequence[PlacedIdentity], geometry: BatchGeometry,
                          adapter_scale=1.0, identitynet_scale=1.0) -> RegionalConditioning:
    """The pipeline's conditioning stages, once per identity: its tokens (`encode_identity`), its region
    (`prepare_face_mask`) and its IdentityNet `Control` (its tokens, keypoint image and region)."""
    text, pooled = pipe.encode_prompt([prompt], geometry)
    regions, controls = [], []
    for who in identities:
        tokens = pipe.encode_identity(who.embedding, geometry)                      # [B', N, C]
        mask = pipe.prepare_face_mask(who.region, geometry)                         # [B', 1, H, W]
        regions.append(RegionalIdentity(tokens, mask))
        controls += pipe.prepare_controls(geometry, text, tokens, who.keypoint_image, identitynet_scale,
                                          face_mask=mask)
    return RegionalConditioning(
        text_tokens=text, identity_tokens=None, added_cond_kwargs=pipe.prepare_added_cond(pooled, geometry.height,
                                                                                           geometry.width),
        adapter_scale=pipe.prepare_scale(adapter_scale, geometry, "adapter_scale"), controls=tuple(controls),
        guided=geometry.guided, identity_attention=pipe.has_identity_attention, regions=tuple(regions))


@torch.no_grad()
def generate_regional(pipe, identities: Sequence[PlacedIdentity], height: int, width: int, sampling: Sampling,
                      adapter_scale=1.0, identitynet_scale=1.0, output_type: str = "pil") -> list[Image.Image]:
    """`sampling.copies` images (one per starting noise) with every identity in its own region.

    :param output_type: as `InstantIDPipeline.decode_latents` ("pil", "np", "pt", "latent").
    """
    geometry = BatchGeometry(1, sampling.copies, height, width, guided=sampling.guidance_scale > 1.0)
    cond = regional_conditioning(pipe, sampling.prompt, identities, geometry, adapter_scale, identitynet_scale)
    timesteps = schedule(pipe.scheduler, sampling.steps, 1.0, pipe.device)
    state = pipe.prepare_latents(geometry, torch.Generator().manual_seed(sampling.seed))
    return pipe.decode_latents(pipe.denoise(state, timesteps, cond, sampling.guidance_scale), output_type)


@dataclass
class RegionsRun:
    """Multi-identity images and the scores of each face's box.

    :param identities: what each identity was given (keypoint image, region), in box order.
    :param images: `copies` images.
    :param table: one row per (image, region): copy, region, wanted (the name of the region's identity),
        similarity_<name> for every identity, similarity_own, similarity_other (the most similar other
        identity), keypoint_error (px), own_is_closest.
    """

    layout: Layout
    identities: list[PlacedIdentity]
    images: list[Image.Image]
    table: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Mean scores per region over the starting noises."""
        return self.table.drop(columns="copy").groupby(["region", "wanted"], sort=False).mean().reset_index()


def plot_region_scores(runs: Mapping[str, RegionsRun], people: Sequence[Person]) -> Figure:
    """Grouped bars: for each run (e.g. "A | B" and "B | A") and box, the mean similarity to each person."""
    rows = pd.concat([run.summary().assign(run=name) for name, run in runs.items()], ignore_index=True)
    fig = Figure(figsize=(1.6 + 1.3 * len(rows), 3.6))
    ax = fig.subplots()
    x, width = np.arange(len(rows)), 0.8 / len(people)
    for i, person in enumerate(people):
        ax.bar(x + (i - (len(people) - 1) / 2) * width, rows[f"similarity_{person.name}"], width,
               label=f"similarity to {person.name}")
    ax.set_xticks(x, [f"{r.run}\n{r.region}: wants {r.wanted}" for r in rows.itertuples()], fontsize=8)
    ax.set(ylabel="identity similarity (evaluator)", title="Each face's box, scored against every identity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def generate_identities(pipe, scorer, people: Sequence[Person], kps: Sequence[np.ndarray], layout: Layout,
                        draw: DrawKeypoints, sampling: Sampling, adapter_scale=1.0,
                        identitynet_scale=1.0) -> RegionsRun:
    """People[r] in layout box r with keypoints kps[r] (pixels of the face's box), then each box scored.

    :param draw: draws a face-sized keypoint image; `layout.place` puts it in the person's box.
    """
    placed = [PlacedIdentity(p.embedding, layout.place(r, draw(k)), layout.region(r))
              for r, (p, k) in enumerate(zip(people, kps))]
    images = generate_regional(pipe, placed, layout.height, layout.width, sampling, adapter_scale,
                               identitynet_scale)
    return RegionsRun(layout, placed, images, score_regions(scorer, images, layout, people, kps))


def score_regions(scorer, images: Sequence[Image.Image], layout: Layout, people: Sequence[Person],
                  kps: Sequence[np.ndarray]) -> pd.DataFrame:
    """Every box of every image: its similarity to every person, to its own (people[r] for box r) and to
    the most similar other one, its keypoint error, and whether its own person is the closest."""
    crops = [layout.crop(r, im) for im in images for r in range(len(people))]           # image-major
    wanted = [r for _ in images for r in range(len(people))]
    similarity = similarity_to(scorer, crops, people)                                      # [N, people]
    errors = scorer.score(crops, [Request(people[r].identity, kps=kps[r]) for r in wanted]).keypoint_error
    table = pd.DataFrame({"copy": np.repeat(np.arange(len(images)), len(people)),
                          "region": [f"box {r}" for r in wanted], "wanted": [people[r].name for r in wanted]})
    values, rows = similarity.to_numpy(), np.arange(len(crops))
    others = np.where(np.arange(len(people))[None] == np.array(wanted)[:, None], -np.inf, values)  # [N, people]
    return pd.concat([table, similarity], axis=1).assign(
        similarity_own=values[rows, wanted], similarity_other=others.max(1), keypoint_error=errors.to_numpy(),
        own_is_closest=values.argmax(1) == np.array(wanted))


# ----------------------------------------------------------------------------- shared

@torch.no_grad()
def generate_from_one_noise(pipe, embeddings: Sequence[Embedding], keypoint_images: Sequence,
                            sampling: Sampling) -> list[list[Image.Image]]:
    """Image k (embedding k, keypoint image k) from each of `sampling.copies` starting noises, in one
    batched call; noise c is the same for every k.

    :return: images[k][c].
    """
    k, n = len(embeddings), sampling.copies
    height, width = pipe.default_size(keypoint_images[0], None, None)
    f = pipe.vae_scale_factor
    noise = torch.randn(n, pipe.unet.config.in_channels, height // f, width // f,
                        generator=torch.Generator().manual_seed(sampling.seed))                 # [n, 4, h, w]
    images = pipe([sampling.prompt] * k, list(embeddings), list(keypoint_images), num_images_per_prompt=n,
                  num_inference_steps=sampling.steps, guidance_scale=sampling.guidance_scale, height=height,
                  width=width, latents=noise.repeat(k, 1, 1, 1).to(pipe.device, pipe.unet.dtype)).images
    return [images[i * n:(i + 1) * n] for i in range(k)]                                      # prompt-major


def similarity_to(scorer, images: Sequence, people: Sequence[Person]) -> pd.DataFrame:
    """Per image, the scorer's gallery similarity to each person: columns `similarity_<name>`."""
    return pd.DataFrame({f"similarity_{p.name}": scorer.score(images, [Request(p.identity)] * len(images))
                         .identity_similarity.to_numpy() for p in people})
