"""dlib's face-recognition ResNet in PyTorch: the same weights, the same 128-d descriptors, faster.

The dlib backend's identity embedding is the output of `dlib_face_recognition_resnet_model_v1`
(package `face_recognition_models`): a 29-convolution ResNet that maps a 150x150 aligned face
chip to a 128-d descriptor, trained with a metric loss so that two photos of one person lie
closer than 0.6 (Euclidean). dlib's build here runs it without BLAS (~100 ms a face on a quiet
2-core CPU); the same network in torch takes ~15-25 ms (one thread, see `face_descriptors`).

The network, in dlib's template notation (input at the bottom, as dlib writes it)::

    loss_metric<fc_no_bias<128, avg_pool_everything<
        ares_down<256,                                        stage 4: 1 block,  256 ch
        ares<256, ares<256, ares_down<256,                    stage 3: 3 blocks, 256 ch
        ares<128, ares<128, ares_down<128,                    stage 2: 3 blocks, 128 ch
        ares<64, ares<64, ares<64, ares_down<64,              stage 1: 4 blocks,  64 ch
        ares<32, ares<32, ares<32,                            stage 0: 3 blocks,  32 ch
        max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2,         stem
        input_rgb_image_sized<150> >...>

    block       = affine<con<N,3,3,1,1, relu<affine<con<N,3,3,stride,stride, x>>>>>
    ares        = relu<add_prev(block(x, stride 1), x)>
    ares_down   = relu<add_prev(block(x, stride 2), avg_pool<2,2,2,2>(x))>

dlib facts the port follows:

- input: channels R, G, B (in that order), value = (pixel - mean[channel]) / 256, with the
  per-channel means stored in the file (122.782, 117.001, 104.298);
- `con`: cross-correlation, filters [out, in, rows, cols] like torch; padding is stored per
  layer (dlib's default: half the filter when the stride is 1, none otherwise);
- `affine`: batch norm frozen to ``y = gamma * x + beta`` per channel;
- `add_prev`: the sum of two tensors of different shapes, each zero-padded at the end to the
  larger one (the function `add_prev`); the stride-2 path is smaller than its average-pooled shortcut on
  the last two stages (8 -> 3 vs 4, 4 -> 1 vs 2);
- `avg_pool_everything`: the mean over all positions; `fc_no_bias`: ``y = x @ W``, W [in, out];
- `loss_metric` returns the fc output as is (not normalised).

The `.dat` file is dlib's own serialisation, read here with numpy (`read_dlib_network`, ~10 ms):
see `DlibReader` for the encoding.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, InputError, ModelFilesMissingError

PathLike = Union[str, os.PathLike]

# float_details' special exponents (dlib/float_details.h)
_INF, _NEG_INF, _NAN = 32000, 32001, 32002


# ------------------------------------------------------------------------------ the network


@dataclass(frozen=True)
class DlibResNetConfig:
    """Shape of dlib's face-recognition ResNet.

    :param image_size: side of the square input chip (pixels).
    :param stem_channels: filters of the 7x7 stride-2 stem convolution.
    :param stages: (channels, blocks) per stage, input side first; the first block of every
        stage but the first halves the resolution (dlib's `ares_down`).
    :param embedding_dim: length of the descriptor (the `fc_no_bias` outputs).
    """

    image_size: int = 150
    stem_channels: int = 32
    stages: tuple[tuple[int, int], ...] = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))
    embedding_dim: int = 128

    @classmethod
    def v1(cls) -> "DlibResNetConfig":
        """`dlib_face_recognition_resnet_model_v1`, as released (the defaults)."""
        return cls()

    @classmethod
    def tiny(cls) -> "DlibResNetConfig":
        """A few channels, two stages: for tests with random weights."""
        return cls(image_size=40, stem_channels=4, stages=((4, 1), (8, 2)), embedding_dim=8)

    def block_shapes(self) -> list[tuple[int, int, int]]:
        """(in channels, out channels, stride) of every residual block, input side first."""
        shapes, channels = [], self.stem_channels
        for index, (width, blocks) in enumerate(self.stages):
            for b in range(blocks):
                shapes.append((channels, width, 2 if index > 0 and b == 0 else 1))
                channels = width
        return shapes


def add_prev(a: Tensor, b: Tensor) -> Tensor:
    """dlib's `add_prev`: ``a + b`` where each is zero-padded at the end to the larger shape.

    For every output position (c, y, x): a[c, y, x] (0 where a has no such position) plus
    b[c, y, x] (likewise). Equal shapes give the plain sum.

    :param a: shape [B, Ca, Ha, Wa]
    :param b: shape [B, Cb, Hb, Wb]
    :return: shape [B, max(Ca, Cb), max(Ha, Hb), max(Wa, Wb)]
    """
    size = [max(p, q) for p, q in zip(a.shape[1:], b.shape[1:])]  # [C, H, W]

    def grow(t: Tensor) -> Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, size[2] - w, 0, size[1] - h, 0, size[0] - c))  # pad W, then H, then C

    return grow(a) + grow(b)


class Affine(nn.Module):
    """dlib's `affine` layer (batch norm with frozen statistics): ``y = weight * x + bias`` per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """:param x: shape [B, C, H, W]"""
        return torch.addcmul(self.bias[:, None, None], x, self.weight[:, None, None])


class ResidualBlock(nn.Module):
    """dlib's `ares` (stride 1) or `ares_down` (stride 2): relu(add_prev(block(x), shortcut(x)))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1 if stride == 1 else 0)
        self.affine1 = Affine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1)
        self.affine2 = Affine(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """:param x: shape [B, C_in, H, W] -> [B, C_out, H, W] (stride 1) or [B, C_out, H // 2, W // 2] (stride 2)"""
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.stride == 2 else x
        return F.relu(add_prev(y, shortcut))


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: aligned face chips -> descriptors.

    Build, then load: ``model = DlibResNet(config); model.load_state_dict(state)``, or
    `load_dlib_resnet(path)` for the released file.
    """

    def __init__(self, config: DlibResNetConfig = DlibResNetConfig()):
        super().__init__()
        self.config = config
        self.register_buffer("input_mean", torch.zeros(3))  # R, G, B means of the training chips
        self.stem_conv = nn.Conv2d(3, config.stem_channels, 7, 2, padding=0)
        self.stem_affine = Affine(config.stem_channels)
        self.blocks = nn.ModuleList(ResidualBlock(*shape) for shape in config.block_shapes())
        self.fc = nn.Linear(config.stages[-1][0], config.embedding_dim, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:
        """:param pixels: shape [B, 3, S, S], RGB values in [0, 255] (float), S = image_size.
        :return: shape [B, embedding_dim], the raw descriptors."""
        x = (pixels - self.input_mean[:, None, None]) / 256.0
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)  # [B, C, 35, 35] for S=150
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))  # avg_pool_everything: [B, C, h, w] -> [B, C]


def chips_to_tensor(chips: Union[np.ndarray, Sequence[np.ndarray]], size: int) -> Tensor:
    """Face chips as the network's input.

    :param chips: shape [S, S, 3] or [B, S, S, 3] (or a list of [S, S, 3]), uint8 RGB, as
        `dlib.get_face_chip(image, shape, size=S, padding=0.25)` returns them.
    :return: shape [B, 3, S, S], float32 in [0, 255].
    """
    array = np.stack(chips) if isinstance(chips, (list, tuple)) else np.asarray(chips)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != (size, size, 3):
        raise InputError(f"face chips must be {size}x{size} RGB, shape [B, {size}, {size}, 3]; got {array.shape}.")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()  # [B, 3, S, S]


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


@torch.inference_mode()
def face_descriptors(
    model: DlibResNet, chips: Union[np.ndarray, Sequence[np.ndarray]], threads: Optional[int] = None
) -> np.ndarray:
    """dlib descriptors of aligned face chips.

    :param chips: see `chips_to_tensor`.
    :param threads: intra-op threads for this call (None: torch's setting). One chip is small
        work: on a 2-core CPU shared with another busy process, 2 threads wait on each other
        at every layer (measured: ~0.2-0.8 s a chip, vs ~20 ms with 1 thread).
    :return: shape [B, embedding_dim], float32.
    """
    with torch_threads(threads):
        return model(chips_to_tensor(chips, model.config.image_size)).numpy()


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


class DlibNetwork(NamedTuple):
    """A parsed `.dat` file: the input layer's settings and the layers, input side first."""

    loss: str
    input_mean: np.ndarray  # [3] R, G, B
    input_size: tuple[int, int]  # rows, cols
    layers: list[DlibLayer]


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


def _read_sized_input(r: DlibReader) -> tuple[np.ndarray, tuple[int, int]]:
    if r.string() != "input_rgb_image_sized":
        raise r.fail("the input layer is not input_rgb_image_sized")
    mean = np.array([r.floating() for _ in range(3)], np.float32)  # R, G, B
    return mean, (r.integer(), r.integer())


def parse_dlib_network(data: bytes, name: str = "the file") -> DlibNetwork:
    """Parse a dlib DNN whose loss is `loss_metric` and input `input_rgb_image_sized` (see `read_layer_stack`)."""
    r = DlibReader(data, name)
    r.version([1], "add_loss_layer")
    loss = r.string()
    if loss != "loss_metric_2":
        raise r.fail(f"loss {loss!r}; expected dlib's metric loss ('loss_metric_2')")
    r.floating(), r.floating()  # margin, distance threshold
    (mean, size), layers = read_layer_stack(r, _read_sized_input)
    return DlibNetwork(loss, mean, size, layers)


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


def read_dlib_network(path: PathLike) -> DlibNetwork:
    """Parse a dlib network file (`parse_dlib_network`).

    :raises ModelFilesMissingError: there is no such file.
    :raises CheckpointError: it is not a dlib metric-learning network, or it is truncated.
    """
    return parse_dlib_network(read_dlib_bytes(path), str(path))


# ------------------------------------------------------------------------------ dlib layers -> state dict


def expected_layers(config: DlibResNetConfig) -> list[tuple[str, dict]]:
    """(kind, options) of the layers, input side first, that a dlib file of this architecture holds."""

    def con(stride: int, padding: int) -> tuple[str, dict]:
        return "con", {"stride": (stride, stride), "padding": (padding, padding)}

    def pool(kind: str, size: int, stride: int) -> tuple[str, dict]:
        return kind, {"size": (size, size), "stride": (stride, stride), "padding": (0, 0)}

    tag, affine, relu, add = ("tag", {}), ("affine", {}), ("relu", {}), ("add_prev", {})
    layers = [con(2, 0), affine, relu, pool("max_pool", 3, 2)]
    for _, _, stride in config.block_shapes():
        down = stride == 2  # tag2, skip1, avg_pool: the shortcut
        layers += [tag, con(stride, 0 if down else 1), affine, relu, con(1, 1), affine]
        layers += ([tag, tag, pool("avg_pool", 2, 2)] if down else []) + [add, relu]
    return layers + [pool("avg_pool", 0, 1), ("fc_no_bias", {})]  # avg_pool_everything, then the fc


def _module_tensors(layer: DlibLayer, prefix: str) -> dict[str, np.ndarray]:
    """A parametric dlib layer's arrays under the torch module's names."""
    if layer.kind == "con":
        return {f"{prefix}.weight": layer.params["weight"], f"{prefix}.bias": layer.params["bias"]}
    if layer.kind == "affine":
        return {f"{prefix}.weight": layer.params["gamma"], f"{prefix}.bias": layer.params["beta"]}
    return {f"{prefix}.weight": layer.params["weight"].T}  # fc_no_bias: [in, out] -> torch's [out, in]


def dlib_state_dict(network: DlibNetwork, config: DlibResNetConfig) -> dict[str, Tensor]:
    """The `DlibResNet` state dict held by a parsed dlib file.

    :raises CheckpointError: the file's layers are not those of `config`'s architecture.
    """
    found = [(layer.kind, layer.options) for layer in network.layers]
    expected = expected_layers(config)
    if found != expected or network.input_size != (config.image_size, config.image_size):
        at = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
        raise CheckpointError(
            f"the dlib network ({len(found)} layers, input {network.input_size}) is not the face-recognition "
            f"ResNet of {config} ({len(expected)} layers): layer {at} is "
            f"{found[at] if at < len(found) else 'missing'}, expected {expected[at] if at < len(expected) else 'none'}."
        )
    parametric = [layer for layer in network.layers if layer.kind in ("con", "affine", "fc_no_bias")]
    state = {"input_mean": network.input_mean}
    for layer, prefix in zip(parametric, _module_prefixes(config)):
        state |= _module_tensors(layer, prefix)
    return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()}


def _module_prefixes(config: DlibResNetConfig) -> list[str]:
    """Names of `DlibResNet`'s parametric modules in dlib's layer order (input side first)."""
    prefixes = ["stem_conv", "stem_affine"]
    for i in range(len(config.block_shapes())):
        prefixes += [f"blocks.{i}.{name}" for name in ("conv1", "affine1", "conv2", "affine2")]
    return prefixes + ["fc"]


def load_dlib_resnet(path: PathLike, config: DlibResNetConfig = DlibResNetConfig()) -> DlibResNet:
    """The torch port with the weights of a dlib face-recognition network file, eval mode, float32.

    Cached per process (by path, size and modification time); treat the model as read-only.

    :raises ModelFilesMissingError: no file at `path`.
    :raises CheckpointError: the file is corrupt or holds another architecture.
    """
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _load_cached(str(path.resolve()), stat and (stat.st_size, stat.st_mtime_ns), config)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, _stamp, config: DlibResNetConfig) -> DlibResNet:
    model = DlibResNet(config)
    try:
        model.load_state_dict(dlib_state_dict(read_dlib_network(path), config))
    except RuntimeError as error:  # shapes differ from the config's
        raise CheckpointError(f"{path} does not fit {config}: {error}") from error
    return model.eval().requires_grad_(False)
