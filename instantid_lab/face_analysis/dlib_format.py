"""dlib's model-file format, and the pieces both torch ports of dlib's networks share.

`DlibReader` reads dlib's serialisation (dlib/serialize.h); `read_layer_stack` reads a DNN's
computational layers into `DlibLayer` records, input side first. The face-recognition ResNet
(`dlib_resnet`) and the MMOD face detector (`dlib_mmod`) both build on these, and on `Affine`
(dlib's frozen batch norm) and `torch_threads`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ModelFilesMissingError
from ..types import PathLike

# float_details' special exponents (dlib/float_details.h)
_INF, _NEG_INF, _NAN = 32000, 32001, 32002


class Affine(nn.Module):
    """dlib's `affine` layer (batch norm with frozen statistics): ``y = weight * x + bias`` per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """:param x: shape [B, C, H, W]"""
        return torch.addcmul(self.bias[:, None, None], x, self.weight[:, None, None])


@contextlib.contextmanager
def torch_threads(count: Optional[int]) -> Iterator[None]:
    """Run the block with `count` intra-op threads (None or 0: torch's setting), then restore it."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------ reading dlib's format


class DlibReader:
    """Reads dlib's serialisation (dlib/serialize.h) from bytes.

    - integer: a control byte (bit 7: negative; bits 0-3: byte count n), then |value| in n
      little-endian bytes;
    - float: `float_details`, the integers mantissa then exponent, value = mantissa * 2**exponent
      (exponent 32000 / 32001 / 32002: +inf / -inf / nan);
    - string: its length (integer), then the bytes; bool: the character '0' or '1';
    - tensor: version (integer) 2, then num_samples, k, nr, nc (integers), then the values as
      little-endian float32 (version 1: one float_details each); alias_tensor: version 1 and
      the four dimensions, no data.
    """

    def __init__(self, data: bytes, name: str = "the file"):
        self.data, self.pos, self.name = data, 0, name

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.name} is not a readable dlib network: {what} (at byte {self.pos} of {len(self.data)}). "
            "The file may be truncated or corrupt; reinstall it with: "
            "pip install --force-reinstall face-recognition-models"
        )

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"expected {n} more bytes, the file ends")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        control = self.take(1)[0]
        if control & 0x70:
            raise self.fail(f"bad integer control byte {control:#04x}")
        value = int.from_bytes(self.take(control & 0x0F), "little")
        return -value if control & 0x80 else value

    def floating(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        special = {_INF: float("inf"), _NEG_INF: float("-inf"), _NAN: float("nan")}
        return special[exponent] if exponent in special else float(np.ldexp(float(mantissa), exponent))

    def string(self, limit: int = 256) -> str:
        length = self.integer()
        if not 0 <= length <= limit:
            raise self.fail(f"a name of {length} bytes")
        return self.take(length).decode("ascii", errors="replace")

    def boolean(self) -> bool:
        char = self.take(1)
        if char not in (b"0", b"1"):
            raise self.fail(f"expected a bool ('0' or '1'), found {char!r}")
        return char == b"1"

    def tensor(self) -> np.ndarray:
        version, shape = self.integer(), tuple(self.integer() for _ in range(4))  # (num_samples, k, nr, nc)
        if version not in (1, 2) or min(shape) < 0:
            raise self.fail(f"a tensor of version {version}, shape {shape}")
        count = math.prod(shape)
        if version == 1:
            return np.array([self.floating() for _ in range(count)], np.float32).reshape(shape)
        return np.frombuffer(self.take(4 * count), "<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, ...]:
        if self.integer() != 1:
            raise self.fail("an alias_tensor of unknown version")
        return tuple(self.integer() for _ in range(4))

    def version(self, expected: Sequence[int], what: str) -> int:
        value = self.integer()
        if value not in expected:
            raise self.fail(f"{what} version {value}, expected one of {list(expected)}")
        return value


class DlibLayer(NamedTuple):
    """One computational layer as the file stores it.

    :param kind: dlib's layer name without its version suffix: "con", "affine", "relu",
        "max_pool", "avg_pool", "add_prev", "fc", "fc_no_bias" (a saved batch norm, "bn_con", is
        read as the "affine" dlib folds it into); or "tag" for a tag/skip layer
        (those store nothing but a version number, so their ids are not in the file).
    :param params: arrays, e.g. con: "weight" [out, in, r, c], "bias" [out]; affine: "gamma",
        "beta" [C]; fc: "weight" [in, out].
    :param options: con: "stride", "padding" as (y, x); pools: also "size" (rows, cols; 0 = all).
    """

    kind: str
    params: dict
    options: dict


def _read_con(r: DlibReader) -> DlibLayer:
    params = r.tensor().reshape(-1)  # filters then biases, flat
    filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (r.integer() for _ in range(7))
    weight_shape, _ = r.alias(), r.alias()  # filters [out, in, rows, cols], biases [1, out, 1, 1]
    for _ in range(4):
        r.floating()  # learning-rate and weight-decay multipliers
    n = math.prod(weight_shape)
    if params.size != n + filters or weight_shape[0] != filters or weight_shape[2:] != (rows, cols):
        raise r.fail(f"a con layer whose sizes disagree ({params.size} values, filters {weight_shape})")
    weight, bias = params[:n].reshape(weight_shape), params[n:]
    options = {"stride": (stride_y, stride_x), "padding": (pad_y, pad_x)}
    return DlibLayer("con", {"weight": weight, "bias": bias}, options)


def _read_affine(r: DlibReader) -> DlibLayer:
    params = r.tensor().reshape(-1)  # gamma then beta
    gamma_shape, _ = r.alias(), r.alias()
    mode = r.integer()  # 0: per channel (conv mode), 1: per element (fc mode)
    n = math.prod(gamma_shape)
    if mode != 0 or params.size != 2 * n:
        raise r.fail(f"an affine layer in mode {mode} with {params.size} values for {n} channels")
    return DlibLayer("affine", {"gamma": params[:n], "beta": params[n:]}, {})


def _read_bn_con(r: DlibReader) -> DlibLayer:
    """A batch-norm layer saved from training ("bn_con2"), read as the `affine` layer dlib makes of it.

    dlib loads such a layer into a network that declares `affine` by folding its running
    statistics: gamma' = gamma / sqrt(running_variance + eps), beta' = beta - gamma' * running_mean.
    """
    params = r.tensor().reshape(-1)  # gamma then beta
    gamma_shape, _ = r.alias(), r.alias()
    _, _, running_mean, running_variance = (r.tensor().reshape(-1) for _ in range(4))  # means, invstds: batch stats
    r.integer(), r.integer()  # num_updates, running_stats_window_size
    for _ in range(4):
        r.floating()  # learning-rate and weight-decay multipliers
    eps = r.floating()
    n = math.prod(gamma_shape)
    if params.size != 2 * n or running_mean.size != n or running_variance.size != n:
        raise r.fail(f"a bn_con layer with {params.size} values and statistics of {running_mean.size} for {n} channels")
    gamma = (params[:n] / np.sqrt(running_variance + np.float32(eps))).astype(np.float32)
    return DlibLayer("affine", {"gamma": gamma, "beta": params[n:] - gamma * running_mean}, {})


def _read_pool(kind: str) -> Callable[[DlibReader], DlibLayer]:
    def read(r: DlibReader) -> DlibLayer:
        rows, cols, stride_y, stride_x, pad_y, pad_x = (r.integer() for _ in range(6))
        return DlibLayer(kind, {}, {"size": (rows, cols), "stride": (stride_y, stride_x), "padding": (pad_y, pad_x)})

    return read


def _read_fc(r: DlibReader) -> DlibLayer:
    outputs, inputs = r.integer(), r.integer()
    params = r.tensor().reshape(-1)
    r.alias(), r.alias()  # weights [in, out], biases
    has_bias = r.integer() == 0  # dlib's fc_bias_mode: 0 FC_HAS_BIAS, 1 FC_NO_BIAS
    for _ in range(4):
        r.floating()
    if params.size != (inputs + has_bias) * outputs:
        raise r.fail(f"an fc layer with {params.size} values for {inputs} -> {outputs}")
    params = params.reshape(-1, outputs)  # [in (+1 bias row), out]
    if has_bias:
        return DlibLayer("fc", {"weight": params[:inputs], "bias": params[inputs]}, {})
    return DlibLayer("fc_no_bias", {"weight": params}, {})


_LAYER_READERS: dict[str, Callable[[DlibReader], DlibLayer]] = {
    "con_4": _read_con,
    "affine_": _read_affine,
    "bn_con2": _read_bn_con,
    "relu_": lambda r: DlibLayer("relu", {}, {}),
    "add_prev_": lambda r: DlibLayer("add_prev", {}, {}),
    "max_pool_2": _read_pool("max_pool"),
    "avg_pool_2": _read_pool("avg_pool"),
    "fc_2": _read_fc,
}


def _read_layer_details(r: DlibReader, first: bool) -> DlibLayer:
    """One `add_layer`'s details and its training state (3 bools, then tensors we skip)."""
    name = r.string()
    if name not in _LAYER_READERS:
        raise r.fail(f"unsupported layer {name!r} (this reader knows {sorted(_LAYER_READERS)})")
    layer = _LAYER_READERS[name](r)
    for _ in range(3):
        r.boolean()  # setup called, gradient stale, output getters disabled
    for _ in range(3):
        r.tensor()  # x_grad, cached_output, then params_grad (or grad_final on the input side)
    if first:
        r.integer()  # sample expansion factor
    return layer


def read_layer_stack(r: DlibReader, read_input: Callable[[DlibReader], object]) -> tuple[object, list[DlibLayer]]:
    """The layers under a loss layer: (the input layer's settings, the layers, input side first).

    Serialisation is recursive, outer layer first: each `add_layer` writes its version, then
    its subnetwork, then its own details. So after the loss come a run of versions (2: a
    computational layer, 1: a tag/skip layer), 3 for the layer on the input, the input layer
    (read by `read_input`, which knows its type), and then every layer's details from the
    input side up.
    """
    wrappers = []  # outer side first
    while (version := r.version([1, 2, 3], "layer")) != 3:
        wrappers.append(version)
    settings = read_input(r)
    layers = [_read_layer_details(r, first=True)]
    for version in reversed(wrappers):
        layers.append(_read_layer_details(r, first=False) if version == 2 else DlibLayer("tag", {}, {}))
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} bytes left after the network")
    return settings, layers


def read_dlib_bytes(path: PathLike) -> bytes:
    """The bytes of a dlib model file.

    :raises ModelFilesMissingError: there is no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFilesMissingError(
            f"no dlib network at {path}; the file comes with the face-recognition-models package: "
            "pip install --force-reinstall face-recognition-models"
        )
    return path.read_bytes()
