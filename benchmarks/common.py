"""What the speed benchmarks share: the two pipelines on the same weights, step timing, JSON output.

- `build_pair`: the kit's `InstantIDPipeline` (image adapter + IdentityNet) and the PLAIN diffusers
  `StableDiffusionXLControlNetPipeline` a user would otherwise run: its own default attention
  processors (`AttnProcessor2_0`), no identity attention, its ControlNet reading the text. Both get the
  same UNet weights (the plain one a copy made before the adapter is installed) and the same ControlNet.
- `step_times`: seconds between consecutive `callback_on_step_end` calls (ControlNet + UNet + scheduler).
- `interleaved`: runs several ways in alternating order, so drift of a shared machine hits all alike.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from instantid_lab.adapter import Resampler, ResamplerConfig
from instantid_lab.keypoints import draw_kps
from instantid_lab.pipeline import InstantIDPipeline
from instantid_lab.tiny import seeded, tiny_adapter_state

PROMPT = "a photo of an astronaut in space"
#: A frontal face's 5 keypoints, as fractions of the image side.
KPS = [[0.35, 0.40], [0.65, 0.40], [0.50, 0.55], [0.38, 0.72], [0.62, 0.72]]


def build_pair(components: dict, resampler: ResamplerConfig, device, dtype=torch.float32):
    """(kit pipeline, plain diffusers pipeline) on the same weights, in `dtype`, moved to `device`.

    :param components: `InstantIDPipeline` keyword arguments (the `tiny_components` layout).
    :param resampler: the Resampler's sizes (its `output_dim` = the UNet's cross-attention width).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    for model in components.values():                                 # build, then cast: the models in `dtype`
        if isinstance(model, torch.nn.Module) and next(model.parameters()).dtype != dtype:
            model.to(dtype)
    plain_unet = copy.deepcopy(components["unet"])                    # before the adapter is installed
    state = tiny_adapter_state(components["unet"], seed=4, embedding_dim=resampler.embedding_dim)
    with seeded(5):
        state["image_proj"] = Resampler(resampler).state_dict()
    kit = InstantIDPipeline(**components)
    kit.load_adapter(state)
    plain = StableDiffusionXLControlNetPipeline(
        **{k: v for k, v in components.items() if k not in ("unet", "scheduler")}, unet=plain_unet,
        scheduler=EulerDiscreteScheduler.from_config(components["scheduler"].config),
    )
    for pipe in (kit, plain):
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    return kit, plain


def keypoint_image(size: int):
    return draw_kps([[x * size, y * size] for x, y in KPS], (size, size))


def runners(kit, plain, size: int, embedding_dim: int, **common) -> dict[str, Callable]:
    """name -> run(callback): one generation of each pipeline, same prompt, seed, steps and guidance."""
    kps = keypoint_image(size)
    embedding = torch.randn(embedding_dim, generator=torch.Generator().manual_seed(0)) * 5

    def kit_run(cb):
        return kit(PROMPT, embedding, kps, adapter_scale=0.8, identitynet_scale=0.8, height=size, width=size,
                   generator=torch.Generator().manual_seed(0), callback_on_step_end=cb, **common)

    def plain_run(cb):
        return plain(PROMPT, image=kps, controlnet_conditioning_scale=0.8, height=size, width=size,
                     generator=torch.Generator().manual_seed(0), callback_on_step_end=cb, **common)

    return {"plain": plain_run, "kit": kit_run}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_times(run: Callable) -> list[float]:
    """Seconds between consecutive step-end callbacks of one generation."""
    stamps = []

    def callback(pipe, step, t, tensors):
        sync()
        stamps.append(time.perf_counter())
        return {}

    run(callback)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def interleaved(runs: dict[str, Callable], repeats: int, measure: Callable = step_times) -> dict[str, list[float]]:
    """`measure(run)` for every run, `repeats` times, alternating the order (a, b, b, a, ...); one warm-up each."""
    for run in runs.values():
        measure(run)
    times = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            got = measure(runs[name])
            times[name] += got if isinstance(got, list) else [got]
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def write_json(path: Optional[str], record: dict) -> None:
    """Write `record` to `path` (if given) as indented JSON."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
