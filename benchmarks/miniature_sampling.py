"""Seconds per 32-px image of the shipped miniature, one image per call vs a batch per call, side by side.

The same held-out task (references, target keypoints and captions), the same sampler (DDIM, the miniature's guidance),
runs interleaved (single, batched, single, batched, ...) in one process, one torch thread by default.
Prints the median seconds per image of each way and their ratio, for the step counts asked for.

    python benchmarks/miniature_sampling.py [--batch 16] [--steps 20 30] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instantid_lab.data import MINIATURE_DIR
from instantid_lab.miniature.base import GUIDANCE_SCALE
from instantid_lab.miniature.evaluate import HeldoutTask
from instantid_lab.miniature.recognizer import embed_images, load_recognizer
from instantid_lab.miniature.world import images_to_tensor
from instantid_lab.worlds import load_pipeline


def seconds_per_image(pipe, prompts, embeds, kps_images, steps: int) -> float:
    start = time.perf_counter()
    pipe(prompts, list(embeds), kps_images, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE,
         generator=torch.Generator().manual_seed(0))
    return (time.perf_counter() - start) / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 30])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("miniature")
    pipe.set_progress_bar_config(disable=True)
    task = HeldoutTask.make(args.batch)
    conditioner = load_recognizer(MINIATURE_DIR / "recognizer_conditioner.safetensors")
    embeds = embed_images(conditioner, images_to_tensor([s.image for s in task.references]))
    prompts, kps = task.prompts(), task.keypoint_images()
    print(f"miniature, DDIM, guidance {GUIDANCE_SCALE}, {args.threads} thread(s), batch {args.batch}, median of {args.repeats}")
    for steps in args.steps:
        single, batched = [], []
        for _ in range(args.repeats):
            single.append(seconds_per_image(pipe, prompts[:1], embeds[:1], kps[:1], steps))
            batched.append(seconds_per_image(pipe, prompts, embeds, kps, steps))
        s, b = statistics.median(single), statistics.median(batched)
        print(f"{steps:3d} steps: single {s:.3f} s/image | batched {b:.3f} s/image | single / batched {s / b:.1f}x")


if __name__ == "__main__":
    main()
