"""Figures of ablation grids, drawn with matplotlib: heatmaps of a 2-D grid, trade-off curves, image sheets.

The figure functions take a per-setting summary (`grid.GridRun.summary()`, `grid.setting_summary`:
columns `<score>_mean` and `<score>_sem` beside the setting's columns) and return a `Figure`:

- `heatmaps`: the mean of each score over a 2-D grid (e.g. adapter scale x IdentityNet scale, Fig. 9);
- `curves`: one score against another, one curve per level of some columns, its points the levels of
  another in order (identity vs prompt adherence, identity vs keypoint error, pose freedom);
- `write_report`: a grid run's sheets (`image_sheet`, one per setting) and `grid_figures` as PNG files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from ..images import image_sheet
from ..miniature.evaluate import HeldoutTask

#: Axis titles of the scores.
LABELS = {
    "identity_similarity": "identity similarity (cosine, evaluator)",
    "rank1": "rank-1 identification",
    "keypoint_error": "keypoint error (px, vs requested)",
    "reference_keypoint_error": "distance to the reference's keypoints (px)",
    "caption_mean": "caption accuracy (mean of 4 attributes)",
    "caption_all": "caption accuracy (all 4 right)",
}


def new_figure(width: float, height: float) -> Figure:
    """A figure made by pyplot (so a notebook's backend is set up) and closed at once: pyplot keeps no reference."""
    fig = plt.figure(figsize=(width, height))
    plt.close(fig)
    return fig


def levels(column: pd.Series) -> list:
    """The distinct values of a column, in the order they first appear."""
    return list(dict.fromkeys(column.tolist()))


def heatmaps(summary: pd.DataFrame, x: str, y: str,
             values: Sequence[str] = ("identity_similarity", "keypoint_error", "caption_mean")) -> Figure:
    """One panel per score: its mean over the grid `x` (columns) x `y` (rows, growing upwards), annotated
    (errors: lower is brighter; fractions coloured on [0, 1])."""
    fig = new_figure(4.3 * len(values), 3.8)
    xs, ys = levels(summary[x]), levels(summary[y])
    for ax, value in zip(np.atleast_1d(fig.subplots(1, len(values))), values):
        matrix = summary.pivot(index=y, columns=x, values=f"{value}_mean").loc[ys, xs].to_numpy(float)  # [Y, X]
        limits = (0.0, 1.0) if value.startswith(("caption", "rank")) else (None, None)   # fractions on their full range
        image = ax.imshow(matrix, origin="lower", cmap="viridis_r" if "error" in value else "viridis", aspect="auto",
                          vmin=limits[0], vmax=limits[1])
        for (row, col), v in np.ndenumerate(matrix):
            ax.text(col, row, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white",
                    bbox={"boxstyle": "round,pad=0.1", "facecolor": "black", "alpha": 0.35, "edgecolor": "none"})
        ax.set_xticks(range(len(xs)), [f"{v:g}" if isinstance(v, float) else v for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" if isinstance(v, float) else v for v in ys])
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(LABELS.get(value, value), fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.85)
    fig.tight_layout()
    return fig


def curves(summary: pd.DataFrame, x: str, along: str, curve: Union[str, Sequence[str], None] = None,
           y: str = "identity_similarity", title: Optional[str] = None) -> Figure:
    """`y` against `x` (means with standard-error bars): one curve per level of `curve` (columns), its
    points the levels of `along` in order, each point labelled with its `along` level."""
    fig = new_figure(6.0, 4.4)
    ax = fig.subplots()
    by = [curve] if isinstance(curve, str) else list(curve or [])
    groups = [((), summary)] if not by else [(key, summary[(summary[by] == list(key)).all(axis=1)])
                                             for key in levels(pd.Series(list(summary[by].itertuples(index=False))))]
    for key, part in groups:
        label = ", ".join(f"{c} = {_show(v)}" for c, v in zip(by, key)) or along
        line = ax.errorbar(part[f"{x}_mean"], part[f"{y}_mean"], xerr=part.get(f"{x}_sem"), yerr=part.get(f"{y}_sem"),
                           marker="o", capsize=2, label=label)
        for px, py, level in zip(part[f"{x}_mean"], part[f"{y}_mean"], part[along]):
            ax.annotate(_show(level), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line[0].get_color())
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    if by:
        ax.legend(fontsize=7, title=f"points: {along}", title_fontsize=7)
    ax.set_title(title or f"{LABELS.get(y, y)} vs {LABELS.get(x, x)}", fontsize=9)
    fig.tight_layout()
    return fig


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float, np.floating)) else str(value)


def grid_figures(summary: pd.DataFrame, axes: Sequence[str]) -> dict[str, Figure]:
    """A grid's figures: `heatmaps` when it has two axes; identity vs prompt adherence and identity vs
    keypoint error (`curves` along the first axis, one curve per level of the others)."""
    figures = {"heatmaps": heatmaps(summary, axes[0], axes[1])} if len(axes) == 2 else {}
    figures["identity_vs_prompt"] = curves(summary, "caption_mean", axes[0], axes[1:])
    figures["identity_vs_keypoints"] = curves(summary, "keypoint_error", axes[0], axes[1:])
    return figures


def write_report(run, columns: int = 16) -> list[Path]:
    """Write a `grid.GridRun`'s sheets (`sheets/<setting>.png`: identities across, prompts x seeds down;
    `sheets/references.png`) and `grid_figures` (`plots/<name>.png`). :return: the files written."""
    written, cells = [], run.grid.cells()
    k = run.grid.identities
    for setting in run.grid.settings():
        mine = sorted((c for c in cells if c.setting == setting), key=lambda c: (c.prompt, c.seed, c.identity))
        images = [Image.open(run.out / "images" / f"{c.id}.png") for c in mine]
        written.append(_save(image_sheet(images, columns=min(k, columns), scale=3), run.out / "sheets" / setting.id))
    references = [s.image for s in HeldoutTask.make(k, run.grid.task_seed).references]
    written.append(_save(image_sheet(references, columns=min(k, columns), scale=3), run.out / "sheets" / "references"))
    for name, fig in grid_figures(run.summary(), list(run.grid.axes)).items():
        written.append(_save(fig, run.out / "plots" / name))
    return written


def _save(picture: Union[Figure, Image.Image], stem: Path) -> Path:
    path = stem.with_name(stem.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(picture, Figure):
        picture.savefig(path, dpi=100, bbox_inches="tight")
    else:
        picture.save(path)
    return path
