"""Safe loading and saving of the image adapter's weights.

The released `ip-adapter.bin` is a torch pickle holding ``{"image_proj": <Resampler state dict>,
"ip_adapter": <decoupled-attention state dict>}``. A pickle can run arbitrary code when loaded, so
it is read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers. `convert_to_safetensors` turns it, once, into a `.safetensors` file (keys
"image_proj.<k>" and "ip_adapter.<k>"), which holds tensors only by construction.

`ip_adapter` keys are "{i}.to_k_ip.weight" / "{i}.to_v_ip.weight", i = the layer's index in the
UNet's `attn_processors`; for SDXL the 70 cross-attention layers are i = 1, 3, ..., 139.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .adapter import describe_mismatch
from .attention import attention_layers, is_cross_attention
from .errors import CheckpointError, ModelFilesMissingError, UnsafeCheckpointError
from .types import PathLike

PARTS = ("image_proj", "ip_adapter")

#: cross-attention width -> the base model family that has it (to explain a mismatch)
BASE_MODELS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}


def load_adapter_state(path_or_state: Union[PathLike, Mapping]) -> dict[str, dict[str, Tensor]]:
    """Read an adapter checkpoint without executing anything.

    :param path_or_state: a `.bin`/`.pt` torch pickle, a `.safetensors` file, or an already loaded
        dict (nested ``{"image_proj": ..., "ip_adapter": ...}`` or flat with prefixed keys)
    :return: ``{"image_proj": {...}, "ip_adapter": {...}}``, tensors on the CPU for files
    :raises ModelFilesMissingError: the file does not exist.
    :raises UnsafeCheckpointError: the pickle asks to run code or build non-tensor objects.
    :raises CheckpointError: unreadable file, or not an adapter checkpoint (names the odd keys).
    """
    if isinstance(path_or_state, Mapping):
        return _as_parts(path_or_state, "the given state dict")
    path = Path(path_or_state)
    if not path.is_file():
        raise ModelFilesMissingError(
            f"no adapter checkpoint at {path.resolve()}. Download InstantID's ip-adapter.bin "
            "(Hugging Face: InstantX/InstantID) and put it there, or pass the path where it is."
        )
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
    return _as_parts(state, str(path))


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}). Re-download or re-convert it.") from e


def _read_pickle(path: Path) -> Mapping:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} wants to load more than tensors, so it was not loaded (nothing in it was executed): "
            f"{str(e).splitlines()[0]}. Use a checkpoint from a source you trust, converted with "
            "convert_to_safetensors."
        ) from e
    except Exception as e:  # truncated or not a pickle at all: torch's unpickler raises many kinds of error
        raise CheckpointError(f"could not read {path} as a torch checkpoint ({type(e).__name__}: {e}). "
                              "Is the download complete?") from e


def _as_parts(state: Mapping, where: str) -> dict[str, dict[str, Tensor]]:
    """Nested or flat ("image_proj.<k>") -> nested; checks there are exactly the two parts, all tensors."""
    nested = any(k in PARTS for k in state)
    odd = [k for k in state if k not in PARTS] if nested else [k for k in state if not _is_flat_key(k)]
    if odd:
        raise CheckpointError(
            f"{where} is not an adapter checkpoint: unexpected key(s) {odd[:6]}; expected 'image_proj' and "
            "'ip_adapter' (or flat keys 'image_proj.<name>', 'ip_adapter.<name>')."
        )
    if nested:
        not_dicts = [p for p in PARTS if not isinstance(state.get(p, {}), Mapping)]
        if not_dicts:
            raise CheckpointError(f"{where}: {not_dicts} should each be a state dict (name -> tensor)")
        parts = {p: dict(state.get(p, {})) for p in PARTS}
    else:
        parts = {p: {} for p in PARTS}
        for key, value in state.items():
            part, name = key.split(".", 1)
            parts[part][name] = value
    _check_parts(parts, where)
    return parts


def _is_flat_key(key) -> bool:
    return isinstance(key, str) and "." in key and key.split(".", 1)[0] in PARTS


def _check_parts(parts: Mapping[str, Mapping], where: str) -> None:
    empty = [p for p in PARTS if not parts[p]]
    if empty:
        raise CheckpointError(f"{where} has no {empty} weights; an adapter checkpoint needs both {list(PARTS)}.")
    odd = [f"{p}.{k}" for p in PARTS for k, v in parts[p].items() if not isinstance(v, Tensor)]
    if odd:
        raise CheckpointError(f"{where}: these entries are not tensors: {odd[:6]}")


def save_adapter_state(state: Mapping, path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write an adapter state as safetensors, keys "image_proj.<k>" and "ip_adapter.<k>".

    :param state: ``{"image_proj": {...}, "ip_adapter": {...}}`` (e.g. from `load_adapter_state`, or
        ``{"image_proj": resampler.state_dict(), "ip_adapter": procs.state_dict()}``)
    :param path: the file to write (its folder is created).
    :param metadata: extra text entries for the file's header (read back with `adapter_metadata`).
    """
    from safetensors.torch import save_file

    parts = _as_parts(state, "the state to save")
    flat = {f"{p}.{k}": v.detach().contiguous().cpu() for p in PARTS for k, v in parts[p].items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata={**(metadata or {}), "format": "pt"})


