"""The attention explorer: where the generated image looked, at one text token and at the identity tokens.

Decoupled cross-attention has two separate softmaxes per layer (text, identity); `record` runs one
generation inside `attention.capture_attention` (scoped: on exit every processor is the object it was,
recording nothing, which `record` checks) and keeps one map per layer and denoising step. Pick a layer,
a step, a word of the prompt and one of the identity tokens: the panel shows the image, the word's map
and the identity token's map over it, brighter = more attention. (Each query's identity attention sums
to 1 over the identity tokens, so their mean is flat: look at one token at a time.)

    explorer = AttentionExplorer(studio, current_request)
    explorer.record(request)                     # runs the pipeline once; returns an AttentionRecord
    explorer.maps(layer, step, word, token)      # (text map [H, W], identity map [H, W]), each in [0, 1]
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Callable, Optional

import ipywidgets as widgets
import numpy as np
from matplotlib import colormaps
from PIL import Image

from ..attention import (
    AttentionMaps,
    capture_attention,
    identity_processors,
    token_grid,
)
from ..errors import LabError
from ..images import enlarge
from ..viz import png_bytes
from .live import run_now
from .panel import Panel
from .studio import GenerationRequest, Studio


@dataclass
class AttentionRecord:
    """The maps of one generation: `maps.text[layer][step]` [B', Lq, Lt], `maps.identity[layer][step]` [B', Lq, Li]."""

    request: GenerationRequest
    image: Image.Image
    maps: AttentionMaps
    words: tuple  # (word, token position) for each word of the prompt

    @property
    def steps(self) -> int:
        return len(next(iter(self.maps.text.values())))


class AttentionExplorer(Panel):
    """Pick a layer, a denoising step and a prompt word; see text vs identity attention over the image.

    :param studio: the playground's `Studio` (its world's pipe is what runs).
    :param current_request: returns the request to record (the playground's current settings).
    :param submit: runs `work(job)` and returns a Future (the playground's worker, which reports failures in
        its status line); default: at once.
    :param scale: how much the small images are enlarged for display.
    """

    def __init__(self, studio: Studio, current_request: Callable[[], GenerationRequest],
                 submit: Callable = run_now, scale: int = 6):
        self.studio, self.current_request, self.submit, self.scale = studio, current_request, submit, scale
        self.last: Optional[AttentionRecord] = None
        self._build_widgets()

    # ------------------------------------------------------------------ public

    def record(self, request: GenerationRequest, callback_on_step_end=None) -> AttentionRecord:
        """Generate `request` once while capturing attention; raises if anything stays attached afterwards."""
        pipe = self.studio.world.pipe
        before = dict(pipe.unet.attn_processors)
        with capture_attention(pipe.unet) as maps:
            image = pipe(**self.studio.call_args(request), callback_on_step_end=callback_on_step_end).images[0]
        check_detached(pipe.unet, before)
        return AttentionRecord(request, image, maps, prompt_words(pipe.tokenizer, request.prompt))

    def refresh(self):
        """Record the current request through `submit` and show it when done; returns the Future."""
        request = self.current_request()
        self.status.value = "recording attention…"
        return self.submit(lambda job: self._shown(self.record(request, job.callback(request.steps))))

    def show(self, record: AttentionRecord) -> None:
        """Offer `record`'s layers, steps and words, and draw the current choice."""
        self.last = record
        self._quiet = True
        layer, word = self.layer_picker.value, self.word_picker.value
        self.layer_picker.options = [(layer_label(n, record), n) for n in record.maps.layers]
        self.layer_picker.value = layer if layer in record.maps.layers else record.maps.layers[0]
        first = self.step_slider.max == 0      # nothing shown yet: start at the last step, the finished image
        self.step_slider.max = record.steps - 1
        self.step_slider.value = record.steps - 1 if first else min(self.step_slider.value, record.steps - 1)
        self.word_picker.options = list(record.words)
        self.word_picker.value = word if word in dict(record.words).values() else _content_word(record.words)
        self.token_slider.max = record.maps.identity[self.layer_picker.value][0].shape[-1] - 1
        self._quiet = False
        self._draw()

    def maps(self, layer: str, step: int, position: int, token: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The map of the text token at `position` and of identity token `token`, at `layer` and `step`.

        :return: two [H, W] arrays (the image size), each stretched to [0, 1].
        """
        record = self.last
        one = AttentionMaps(text={layer: [record.maps.text[layer][step]]},
                            identity={layer: [record.maps.identity[layer][step]]})
        size = (record.image.height, record.image.width)
        text = one.token_maps(size, "text")[-1, position]                      # [H, W], the conditional half
        identity = one.token_maps(size, "identity")[-1, token]                 # [H, W]
        return _stretch(text.numpy()), _stretch(identity.numpy())


    # ------------------------------------------------------------------ widgets

    def _build_widgets(self) -> None:
        self._quiet = False
        self.record_button = widgets.Button(description="record attention", icon="eye")
        self.layer_picker = widgets.Dropdown(description="layer", layout=widgets.Layout(width="420px"))
        self.step_slider = widgets.IntSlider(description="step", min=0, max=0)
        self.word_picker = widgets.Dropdown(description="text token")
        self.token_slider = widgets.IntSlider(description="identity token", min=0, max=0)
        self.status = widgets.HTML("<i>press “record attention” to run the current settings once</i>")
        self.views = [widgets.Image(format="png") for _ in range(3)]
        self.titles = [widgets.HTML() for _ in range(3)]
        self.record_button.on_click(lambda _: self.refresh())
        for control in (self.layer_picker, self.step_slider, self.word_picker, self.token_slider):
            control.observe(lambda _: self._quiet or self._draw(), names="value")
        cells = [widgets.VBox([t, v]) for t, v in zip(self.titles, self.views)]
        controls = [widgets.HBox([self.record_button, self.layer_picker]),
                    widgets.HBox([self.step_slider, self.word_picker, self.token_slider])]
        self._panel = widgets.VBox([*controls, self.status, widgets.HBox(cells)])

    def _shown(self, record: AttentionRecord) -> AttentionRecord:
        self.show(record)
        return record

    def _draw(self) -> None:
        record, layer, word = self.last, self.layer_picker.value, self.word_picker.value
        if record is None or layer is None or word is None:
            return
        step, token = self.step_slider.value, self.token_slider.value
        text, identity = self.maps(layer, step, word, token)
        image = np.asarray(record.image, np.float32) / 255
        pictures = [record.image, overlay(image, text), overlay(image, identity)]
        label = dict((p, w) for w, p in record.words)[word]
        titles = ["generated image", f"text token “{label}”", f"identity token {token}"]
        for view, title, picture, caption in zip(self.views, self.titles, pictures, titles):
            view.value = png_bytes(enlarge(picture, self.scale))
            title.value = f"<b>{html.escape(caption)}</b>"
        self.status.value = (f"{html.escape(record.request.describe())} · layer {html.escape(layer)} · "
                             f"step {step + 1} of {record.steps}")


def check_detached(unet, before: dict) -> None:
    """Raise `LabError` unless `unet`'s processors are the objects in `before` and none records any more."""
    after = dict(unet.attn_processors)
    changed = [n for n in before if after.get(n) is not before[n]] + [n for n in after if n not in before]
    recording = [n for n, p in identity_processors(unet).items() if p.recorder is not None]
    if changed or recording:
        raise LabError(f"attention capture left the UNet changed: processors {changed}, still recording {recording}")


def prompt_words(tokenizer, prompt: str) -> tuple:
    """(word, token position) for each token of `prompt`, without the start, end and padding tokens."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return tuple((t.replace("</w>", ""), i) for i, (t, k) in enumerate(zip(tokens, ids)) if k not in special)


def layer_label(name: str, record: AttentionRecord) -> str:
    """"down_blocks.0.attentions.0 (16x16)": the layer's block and the grid of its attention map."""
    queries = record.maps.text[name][0].shape[1]
    rows, cols = token_grid(queries, record.image.height, record.image.width)
    return f"{name.split('.transformer_blocks')[0]} ({rows}x{cols})"


def overlay(image: np.ndarray, heat: np.ndarray, weight: float = 0.6) -> np.ndarray:
    """`heat` [H, W] in [0, 1], coloured (inferno), blended over the image [H, W, 3] in [0, 1] shown in grey."""
    grey = image.mean(-1, keepdims=True).repeat(3, -1)                 # [H, W, 3]
    coloured = colormaps["inferno"](heat)[..., :3]                     # [H, W, 4] -> [H, W, 3]
    return (1 - weight) * grey + weight * coloured


def _content_word(words: tuple) -> int:
    """The position of the first word longer than two letters (not "a" or ","), else the first word's."""
    return next((p for w, p in words if len(w) > 2), words[0][1])


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low + 1e-12)
