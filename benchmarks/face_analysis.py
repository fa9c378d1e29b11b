"""Faces per second of face analysis on the bundled photos, split into its stages.

    python benchmarks/face_analysis.py [--repeats N] [--per-photo]

Runs the dlib backend three ways: its CNN face detector and descriptor network both run by the
torch ports ("dlib+torch", the default), only the descriptor ported ("dlib+torchdesc": dlib's own
CNN detector), and neither ("dlib+dlib"); and the insightface backend too when the antelopev2
files are found.
Model loading is excluded (it happens once per process); decoding the JPEGs is included in
"detect". Stages: detect = finding the boxes; describe = keypoints + embedding of every face,
of which "embed" is the embedding alone (the rest is the landmark fit; insightface's
keypoints come with detection, so its rest is ~0). "cpu s" is the process's CPU time: on a
machine shared with other work, faces per CPU second says more than faces per wall second
(dlib runs on one core; torch and onnxruntime may use several). The goal is >= 10 faces/s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

import numpy as np

from instantid_lab.data import face_photos
from instantid_lab.face_analysis import find_antelopev2, get_face_analyzer
from instantid_lab.face_analysis.base import FaceAnalyzer
from instantid_lab.images import to_array


@dataclass
class Timing:
    """Seconds spent per stage, and faces found."""

    faces: int = 0
    detect: float = 0.0
    describe: float = 0.0
    embed: float = 0.0
    cpu: float = 0.0
    rows: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.detect + self.describe

    def add(self, name: str, faces: int, detect: float, describe: float, embed: float, fallback: bool = False) -> None:
        self.faces, self.detect, self.describe, self.embed = (
            self.faces + faces, self.detect + detect, self.describe + describe, self.embed + embed)
        self.rows.append((name, faces, detect, describe, embed, fallback))

    def split(self) -> tuple[float, float]:
        """(faces/s on photos the first detector handles, seconds per photo that needs the CNN fallback)."""
        quick = [r for r in self.rows if not r[5]]
        slow = [r for r in self.rows if r[5]]
        quick_rate = sum(r[1] for r in quick) / max(sum(r[2] + r[3] for r in quick), 1e-9)
        slow_seconds = sum(r[2] + r[3] for r in slow) / max(len(slow), 1)
        return quick_rate, slow_seconds


def embedding_seconds(analyzer: FaceAnalyzer, pixels: np.ndarray, detections) -> float:
    """Time of the embedding step alone on already located faces (dlib: its landmark fit,
    which the embedding needs, runs outside the timer)."""
    if analyzer.backend == "dlib":
        inputs = [analyzer._landmarks(pixels, d) for d in detections]
    else:
        inputs = list(detections)
    start = time.perf_counter()
    for item in inputs:
        analyzer._embedding(pixels, item)
    return time.perf_counter() - start


def measure(analyzer: FaceAnalyzer, repeats: int) -> Timing:
    """Run detection and description on every bundled photo `repeats` times."""
    timing = Timing()
    for _ in range(repeats):
        for p in face_photos():
            cpu_start, start = time.process_time(), time.perf_counter()
            pixels = analyzer._prepare(to_array(p.path))  # [H, W, 3]
            detections = analyzer._locate(pixels)
            located = time.perf_counter()
            for d in detections:
                analyzer._describe(pixels, d)
            described = time.perf_counter()
            timing.cpu += time.process_time() - cpu_start
            embed = embedding_seconds(analyzer, pixels, detections)
            fallback = any(getattr(d, "extra", None) == "cnn" for d in detections)
            timing.add(p.file, len(detections), located - start, described - located, embed, fallback)
    return timing


def print_table(results: dict[str, Timing], per_photo: bool) -> None:
    header = ("backend", "faces", "detect s", "landmarks s", "embed s", "total s", "faces/s", "cpu s", "faces/cpu s")
    print("{:<15} {:>5} {:>9} {:>11} {:>8} {:>8} {:>8} {:>7} {:>11}".format(*header))
    for backend, t in results.items():
        row = (backend, t.faces, t.detect, t.describe - t.embed, t.embed, t.total, t.faces / max(t.total, 1e-9))
        row += (t.cpu, t.faces / max(t.cpu, 1e-9))
        print("{:<15} {:>5} {:>9.2f} {:>11.2f} {:>8.2f} {:>8.2f} {:>8.2f} {:>7.2f} {:>11.2f}".format(*row))
    print()
    for backend, t in results.items():
        quick_rate, slow_seconds = t.split()
        print(f"{backend}: {quick_rate:.2f} faces/s on photos the HOG detector handles; "
              f"{slow_seconds:.2f} s per photo that needs the whole-image CNN fallback (hard poses)")
    if per_photo:
        for backend, t in results.items():
            print(f"\n{backend}: {'photo':<14} {'faces':>5} {'detect ms':>9} {'describe ms':>11}")
            for name, faces, detect, describe, _, _ in t.rows:
                print(f"{'':<13}{name:<14} {faces:>5} {detect * 1000:>9.0f} {describe * 1000:>11.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="passes over the 18 photos")
    parser.add_argument("--per-photo", action="store_true", help="also print each photo's times")
    args = parser.parse_args()
    runs = {
        "dlib+torch": ("dlib", {"detector": "torch", "descriptor": "torch"}),
        "dlib+torchdesc": ("dlib", {"detector": "dlib", "descriptor": "torch"}),
        "dlib+dlib": ("dlib", {"detector": "dlib", "descriptor": "dlib"}),
    }
    if find_antelopev2():
        runs["insightface"] = ("insightface", {})
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} (other processes slow this down)")
    results = {}
    for name, (backend, options) in runs.items():
        analyzer = get_face_analyzer(backend, **options)
        analyzer.get_face(face_photos()[0].path)  # warm-up, not timed
        results[name] = measure(analyzer, args.repeats)
    print_table(results, args.per_photo)


if __name__ == "__main__":
    main()
