"""Loading the real weights (SDXL 1.0 + the released InstantID files) from local folders only.

Nothing here downloads. The base model is a local folder in diffusers layout, a Hugging Face
repo id already in the local cache (`HF_HOME`), or one `.safetensors` file (a fine-tuned SDXL in the
original single-file layout), read by diffusers' `from_single_file` with the configurations and
tokenizers of a local SDXL folder or cached repo (`single_file_config`); the InstantID files live in
one folder:

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
#: A base model as one file: the original (non-diffusers) layout; .ckpt pickles are refused (they can run code).
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
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


def missing_base_files(folder: Path, weights: bool = True) -> list[str]:
    """Files of the diffusers SDXL layout that `folder` lacks (relative paths).

    :param weights: also the models' weight files (False: only what a single-file base takes from the
        folder: `model_index.json`, the configs and the tokenizers).
    """
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    for sub, (config, files) in BASE_LAYOUT.items():
        if not (folder / sub / config).is_file():
            missing.append(f"{sub}/{config}")
        needed = files and (weights or sub.startswith("tokenizer"))
        if needed and not any((folder / sub / f).is_file() for f in files):
            missing.append(f"{sub}/{' or '.join(files)}")
    return missing


def is_single_file(base: PathLike) -> bool:
    """Whether `base` names one checkpoint file rather than a folder or a repo id."""
    return Path(base).suffix in SINGLE_FILE_SUFFIXES


def missing_instantid_files(folder: Path) -> list[str]:
    """InstantID files that `folder` lacks (relative paths)."""
    missing = [f for f in INSTANTID_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in ADAPTER_FILES):
        missing.append(" or ".join(ADAPTER_FILES))
    return missing


def check_model_files(base: PathLike = SDXL_BASE, instantid: Optional[PathLike] = None,
                      single_file_config: PathLike = SDXL_BASE) -> tuple[Path, Path]:
    """(base folder or single file, InstantID folder) if every file is there.

    :raises ModelFilesMissingError: lists every missing file and where it goes.
    """
    ids = instantid_dir(instantid)
    folder, problems = _check_single_file(base, single_file_config) if is_single_file(base) else _check_base(base)
    if missing_instantid_files(ids):
        problems.append(f"InstantID folder {ids} lacks: {', '.join(missing_instantid_files(ids))} "
                        f"(from the {INSTANTID_REPO} model page; set $INSTANTID_DIR or pass instantid_dir=)")
    if problems:
        raise ModelFilesMissingError("model files are missing (nothing is downloaded):\n- " + "\n- ".join(problems))
    return folder, ids


def _check_base(base: PathLike) -> tuple[Optional[Path], list[str]]:
    folder = resolve_base(base)
    if folder is None:
        return None, [f"base model {str(base)!r}: not a local folder and not in the Hugging Face cache "
                      f"(HF_HOME). Put a diffusers SDXL folder there ({', '.join(BASE_LAYOUT)}, model_index.json) "
                      f"or pass base='/path/to/stable-diffusion-xl-base-1.0'."]
    missing = missing_base_files(folder)
    return folder, [f"base model folder {folder} lacks: {', '.join(missing)}"] if missing else []


def _check_single_file(path: PathLike, config: PathLike) -> tuple[Path, list[str]]:
    """Problems of a single-file base: the file itself, and the SDXL folder its configurations come from."""
    path, problems = Path(path).expanduser(), []
    if path.suffix != ".safetensors":
        problems.append(f"{path}: a {path.suffix} checkpoint is a pickle, which can run code when loaded; use the "
                        ".safetensors version of this model.")
    elif not path.is_file():
        problems.append(f"single-file base {path} does not exist.")
    folder = resolve_base(config)
    if folder is None:
        problems.append(f"the configuration for single-file base {path.name}: {str(config)!r} is not a local folder "
                        f"and not in the Hugging Face cache. A single file has weights only; its configs and "
                        f"tokenizers come from a diffusers SDXL folder: pass single_file_config='/path/to/"
                        f"stable-diffusion-xl-base-1.0' (the weights in it are not needed).")
    elif missing_base_files(folder, weights=False):
        problems.append(f"configuration folder {folder} (for {path.name}) lacks: "
                        f"{', '.join(missing_base_files(folder, weights=False))}")
    return path, problems


def load_sdxl_instantid(base: PathLike = SDXL_BASE, instantid_dir: Optional[PathLike] = None,
                        torch_dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None,
                        layer_scale: float = 1.0, single_file_config: PathLike = SDXL_BASE):
    """`InstantIDPipeline` with SDXL 1.0 (or a fine-tune), IdentityNet and the image adapter, from local files.

    :param base: a local diffusers SDXL folder, a repo id already in the Hugging Face cache, or one
        `.safetensors` file of a fine-tuned SDXL in the original single-file layout.
    :param single_file_config: for a single-file `base`: the local diffusers SDXL folder (or cached repo id)
        whose configurations and tokenizers describe it (its weights are not read).
    :param instantid_dir: folder with ControlNetModel/ and ip-adapter.bin (default: $INSTANTID_DIR or models/instantid).
    :param torch_dtype: dtype of every model (float16 on GPUs; the VAE decodes in float32 when it must).
    :param device: where to move the pipeline, if given.
    :param layer_scale: every layer's identity scale (multiplies the per-call `adapter_scale`).
    :raises ModelFilesMissingError: some files are missing; the message lists them and where they go.
    """
    path, ids = check_model_files(base, instantid_dir, single_file_config)
    components = (_single_file_components(path, resolve_base(single_file_config), torch_dtype) if is_single_file(path)
                  else _base_components(path, torch_dtype))
    pipe = _build_pipeline(components, ids / "ControlNetModel", torch_dtype)
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


def _build_pipeline(components: dict, controlnet_dir: Path, torch_dtype: torch.dtype):
    from diffusers import ControlNetModel

    from .pipeline import InstantIDPipeline

    controlnet = ControlNetModel.from_pretrained(controlnet_dir, torch_dtype=torch_dtype, local_files_only=True)
    return InstantIDPipeline(**components, controlnet=controlnet)


def _base_components(folder: Path, torch_dtype: torch.dtype) -> dict:
    """The SDXL components of a diffusers folder (Euler scheduler)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    return dict(
        vae=_load(AutoencoderKL, folder, "vae", torch_dtype=torch_dtype),
        text_encoder=_load(CLIPTextModel, folder, "text_encoder", dtype=torch_dtype),
        text_encoder_2=_load(CLIPTextModelWithProjection, folder, "text_encoder_2", dtype=torch_dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True),
        unet=_load(UNet2DConditionModel, folder, "unet", torch_dtype=torch_dtype),
        scheduler=EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
    )


def _single_file_components(path: Path, config_folder: Path, torch_dtype: torch.dtype) -> dict:
    """The SDXL components of one original-layout file: diffusers' `from_single_file`, configurations and
    tokenizers from `config_folder` (a local folder, so nothing is fetched), Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    sdxl = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True,
                                                      torch_dtype=torch_dtype)
    names = ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet"]
    scheduler = EulerDiscreteScheduler.from_pretrained(config_folder, subfolder="scheduler", local_files_only=True)
    return {**{n: getattr(sdxl, n) for n in names}, "scheduler": scheduler}


def _load(cls, folder: Path, sub: str, **dtype):
    """`cls.from_pretrained` from `folder/sub`, local files only (diffusers takes `torch_dtype`, transformers `dtype`)."""
    return cls.from_pretrained(folder, subfolder=sub, variant=_variant(folder, sub), local_files_only=True, **dtype)


def _variant(folder: Path, sub: str) -> Optional[str]:
    """"fp16" when only the fp16 weight file of a subfolder is present."""
    full, half = BASE_LAYOUT[sub][1]
    return "fp16" if not (folder / sub / full).is_file() and (folder / sub / half).is_file() else None
