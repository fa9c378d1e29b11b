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

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, InputError
from ..types import PathLike
from .dlib_format import Affine, DlibLayer, DlibReader, read_dlib_bytes, read_layer_stack, torch_threads



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


class DlibNetwork(NamedTuple):
    """A parsed `.dat` file: the input layer's settings and the layers, input side first."""

    loss: str
    input_mean: np.ndarray  # [3] R, G, B
    input_size: tuple[int, int]  # rows, cols
    layers: list[DlibLayer]


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
