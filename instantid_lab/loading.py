"""Loading the real weights (SDXL 1.0 + the released InstantID files) from local folders only.

Nothing here downloads. The base model is a local folder in diffusers layout, or a Hugging Face
repo id already in the local cache (`HF_HOME`); the InstantID files live in one folder:

    <instantid_dir>/ControlNetModel/config.json
    <instantid_dir>/ControlNetModel/diffusion_pytorch_model.safetensors
    <instantid_dir>/ip-adapter.bin            (or ip-adapter.safetensors, see checkpoint.convert_to_safetensors)

When something is missing, `ModelFilesMissingError` lists every missing file and where it goes.
Build, then load: the models are built from their configs and loaded in `torch_dtype`; moving to
a device is the caller's `pipe.to(device)` (or the `device` argument).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from .data import DATA_DIR
from .errors import ModelFilesMissingError
from .types import PathLike

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
INSTANTID_REPO = "InstantX/InstantID"
#: Where the kit looks for the InstantID files by default ($INSTANTID_DIR overrides it).
DEFAULT_INSTANTID_DIR = DATA_DIR.parent / "models" / "instantid"

#: Files of a diffusers SDXL folder: (subfolder, config file, accepted weight files).
BASE_LAYOUT = {
    "unet": ("config.json", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]),
    "vae": ("config.json", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]),
    "text_encoder": ("config.json", ["model.safetensors", "model.fp16.safetensors"]),
    "text_encoder_2": ("config.json", ["model.safetensors", "model.fp16.safetensors"]),
    "tokenizer": ("tokenizer_config.json", ["vocab.json", "tokenizer.json"]),
    "tokenizer_2": ("tokenizer_config.json", ["vocab.json", "tokenizer.json"]),
    "scheduler": ("scheduler_config.json", []),
}
INSTANTID_FILES = ["ControlNetModel/config.json", "ControlNetModel/diffusion_pytorch_model.safetensors"]
ADAPTER_FILES = ["ip-adapter.bin", "ip-adapter.safetensors"]


def instantid_dir(path: Optional[PathLike] = None) -> Path:
    """The InstantID folder: `path`, else $INSTANTID_DIR, else `models/instantid` in the repository."""
    return Path(path or os.environ.get("INSTANTID_DIR") or DEFAULT_INSTANTID_DIR).expanduser()


def resolve_base(base: PathLike = SDXL_BASE) -> Optional[Path]:
    """The local folder of the base model: `base` itself if it is a folder, else the cached snapshot
    of the Hugging Face repo `base` (never downloaded); None if neither exists."""
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    if Path(base).is_absolute() or str(base).startswith("."):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(base), local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError), or not a valid repo id
        return None


def missing_base_files(folder: Path) -> list[str]:
    """Files of the diffusers SDXL layout that `folder` lacks (relative paths)."""
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    for sub, (config, weights) in BASE_LAYOUT.items():
        if not (folder / sub / config).is_file():
            missing.append(f"{sub}/{config}")
        if weights and not any((folder / sub / w).is_file() for w in weights):
            missing.append(f"{sub}/{' or '.join(weights)}")
    return missing


def missing_instantid_files(folder: Path) -> list[str]:
    """InstantID files that `folder` lacks (relative paths)."""
    missing = [f for f in INSTANTID_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in ADAPTER_FILES):
        missing.append(" or ".join(ADAPTER_FILES))
    return missing


def check_model_files(base: PathLike = SDXL_BASE, instantid: Optional[PathLike] = None) -> tuple[Path, Path]:
    """(base folder, InstantID folder) if every file is there.

    :raises ModelFilesMissingError: lists every missing file and where it goes.
    """
    folder, ids = resolve_base(base), instantid_dir(instantid)
    problems = []
    if folder is None:
        problems.append(f"base model {str(base)!r}: not a local folder and not in the Hugging Face cache "
                        f"(HF_HOME). Put a diffusers SDXL folder there ({', '.join(BASE_LAYOUT)}, model_index.json) "
                        f"or pass base='/path/to/stable-diffusion-xl-base-1.0'.")
    elif missing_base_files(folder):
        problems.append(f"base model folder {folder} lacks: {', '.join(missing_base_files(folder))}")
    if missing_instantid_files(ids):
        problems.append(f"InstantID folder {ids} lacks: {', '.join(missing_instantid_files(ids))} "
                        f"(from the {INSTANTID_REPO} model page; set $INSTANTID_DIR or pass instantid_dir=)")
    if problems:
        raise ModelFilesMissingError("model files are missing (nothing is downloaded):\n- " + "\n- ".join(problems))
    return folder, ids


def load_sdxl_instantid(base: PathLike = SDXL_BASE, instantid_dir: Optional[PathLike] = None,
                        torch_dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None,
                        layer_scale: float = 1.0):
    """`InstantIDPipeline` with SDXL 1.0, IdentityNet and the image adapter, from local files.

    :param base: a local diffusers SDXL folder, or a repo id already in the Hugging Face cache.
    :param instantid_dir: folder with ControlNetModel/ and ip-adapter.bin (default: $INSTANTID_DIR or models/instantid).
    :param torch_dtype: dtype of every model (float16 on GPUs; the VAE decodes in float32 when it must).
    :param device: where to move the pipeline, if given.
    :param layer_scale: every layer's identity scale (multiplies the per-call `adapter_scale`).
    :raises ModelFilesMissingError: some files are missing; the message lists them and where they go.
    """
    folder, ids = check_model_files(base, instantid_dir)
    pipe = _build_pipeline(folder, ids / "ControlNetModel", torch_dtype)
    adapter = next(ids / f for f in ADAPTER_FILES if (ids / f).is_file())
    pipe.load_adapter(adapter, layer_scale=layer_scale)
    return pipe.to(device) if device is not None else pipe


def load_controlnet(folder: PathLike, torch_dtype: torch.dtype = torch.float32):
    """An extra ControlNet (pose, canny, depth, ...) from a local diffusers folder.

    :raises ModelFilesMissingError: the folder lacks config.json or its weights.
    """
    from diffusers import ControlNetModel

    folder = Path(folder).expanduser()
    missing = [f for f in INSTANTID_FILES if not (folder / Path(f).name).is_file()]
    if missing:
        raise ModelFilesMissingError(
            f"ControlNet folder {folder} lacks {', '.join(Path(f).name for f in missing)}; put a diffusers "
            "ControlNet there (e.g. an SDXL canny ControlNet) or pass another folder."
        )
    return ControlNetModel.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True)


def _build_pipeline(folder: Path, controlnet_dir: Path, torch_dtype: torch.dtype):
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .pipeline import InstantIDPipeline

    return InstantIDPipeline(
        vae=_load(AutoencoderKL, folder, "vae", torch_dtype=torch_dtype),
        text_encoder=_load(CLIPTextModel, folder, "text_encoder", dtype=torch_dtype),
        text_encoder_2=_load(CLIPTextModelWithProjection, folder, "text_encoder_2", dtype=torch_dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True),
        unet=_load(UNet2DConditionModel, folder, "unet", torch_dtype=torch_dtype),
        controlnet=ControlNetModel.from_pretrained(controlnet_dir, torch_dtype=torch_dtype, local_files_only=True),
        scheduler=EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
    )


def _load(cls, folder: Path, sub: str, **dtype):
    """`cls.from_pretrained` from `folder/sub`, local files only (diffusers takes `torch_dtype`, transformers `dtype`)."""
    return cls.from_pretrained(folder, subfolder=sub, variant=_variant(folder, sub), local_files_only=True, **dtype)


def _variant(folder: Path, sub: str) -> Optional[str]:
    """"fp16" when only the fp16 weight file of a subfolder is present."""
    full, half = BASE_LAYOUT[sub][1]
    return "fp16" if not (folder / sub / full).is_file() and (folder / sub / half).is_file() else None
