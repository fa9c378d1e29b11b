"""Pose freedom: can the face take a pose the reference does not have, and keep its identity?

Users of InstantID report that "the face and the pose are copied" from the reference. Here the requested
pose is one the reference does not have: its keypoints turned 25° (towards and past upright) and moved
5 px sideways (`cells.turned_kps`); the prompt is the target's caption. Three knobs trade keypoint
adherence against identity, each a curve of a `grid.Grid` run by the one grid runner:

- "IdentityNet scale": the conditioning scale (0 = no IdentityNet: the pose is the base model's);
- "window end": IdentityNet acts only in the first part of the steps (`control_guidance_end`), at scale 1;
- "no keypoints": IdentityNet at each scale on an all-black keypoint image (identity tokens, no pose).

    table = pose_freedom("outputs/pose", identities=8)   # one row per cell, columns knob / knob_value
    pose_summary(table)                                  # identity vs keypoint error per knob and value
    plots.curves(pose_summary(table), "keypoint_error", "knob_value", "knob")

Each cell is scored for identity (evaluating recogniser), keypoint error against the requested
(turned) keypoints and distance to the reference's own keypoints (`reference_keypoint_error`: small
when the reference's pose was copied).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from PIL import Image

from ..miniature.base import GUIDANCE_SCALE, SAMPLING_STEPS
from ..miniature.evaluate import HeldoutTask
from ..miniature.instantid import keypoint_image
from ..types import PathLike
from .cells import Models, turned_kps
from .grid import SCORES, Grid, run_grid, setting_summary

KNOBS = ("IdentityNet scale", "window end", "no keypoints")
#: The `Knobs` field each knob's curve varies.
AXES = {"IdentityNet scale": "identitynet_scale", "window end": "control_guidance_end",
        "no keypoints": "identitynet_scale"}


def pose_grids(identities: int = 8, seeds: Sequence[int] = (0,), steps: int = SAMPLING_STEPS,
               guidance_scale: float = GUIDANCE_SCALE,
               scales: Sequence[float] = (0.0, 0.5, 1.0, 1.5), ends: Sequence[float] = (0.3, 0.6, 1.0)) -> dict:
    """The three knobs' grids (name -> `Grid`), all asking for the turned pose with the target's caption."""
    fixed = {"pose": "turned", "num_inference_steps": steps, "guidance_scale": guidance_scale}
    common = dict(identities=identities, seeds=tuple(seeds))
    return {
        "IdentityNet scale": Grid({"identitynet_scale": tuple(scales)}, fixed=fixed, **common),
        "window end": Grid({"control_guidance_end": tuple(ends)}, fixed={**fixed, "identitynet_scale": 1.0}, **common),
        "no keypoints": Grid({"identitynet_scale": tuple(s for s in scales if s > 0)},
                             fixed={**fixed, "keypoint_image": "black"}, **common),
    }


def pose_freedom(out: PathLike, models: Optional[Models] = None, max_batch: int = 64, progress: bool = True,
                 **grid_options) -> pd.DataFrame:
    """Run the three knobs' grids (cached in `out/<knob>/`) and return one tidy table.

    :param grid_options: `pose_grids`'s arguments (identities, seeds, steps, guidance_scale, scales, ends).
    :return: one row per cell: `knob`, `knob_value`, the knobs and the scores (`grid.run_grid`'s table).
    """
    models = models or Models.miniature()
    tables = []
    for knob, grid in pose_grids(**grid_options).items():
        run = run_grid(grid, Path(out) / re.sub(r"\W+", "_", knob), models, max_batch, progress)
        tables.append(run.table.assign(knob=knob, knob_value=run.table[AXES[knob]]))
    return pd.concat(tables, ignore_index=True)


def pose_summary(table: pd.DataFrame, columns: Sequence[str] = SCORES) -> pd.DataFrame:
    """Mean, standard error and count of the scores per knob and value, in run order."""
    return setting_summary(table, ["knob", "knob_value"], columns)


def requested_keypoint_images(identities: int = 8, task_seed: int = 0) -> list[Image.Image]:
    """The keypoint images of the turned poses asked for, one per identity (the references' keypoints turned)."""
    return [keypoint_image(turned_kps(s.kps)) for s in HeldoutTask.make(identities, task_seed).references]
