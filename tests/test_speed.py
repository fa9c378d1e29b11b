"""Speed and the GPU path, checked on the CPU with tiny random components: the identity keys/values are
prepared once per call, a denoising step never reads a tensor on the host, diffusers' `torch.compile` idiom
and `fullgraph=True` give the eager image, the offload chain names every model, bfloat16 runs, and the
full-size GPU benchmark runs at tiny sizes (`--tiny`)."""

import json
import logging
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.overrides import TorchFunctionMode

from instantid_lab.attention import (PlainAttnProcessor, RegionalIdentity, identity_processors, install_adapter,
                                     prepare_identity_attention)
from instantid_lab.errors import InputError
from instantid_lab.pipeline import ExtraControlNet, InstantIDPipeline
from instantid_lab.tiny import (TINY_PROMPT, TinyConfig, tiny_components, tiny_controlnet, tiny_pipeline, tiny_unet)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TinyConfig.sdxl()


def run(pipe, kps_image, emb, steps=2, **kw):
    args = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
    return pipe(kw.pop("prompt", TINY_PROMPT), emb, kps_image, **{**args, **kw}).images


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ----------------------------------------------------------------------------- lean processors


def unet_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = CONFIG.cross_attention_dim
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(batch, 7, c, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(batch, CONFIG.projection_dim, generator=g),
                                   "time_ids": torch.randn(batch, 6, generator=g)})


IDS = torch.randn(2, 4, CONFIG.cross_attention_dim, generator=torch.Generator().manual_seed(9))
LEFT = torch.zeros(2, 1, 64, 64)
LEFT[..., :32] = 1.0
IDENTITY_CASES = {
    "one number": dict(identity_tokens=IDS, adapter_scale=0.8),
    "one scale per sample": dict(identity_tokens=IDS, adapter_scale=torch.tensor([0.0, 0.9])),
    "a region": dict(identity_tokens=IDS, adapter_scale=0.7, region_mask=LEFT),
    "tokens for one, two samples": dict(identity_tokens=IDS[:1], adapter_scale=torch.tensor([0.3, 1.0])),
    "two regional identities": dict(regional_identities=[RegionalIdentity(IDS, LEFT), RegionalIdentity(-IDS, 1 - LEFT)],
                                    adapter_scale=0.8),
}


@pytest.fixture(scope="module")
def unet():
    u = tiny_unet(CONFIG)
    install_adapter(u)
    return u


@pytest.mark.parametrize("case", IDENTITY_CASES)
@torch.no_grad()
def test_identity_prepared_once_gives_the_output_of_the_raw_arguments(unet, case):
    raw = IDENTITY_CASES[case]
    prepared = prepare_identity_attention(unet, raw)
    assert set(prepared) == {"identity_kv"} and set(prepared["identity_kv"]) == set(identity_processors(unet))
    want = unet(**unet_inputs(), cross_attention_kwargs=raw).sample
    got = unet(**unet_inputs(), cross_attention_kwargs=prepared).sample
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_a_prepared_call_checks_its_batch_and_its_unet(unet):
    prepared = prepare_identity_attention(unet, identity_tokens=IDS)
    with pytest.raises(InputError, match="batch of 2"):
        unet(**unet_inputs(batch=3), cross_attention_kwargs=prepared)
    with pytest.raises(InputError, match="adapter_scale"):
        prepare_identity_attention(unet, identity_tokens=IDS, adapter_scale=torch.ones(3))
    other = tiny_unet(TinyConfig.sdxl(transformer_layers=(1, 1, 3)))        # a layer more per block
    install_adapter(other)
    with pytest.raises(InputError, match="prepare it for this UNet"):
        other(**unet_inputs(), cross_attention_kwargs=prepared)


@torch.no_grad()
def test_self_attention_is_diffusers_own_processor_and_takes_the_identity_arguments_silently(caplog):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 9, 16)
    attn.set_processor(PlainAttnProcessor())
    with caplog.at_level(logging.WARNING):
        ours = attn(x, identity_tokens=IDS, adapter_scale=0.5, identity_kv={})
    assert torch.equal(ours, AttnProcessor2_0()(attn, x))
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]


def count_identity_projections(pipe) -> list:
    calls = []
    for proc in identity_processors(pipe.unet).values():
        proc.to_k_ip.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("steps", [2, 5])
def test_the_identity_keys_and_values_are_computed_once_per_call_not_per_step(kps_image, emb, steps):
    pipe = tiny_pipeline("sdxl")
    calls = count_identity_projections(pipe)
    run(pipe, kps_image, emb, steps=steps)
    assert len(calls) == len(identity_processors(pipe.unet))           # one per identity layer, whatever the steps


class HostReads(TorchFunctionMode):
    """Records every call that copies a tensor's value to the host (a device sync on a GPU), except the
    scheduler's (diffusers' Euler finds its step index once per generation, with `nonzero().item()`)."""

    READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            stack = traceback.extract_stack()
            if not any("/schedulers/" in frame.filename for frame in stack):
                self.seen.append(f"{func.__name__} at {stack[-2].filename}:{stack[-2].lineno}")
        return func(*args, **(kwargs or {}))


def test_a_denoising_step_never_reads_a_tensor_on_the_host(kps_image, emb, monkeypatch):
    """Per-sample scales (tensors), a face region, an extra ControlNet, guess mode: ControlNets + UNet + guidance
    run without one `bool(tensor)` / `.item()`."""
    pipe = tiny_pipeline("sdxl")
    reads, predict = HostReads(), pipe.predict_noise

    def watched(*args, **kwargs):
        with reads:
            return predict(*args, **kwargs)

    monkeypatch.setattr(pipe, "predict_noise", watched)
    extra = ExtraControlNet(tiny_controlnet("sdxl", seed=5), kps_image, scale=[0.5, 0.3])
    run(pipe, kps_image, emb, prompt=[TINY_PROMPT, "a portrait"], adapter_scale=torch.tensor([0.4, 1.0]),
        identitynet_scale=[0.8, 0.6], face_mask=np.asarray(LEFT[0, 0]), extra_controlnets=[extra])
    run(pipe, kps_image, emb, guess_mode=True)
    assert reads.seen == []


