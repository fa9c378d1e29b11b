"""Held-out evaluation of the miniature: identity, keypoints and caption, for any mix of InstantID's parts.

The task (`HeldoutTask`): for each of K held-out identities (never seen in training), one *reference*
render gives the identity embedding (conditioning recogniser) and another *target* render gives the
requested keypoints and caption. A generated image is scored against the target by three judges that
took no part in generation:

- identity: the *evaluating* recogniser; rank-1 = the generated face's nearest identity in a gallery
  (mean embedding of 3 further renders per identity) is its own (chance 1/K); similarity = cosine to
  its own gallery row;
- keypoints: the inspector's keypoints on the generated face vs the requested ones (mean pixel distance
  in the 32-px image);
- caption: the inspector's reading of background, expression, accessory and style vs the prompt.

`evaluate_ablations` generates the same task with the same noise for each setting of
(adapter scale, IdentityNet scale): the base alone (0, 0), adapter only (1, 0), IdentityNet only (0, 1)
and both (1, 1), so rows differ only in which parts are on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..data import MINIATURE_DIR
from ..errors import LabError
from ..images import ImageLike, image_sheet, load_image
from .base import GUIDANCE_SCALE, SAMPLING_STEPS
from .inspector import ATTRIBUTES, inspect, load_inspector
from .instantid import keypoint_image, load_miniature
from .recognizer import embed_images, load_recognizer
from .world import BACKGROUND_RGB, BACKGROUNDS, HELDOUT_IDS, Caption, Pose, images_to_tensor, render_id

#: name -> (adapter scale, IdentityNet scale)
ABLATIONS = {"base": (0.0, 0.0), "adapter only": (1.0, 0.0), "IdentityNet only": (0.0, 1.0), "both": (1.0, 1.0)}


@dataclass
class HeldoutTask:
    """References, targets and gallery renders of `len(ids)` held-out identities (row k = identity k)."""

    ids: list
    references: list  # Sample per identity: its image is embedded by the conditioner
    targets: list  # Sample per identity: its keypoints and caption are requested
    gallery: list = field(repr=False)  # 3 images per identity for the evaluator's gallery

    @classmethod
    def make(cls, n_identities: int = 48, seed: int = 0, first: int = 0) -> "HeldoutTask":
        """Identities `HELDOUT_IDS[first : first + n_identities]`; `seed` draws their poses and captions."""
        rng = np.random.default_rng(seed)
        ids = list(HELDOUT_IDS[first:first + n_identities])
        draw = lambda i: render_id(i, Pose.sample(rng), Caption.sample(rng))
        references, targets = [draw(i) for i in ids], [draw(i) for i in ids]
        gallery = [[draw(i).image for _ in range(3)] for i in ids]
        return cls(ids, references, targets, gallery)

    def prompts(self) -> list[str]:
        return [s.caption.text() for s in self.targets]

    def keypoint_images(self) -> list[Image.Image]:
        return [keypoint_image(s.kps) for s in self.targets]


class Judges:
    """The scorers of a generated image: the evaluating recogniser with its gallery, and the inspector
    (optional: without it only identity is scored)."""

    def __init__(self, task: HeldoutTask, evaluator, inspector=None):
        self.task, self.evaluator, self.inspector = task, evaluator, inspector
        self.gallery = torch.nn.functional.normalize(torch.stack(
            [embed_images(evaluator, images_to_tensor(g)).mean(0) for g in task.gallery]), dim=1)  # [K, E]

    def score(self, images: Sequence[Image.Image]) -> dict:
        """Image k shows identity k with target k's keypoints and caption: identity, keypoint and caption scores."""
        x = images_to_tensor(images)
        similarity, hits = identity_scores(embed_images(self.evaluator, x), self.gallery, range(len(images)))
        scores = {"rank1": float(hits.float().mean()), "identity_similarity": float(similarity.mean())}
        if self.inspector is None:
            return scores
        read = inspect(self.inspector, x)
        requested = torch.from_numpy(np.stack([s.kps for s in self.task.targets])).float()
        return {**scores, "keypoint_error_px": float(keypoint_distances(read["kps"], requested).mean()),
                "caption_accuracy": caption_accuracy(read, [s.caption for s in self.task.targets])}


@torch.no_grad()
def generate(pipe, task: HeldoutTask, conditioner, adapter_scale: float, identitynet_scale: float,
             steps: int = SAMPLING_STEPS, guidance_scale: float = GUIDANCE_SCALE, seed: int = 0) -> list[Image.Image]:
    """The task's K images at the given scales (same seed, hence same initial noise, for every setting)."""
    embeds = embed_images(conditioner, images_to_tensor([s.image for s in task.references]))  # [K, E]
    return pipe(task.prompts(), list(embeds), task.keypoint_images(), adapter_scale=adapter_scale,
                identitynet_scale=identitynet_scale, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed)).images


