"""The miniature's evaluation: the inspector, the held-out task and its judges, the face analyzer, the
shipped pipeline, and training with held-out scores at every checkpoint."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from instantid_lab.data import MINIATURE_DIR
from instantid_lab.errors import InputError, ModelFilesMissingError
from instantid_lab.face_analysis import get_face_analyzer
from instantid_lab.miniature.autoencoder import AutoencoderConfig
from instantid_lab.miniature.base import BaseConfig
from instantid_lab.miniature import evaluate
from instantid_lab.miniature.evaluate import HeldoutTask, Judges, caption_accuracy, keypoint_distances
from instantid_lab.miniature.inspector import ATTRIBUTES, InspectorConfig, inspect, load_inspector, save_inspector
from instantid_lab.miniature.instantid import ADAPTER_FILE, InstantIDConfig, keypoint_image, load_miniature
from instantid_lab.miniature.recognizer import (
    FaceRecognizer, RecognizerConfig, embed_images, load_recognizer, save_recognizer,
)
from instantid_lab.miniature.training import LoopSettings, train_autoencoder, train_base, train_instantid, train_loop
from instantid_lab.miniature.training.inspector import train_inspector
from instantid_lab.miniature.world import HELDOUT_IDS, Caption, Pose, images_to_tensor, random_samples, render_id
from instantid_lab.pipeline import InstantIDPipeline
from instantid_lab.worlds import load_pipeline

INSPECTOR = MINIATURE_DIR / "inspector.safetensors"
CONDITIONER = MINIATURE_DIR / "recognizer_conditioner.safetensors"
EVALUATOR = MINIATURE_DIR / "recognizer_evaluator.safetensors"


def mean_distance(a, b) -> float:
    """Mean distance in pixels between keypoints a [..., 5, 2] and b [..., 5, 2]."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b), axis=-1).mean())


# ----------------------------------------------------------------------------- inspector


@pytest.fixture(scope="module")
def quick_inspector():
    return train_inspector(InspectorConfig.quick(), progress=False)


def test_inspector_quick_training_lowers_the_loss(quick_inspector):
    _, losses = quick_inspector
    assert len(losses) == InspectorConfig.quick().steps
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_inspect_reads_keypoints_and_values_of_each_attribute(quick_inspector):
    model, _ = quick_inspector
    samples = random_samples(HELDOUT_IDS, 6, seed=0)
    read = inspect(model, images_to_tensor([s.image for s in samples]), batch_size=4)  # two batches
    assert read["kps"].shape == (6, 5, 2)
    for name, values in ATTRIBUTES.items():
        assert len(read[name]) == 6 and set(read[name]) <= set(values), name


def test_keypoint_distance_is_the_mean_distance_in_pixels_per_face():
    kps = torch.rand(3, 5, 2) * 32
    assert torch.equal(keypoint_distances(kps, kps), torch.zeros(3))
    moved = kps + torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]], [[0.0, 0.0]]])
    torch.testing.assert_close(keypoint_distances(moved, kps), torch.tensor([5.0, 1.0, 0.0]))


def test_caption_accuracy_counts_each_attribute_and_all_four():
    captions = [Caption("blue", "neutral", "none", "flat"), Caption("red", "smiling", "hat", "outline"),
                Caption("green", "neutral", "glasses", "flat"), Caption("stripes", "smiling", "none", "outline")]
    read = {"background": ["blue", "red", "green", "blue"],  # the last one wrong
            "expression": ["neutral", "smiling", "smiling", "smiling"],  # the third wrong
            "accessory": ["none", "hat", "glasses", "none"],  # all right
            "style": ["flat", "flat", "flat", "outline"]}  # the second wrong
    assert caption_accuracy(read, captions) == {
        "background": 0.75, "expression": 0.75, "accessory": 1.0, "style": 0.75, "all": 0.25, "mean": 0.8125}


