"""Full-size SDXL-shaped InstantID on a GPU: plain diffusers vs the kit (eager, compiled), peak memory, kernel time.

Random weights in the real shapes, built on the device (no download): the SDXL 1.0 UNet and the released
IdentityNet configs (docs/instantid-reference.md), the released Resampler (16 tokens, 2048 wide). The text
encoders are 2-layer CLIPs of SDXL's widths (768 + 1280, pooled 1280) and the VAE is tiny: both run once per
call or never (no decode), so they barely count. Defaults: bfloat16, 1024 x 1024, 30 Euler steps, guidance 5.

Printed side by side, from one process:
- median step time (ControlNet + UNet + scheduler) of the plain `StableDiffusionXLControlNetPipeline`, the
  kit eager, and the kit with `torch.compile` on its UNet and IdentityNet; ratios to plain;
- peak device memory of each, and of the kit with `enable_model_cpu_offload()`;
- kernel time vs wall time of a kit generation (`torch.profiler`): how much of a step the device is busy.

    python benchmarks/gpu_sdxl.py [--steps 30] [--size 1024] [--mode default|reduce-overhead|max-autotune]
                                  [--no-compile] [--json PATH]
    python benchmarks/gpu_sdxl.py --tiny      # the same code on the CPU at tiny sizes (a test runs it; the
                                              # default without a CUDA device)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from common import build_pair, interleaved, median_ms, runners, sync, write_json
from instantid_lab.adapter import ResamplerConfig
from instantid_lab.identitynet import identitynet_sdxl
from instantid_lab.tiny import TinyConfig, tiny_components, tiny_scheduler, tiny_text_encoders, tiny_tokenizer, tiny_vae

#: SDXL 1.0's UNet (docs/instantid-reference.md, "SDXL 1.0 shapes").
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def sdxl_components(device) -> dict:
    """`InstantIDPipeline` keyword arguments with the SDXL UNet and IdentityNet, built on `device` (float32)."""
    from diffusers import UNet2DConditionModel

    text = TinyConfig.sdxl(text_hidden=(768, 1280), projection_dim=1280)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()
        controlnet = identitynet_sdxl().eval()
        text_encoder, text_encoder_2 = tiny_text_encoders(text, seed=1)
        vae = tiny_vae(text, seed=2)
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tiny_tokenizer(),
                tokenizer_2=tiny_tokenizer(), unet=unet, controlnet=controlnet, scheduler=tiny_scheduler())


def peak_memory_gb(run) -> float | None:
    """Peak device memory of `run()` in GiB (None on a CPU)."""
    if not torch.cuda.is_available():
        run()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run()
    return torch.cuda.max_memory_allocated() / 2**30


def kernel_vs_wall(run) -> dict:
    """One generation under `torch.profiler`: the time ops spend on the device (on a CPU: inside aten ops)
    against the wall time. Their ratio is how busy the device is; the rest is Python and launch overhead."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    if cuda:
        busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
    else:
        busy = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6
    return {"wall_s": wall, "kernel_s": busy, "kernel_over_wall": busy / wall}


def compile_kit(kit, mode: str, backend: str) -> None:
    """diffusers' idiom: the UNet and IdentityNet compiled in place (the identity processors inside), one graph
    each, static shapes (a new size compiles again rather than tracing sizes symbolically)."""
    options = dict(mode=None if mode == "default" else mode, backend=backend, fullgraph=True, dynamic=False)
    kit.unet = torch.compile(kit.unet, **options)
    kit.controlnet = torch.compile(kit.controlnet, **options)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (float32, eager backend)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", default="default", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--backend", help="torch.compile backend (default: inductor; eager with --tiny)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: running --tiny (tiny sizes on the CPU) instead")
        args.tiny = True
    device = "cpu" if args.tiny else "cuda"
    defaults = dict(steps=3, size=64, backend="eager") if args.tiny else dict(steps=30, size=1024, backend="inductor")
    for name, value in defaults.items():
        setattr(args, name, getattr(args, name) or value)
    args.device, args.dtype = device, torch.float32 if args.tiny else torch.bfloat16
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    components = tiny_components("sdxl", seed=0) if args.tiny else sdxl_components(args.device)
    width = components["unet"].config.cross_attention_dim
    resampler = ResamplerConfig.tiny(num_queries=16, output_dim=width) if args.tiny else ResamplerConfig.sdxl()
    kit, plain = build_pair(components, resampler, args.device, args.dtype)
    runs = runners(kit, plain, args.size, resampler.embedding_dim, num_inference_steps=args.steps,
                   guidance_scale=5.0, output_type="latent")
    record = dict(benchmark="gpu_sdxl", date=datetime.date.today().isoformat(), machine=platform.node(),
                  device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", dtype=str(args.dtype),
                  size=args.size, steps=args.steps, repeats=args.repeats, torch=torch.__version__)
    times = interleaved(runs, args.repeats)
    record["peak_memory_gb"] = {name: peak_memory_gb(lambda: run(None)) for name, run in runs.items()}
    record["profile_kit_eager"] = kernel_vs_wall(lambda: runs["kit"](None))
    record["peak_memory_gb"]["kit model offload"] = offloaded_peak(kit, runs["kit"], args.device)
    if not args.no_compile:
        compile_kit(kit, args.mode, args.backend)
        start = time.perf_counter()
        runs["kit"](None)                                               # compiles
        record["compile_s"] = time.perf_counter() - start
        times["kit compiled"] = interleaved({"kit": runs["kit"]}, args.repeats)["kit"]
        record["profile_kit_compiled"] = kernel_vs_wall(lambda: runs["kit"](None))
        record["compile"] = {"mode": args.mode, "backend": args.backend, "fullgraph": True, "dynamic": False}
    record["median_step_ms"] = {name: median_ms(t) for name, t in times.items()}
    record["ratio_to_plain"] = {n: m / record["median_step_ms"]["plain"] for n, m in record["median_step_ms"].items()}
    report(record)
    write_json(args.json, record)
    return record


def offloaded_peak(kit, run, device) -> float | None:
    """Peak memory of the kit with `enable_model_cpu_offload` (each model on the device only while needed)."""
    kit.enable_model_cpu_offload(device=device)
    try:
        return peak_memory_gb(lambda: run(None))
    finally:
        kit.remove_all_hooks()
        kit.to(device)


def report(r: dict) -> None:
    print(f"{r['device']}, {r['dtype']}, {r['size']}x{r['size']} px, {r['steps']} steps, guidance 5, "
          f"{r['repeats']} repeats, torch {r['torch']}")
    for name, ms in r["median_step_ms"].items():
        print(f"  {name:13s} median step {ms:8.2f} ms   x{r['ratio_to_plain'][name]:.3f} of plain")
    for name, gb in r["peak_memory_gb"].items():
        print(f"  peak memory {name:18s} " + ("n/a (CPU)" if gb is None else f"{gb:6.2f} GiB"))
    for key in ("profile_kit_eager", "profile_kit_compiled"):
        if key in r:
            p = r[key]
            print(f"  {key[8:]:13s} kernel {p['kernel_s']:.3f} s of wall {p['wall_s']:.3f} s "
                  f"({100 * p['kernel_over_wall']:.0f}% busy)")
    if "compile_s" in r:
        print(f"  first compiled call (compiling) {r['compile_s']:.1f} s, {r['compile']}")


if __name__ == "__main__":
    main()
