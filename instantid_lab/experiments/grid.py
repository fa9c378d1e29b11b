"""Ablation grids: a grid over the pipeline's arguments, run batched and cached, as a tidy table.

A `Grid` is a product of axes over `Knobs` (the arguments of one generation) times K held-out identities
x P prompts x S seeds. A *cell* is one setting x identity x prompt x seed: the identity's reference render
gives the identity embedding (the miniature's conditioning recogniser), its target render p the requested
keypoints and the caption (the prompt), the seed the starting noise, the same for an identity / prompt /
seed in every setting, so the cells of one identity differ only in the setting.

    run = run_grid(preset("scales", identities=8), "outputs/scales")   # Fig. 9: adapter x IdentityNet scale
    run.table, run.summary()                                           # one row per cell; means per setting

Cells that differ only in per-sample arguments (scales, prompts, identities, keypoints, noise) share one
denoising call, in chunks of at most `max_batch`; cells whose *call* differs (window, extra ControlNet,
negative identity, steps, guidance) go to separate calls. The chunks are a fixed partition of the cells,
so a cell is always computed in the same batch: a run interrupted and started again with the same
command computes only the unfinished chunks and ends with identical results.

In `out/`: `grid.json` (the declaration; a folder holding another grid is refused), `cells/<cell>.json`
(knobs + scores) and `images/<cell>.png`, written atomically (a temporary file, then `os.replace`),
`results.csv` (one row per cell); the CLI adds `sheets/` and `plots/` (`plots.write_report`).
Scores (`metrics.MiniatureScorer`, judges that did not condition): identity similarity and rank-1 (the
evaluating recogniser, among the grid's identities), keypoint error in px against the requested and the
reference's keypoints (was the reference's pose copied?), caption accuracy (`caption_mean`: mean of four).

    python -m instantid_lab.experiments.grid --preset scales --out outputs/scales [--identities 8 --seeds 1 --steps 20]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from ..errors import InputError, LabError
from ..miniature.base import GUIDANCE_SCALE, SAMPLING_STEPS
from ..miniature.evaluate import ABLATIONS
from ..miniature.training.loop import process_state
from ..types import PathLike
from .cells import GridTask, Models, cell_inputs, generate, score
from .metrics import summary

#: The scores `GridRun.summary` averages per setting.
SCORES = ("identity_similarity", "rank1", "keypoint_error", "reference_keypoint_error", "caption_mean", "caption_all")
PROMPTS, POSES, KEYPOINT_IMAGES, NEGATIVES = ("caption", "empty"), ("target", "reference", "turned"), \
    ("drawn", "black"), ("zeros", "noise")


@dataclass(frozen=True)
class Knobs:
    """The arguments of one generation. Per sample (batched): the scales, `prompt`, `pose`, `keypoint_image`
    and the extra ControlNet's scale; per call: the window, whether there is an extra ControlNet, the
    negative identity, steps and guidance.

    :param prompt: "caption" (the target's caption) or "empty" ("": Fig. 3's image-only row).
    :param pose: the requested keypoints: "target" (the target render's), "reference" (the reference's own:
        the pose is copied) or "turned" (`turned_kps`: the reference's turned 25° and moved 5 px).
    :param keypoint_image: "drawn" (the keypoint image of `pose`) or "black" (no keypoints at all).
    :param extra_controlnet: scale of an extra ControlNet on the target's edge map (0: none). In the
        miniature it is `demo.random_controlnet`, untrained: it shows the mechanics, not a trained control.
    :param negative_identity: "zeros" or "noise"; with "noise" the pipeline draws one noise for the whole
        call, so a cell's negative identity depends on its place in its chunk (fixed, hence reproducible).
    """

    adapter_scale: float = 1.0
    identitynet_scale: float = 1.0
    prompt: str = "caption"
    pose: str = "target"
    keypoint_image: str = "drawn"
    extra_controlnet: float = 0.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    negative_identity: str = "zeros"
    num_inference_steps: int = SAMPLING_STEPS
    guidance_scale: float = GUIDANCE_SCALE

    def __post_init__(self):
        for name, allowed in [("prompt", PROMPTS), ("pose", POSES), ("keypoint_image", KEYPOINT_IMAGES),
                              ("negative_identity", NEGATIVES)]:
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def call_key(self) -> tuple:
        """What must be equal for two cells to share one denoising call."""
        return (self.control_guidance_start, self.control_guidance_end, self.extra_controlnet > 0,
                self.negative_identity, self.num_inference_steps, self.guidance_scale)


KNOBS = tuple(f.name for f in fields(Knobs))


@dataclass(frozen=True)
class Level:
    """A named level of an axis that sets several knobs at once, e.g.
    `Level("adapter only", {"adapter_scale": 1.0, "identitynet_scale": 0.0})`."""

    label: str
    knobs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Setting:
    """One point of the grid: each axis's level label (or value) and the knobs they give."""

    labels: dict
    knobs: Knobs

    @property
    def id(self) -> str:
        """A file-name-safe name, e.g. "adapter_scale=0.5__identitynet_scale=1"."""
        parts = [f"{axis}={_label(value)}" for axis, value in self.labels.items()]
        return "__".join(re.sub(r"[^A-Za-z0-9._=-]+", "-", p) for p in parts) or "default"


@dataclass(frozen=True)
class Cell:
    """One generation: a setting for identity `identity` (index into the grid's identities), its target
    render `prompt` and noise `seed`."""

    setting: Setting
    identity: int
    prompt: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.setting.id}__i{self.identity}_p{self.prompt}_s{self.seed}"


