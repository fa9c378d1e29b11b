"""An 8-cell ablation grid (adapter scale x IdentityNet scale, paper Fig. 9) in one batched call vs 8 calls.

One identity, prompt and keypoint image; every cell starts from the same noise (the same seed), so the cells
differ only by their scales. Batched, the scales go in per sample (`adapter_scale` a tensor of 8,
`identitynet_scale` a list of 8) and the pipeline runs once; sequentially, it runs once per cell. The two give
the same images (printed: their largest difference). Runs alternate (batched, sequential, sequential, ...);
the medians and their ratio sequential / batched are printed (goal >= 1.3).

    python benchmarks/batched_grid.py [--pipeline miniature|tiny] [--steps 20] [--repeats 3] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import statistics
import time

import numpy as np
import torch

from common import interleaved, write_json

ADAPTER_SCALES, IDENTITYNET_SCALES = (0.0, 0.33, 0.67, 1.0), (0.5, 1.0)
GOAL = 1.3


def subject(name: str):
    """(pipeline, prompt, identity embedding, keypoint image, guidance scale) of a grid."""
    if name == "tiny":
        from instantid_lab.keypoints import draw_kps
        from instantid_lab.tiny import TINY_KPS, TINY_PROMPT, tiny_embedding, tiny_pipeline

        return tiny_pipeline("sdxl"), TINY_PROMPT, tiny_embedding(16), draw_kps(np.array(TINY_KPS), (64, 64)), 5.0
    from instantid_lab.data import MINIATURE_DIR
    from instantid_lab.miniature.evaluate import HeldoutTask
    from instantid_lab.miniature.recognizer import embed_images, load_recognizer
    from instantid_lab.miniature.world import images_to_tensor
    from instantid_lab.worlds import load_pipeline

    pipe, task = load_pipeline("miniature"), HeldoutTask.make(1)
    pipe.set_progress_bar_config(disable=True)
    conditioner = load_recognizer(MINIATURE_DIR / "recognizer_conditioner.safetensors")
    embedding = embed_images(conditioner, images_to_tensor([task.references[0].image]))[0]
    return pipe, task.prompts()[0], embedding, task.keypoint_images()[0], 3.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", choices=["miniature", "tiny"], default="miniature")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe, prompt, embedding, kps, guidance = subject(args.pipeline)
    cells = list(itertools.product(ADAPTER_SCALES, IDENTITYNET_SCALES))                  # 8 (adapter, identitynet)
    size = pipe.default_size(kps, None, None)
    f = pipe.vae_scale_factor
    noise = torch.randn(1, 4, size[0] // f, size[1] // f, generator=torch.Generator().manual_seed(0))
    common = dict(num_inference_steps=args.steps, guidance_scale=guidance, output_type="np")
    n = len(cells)

    def batched():
        return pipe([prompt] * n, [embedding] * n, [kps] * n, adapter_scale=torch.tensor([a for a, _ in cells]),
                    identitynet_scale=[s for _, s in cells], latents=noise.repeat(n, 1, 1, 1), **common).images

    def sequential():
        return np.concatenate([pipe(prompt, embedding, kps, adapter_scale=a, identitynet_scale=s, latents=noise,
                                    **common).images for a, s in cells])

    difference = float(np.abs(batched() - sequential()).max())
    times = interleaved({"batched": batched, "sequential": sequential}, args.repeats, measure=seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["sequential"] / medians["batched"]
    print(f"{args.pipeline} pipeline, {size[0]}x{size[1]} px, {n} cells (adapter x IdentityNet scale), {args.steps} "
          f"steps, guidance {guidance}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    for name, s in medians.items():
        print(f"  {name:10s} {s:7.3f} s per grid  ({s / n:.3f} s per cell)")
    print(f"  sequential / batched = {ratio:.2f}x  (goal >= {GOAL}); largest pixel difference {difference:.1e}")
    record = dict(benchmark="batched_grid", date=datetime.date.today().isoformat(), machine=platform.node(),
                  pipeline=args.pipeline, size=list(size), cells=n, steps=args.steps, repeats=args.repeats,
                  threads=torch.get_num_threads(), seconds_per_grid=medians, ratio_sequential_over_batched=ratio,
                  goal=GOAL, max_pixel_difference=difference, torch=torch.__version__)
    write_json(args.json, record)
    return record


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