# ----------------------------------------------------------------------------- torch.compile


def test_the_diffusers_compile_idiom_gives_the_eager_image(kps_image, emb):
    """`pipe.unet = torch.compile(pipe.unet)` (here the eager backend, no compiler needed): the kit finds its
    processors through the wrapper (once a KeyError), keeps refusing what would drop the identity, and a
    pipeline may also be built on compiled models and given the adapter then."""
    pipe = tiny_pipeline("sdxl")
    eager = run(pipe, kps_image, emb, adapter_scale=torch.tensor([0.7]), face_mask=np.asarray(LEFT[0, 0]))
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    pipe.controlnet = torch.compile(pipe.controlnet, backend="eager")
    assert pipe.has_identity_attention and len(identity_processors(pipe.unet)) > 0
    assert max_diff(run(pipe, kps_image, emb, adapter_scale=torch.tensor([0.7]), face_mask=np.asarray(LEFT[0, 0])),
                    eager) <= 1e-6
    with pytest.raises(InputError, match="IdentityAttnProcessor"):
        pipe.unet.set_attn_processor(AttnProcessor2_0())

    c = tiny_components("sdxl", seed=0)
    built = InstantIDPipeline(**{**c, "unet": torch.compile(c["unet"], backend="eager"),
                                 "controlnet": torch.compile(c["controlnet"], backend="eager")})
    built.load_adapter(pipe.adapter_state())
    built.set_progress_bar_config(disable=True)
    assert max_diff(run(built, kps_image, emb, adapter_scale=torch.tensor([0.7]),
                        face_mask=np.asarray(LEFT[0, 0])), eager) <= 1e-6


@pytest.mark.parametrize("case", ["one scale per sample", "two regional identities"])
@torch.no_grad()
def test_the_unet_with_identity_processors_compiles_with_fullgraph(unet, case):
    """No graph break anywhere in the UNet with the identity processors, raw or prepared arguments."""
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="eager", fullgraph=True)
    for kwargs in (IDENTITY_CASES[case], prepare_identity_attention(unet, IDENTITY_CASES[case])):
        want = unet(**unet_inputs(), cross_attention_kwargs=kwargs).sample
        torch.testing.assert_close(compiled(**unet_inputs(), cross_attention_kwargs=kwargs).sample, want,
                                   atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- the GPU path, on the CPU


def test_the_offload_chain_names_every_model_and_never_sends_identitynet_back_at_each_step():
    pipe = tiny_pipeline("sdxl")
    chain = InstantIDPipeline.model_cpu_offload_seq.split("->")
    models = {n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert models <= set(chain) and len(chain) == len(set(chain))
    pipe.enable_model_cpu_offload(device="cpu")
    previous = {h.model: h.hook.prev_module_hook for h in pipe._all_hooks}
    assert previous[pipe.unet].model is not pipe.controlnet            # the UNet's call would offload IdentityNet
    assert previous[pipe.controlnet] is None or previous[pipe.controlnet].model is not pipe.unet
    pipe.remove_all_hooks()


@torch.no_grad()
def test_sequentially_offloaded_weights_give_the_same_identity_attention(unet):
    """accelerate's sequential offload keeps the weights on the meta device and streams them in layer by
    layer; the identity keys/values, prepared outside the UNet's forward, stream in the same way."""
    import copy

    from accelerate import cpu_offload

    kwargs = IDENTITY_CASES["a region"]
    want = unet(**unet_inputs(), cross_attention_kwargs=kwargs).sample
    offloaded = copy.deepcopy(unet)
    cpu_offload(offloaded, execution_device="cpu")
    assert next(offloaded.parameters()).device.type == "meta"
    prepared = prepare_identity_attention(offloaded, kwargs)
    torch.testing.assert_close(offloaded(**unet_inputs(), cross_attention_kwargs=prepared).sample, want,
                               atol=1e-6, rtol=0)


def test_a_bfloat16_pipeline_runs_close_to_float32_and_loads_in_bfloat16(tmp_path, kps_image, emb):
    pipe = tiny_pipeline("sdxl")
    full = run(pipe, kps_image, emb)
    pipe.save_pretrained(tmp_path)
    half = InstantIDPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    procs = identity_processors(half.unet).values()
    assert half.unet.dtype == half.image_proj.dtype == torch.bfloat16
    assert all(p.to_k_ip.weight.dtype == torch.bfloat16 for p in procs)
    image = run(half, kps_image, emb, adapter_scale=torch.tensor([0.8]))
    assert np.isfinite(image).all() and np.abs(image - full).mean() < 0.02


def test_the_gpu_benchmark_runs_at_tiny_sizes_on_the_cpu(tmp_path):
    """`benchmarks/gpu_sdxl.py --tiny`: the full-size script's code path (plain, kit eager, kit compiled with
    fullgraph, memory, profiler) on tiny weights; about 15 s here, at most about 60 s."""
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_sdxl.py", "--tiny", "--steps", "2", "--repeats", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["median_step_ms"]) == {"plain", "kit", "kit compiled"}
    assert record["compile"]["fullgraph"] and "kernel_over_wall" in record["profile_kit_eager"]
    assert "kit compiled" in done.stdout and "peak memory" in done.stdout