@dataclass(frozen=True)
class Grid:
    """A product of axes over `Knobs`, for `identities` held-out identities x `prompts` target renders
    each x `seeds`.

    :param axes: axis name -> levels: values of the `Knobs` field of that name, or `Level` records (then
        the axis may have any name).
    :param fixed: `Knobs` fields that every cell shares (the rest keep their defaults).
    :param task_seed: which renders are the references and targets (`HeldoutTask.make(K, task_seed + p)`).
    """

    axes: dict
    identities: int = 8
    prompts: int = 1
    seeds: tuple = (0,)
    fixed: dict = field(default_factory=dict)
    task_seed: int = 0

    def __post_init__(self):
        levels = [v for values in self.axes.values() for v in values if isinstance(v, Level)]
        unknown = sorted((set(self.fixed) | {k for v in levels for k in v.knobs}) - set(KNOBS))
        if unknown:
            raise InputError(f"not pipeline arguments: {unknown}; use Knobs fields {KNOBS}")
        plain = lambda values: not any(isinstance(v, Level) for v in values)
        bad = [a for a, values in self.axes.items() if plain(values) != (a in KNOBS) or not (plain(values) or all(
            isinstance(v, Level) for v in values))]
        if bad:
            raise InputError(f"axes {bad}: an axis named like a Knobs field takes its values; any other axis takes "
                             "Level records")
        if self.identities < 1 or self.prompts < 1 or not self.seeds or not self.axes or not all(self.axes.values()):
            raise InputError("a grid needs identities >= 1, prompts >= 1, a seed, an axis and a level on every axis")

    def settings(self) -> list[Setting]:
        """Every combination of the axes' levels, the first axis slowest."""
        combos = itertools.product(*self.axes.values())
        return [self._setting(dict(zip(self.axes, levels))) for levels in combos]

    def _setting(self, chosen: dict) -> Setting:
        knobs = dict(self.fixed)
        for axis, level in chosen.items():
            knobs.update(level.knobs if isinstance(level, Level) else {axis: level})
        labels = {axis: level.label if isinstance(level, Level) else level for axis, level in chosen.items()}
        return Setting(labels, Knobs(**knobs))

    def cells(self) -> list[Cell]:
        """settings x identities x prompts x seeds, in that order."""
        return [Cell(s, k, p, seed) for s in self.settings() for k in range(self.identities)
                for p in range(self.prompts) for seed in self.seeds]

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


# ----------------------------------------------------------------------------- presets

PRESETS = {
    "scales": {"adapter_scale": (0.0, 0.5, 1.0, 1.5), "identitynet_scale": (0.0, 0.5, 1.0, 1.5)},  # Fig. 9
    "parts": {"parts": tuple(Level(name, {"adapter_scale": a, "identitynet_scale": c})
                             for name, (a, c) in ABLATIONS.items())},
    "prompt": {"conditions": (Level("empty prompt", {"prompt": "empty"}), Level("prompt"),             # Fig. 3
                              Level("prompt + extra ControlNet", {"extra_controlnet": 0.4}))},
    "windows": {"control_guidance_start": (0.0, 0.3), "control_guidance_end": (0.3, 0.6, 1.0)},
    "negative": {"negative_identity": ("zeros", "noise"), "adapter_scale": (0.5, 1.0, 1.5)},
}


