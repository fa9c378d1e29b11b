"""Ablation grids: the declaration expands to the right cells, batching changes nothing, the cache is
trusted, an interrupted run resumes to the same results, and bad input is named."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from instantid_lab.errors import InputError
from instantid_lab.experiments.cells import GridTask, Models, generate, turned_kps
from instantid_lab.experiments.grid import Grid, Level, main, open_folder, plan_chunks, preset, run_grid

PARTS = (Level("base", {"adapter_scale": 0.0, "identitynet_scale": 0.0}), Level("both"))


@pytest.fixture(scope="module")
def models():
    return Models.miniature()


def test_a_grid_expands_to_settings_x_identities_x_prompts_x_seeds():
    grid = Grid({"parts": PARTS, "control_guidance_end": (0.5, 1.0)}, identities=3, prompts=2, seeds=(4, 7),
                fixed={"num_inference_steps": 5, "prompt": "empty"})
    cells = grid.cells()
    assert len(grid.settings()) == 4 and len(cells) == 4 * 3 * 2 * 2
    assert len({c.id for c in cells}) == len(cells)
    first = cells[0]
    assert (first.setting.labels, first.identity, first.prompt, first.seed) == (
        {"parts": "base", "control_guidance_end": 0.5}, 0, 0, 4)
    knobs = first.setting.knobs
    assert (knobs.adapter_scale, knobs.identitynet_scale, knobs.control_guidance_end) == (0.0, 0.0, 0.5)
    assert (knobs.num_inference_steps, knobs.prompt) == (5, "empty")              # `fixed` reaches every cell
    assert cells[-1].setting.knobs.adapter_scale == 1.0                           # "both": the defaults
    assert [c.seed for c in cells[:4]] == [4, 7, 4, 7]                            # seeds fastest, then prompts
    assert len(preset("scales").cells()) == 16 * 8 and len(preset("parts", identities=5, seeds=(0, 1)).cells()) == 40


def test_chunks_share_one_call_and_respect_max_batch():
    grid = Grid({"control_guidance_end": (0.5, 1.0), "adapter_scale": (0.0, 1.0)}, identities=3)
    chunks = plan_chunks(grid.cells(), max_batch=4)
    assert [len(c) for c in chunks] == [4, 2, 4, 2]
    assert all(len({c.setting.knobs.call_key() for c in chunk}) == 1 for chunk in chunks)
    assert [c.id for chunk in chunks for c in chunk] == [c.id for c in grid.cells()]


def test_bad_declarations_presets_and_folders_are_named(tmp_path, capsys):
    with pytest.raises(InputError, match="--preset"):
        preset("fig9")
    with pytest.raises(InputError, match="adapter_scal"):
        Grid({"adapter_scal": (0.0, 1.0)})
    with pytest.raises(InputError, match="strength"):
        Grid({"parts": (Level("odd", {"strength": 0.5}),)})
    with pytest.raises(InputError, match="pose"):
        Grid({"pose": ("sideways",)}).cells()
    with pytest.raises(SystemExit):
        main(["--preset", "fig9", "--out", str(tmp_path / "x")])
    assert "--preset" in capsys.readouterr().err
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InputError, match="--out"):
        open_folder(tmp_path / "file", preset("parts"))
    open_folder(tmp_path / "run", preset("parts"))
    with pytest.raises(InputError, match="another grid"):
        open_folder(tmp_path / "run", preset("parts", identities=3))


def test_turned_keypoints_keep_the_face_and_change_the_pose():
    kps = np.array([[10, 14], [18, 15], [14, 19], [11, 23], [17, 23]], np.float32)
    turned = turned_kps(kps)
    distances = lambda k: np.linalg.norm(k[:, None] - k[None], axis=-1)
    roll = lambda k: np.degrees(np.arctan2(*(k[1] - k[0])[::-1]))
    assert np.allclose(distances(kps), distances(turned), atol=1e-3)          # same face shape
    assert roll(kps) > 0 > roll(turned) and abs(roll(kps) - roll(turned) - 25) < 1e-3
    assert turned[:, 0].mean() - kps[:, 0].mean() == pytest.approx(5, abs=1e-3)


def test_batched_cells_equal_separate_single_cell_runs(models):
    grid = Grid({"mix": (Level("base", {"adapter_scale": 0.0, "identitynet_scale": 0.0}),
                         Level("empty, turned", {"prompt": "empty", "pose": "turned", "adapter_scale": 0.5}),
                         Level("no keypoints", {"keypoint_image": "black", "identitynet_scale": 1.5}))},
                identities=2, seeds=(0, 1), fixed={"num_inference_steps": 2})
    task = GridTask.make(grid.identities, grid.prompts, models.conditioner)
    cells = grid.cells()
    batched = generate(models, task, cells)                                     # [12, 32, 32, 3]
    alone = np.stack([generate(models, task, [c])[0] for c in cells])
    assert np.abs(batched - alone).max() <= 1e-4
    assert np.abs(batched[0] - batched[4]).mean() > 1e-3                       # settings do differ
    extra = Grid({"extra_controlnet": (0.2, 0.8)}, identities=1, fixed={"num_inference_steps": 2}).cells()
    assert np.abs(generate(models, task, extra)[1] - generate(models, task, extra[1:])[0]).max() <= 1e-4


def test_a_finished_grid_is_read_back_without_generating(models, tmp_path):
    grid = Grid({"adapter_scale": (0.0, 1.0)}, identities=2, fixed={"num_inference_steps": 2})
    first = run_grid(grid, tmp_path, models, progress=False)
    assert (first.generated, first.reused) == (4, 0) and len(first.table) == 4
    assert {"identity_similarity", "rank1", "keypoint_error", "reference_keypoint_error", "caption_mean"} <= set(
        first.table)
    assert json.loads((tmp_path / "cells" / f"{grid.cells()[0].id}.json").read_text())["knobs"]["adapter_scale"] == 0
    results = (tmp_path / "results.csv").read_bytes()
    again = run_grid(grid, tmp_path, Models(pipe=None, conditioner=None, scorer=None), progress=False)  # never used
    assert (again.generated, again.reused) == (0, 4)
    assert (tmp_path / "results.csv").read_bytes() == results
    assert list(again.summary()["adapter_scale"]) == [0.0, 1.0]


def _cli(out, *, wait=True):
    command = [sys.executable, "-m", "instantid_lab.experiments.grid", "--preset", "parts", "--out", str(out),
               "--identities", "3", "--steps", "3", "--max-batch", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return process.communicate(timeout=120) if wait else process


def test_an_interrupted_run_resumes_to_identical_results_without_redoing_cells(tmp_path):
    interrupted, whole = tmp_path / "interrupted", tmp_path / "whole"
    process = _cli(interrupted, wait=False)
    deadline = time.time() + 90
    while not list((interrupted / "cells").glob("*.json")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (interrupted / "cells").glob("*.json")}
    assert 0 < len(done) < 12 and not (interrupted / "results.csv").exists()   # really cut short

    out, _ = _cli(interrupted)
    assert f"generated {12 - len(done)}, reused {len(done)}" in out
    assert all((interrupted / "cells" / name).stat().st_mtime_ns == t for name, t in done.items())
    _cli(whole)
    assert (interrupted / "results.csv").read_bytes() == (whole / "results.csv").read_bytes()
    assert (interrupted / "plots" / "identity_vs_prompt.png").exists()
    assert (interrupted / "sheets" / "references.png").exists()


def test_two_processes_share_the_cells_and_write_the_table_of_one_process(tmp_path):
    """`torchrun --nproc_per_node 2`: chunk k goes to process k mod 2; the main process merges the cache."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    grid = ["-m", "instantid_lab.experiments.grid", "--preset", "parts", "--identities", "4", "--steps", "2",
            "--max-batch", "4"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for command, out in (([sys.executable], "one"), ([torchrun, "--nproc_per_node", "2"], "two")):
        done = subprocess.run([*command, *grid, "--out", str(tmp_path / out)], capture_output=True, text=True,
                              timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "16 cells: generated 16, reused 0" in done.stdout
    assert (tmp_path / "one" / "results.csv").read_bytes() == (tmp_path / "two" / "results.csv").read_bytes()