def evaluate_ablations(pipe, conditioner, evaluator, inspector, n_identities: int = 48,
                       ablations: dict = ABLATIONS, steps: int = SAMPLING_STEPS, guidance_scale: float = GUIDANCE_SCALE,
                       seed: int = 0, first: int = 0) -> dict:
    """Score each ablation (name -> (adapter scale, IdentityNet scale)) and the real target renders on
    `HeldoutTask.make(n_identities, seed, first)`; `seed` also draws the starting noise.

    :return: {"rows": {name: scores + "seconds_per_image"}, "images": {name: K images},
        "identities": K, "chance": 1 / K, "sampler": description}
    """
    task = HeldoutTask.make(n_identities, seed, first)
    judges = Judges(task, evaluator, inspector)
    rows, images = {"real renders": judges.score([s.image for s in task.targets])}, {}
    for name, (adapter_scale, identitynet_scale) in ablations.items():
        start = time.perf_counter()
        images[name] = generate(pipe, task, conditioner, adapter_scale, identitynet_scale, steps, guidance_scale, seed)
        seconds = (time.perf_counter() - start) / len(task.ids)
        rows[name] = {**judges.score(images[name]), "seconds_per_image": round(seconds, 4)}
    return {"rows": rows, "images": images, "identities": len(task.ids), "chance": 1 / len(task.ids),
            "sampler": f"DDIM {steps} steps, guidance {guidance_scale}, seed {seed}", "first": first, "seed": seed}


#: The protocol's identity sets: the first index into HELDOUT_IDS of each (disjoint from the 0-199 that the
#: notebooks, the training tracker and the experiments show).
PROTOCOL_SETS = (1000, 2000)


def evaluate_protocol(pipe, conditioner, evaluator, inspector, n_identities: int = 48,
                      sets: Sequence[int] = PROTOCOL_SETS, seeds: Sequence[int] = (0, 1), **sampling) -> dict:
    """`evaluate_ablations` on each disjoint identity set x each seed, and the mean and minimum over those runs.

    :return: {"runs": [each run's result], "rows": {row: scores averaged over the runs},
        "min_rank1": {row: the lowest rank-1 of any run}, "identities", "chance", "sampler"}
    """
    runs = [evaluate_ablations(pipe, conditioner, evaluator, inspector, n_identities, seed=seed, first=first, **sampling)
            for first in sets for seed in seeds]
    mean = {row: _mean_scores([run["rows"][row] for run in runs]) for row in runs[0]["rows"]}
    lowest = {row: min(run["rows"][row]["rank1"] for run in runs) for row in runs[0]["rows"]}
    sampler = runs[0]["sampler"].rsplit(", seed", 1)[0]
    return {"runs": runs, "rows": mean, "min_rank1": lowest, "identities": n_identities, "chance": 1 / n_identities,
            "sampler": f"{sampler}; mean of {len(runs)} runs: identity sets {list(sets)} x seeds {list(seeds)}"}


def _mean_scores(rows: Sequence[dict]) -> dict:
    """The mean of each score over runs (nested dicts, e.g. caption accuracy, averaged per key)."""
    first = rows[0]
    return {k: _mean_scores([r[k] for r in rows]) if isinstance(first[k], dict) else float(np.mean([r[k] for r in rows]))
            for k in first}


def format_table(result: dict) -> str:
    """The ablation rows as a Markdown table (with each row's lowest rank-1 when several runs were averaged)."""
    lowest = result.get("min_rank1")
    extra = (" lowest rank-1 of a run |", "---|") if lowest else ("", "")
    lines = ["| setting | rank-1 | identity similarity | keypoint error (px) | caption accuracy (mean / all four) |"
             + extra[0], "|---|---|---|---|---|" + extra[1]]
    for name, r in result["rows"].items():
        c = r["caption_accuracy"]
        lines.append(f"| {name} | {r['rank1']:.3f} | {r['identity_similarity']:.3f} | {r['keypoint_error_px']:.2f} "
                     f"| {c['mean']:.3f} / {c['all']:.3f} |" + (f" {lowest[name]:.3f} |" if lowest else ""))
    return "\n".join(lines)


def save_ablation(result: dict, out: Path) -> None:
    """Write `ablation.json` (scores), `ablation.md` (the table) and `ablation.png` (first 8 identities per row
    of the first run)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = result["runs"][0]["images"] if "runs" in result else result["images"]
    drop_images = lambda r: {k: v for k, v in r.items() if k != "images"}
    scores = {**drop_images(result), "runs": [drop_images(r) for r in result.get("runs", [])]}
    (out / "ablation.json").write_text(json.dumps(scores, indent=2))
    (out / "ablation.md").write_text(format_table(result) + f"\n\n{result['identities']} held-out identities, "
                                     f"{result['sampler']}.\n")
    rows = [im[:8] for im in images.values()]
    image_sheet([im for row in rows for im in row], columns=len(rows[0]), scale=3).save(out / "ablation.png")


# ----------------------------------------------------------------------------- the judges' readings


def identity_scores(embeddings: Tensor, gallery: Tensor, wanted: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per image: cosine to its wanted gallery row, and rank-1 (whether that row is the most similar one).

    :param embeddings: the generated faces' embeddings [N, E] (any norm).
    :param gallery: one row per identity [K, E] (any norm).
    :param wanted: the wanted gallery row of each image, N indices.
    :return: (similarity [N], rank-1 hits [N], bool)
    """
    similarity = F.normalize(embeddings, dim=1) @ F.normalize(gallery, dim=1).T  # [N, K]
    wanted = torch.as_tensor(list(wanted))
    return similarity[torch.arange(len(wanted)), wanted], similarity.argmax(1) == wanted