def preset(name: str, identities: int = 8, prompts: int = 1, seeds: Sequence[int] = (0,),
           steps: int = SAMPLING_STEPS, guidance_scale: float = GUIDANCE_SCALE, **fixed) -> Grid:
    """A named grid: "scales" (adapter x IdentityNet scale, Fig. 9), "parts" (base / adapter only /
    IdentityNet only / both), "prompt" (empty prompt / prompt / prompt + an extra ControlNet, Fig. 3),
    "windows" (IdentityNet's start x end), "negative" (negative identity zeros vs noise x adapter scale).

    :param fixed: more `Knobs` fields shared by every cell.
    :raises InputError: an unknown name (the CLI's --preset).
    """
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r} (--preset): choose one of {sorted(PRESETS)}")
    fixed = {"num_inference_steps": steps, "guidance_scale": guidance_scale, **fixed}
    return Grid(dict(PRESETS[name]), identities, prompts, tuple(seeds), fixed)


# ----------------------------------------------------------------------------- running, with a cache


@dataclass
class GridRun:
    """A finished grid: the tidy table (results.csv + `image`, each cell's PNG), how many cells this run
    generated and how many it found done."""

    grid: Grid
    out: Path
    table: pd.DataFrame
    generated: int
    reused: int

    def summary(self, columns: Sequence[str] = SCORES) -> pd.DataFrame:
        """Mean, standard error and count of `columns` per setting (`<score>_mean`, ...), in grid order."""
        return setting_summary(self.table, list(self.grid.axes), columns)


def setting_summary(table: pd.DataFrame, by: Sequence[str], columns: Sequence[str] = SCORES) -> pd.DataFrame:
    """`metrics.summary` of `columns` per group of `by`, the groups in the order they first appear."""
    order = table[list(by)].drop_duplicates()
    return order.merge(summary(table, by, columns), on=list(by), how="left").reset_index(drop=True)


def plan_chunks(cells: Sequence[Cell], max_batch: int = 64) -> list[list[Cell]]:
    """The fixed partition of `cells` into denoising calls: grouped by `Knobs.call_key` (first seen
    first), each group cut into chunks of at most `max_batch`, in cell order."""
    if max_batch < 1:
        raise InputError(f"max_batch (--max-batch) must be >= 1, got {max_batch}")
    groups: dict = {}
    for cell in cells:
        groups.setdefault(cell.setting.knobs.call_key(), []).append(cell)
    return [g[i:i + max_batch] for g in groups.values() for i in range(0, len(g), max_batch)]


def run_grid(grid: Grid, out: PathLike, models: Optional[Models] = None, max_batch: int = 64,
             progress: bool = True) -> GridRun:
    """Generate and score every cell not yet in `out`, then write `out/results.csv`.

    Under `torchrun --nproc_per_node N` (or `accelerate launch`) the processes share the chunks (chunk k
    goes to process k mod N), each writing its cells into the cache; the main process then assembles
    `results.csv` from the cache, the same table one process would write.

    :param models: default `Models.miniature()` (loaded only when a cell needs generating).
    :raises InputError: `out` is a file, or holds another grid's results.
    """
    out, cells, processes = open_folder(out, grid), grid.cells(), process_state()
    mine = plan_chunks(cells, max_batch)[processes.process_index::processes.num_processes]
    todo = [chunk for chunk in mine if not all(_done(out, c) for c in chunk)]
    reused = sum(_done(out, c) for c in cells)
    processes.wait_for_everyone()  # every process counted the cache before any writes to it
    if todo:
        models = models or Models.miniature()
        task = GridTask.make(grid.identities, grid.prompts, models.conditioner, grid.task_seed)
        with tqdm(total=sum(map(len, todo)), unit="cell", disable=not progress, desc=out.name) as bar:
            for chunk in todo:
                run_chunk(models, task, chunk, out)
                bar.update(len(chunk))
    processes.wait_for_everyone()  # every process's cells are in the cache
    table = pd.DataFrame([_row(json.loads((out / "cells" / f"{c.id}.json").read_text())) for c in cells])
    if processes.is_main_process:
        write_atomic(out / "results.csv", table.to_csv(index=False).encode())
    table["image"] = [str(out / "images" / f"{c.id}.png") for c in cells]  # in memory only: results.csv stays portable
    return GridRun(grid, out, table, len(cells) - reused, reused)