def adapter_metadata(path: PathLike) -> dict[str, str]:
    """The text entries of a `.safetensors` adapter file's header ({} for other files)."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def convert_to_safetensors(src: PathLike, dst: PathLike) -> None:
    """Read a (trusted or not) `.bin` checkpoint safely and write it as `.safetensors`."""
    save_adapter_state(load_adapter_state(src), dst)


def expected_ip_adapter_shapes(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    """The `ip_adapter` keys and shapes this UNet needs (works on the meta device).

    :return: {"1.to_k_ip.weight": (hidden, cross_dim), "1.to_v_ip.weight": ..., ...}
    """
    shapes = {}
    for i, (name, attn) in enumerate(attention_layers(unet)):
        if is_cross_attention(name, attn):
            shape = (attn.to_k.out_features, attn.to_k.in_features)       # Linear(cross_dim -> hidden).weight
            shapes[f"{i}.to_k_ip.weight"] = shapes[f"{i}.to_v_ip.weight"] = shape
    return shapes


def check_ip_adapter_state(unet: nn.Module, ip_adapter_sd: Mapping[str, Tensor]) -> None:
    """Check an `ip_adapter` state dict against the UNet before loading it.

    :raises CheckpointError: naming missing, unexpected and mis-shaped keys, and the likely cause.
    """
    expected = expected_ip_adapter_shapes(unet)
    given = {k: tuple(v.shape) for k, v in ip_adapter_sd.items()}
    problems = describe_mismatch(expected, given)
    if problems:
        raise CheckpointError(
            f"the ip_adapter weights do not fit this UNet. Likely cause: {_likely_cause(expected, given)} "
            f"Details: {problems}."
        )


def _likely_cause(expected: Mapping[str, tuple], given: Mapping[str, tuple]) -> str:
    if any(k.startswith(PARTS) or k.startswith("unet.") for k in given):
        return "the keys carry a prefix: pass checkpoint['ip_adapter'] (see load_adapter_state), not the whole file."
    if any(".to_k_ip.0." in k or k.startswith("to_k_ip") for k in given):
        return "these are diffusers-format processor keys, not the released layout '{i}.to_k_ip.weight'."
    want = {s[1] for s in expected.values()}
    have = {s[1] for s in given.values() if len(s) == 2}
    if have and have != want:
        base = ", ".join(BASE_MODELS.get(d, "an unknown base model") for d in sorted(have))
        return (f"the adapter reads {sorted(have)}-d tokens ({base}) but this UNet's cross-attention is "
                f"{sorted(want)}-d ({BASE_MODELS.get(max(want), 'another model')}): adapter and base model differ.")
    n_want, n_have = len(expected) // 2, len(given) // 2
    if n_want != n_have:
        return f"the adapter has {n_have} cross-attention layers, this UNet {n_want}: a different UNet architecture."
    return "a UNet with other block widths than the one the adapter was trained on."
