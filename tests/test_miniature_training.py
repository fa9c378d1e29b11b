"""The miniature's training after the move to `miniature/training/`: one loop for every stage, the same losses.

`tests/recorded/miniature_losses.json` holds the per-step losses every stage gave at tiny settings
with the code before the restructuring (separate loops, a hand-written EMA, a training-only
denoiser). The same seeds must give the same losses now: bit for bit for every stage but InstantID,
whose denoiser is now the pipeline's own stage (equal to float32 rounding).
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from instantid_lab.miniature.autoencoder import AutoencoderConfig
from instantid_lab.miniature.base import BaseConfig
from instantid_lab.miniature.inspector import InspectorConfig
from instantid_lab.miniature.instantid import InstantIDConfig
from instantid_lab.miniature.recognizer import FaceRecognizer, RecognizerConfig, save_recognizer
from instantid_lab.miniature.training import checkpoint_path, train_autoencoder, train_base, train_instantid
from instantid_lab.miniature.training.data import labelled_renders
from instantid_lab.miniature.training.inspector import train_inspector
from instantid_lab.miniature.training.recognizers import train_recognizer

RECORDED = json.loads((Path(__file__).parent / "recorded" / "miniature_losses.json").read_text())


def losses_of(out: Path, name: str) -> list:
    return list(torch.load(checkpoint_path(out, name), weights_only=True)["losses"])


@pytest.fixture(scope="module")
def losses(tmp_path_factory) -> dict:
    """Every stage at tiny settings, as recorded: recogniser, inspector, autoencoder (2 phases), base, InstantID."""
    out, got = tmp_path_factory.mktemp("stages"), {}
    images, labels = labelled_renders(8, 4, seed=0)
    _, got["recognizer"] = train_recognizer(RecognizerConfig.tiny(), images, labels, steps=6, batch_size=8,
                                            progress=False)
    _, got["inspector"] = train_inspector(replace(InspectorConfig.quick(), steps=6, train_images=64), progress=False)
    train_autoencoder(AutoencoderConfig.quick(), out, progress=False)
    got["autoencoder"], got["autoencoder_decoder"] = losses_of(out, "autoencoder"), losses_of(out, "autoencoder_decoder")
    train_base(BaseConfig.quick(), out, progress=False)
    got["base"] = losses_of(out, "base")
    torch.manual_seed(0)
    save_recognizer(FaceRecognizer(replace(RecognizerConfig.tiny(), embedding_dim=64)),
                    out / "recognizer_conditioner.safetensors")
    train_instantid(InstantIDConfig.quick(), out, progress=False)
    got["instantid"] = losses_of(out, "instantid")
    return got


@pytest.mark.parametrize("stage", sorted(RECORDED))
def test_the_same_seed_gives_the_losses_recorded_before_the_restructuring(losses, stage):
    assert len(losses[stage]) == len(RECORDED[stage])
    # equal, but for float32 rounding: InstantID's denoiser is now the pipeline's (measured: <= 1.3e-7 relative)
    torch.testing.assert_close(torch.tensor(losses[stage]), torch.tensor(RECORDED[stage]), rtol=1e-6, atol=0)