def run_chunk(models: Models, task: GridTask, chunk: Sequence[Cell], out: Path) -> int:
    """Generate and score one chunk; write the image and the JSON of each cell not yet done (the JSON last:
    it marks the cell finished). :return: the number of cells written."""
    images = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in generate(models, task, chunk)]
    scores = score(models, task, chunk, images)
    written = 0
    for cell, image, row in zip(chunk, images, scores.to_dict("records")):
        if _done(out, cell):
            continue
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        write_atomic(out / "images" / f"{cell.id}.png", buffer.getvalue())
        write_atomic(out / "cells" / f"{cell.id}.json", json.dumps(_record(task, cell, row), indent=1).encode())
        written += 1
    return written


def _record(task: GridTask, cell: Cell, scores: dict) -> dict:
    return {"cell": cell.id, "setting": cell.setting.labels, "identity_index": cell.identity,
            "prompt_index": cell.prompt, "seed": cell.seed, "prompt_text": cell_inputs(task, cell).prompt,
            "knobs": asdict(cell.setting.knobs), "scores": {k: _plain(v) for k, v in scores.items()}}


def _row(record: dict) -> dict:
    """A cell's JSON as one row: cell, the labels of `Level` axes, indices, knobs, scores."""
    labels = {k: v for k, v in record["setting"].items() if k not in KNOBS}
    head = {k: record[k] for k in ("cell", "identity_index", "prompt_index", "seed", "prompt_text")}
    return {"cell": head.pop("cell"), **labels, **head, **record["knobs"], **record["scores"]}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _done(out: Path, cell: Cell) -> bool:
    return (out / "cells" / f"{cell.id}.json").exists()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def open_folder(out: PathLike, grid: Grid) -> Path:
    """`out` as a results folder for `grid`: created with `grid.json`, or checked against it.

    :raises InputError: `out` is a file, or its `grid.json` declares another grid.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out / out={str(out)!r} is a file; give a folder for the results")
    declared = out / "grid.json"
    if declared.exists() and json.loads(declared.read_text()) != grid.to_json():
        raise InputError(f"--out / out={str(out)!r} holds the results of another grid (its grid.json differs); "
                         "give another folder, or delete this one to start again")
    write_atomic(declared, json.dumps(grid.to_json(), indent=1).encode())
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: run a preset grid on the miniature into --out (results.csv, images/, sheets/, plots/)."""
    parser = argparse.ArgumentParser(prog="python -m instantid_lab.experiments.grid", description=main.__doc__)
    parser.add_argument("--preset", required=True, help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--out", required=True, type=Path, help="results folder (rerun the same command to resume)")
    parser.add_argument("--identities", type=int, default=8, help="held-out identities K")
    parser.add_argument("--prompts", type=int, default=1, help="target renders (prompt + keypoints) per identity")
    parser.add_argument("--seeds", type=int, default=1, help="noise seeds per identity and prompt")
    parser.add_argument("--steps", type=int, default=SAMPLING_STEPS, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--max-batch", type=int, default=64, help="images per denoising call")
    parser.add_argument("--folder", type=Path, default=None, help="the miniature's weights (default: shipped)")
    args = parser.parse_args(argv)
    try:
        grid = preset(args.preset, args.identities, args.prompts, range(args.seeds), args.steps, args.guidance)
        open_folder(args.out, grid)  # a bad folder fails before any model loads
        run = run_grid(grid, args.out, None if args.folder is None else Models.miniature(args.folder), args.max_batch)
    except LabError as error:
        parser.error(str(error))
    if not process_state().is_main_process:
        return  # the main process writes the plots and the summary
    from .plots import write_report  # matplotlib only for the report

    write_report(run)
    print(f"{len(run.table)} cells: generated {run.generated}, reused {run.reused} -> {run.out / 'results.csv'}")


if __name__ == "__main__":
    main()
