"""Tiny random ONNX models in the antelopev2 formats, so the insightface path runs offline.

- A detector in SCRFD's format: input [1, 3, H, W] (any H, W divisible by 32); 9 outputs,
  scores [N_s, 1], box distances [N_s, 4] and keypoint distances [N_s, 10] for strides 8, 16
  and 32, with N_s = (H / s) * (W / s) * 2 anchors. insightface recognises a detector by its
  number of outputs (>= 5) and decodes a box as anchor -/+ distance * stride.
- A recogniser in ArcFace's format: input [B, 3, 112, 112], output [B, 512]. insightface
  recognises it by its square input (>= 112, a multiple of 16) and single output.

Detector variants (`fire`):

- "blocks": stride 32 fires on every fully red 32 x 32 cell of the detector input, stride 16
  on every fully green 16 x 16 cell; with the fixed box distances below a red cell gives a
  64 x 64 face and a green one a 32 x 32 face (see `block_photo`).
- "never": scores are always ~0.
- "small_inputs": stride 32 fires everywhere, but only when the input height is at most
  `max_input` (the score depends on the input's shape), so a caller finds faces only after
  retrying at a smaller detector size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STRIDES = (8, 16, 32)
ANCHORS = 2
#: Box distances (left, top, right, bottom) in units of the stride: a box of 2 strides.
BOX_DISTANCES = (1.0, 1.0, 1.0, 1.0)
#: Keypoint offsets (x, y) from the anchor in units of the stride: an upright frontal face.
KPS_OFFSETS = ((-0.4, -0.3), (0.4, -0.3), (0.0, 0.1), (-0.3, 0.5), (0.3, 0.5))
#: Which input channel (0 = R after insightface's BGR->RGB swap) each stride looks at, "blocks" mode.
BLOCK_CHANNEL = {16: 1, 32: 0}
_GAIN = 40.0  # logit per unit of mean activation: a full cell (mean ~0.996) gives ~+4, half a cell < 0


def _initializer(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _score_weights(stride: int, fire: str) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight [2, 3, s, s] and bias [2] of one stride's score logits."""
    weight = np.zeros((ANCHORS, 3, stride, stride), np.float32)
    if fire == "blocks" and stride in BLOCK_CHANNEL:
        weight[:, BLOCK_CHANNEL[stride]] = _GAIN / (stride * stride)  # mean of one channel over the cell
        return weight, np.full(ANCHORS, -0.9 * _GAIN, np.float32)
    if fire == "small_inputs" and stride == 32:
        return weight, np.full(ANCHORS, 5.0, np.float32)
    return weight, np.full(ANCHORS, -20.0, np.float32)


def _head(stride: int, name: str, width: int, weight: np.ndarray, bias: np.ndarray, nodes, inits) -> str:
    """Conv(stride s) -> [1, 2w, h, w'] -> [1, h, w', 2w] -> [h * w' * 2, width]; returns the output name."""
    inits += [_initializer(f"{name}_w", weight), _initializer(f"{name}_b", bias)]
    conv = helper.make_node("Conv", ["input.1", f"{name}_w", f"{name}_b"], [f"{name}_conv"], strides=[stride, stride])
    nodes.append(conv)
    return _flatten_anchors(f"{name}_conv", name, width, nodes, inits)


def _flatten_anchors(source: str, name: str, width: int, nodes, inits) -> str:
    inits.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{name}_shape"))
    nodes.append(helper.make_node("Transpose", [source], [f"{name}_nhwc"], perm=[0, 2, 3, 1]))  # [1, h, w, 2*width]
    nodes.append(helper.make_node("Reshape", [f"{name}_nhwc", f"{name}_shape"], [name]))  # [h*w*2, width]
    return name