def test_saved_inspector_loads_with_its_config_and_reads_the_same(quick_inspector, tmp_path):
    model, _ = quick_inspector
    save_inspector(model, tmp_path / "inspector.safetensors")  # stored as float16
    loaded = load_inspector(tmp_path / "inspector.safetensors")
    x = images_to_tensor([s.image for s in random_samples(HELDOUT_IDS, 16, seed=1)])
    with torch.no_grad():
        before, after = model(x), loaded(x)
    assert loaded.config == model.config
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert (before["kps"] - after["kps"]).abs().max() < 0.05  # pixels: float16 weights move keypoints negligibly
    assert inspect(model, x)["background"] == inspect(loaded, x)["background"]


def test_a_missing_inspector_says_how_to_train_it(tmp_path):
    with pytest.raises(ModelFilesMissingError, match="python -m instantid_lab.miniature.train inspector"):
        load_inspector(tmp_path / "inspector.safetensors")


# ----------------------------------------------------------------------------- held-out task and judges


def test_heldout_task_is_deterministic_and_holds_only_heldout_identities():
    task, again, other = HeldoutTask.make(5, seed=3), HeldoutTask.make(5, seed=3), HeldoutTask.make(5, seed=4)
    pixels = lambda t: np.stack([np.asarray(s.image) for s in t.references + t.targets])
    assert np.array_equal(pixels(task), pixels(again)) and task.prompts() == again.prompts()
    assert not np.array_equal(pixels(task), pixels(other))  # another seed, other poses and captions
    assert len(set(task.ids)) == 5 and all(i in HELDOUT_IDS for i in task.ids)
    for i, reference, target in zip(task.ids, task.references, task.targets):
        assert reference.identity_id == target.identity_id == i
        assert (reference.pose, reference.caption) != (target.pose, target.caption)
    assert [len(g) for g in task.gallery] == [3] * 5
    assert task.prompts() == [t.caption.text() for t in task.targets]
    assert all(k.size == (32, 32) for k in task.keypoint_images())


def test_heldout_task_sets_are_disjoint_slices_of_the_heldout_ids():
    first, second = HeldoutTask.make(4, seed=0, first=1000), HeldoutTask.make(4, seed=0, first=2000)
    assert first.ids == list(HELDOUT_IDS[1000:1004]) and second.ids == list(HELDOUT_IDS[2000:2004])
    assert not set(first.ids) & set(second.ids)
    assert HeldoutTask.make(4, seed=0).ids == list(HELDOUT_IDS[:4])  # the default set starts at the first id


def test_protocol_averages_every_set_and_seed_and_keeps_the_lowest_rank1(monkeypatch):
    calls = []

    def fake_run(pipe, conditioner, evaluator, inspector, n, seed=0, first=0, **sampling):
        calls.append((first, seed))
        score = {"rank1": first / 1000 + seed, "caption_accuracy": {"all": float(seed)}}
        return {"rows": {"both": score}, "sampler": f"DDIM 20 steps, seed {seed}"}

    monkeypatch.setattr(evaluate, "evaluate_ablations", fake_run)
    result = evaluate.evaluate_protocol(None, None, None, None, 8, sets=(1000, 2000), seeds=(0, 1))
    assert calls == [(1000, 0), (1000, 1), (2000, 0), (2000, 1)]
    assert result["rows"]["both"] == {"rank1": 2.0, "caption_accuracy": {"all": 0.5}}  # (1 + 2 + 2 + 3) / 4
    assert result["min_rank1"] == {"both": 1.0}
    assert "4 runs" in result["sampler"] and "seed 0" not in result["sampler"]


@pytest.fixture(scope="module")
def shipped_judges():
    task = HeldoutTask.make(12, seed=0)
    return task, Judges(task, load_recognizer(EVALUATOR), load_inspector(INSPECTOR))


