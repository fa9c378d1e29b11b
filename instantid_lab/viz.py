"""Pictures for the notebooks: faces with boxes and keypoints, image grids, similarity heatmaps,
same-vs-different histograms and bar charts.

Every plotting function returns a matplotlib `Figure` that is already closed in pyplot (so
nothing is drawn twice and nothing piles up in pyplot's figure list); a notebook shows it by
making it the cell's last expression, and `save_figure` writes it as a PNG.

`save_figure(fig, name)` writes into the folder named by the environment variable
`INSTANTID_LAB_FIGURES` (the notebook runner sets it per notebook) and does nothing when the
variable is unset, so notebooks can call it unconditionally.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping, Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from .embeddings import PairScores, higher_is_more_similar
from .errors import InputError
from .images import ImageLike, enlarge as enlarge_image, load_image
from .keypoints import KPS_COLORS, as_kps

#: Environment variable naming the folder `save_figure` writes PNG files into.
FIGURES_ENV = "INSTANTID_LAB_FIGURES"


# ----------------------------------------------------------------------------- saving


def figures_dir() -> Optional[Path]:
    """The folder named by $INSTANTID_LAB_FIGURES, or None when it is unset or empty."""
    value = os.environ.get(FIGURES_ENV, "")
    return Path(value) if value else None


def save_figure(fig: Union[Figure, Image.Image], name: str, directory: Union[str, Path, None] = None) -> Optional[Path]:
    """Save a figure (or a PIL image) as `<directory>/<name>.png`.

    :param fig: a matplotlib Figure or a PIL image.
    :param name: file stem; characters other than letters, digits, "-", "_" become "_".
    :param directory: where to write; default $INSTANTID_LAB_FIGURES. If neither is set,
        nothing is written and None is returned.
    :return: the written path, or None.
    """
    folder = Path(directory) if directory is not None else figures_dir()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") + ".png")
    if isinstance(fig, Image.Image):
        fig.save(path)
    elif isinstance(fig, Figure):
        fig.savefig(path, dpi=100, bbox_inches="tight")
    else:
        raise InputError(f"save_figure takes a matplotlib Figure or a PIL image, got {type(fig).__name__}")
    return path


def png_bytes(image: ImageLike, max_side: Optional[int] = None) -> bytes:
    """An image as PNG bytes (for ipywidgets.Image), optionally shrunk to fit max_side."""
    pil = load_image(image).copy()
    if max_side is not None:
        pil.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    # Made by pyplot so the notebook's display backend is set up, then closed at once so pyplot
    # holds no reference: the figure shows only where the notebook displays it.
    fig = plt.figure(figsize=(width, height))
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- faces


def draw_faces(image: ImageLike, faces, labels: Optional[Sequence[str]] = None, kps: bool = True,
               highlight: Optional[int] = None, enlarge: int = 1) -> Image.Image:
    """A copy of `image` with each face's box and 5 keypoints drawn on it.

    :param image: the photo the faces were detected in.
    :param faces: a list of objects with `.bbox` [4] (x1, y1, x2, y2) and `.kps` [5, 2]
        (e.g. `Face`), or a single one.
    :param labels: optional text per face, written above its box.
    :param kps: draw the keypoints in the keypoint image's colours.
    :param highlight: index of a face to draw with a thicker orange box (e.g. the selected one).
    :param enlarge: draw on the image enlarged this many times (nearest neighbour, e.g. 8 for the
        miniature's 32-px faces), boxes and keypoints scaled to match.
    """
    canvas = enlarge_image(image, enlarge)
    faces = [faces] if hasattr(faces, "bbox") else list(faces)
    faces = [SimpleNamespace(bbox=np.asarray(f.bbox) * enlarge, kps=np.asarray(f.kps) * enlarge) for f in faces]
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(canvas.size) / 300))
    for index, face in enumerate(faces):
        x1, y1, x2, y2 = (float(v) for v in np.asarray(face.bbox).reshape(4))
        colour, width = ((255, 160, 0), 2 * line) if index == highlight else ((0, 255, 0), line)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        if labels is not None:
            draw.text((x1, max(y1 - 2 * line, 12 * line)), str(labels[index]), fill=colour, anchor="ld",
                      font_size=12 * line, stroke_width=max(1, line // 2), stroke_fill=(0, 0, 0))
        if kps:
            _draw_points(draw, as_kps(face.kps), radius=max(2.0, (x2 - x1) / 20))
    return canvas


def _draw_points(draw: ImageDraw.ImageDraw, kps: np.ndarray, radius: float) -> None:
    for (x, y), color in zip(kps, KPS_COLORS):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color, outline=(0, 0, 0))


def zoom(image: ImageLike, bbox, margin: float = 0.5) -> Image.Image:
    """The region of `image` around a face box, widened by `margin` x the box size on every side.

    :param bbox: shape [4], x1, y1, x2, y2 (e.g. `face.bbox`).
    """
    pil = load_image(image)
    x1, y1, x2, y2 = (float(v) for v in np.asarray(bbox).reshape(4))
    pad_x, pad_y = margin * (x2 - x1), margin * (y2 - y1)
    box = (max(0, int(x1 - pad_x)), max(0, int(y1 - pad_y)),
           min(pil.width, int(x2 + pad_x)), min(pil.height, int(y2 + pad_y)))
    if box[2] <= box[0] or box[3] <= box[1]:
        shown = tuple(round(v) for v in (x1, y1, x2, y2))
        raise InputError(f"the box {shown} lies outside the {pil.width}x{pil.height} image")
    return pil.crop(box)


# ----------------------------------------------------------------------------- grids


def image_grid(
    images: Sequence[ImageLike],
    titles: Optional[Sequence[str]] = None,
    ncols: int = 4,
    cell: float = 3.0,
    suptitle: Optional[str] = None,
) -> Figure:
    """Images in a grid with optional titles.

    :param images: paths, PIL images or arrays.
    :param ncols: images per row (fewer if there are fewer images).
    :param cell: size of one cell in inches.
    """
    if len(images) == 0:
        raise InputError("image_grid needs at least one image")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)  # ceiling division
    width, height = load_image(images[0]).size
    aspect = min(max(height / width, 0.4), 1.0)  # wide images get shorter rows (titles need some height)
    fig = _new_figure(cell * ncols, (cell * aspect + 0.35) * nrows + (0.4 if suptitle else 0.0))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for index, ax in enumerate(axes):
        ax.axis("off")
        if index < len(images):
            ax.imshow(load_image(images[index]))
            if titles is not None:
                ax.set_title(str(titles[index]), fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- similarity


def plot_similarity_matrix(
    matrix: np.ndarray,
    labels: Sequence[str],
    metric: str = "cosine",
    title: Optional[str] = None,
    annotate: bool = True,
) -> Figure:
    """A heatmap of pairwise scores, darker = more similar for both similarities and distances.

    :param matrix: shape [N, N], from `similarity_matrix`.
    :param labels: N names for the rows and columns.
    :param metric: "cosine" (similarity) or "euclidean" (distance; the colour scale is reversed).
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or len(labels) != len(matrix):
        raise InputError(f"need a square [N, N] matrix and N labels; got {list(matrix.shape)}, {len(labels)} labels")
    side = 1.5 + 0.5 * len(labels)
    fig = _new_figure(side + 1.5, side)
    ax = fig.subplots()
    cmap = "viridis" if higher_is_more_similar(metric) else "viridis_r"
    shown = ax.imshow(matrix, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    fig.colorbar(shown, ax=ax, label="cosine similarity" if metric == "cosine" else "Euclidean distance")
    if annotate and len(labels) <= 20:
        _annotate_cells(ax, matrix)
    ax.set_title(title or f"pairwise {metric}")
    fig.tight_layout()
    return fig


def _annotate_cells(ax, matrix: np.ndarray) -> None:
    middle = (matrix.max() + matrix.min()) / 2
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                color="white" if value < middle else "black")


def plot_same_vs_different(
    scores: PairScores,
    threshold: Optional[float] = None,
    title: Optional[str] = None,
    bins: int = 20,
) -> Figure:
    """Histograms of the pair scores of same-person pairs and different-person pairs.

    :param scores: from `same_vs_different`.
    :param threshold: optional vertical line (e.g. dlib's 0.6 distance).
    """
    fig = _new_figure(6, 3.5)
    ax = fig.subplots()
    values = np.concatenate([scores.same, scores.different])
    edges = np.linspace(values.min(), values.max(), bins + 1) if len(values) else bins
    ax.hist(scores.different, bins=edges, alpha=0.6, label=f"different people ({len(scores.different)} pairs)")
    ax.hist(scores.same, bins=edges, alpha=0.6, label=f"same person ({len(scores.same)} pairs)")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("cosine similarity" if scores.metric == "cosine" else "Euclidean distance")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    ax.set_title(title or "same person vs different people")
    fig.tight_layout()
    return fig


def plot_bars(
    names: Sequence[str],
    values: Sequence[float],
    ylabel: str,
    title: Optional[str] = None,
    references: Optional[Mapping[str, float]] = None,
) -> Figure:
    """A bar chart of one value per name, with optional labelled horizontal reference lines.

    :param references: {label: value}, e.g. {"chance": 0.5}; each becomes a dashed line.
    """
    if len(names) != len(values):
        raise InputError(f"got {len(names)} names but {len(values)} values")
    fig = _new_figure(1.5 + 0.9 * len(names), 3.5)
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), values, color="tab:blue")
    # value labels on a white patch, drawn over any reference line they cross
    ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2, zorder=5,
                 bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"})
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="black", linestyle=style, label=label, zorder=1)
    top = max([*values, *(references or {}).values(), 0.0])
    ax.set_ylim(top=top * 1.3 if top > 0 else None)  # head room for the labels and the legend
    if references:
        ax.legend(fontsize=8, loc="upper left", ncols=len(references))
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
