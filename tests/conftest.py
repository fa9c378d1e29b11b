"""Shared fixtures: synthetic faces and embeddings, a stand-in face analyzer, and the --runslow option.

Tests that do not need the real face models use `make_face` / `FakeAnalyzer`: they follow the
`Face` / `FaceAnalyzer` contract of `instantid_lab.face_analysis` (bbox, kps, embedding,
det_score, backend; detect, get_face, embed) without loading any weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")  # before anything imports matplotlib

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instantid_lab.errors import NoFaceError


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: needs real weights or minutes of CPU; use --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class FakeFace:
    """A face with the fields of `face_analysis.Face`."""

    bbox: np.ndarray  # [4] x1, y1, x2, y2
    kps: np.ndarray  # [5, 2]
    embedding: np.ndarray  # [D]
    det_score: float = 0.99
    backend: str = "fake"

    @property
    def normed_embedding(self) -> np.ndarray:
        return self.embedding / np.linalg.norm(self.embedding)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return float((x2 - x1) * (y2 - y1))


def _face_at(x: float, y: float, side: float, embedding: np.ndarray) -> FakeFace:
    """A frontal face whose box has top-left (x, y) and the given side length."""
    unit = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.78], [0.65, 0.78]])  # [5, 2] in the box
    kps = (np.array([x, y]) + side * unit).astype(np.float32)
    bbox = np.array([x, y, x + side, y + side], np.float32)
    return FakeFace(bbox=bbox, kps=kps, embedding=np.asarray(embedding, np.float32))


@pytest.fixture
def make_face():
    """Factory: make_face(x, y, side, embedding) -> a FakeFace with frontal keypoints in its box."""
    return _face_at


@pytest.fixture
def clustered_embeddings():
    """Embeddings of 4 identities x 3 photos: (embeddings [12, 32], labels), clearly clustered."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) * 5.0
    embs = np.concatenate([c + rng.normal(size=(3, 32)) for c in centres]).astype(np.float32)
    labels = [f"person{i}" for i in range(4) for _ in range(3)]
    return embs, labels


@dataclass
class FakeAnalyzer:
    """A face analyzer for tests: the "identity" of a synthetic photo is its colour.

    Each photo made by `colour_photo` is a flat colour with one or two grey squares ("faces");
    the embedding of a face is the photo's mean colour plus a small offset per face, so photos
    of the same colour are the same person.
    """

    backend: str = "fake"
    embedding_dim: int = 3
    calls: list = field(default_factory=list)

    def detect(self, image) -> list:
        array = np.asarray(Image.open(image) if isinstance(image, (str, Path)) else image, np.float32)
        self.calls.append(array.shape)
        height, width = array.shape[:2]
        colour = array[0, 0] / 255.0  # [3] background colour = identity
        if not colour.any():  # a black photo has no face
            return []
        faces = [_face_at(0.1 * width, 0.1 * height, 0.4 * min(width, height), colour + 0.01)]
        if array[int(0.75 * height), int(0.75 * width)].mean() == 128:  # a second, smaller face
            faces.append(_face_at(0.6 * width, 0.6 * height, 0.3 * min(width, height), colour[::-1] + 0.02))
        return faces

    def get_face(self, image):
        faces = self.detect(image)
        if not faces:
            raise NoFaceError("no face")
        return faces[0]

    def embed(self, image) -> np.ndarray:
        return self.get_face(image).embedding


def _colour_photo(path: Path, colour, size=(96, 80), second_face=False) -> Path:
    """Write a flat-colour test photo (see FakeAnalyzer) and return its path."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:] = colour
    if second_face:
        array[int(0.7 * size[1]) :, int(0.7 * size[0]) :] = 128
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def colour_photo():
    """Factory: colour_photo(path, rgb, size=(96, 80), second_face=False) writes a photo for FakeAnalyzer."""
    return _colour_photo


@pytest.fixture
def fake_analyzer():
    return FakeAnalyzer()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The suite's models are tiny: one thread runs them faster than two (thread overhead dominates),
    and keeps the suite from fighting other processes for the cores. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kps_image():
    """The tests' keypoint image: the tiny keypoints drawn at 64 x 64."""
    from instantid_lab.keypoints import draw_kps
    from instantid_lab.tiny import TINY_KPS

    return draw_kps(np.array(TINY_KPS, np.float32), (64, 64))


@pytest.fixture(scope="module")
def emb():
    """A tiny identity embedding (16-d, seeded)."""
    from instantid_lab.tiny import tiny_embedding

    return tiny_embedding(16, seed=1)