def test_judges_score_the_real_targets_far_above_chance(shipped_judges):
    task, judges = shipped_judges
    scores = judges.score([s.image for s in task.targets])
    assert scores["rank1"] >= 0.75  # chance: 1 / 12
    assert scores["keypoint_error_px"] < 1.5
    assert scores["caption_accuracy"]["mean"] > 0.8
    shuffled = judges.score([s.image for s in task.targets[1:] + task.targets[:1]])  # image k shows identity k + 1
    assert shuffled["rank1"] <= 0.25
    assert shuffled["identity_similarity"] < scores["identity_similarity"] - 0.3
    assert shuffled["keypoint_error_px"] > 2 * scores["keypoint_error_px"]


# ----------------------------------------------------------------------------- face analyzer


@pytest.fixture(scope="module")
def analyzer():
    return get_face_analyzer("miniature")


def test_miniature_analyzer_finds_the_rendered_keypoints_and_the_conditioning_embedding(analyzer):
    samples = random_samples(HELDOUT_IDS, 8, seed=5)
    faces = [analyzer.get_face(s.image) for s in samples]
    assert mean_distance([f.kps for f in faces], [s.kps for s in samples]) < 1.5
    assert analyzer.embedding_dim == 64 and faces[0].embedding.shape == (64,)
    assert np.linalg.norm(faces[0].embedding) == pytest.approx(1.0, abs=1e-5)
    conditioner = load_recognizer(CONDITIONER)
    expected = embed_images(conditioner, images_to_tensor([samples[0].image]))[0].numpy()
    np.testing.assert_allclose(faces[0].embedding, expected, atol=1e-5)


def test_miniature_analyzer_scales_keypoints_to_a_larger_image(analyzer):
    samples = random_samples(HELDOUT_IDS, 4, seed=6)
    big = [s.image.resize((128, 128), Image.NEAREST) for s in samples]  # box-downsampling gives back the render
    faces, small = [analyzer.get_face(b) for b in big], [analyzer.get_face(s.image) for s in samples]
    assert mean_distance([f.kps for f in faces], [4 * s.kps for s in samples]) < 4 * 1.5
    np.testing.assert_allclose(np.stack([f.kps for f in faces]), 4 * np.stack([f.kps for f in small]), atol=1e-3)
    for face in faces:
        x1, y1, x2, y2 = face.bbox
        (kx1, ky1), (kx2, ky2) = face.kps.min(0), face.kps.max(0)
        assert x1 < kx1 < kx2 < x2 and y1 < ky1 < ky2 < y2  # the box holds the keypoints


def test_miniature_analyzer_takes_no_options():
    with pytest.raises(InputError, match="no options"):
        get_face_analyzer("miniature", det_thresh=0.4)


# ----------------------------------------------------------------------------- the shipped pipeline


def test_load_pipeline_miniature_generates_32px_images_the_same_for_the_same_seed():
    pipe = load_pipeline("miniature")
    assert isinstance(pipe, InstantIDPipeline) and pipe.controlnet is not None and pipe.has_identity_attention
    pipe.set_progress_bar_config(disable=True)
    reference, target = render_id(1_000_001), render_id(1_000_001, Pose(roll=10.0), Caption("red", "smiling"))
    embedding = embed_images(load_recognizer(CONDITIONER), images_to_tensor([reference.image]))[0]
    run = lambda seed: pipe(target.caption.text(), embedding, keypoint_image(target.kps), num_inference_steps=3,
                            generator=torch.Generator().manual_seed(seed)).images[0]
    first, again, other = run(0), run(0), run(1)
    assert first.size == (32, 32)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


# ----------------------------------------------------------------------------- scoring during training