def _input_height_gate(max_input: int, nodes, inits) -> str:
    """A scalar logit offset: 0 when the input height <= max_input, very negative otherwise."""
    inits.append(numpy_helper.from_array(np.array(2, np.int64), "axis_h"))  # H in [N, C, H, W]
    inits += [_initializer("max_h", max_input), _initializer("minus", -10.0)]
    nodes += [
        helper.make_node("Shape", ["input.1"], ["in_shape"]),
        helper.make_node("Gather", ["in_shape", "axis_h"], ["in_h"], axis=0),
        helper.make_node("Cast", ["in_h"], ["in_h_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["in_h_f", "max_h"], ["excess"]),
        helper.make_node("Relu", ["excess"], ["excess_pos"]),
        helper.make_node("Mul", ["excess_pos", "minus"], ["gate"]),
    ]
    return "gate"


def scrfd_model(fire: str = "blocks", max_input: int = 448) -> onnx.ModelProto:
    """A detector in SCRFD's format (see the module docstring for `fire`)."""
    nodes, inits = [], []
    gate = _input_height_gate(max_input, nodes, inits) if fire == "small_inputs" else None
    scores, boxes, kpss = [], [], []
    for s in STRIDES:
        weight, bias = _score_weights(s, fire)
        inits += [_initializer(f"score{s}_w", weight), _initializer(f"score{s}_b", bias)]
        nodes.append(helper.make_node("Conv", ["input.1", f"score{s}_w", f"score{s}_b"], [f"logit{s}"], strides=[s, s]))
        if gate:
            nodes.append(helper.make_node("Add", [f"logit{s}", gate], [f"gated{s}"]))
        nodes.append(helper.make_node("Sigmoid", [f"gated{s}" if gate else f"logit{s}"], [f"prob{s}"]))
        scores.append(_flatten_anchors(f"prob{s}", f"score_{s}", 1, nodes, inits))
        zeros = lambda width: np.zeros((ANCHORS * width, 3, s, s), np.float32)  # noqa: E731
        boxes.append(_head(s, f"bbox_{s}", 4, zeros(4), np.tile(BOX_DISTANCES, ANCHORS), nodes, inits))
        kpss.append(_head(s, f"kps_{s}", 10, zeros(10), np.tile(np.ravel(KPS_OFFSETS), ANCHORS), nodes, inits))
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{name}", width])
        for names, width in ((scores, 1), (boxes, 4), (kpss, 10))
        for name in names
    ]
    graph = helper.make_graph(nodes, f"tiny_scrfd_{fire}", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def arcface_model(seed: int = 0, dim: int = 512) -> onnx.ModelProto:
    """A recogniser in ArcFace's format: 16 x 16 average pooling, then a random linear map with bias."""
    rng = np.random.default_rng(seed)
    inits = [_initializer("fc_w", rng.normal(size=(3 * 7 * 7, dim)) * 0.5), _initializer("fc_b", rng.normal(size=dim))]
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),  # [B, 3, 7, 7]
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),  # [B, 147]
        helper.make_node("MatMul", ["flat", "fc_w"], ["proj"]),  # [B, 512]
        helper.make_node("Add", ["proj", "fc_b"], ["fc1"]),
    ]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])]
    outputs = [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", dim])]
    graph = helper.make_graph(nodes, "tiny_arcface", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def write_antelopev2(folder: Path, fire: str = "blocks", max_input: int = 448) -> Path:
    """Write a tiny antelopev2 folder (scrfd_10g_bnkps.onnx, glintr100.onnx) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(scrfd_model(fire, max_input), str(folder / "scrfd_10g_bnkps.onnx"))
    onnx.save(arcface_model(), str(folder / "glintr100.onnx"))
    return folder


def block_photo(size: int = 640) -> np.ndarray:
    """A black RGB image [size, size, 3] with a red 32 x 32 block at (320, 320) and a green
    16 x 16 block at (128, 128), both on the detector's grid at det_size == size.

    With the "blocks" detector: a 64 x 64 face centred on the red block's top-left corner
    (box 288..352) and a 32 x 32 face centred on the green one's (box 112..144).
    """
    image = np.zeros((size, size, 3), np.uint8)
    image[320:352, 320:352] = (255, 0, 0)
    image[128:144, 128:144] = (0, 255, 0)
    return image