def keypoint_distances(predicted: Tensor, requested: Tensor) -> Tensor:
    """Per face, the mean distance in pixels between predicted [N, 5, 2] and requested [N, 5, 2] keypoints: [N]."""
    return (predicted - requested).norm(dim=-1).mean(-1)


def keypoint_errors(inspector, images: Sequence[ImageLike], requested: Sequence[np.ndarray]) -> np.ndarray:
    """Per image, the mean distance in pixels between the keypoints the inspector reads and the requested ones.

    :param inspector: a `FaceInspector` (e.g. `get_face_analyzer("miniature").inspector`).
    :param requested: N keypoint arrays [5, 2], in pixels of the images.
    :return: shape [N].
    """
    read = inspect(inspector, images_to_tensor([load_image(x) for x in images]))["kps"]   # [N, 5, 2]
    wanted = torch.from_numpy(np.stack([np.asarray(k, np.float32) for k in requested]))   # [N, 5, 2]
    return keypoint_distances(read, wanted).numpy()


def caption_accuracy(read: dict, captions: Sequence[Caption]) -> dict:
    """Per attribute: the fraction of images whose read value equals the caption's; "all": every attribute right."""
    hits = {name: np.array([r == getattr(c, name) for r, c in zip(read[name], captions)]) for name in ATTRIBUTES}
    out = {name: float(h.mean()) for name, h in hits.items()}
    out["all"] = float(np.logical_and.reduce(list(hits.values())).mean())
    out["mean"] = float(np.mean([out[name] for name in ATTRIBUTES]))
    return out


def background_of(images: Tensor) -> list[str]:
    """The background each image [B, 3, H, W] in [-1, 1] shows, read from its two top corners.

    Stripes are recognised by a large spread of the corner pixels; otherwise the nearest plain colour.
    """
    rgb = (images + 1) * 127.5
    corners = torch.cat([rgb[:, :, :4, :4], rgb[:, :, :4, -4:]], dim=3).flatten(2)  # [B, 3, 32]
    plain = [b for b in BACKGROUNDS if b != "stripes"]
    palette = torch.tensor([BACKGROUND_RGB[b] for b in plain], dtype=torch.float32)  # [K, 3]
    distances = torch.cdist(corners.mean(2), palette)  # [B, K]
    striped = corners.std(2).mean(1) > 30
    return ["stripes" if s else plain[int(k)] for s, k in zip(striped, distances.argmin(1))]


def main(argv=None) -> None:
    """CLI: score base / adapter only / IdentityNet only / both on held-out identities and print the table.

    By default the model card's protocol: 2 disjoint sets of 48 held-out identities x 2 noise seeds, averaged.
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--folder", type=Path, default=MINIATURE_DIR, help="the miniature's weights")
    parser.add_argument("--instantid", type=Path, default=None, help="a retrained InstantID on the same base")
    parser.add_argument("--identities", type=int, default=48)
    parser.add_argument("--sets", type=int, nargs="+", default=list(PROTOCOL_SETS),
                        help="first index into HELDOUT_IDS of each identity set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise (and pose, caption) seeds")
    parser.add_argument("--steps", type=int, default=SAMPLING_STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    args = parser.parse_args(argv)
    if args.identities < 2 or args.steps < 1:
        parser.error(f"--identities must be >= 2 (rank-1 needs a gallery) and --steps >= 1; got {args.identities}, "
                     f"{args.steps}")
    try:
        result = _evaluate_folder(args)
    except LabError as error:  # missing or corrupt weights: the message says what to do
        sys.exit(f"error: {error}")
    save_ablation(result, args.out)
    print(format_table(result))
    seconds = {k: round(float(np.mean([r["rows"][k]["seconds_per_image"] for r in result["runs"]])), 4)
               for k in ABLATIONS}
    print(f"{result['identities']} held-out identities (chance rank-1 {result['chance']:.3f}), {result['sampler']}; "
          f"seconds per image (batch of {args.identities}): " + ", ".join(f"{k} {v}" for k, v in seconds.items()))


def _evaluate_folder(args) -> dict:
    pipe = load_miniature(args.folder, instantid=args.instantid)
    pipe.set_progress_bar_config(disable=True)
    models = [load_recognizer(args.folder / f"recognizer_{role}.safetensors") for role in ("conditioner", "evaluator")]
    return evaluate_protocol(pipe, *models, load_inspector(args.folder / "inspector.safetensors"), args.identities,
                             sets=args.sets, seeds=args.seeds, steps=args.steps, guidance_scale=args.guidance)


if __name__ == "__main__":
    main()