def toy_problem():
    """A linear regression for `train_loop`: (model, loss_fn, on_checkpoint)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])

    def loss_fn(generator, shard):
        index = torch.randint(len(x), (8,), generator=generator)
        return F.mse_loss(model(x[index]), y[index])

    def on_checkpoint(step):
        with torch.no_grad():
            return {"loss": float(F.mse_loss(model(x), y)), "training": model.training}

    return model, loss_fn, on_checkpoint


SETTINGS = LoopSettings(steps=6, lr=0.3, checkpoint_every=2)


def run_toy(out, **kw):
    model, loss_fn, on_checkpoint = toy_problem()
    return train_loop("toy", model, loss_fn, SETTINGS, out, progress=False, on_checkpoint=on_checkpoint, **kw)


def test_on_checkpoint_scores_step_0_and_every_checkpoint_in_eval_mode(tmp_path):
    state = run_toy(tmp_path)
    assert [e["step"] for e in state.evals] == [0, 2, 4, 6]
    assert not any(e["training"] for e in state.evals)
    assert state.evals[-1]["loss"] < 0.5 * state.evals[0]["loss"]


def test_with_an_ema_on_checkpoint_scores_the_averaged_weights_and_training_continues_on_the_raw_ones(tmp_path):
    model, loss_fn, _ = toy_problem()
    seen = []

    def on_checkpoint(step):
        seen.append(model.weight.detach().clone())
        return {}

    settings, stop = replace(SETTINGS, ema_decay=0.9), SETTINGS.steps - 1  # interrupted: the model keeps its raw weights
    state = train_loop("toy", model, loss_fn, settings, None, stop_after=stop, progress=False, on_checkpoint=on_checkpoint)
    plain_model, plain_loss, _ = toy_problem()
    plain = train_loop("toy", plain_model, plain_loss, SETTINGS, None, stop_after=stop, progress=False)
    assert state.losses == plain.losses  # scoring the average never changed the training
    assert torch.equal(model.weight, plain_model.weight)  # the raw weights are back after each scoring
    averaged = state.ema.shadow_params[0]
    assert torch.equal(seen[-1], averaged) and not torch.equal(averaged, model.weight)
    finished_model, finished_loss, _ = toy_problem()
    finished = train_loop("toy", finished_model, finished_loss, settings, None, progress=False)
    assert torch.equal(finished_model.weight, finished.ema.shadow_params[0])  # a finished run holds the average


def test_scores_survive_an_interruption_and_the_resumed_run_continues_them(tmp_path):
    whole = run_toy(tmp_path / "whole")
    partial = run_toy(tmp_path / "resumed", stop_after=3)
    assert [e["step"] for e in partial.evals] == [0, 2, 3] and not partial.finished
    resumed = run_toy(tmp_path / "resumed")  # a new process would start like this: fresh model, same folder
    assert [e["step"] for e in resumed.evals] == [0, 2, 3, 4, 6] and resumed.finished
    assert resumed.evals[:3] == partial.evals
    for got, want in zip(resumed.evals[3:], whole.evals[2:]):  # same batches as the uninterrupted run
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory):
    """A base trained at the quick presets, with two tiny random recognisers (64-d), in its own folder."""
    out = tmp_path_factory.mktemp("quick_base")
    train_autoencoder(AutoencoderConfig.quick(), out, progress=False)
    train_base(BaseConfig.quick(), out, progress=False)
    for role, seed in (("conditioner", 0), ("evaluator", 1)):
        torch.manual_seed(seed)
        save_recognizer(FaceRecognizer(replace(RecognizerConfig.tiny(), embedding_dim=64, seed=seed)),
                        out / f"recognizer_{role}.safetensors")
    return out


def test_train_instantid_on_a_base_folder_writes_parts_and_scores_into_another(quick_base, tmp_path):
    base_files = sorted(p.name for p in quick_base.iterdir())
    out = tmp_path / "retrained"
    config = replace(InstantIDConfig.quick(), eval_identities=2)
    report = train_instantid(config, out, base_dir=quick_base, track=2, progress=False)
    held = report["heldout_identity"]
    assert held["identities"] == 2 and {"real renders", "instantid", "base only"} <= set(held)
    assert all({"rank1", "identity_similarity"} <= set(held[k]) for k in ("real renders", "instantid", "base only"))
    assert (out / "instantid_samples.png").is_file()
    steps = list(range(0, config.steps + 1, config.checkpoint_every))
    assert [e["step"] for e in report["evals"]] == steps
    assert all(0 <= e["rank1"] <= 1 and -1 <= e["identity_similarity"] <= 1 for e in report["evals"])
    assert json.loads((out / "instantid.json").read_text())["evals"] == report["evals"]
    assert (out / ADAPTER_FILE).is_file() and (out / "identitynet" / "config.json").is_file()
    assert sorted(p.name for p in quick_base.iterdir()) == base_files  # nothing written into the base folder
    pipe = load_miniature(quick_base, instantid=out)
    assert pipe.controlnet is not None and pipe.has_identity_attention


def test_instantid_ships_the_ema_weights_and_resumes_a_checkpoint_written_without_one(quick_base, tmp_path):
    """The EMA only changes what is saved, never the training: same losses, other shipped weights. A run
    interrupted before the EMA existed resumes with an EMA started at the resumed weights."""
    from safetensors.torch import load_file

    def run(out, ema_decay, stop_after=None):
        config = replace(InstantIDConfig.quick(), ema_decay=ema_decay)
        return train_instantid(config, out, base_dir=quick_base, stop_after=stop_after, progress=False)

    def shipped_and_raw(out):
        shipped = load_file(out / ADAPTER_FILE)
        raw = torch.load(out / "instantid_checkpoint.pt", weights_only=True)["model"]
        return shipped, {k: raw[k] for k in shipped}  # the parts' state-dict names equal the file's

    plain, averaged = run(tmp_path / "plain", None), run(tmp_path / "ema", 0.999)
    assert plain["losses"] == averaged["losses"]
    shipped, raw = shipped_and_raw(tmp_path / "plain")
    assert all(torch.equal(shipped[k], raw[k]) for k in shipped)  # no EMA: the last weights ship
    shipped, raw = shipped_and_raw(tmp_path / "ema")
    assert any(not torch.equal(shipped[k], raw[k]) for k in shipped)  # the average ships, not the last weights
    run(tmp_path / "resumed", None, stop_after=3)
    resumed = run(tmp_path / "resumed", 0.999)
    assert resumed["steps"] == plain["steps"] and resumed["losses"] == plain["losses"]


def test_the_training_cli_keeps_its_arguments_and_the_old_stage_name(quick_base, tmp_path):
    """`--base` (old name of `--base-dir`) and `encoders` (old name of `recognizers`) still parse."""
    from instantid_lab.miniature.train import ALIASES, parse_args

    args = parse_args(["instantid", "--preset", "quick", "--base", str(quick_base), "--out", str(tmp_path)])
    assert args.base_dir == quick_base and args.stage == "instantid"
    assert ALIASES[parse_args(["encoders"]).stage] == "recognizers"
    done = subprocess.run([sys.executable, "-m", "instantid_lab.miniature.train", "instantid", "--preset", "quick",
                           "--base-dir", str(quick_base), "--out", str(tmp_path), "--steps", "2",
                           "--set", "timestep_draws=3", "--set", "ema_decay=None"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "instantid.json").read_text())
    assert report["steps"] == 2
    assert report["config"]["timestep_draws"] == 3 and report["config"]["ema_decay"] is None  # --set is recorded


def test_miniature_analyzer_finds_no_face_in_a_blank_image_and_scores_renders(analyzer):
    from instantid_lab.errors import NoFaceError

    for colour in [(0, 0, 0), (255, 255, 255), (70, 110, 200)]:
        with pytest.raises(NoFaceError, match="miniature backend"):
            analyzer.get_face(Image.new("RGB", (32, 32), colour))
    scores = [analyzer.get_face(s.image).det_score for s in random_samples(HELDOUT_IDS, 40, seed=8)]
    assert 0.2 < min(scores) and max(scores) <= 1.0  # measured on 2000 renders: min 0.30, median 0.58
