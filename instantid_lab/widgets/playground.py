"""The playground: every knob of InstantID on one panel, live (ipywidgets).

Choose reference identities, the prompt, the adapter scale, IdentityNet's scale and window, move the
keypoints, pick a seed, and see the result beside the reference and the target with the judges'
readouts; earlier results stay in a history strip; "sweep" renders one scale's values in one batched
call; the attention tab shows where the image looked. The logic is plain methods, so tests and
notebooks drive it as a click would:

    playground = Playground.open("miniature")
    playground.set(adapter_scale=0.0, identitynet_scale=0.0)     # sets the controls (no live run)
    playground.generate(wait=True).readout.identity_similarity
    playground.sweep("adapter_scale", [0, 0.5, 1, 1.5], wait=True)

Generation runs in a worker thread (`live.LatestOnly`): the kernel only submits, and a new request
cancels the one running at its next denoising step. With "live" on, every change starts an image.
"""

from __future__ import annotations

import html
from concurrent.futures import Future
from dataclasses import fields
from typing import Optional, Sequence

import ipywidgets as widgets
from matplotlib.figure import Figure
from PIL import Image

from ..errors import InputError
from ..images import enlarge
from ..miniature.world import ACCESSORIES, BACKGROUNDS, EXPRESSIONS, STYLES, Caption
from ..viz import image_grid, png_bytes
from .attention import AttentionExplorer
from .live import Cancelled, Job, LatestOnly
from .panel import Panel
from .sources import MiniatureReferences, PhotoReferences
from .studio import SWEEPABLE, Generation, GenerationRequest, PoseEdit, Studio, Sweep

CAPTION_FIELDS = {"background": BACKGROUNDS, "expression": EXPRESSIONS, "accessory": ACCESSORIES, "style": STYLES}
POSE_FIELDS = tuple(f.name for f in fields(PoseEdit))
SWEEP_LABELS = {"adapter_scale": "adapter scale", "identitynet_scale": "IdentityNet scale"}
DISPLAY_SIDE = 128  # pixels an image is shown at (the miniature's 32-px images enlarged, nearest neighbour)


class Playground(Panel):
    """The panel and its logic. `Playground.open(mode)` builds the world; `Playground(studio)` reuses one.

    :param studio: a `Studio` (a world and a source of references).
    :param live: start an image on every change (the newest request wins).
    :param history_size: how many earlier results the history strip keeps.
    :param sweep_values: the default values of a sweep.
    """

    def __init__(self, studio: Studio, live: bool = True, history_size: int = 8,
                 sweep_values: Sequence[float] = (0.0, 0.5, 1.0, 1.5)):
        self.studio, self.source = studio, studio.source
        self.history: list[Generation] = []
        self.history_size, self.last_sweep = history_size, None
        self.runner = LatestOnly(on_progress=self._on_progress)
        self._quiet, self._width = False, self.source.size(self.source.keys[:1])[0]
        self._build_widgets(studio.default_request(), live, sweep_values)
        self.attention = AttentionExplorer(studio, self.request, self._submit, self._scale)
        self._panel = widgets.VBox([self._main, widgets.Tab([self._sweep_panel, self.attention.panel],
                                                            titles=("sweep", "attention"))])
        self._panel.add_class("playground")
        self._preview()

    @classmethod
    def open(cls, mode: str = "miniature", ci: bool = False, world=None, **kwargs) -> "Playground":
        """A playground on `world` (default: `worlds.open_world(mode, ci=ci)`): held-out identities in the
        miniature, photos otherwise. Keyword arguments go to `Playground`."""
        from ..worlds import open_world

        world = world if world is not None else open_world(mode, ci=ci)
        source = MiniatureReferences(world) if world.mode == "miniature" else PhotoReferences(world)
        return cls(Studio(world, source), **kwargs)

    # ------------------------------------------------------------------ the request

    def request(self) -> GenerationRequest:
        """The request the controls describe now."""
        value = {name: control.value for name, control in self.controls.items()}
        caption = Caption(**{n: value[n] for n in CAPTION_FIELDS}) if self.source.captioned else None
        start, end = self.window_slider.value
        return GenerationRequest(
            references=tuple(value["references"]), prompt=caption.text() if caption else value["prompt"],
            caption=caption, adapter_scale=value["adapter_scale"], identitynet_scale=value["identitynet_scale"],
            control_start=start, control_end=end, pose=PoseEdit(**{n: value[n] for n in POSE_FIELDS}),
            seed=value["seed"], steps=value["steps"], guidance=value["guidance"])

    def set(self, **values) -> GenerationRequest:
        """Set controls by request field (adapter_scale=0.5, references=(id,), background="red", roll=15,
        control_end=0.6, ...) without starting a live image; returns the new request."""
        unknown = sorted(set(values) - set(self.controls) - {"control_start", "control_end"})
        if unknown:
            raise InputError(f"no control for {unknown}; controls: {sorted(self.controls)} + control_start/end")
        with self._silenced():
            for name, value in values.items():
                if name in ("control_start", "control_end"):
                    start, end = self.window_slider.value
                    self.window_slider.value = (value, end) if name == "control_start" else (start, value)
                else:
                    self.controls[name].value = tuple(value) if name == "references" else value
        self._preview()
        return self.request()

    def restore(self, generation: Generation) -> GenerationRequest:
        """Put the controls back to what produced `generation` (e.g. one of `history`)."""
        r = generation.request
        caption = {n: getattr(r.caption, n) for n in CAPTION_FIELDS} if r.caption else {"prompt": r.prompt}
        pose = {n: getattr(r.pose, n) for n in POSE_FIELDS}
        return self.set(references=r.references, adapter_scale=r.adapter_scale, seed=r.seed, steps=r.steps,
                        identitynet_scale=r.identitynet_scale, control_start=r.control_start,
                        control_end=r.control_end, guidance=r.guidance, **caption, **pose)

    # ------------------------------------------------------------------ running

    def generate(self, wait: bool = False):
        """Generate the current request in the worker (superseding any running one).

        :return: the `Generation` when `wait`, else a Future of it (raises `live.Cancelled` if superseded).
        """
        request = self.request()
        self.status.value = "generating…"
        future = self._submit(lambda job: self._show(self.studio.generate(request, job.callback(request.steps))))
        return future.result() if wait else future

    def sweep(self, field: Optional[str] = None, values: Optional[Sequence[float]] = None, wait: bool = False):
        """Render the current request at each of `values` of `field` (default: the sweep controls) in ONE
        batched call from the same noise; returns the `Sweep` when `wait`, else a Future of it."""
        field = field or self.sweep_field.value
        values = tuple(values) if values is not None else parse_values(self.sweep_values.value)
        if field not in SWEEPABLE:
            raise InputError(f"a sweep varies one of {SWEEPABLE} (per-image scales); got {field!r}")
        self.sweep_field.value, self.sweep_values.value = field, ", ".join(f"{v:g}" for v in values)
        request = self.request()
        self.status.value = f"sweeping {SWEEP_LABELS.get(field, field)} over {values}…"
        future = self._submit(
            lambda job: self._show_sweep(self.studio.sweep(request, field, values, job.callback(request.steps))))
        return future.result() if wait else future

    @property
    def last(self) -> Optional[Generation]:
        """The newest finished generation."""
        return self.history[-1] if self.history else None

    def close(self) -> None:
        """Stop the worker thread (what runs is cancelled)."""
        self.runner.close()

    # ------------------------------------------------------------------ display


    def snapshot(self) -> Figure:
        """A static picture of the panel's state: references, target, keypoint image, result; the last sweep below."""
        last = self.last
        if last is None:
            raise InputError("nothing generated yet: call generate() first")
        refs = list(last.request.references)
        rows = [[(self.source.image(k), f"reference {k}") for k in refs]]
        if last.target is not None:
            rows[0].append((last.target, "target (world's drawing)"))
        rows[0] += [(last.keypoint_image, "keypoint image"),
                    (last.image, f"result: similarity {last.readout.identity_similarity:.2f}")]
        if self.last_sweep is not None:
            sweep = self.last_sweep
            rows.append([(im, f"{SWEEP_LABELS[sweep.field]} {v:g}: {r.identity_similarity:.2f}")
                         for v, im, r in zip(sweep.values, sweep.images, sweep.readouts)])
        columns = max(len(row) for row in rows)
        blank = (Image.new("RGB", last.image.size, "white"), "")
        cells = [cell for row in rows for cell in row + [blank] * (columns - len(row))]   # each row padded
        return image_grid([im for im, _ in cells], [t for _, t in cells], ncols=columns, cell=2.2,
                          suptitle=last.request.prompt)

    # ------------------------------------------------------------------ widgets

    def _build_widgets(self, default: GenerationRequest, live: bool, sweep_values: Sequence[float]) -> None:
        def slider(description: str, low: float, high: float, step: float, value: float) -> widgets.FloatSlider:
            # continuous_update=False: a value is sent on release; a continuously updating slider echoes values
            # back to the kernel, which can undo a change made from code meanwhile
            return widgets.FloatSlider(value=value, min=low, max=high, step=step, description=description,
                                       continuous_update=False)


        self.controls: dict[str, widgets.ValueWidget] = {
            "references": widgets.SelectMultiple(options=[(self.source.label(k), k) for k in self.source.keys],
                                                 value=default.references, description="reference(s)", rows=5),
            "adapter_scale": slider("adapter", 0.0, 2.0, 0.05, default.adapter_scale),
            "identitynet_scale": slider("IdentityNet", 0.0, 2.0, 0.05, default.identitynet_scale),
            "roll": slider("roll °", -45.0, 45.0, 1.0, 0.0), "yaw": slider("yaw", -1.0, 1.0, 0.05, 0.0),
            "scale": slider("scale", 0.6, 1.4, 0.02, 1.0),
            "dx": slider("x", -self._width / 4, self._width / 4, self._width / 64, 0.0),
            "dy": slider("y", -self._width / 4, self._width / 4, self._width / 64, 0.0),
            "mirror": widgets.Checkbox(value=False, description="mirror"),
            "seed": widgets.BoundedIntText(value=default.seed, min=0, max=2**31 - 1, description="seed"),
            "steps": widgets.IntSlider(value=default.steps, min=1, max=50, description="steps",
                                       continuous_update=False),
            "guidance": slider("guidance", 1.0, 8.0, 0.5, default.guidance),
        }
        if self.source.captioned:
            for name, options in CAPTION_FIELDS.items():
                self.controls[name] = widgets.Dropdown(options=options, value=getattr(default.caption, name),
                                                       description=name)
        else:
            self.controls["prompt"] = widgets.Text(value=default.prompt, description="prompt")
        self.window_slider = widgets.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.05,
                                                      description="window", continuous_update=False)
        for name, control in [*self.controls.items(), ("window", self.window_slider)]:
            control.add_class(f"playground-{name.replace('_', '-')}")
            control.observe(self._on_change, names="value")
        self.live = widgets.Checkbox(value=live, description="live")
        self.generate_button = widgets.Button(description="generate", button_style="primary", icon="play")
        self.generate_button.add_class("playground-generate")
        self.generate_button.on_click(lambda _: self.generate())
        self.progress = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="progress")
        self.status, self.prompt_view, self.readout = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.readout.add_class("playground-readout")
        self.reference_strip = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap", width=f"{DISPLAY_SIDE}px",
                                                                  overflow="visible"))
        self.target_view, self.kps_view, self.result_view = (
            widgets.Image(format="png", layout=widgets.Layout(width=f"{DISPLAY_SIDE}px")) for _ in range(3))
        self.result_view.add_class("playground-result")
        self.history_strip = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self._main = widgets.HBox([self._controls_box(), self._views_box()])
        self._sweep_panel = self._build_sweep(sweep_values)

    def _controls_box(self) -> widgets.Widget:
        c = self.controls
        upload = []
        if not self.source.captioned:
            self.upload = widgets.FileUpload(accept="image/*", description="upload photo")
            self.upload.observe(self._on_upload, names="value")
            upload = [self.upload]
        prompt = [c[n] for n in CAPTION_FIELDS] if self.source.captioned else [c["prompt"]]
        sections = [("reference", [c["references"], *upload]), ("prompt", [*prompt, self.prompt_view]),
                    ("image adapter and IdentityNet", [c["adapter_scale"], c["identitynet_scale"], self.window_slider]),
                    ("pose (moves the keypoints)", [c[n] for n in POSE_FIELDS]),
                    ("sampler", [c["seed"], c["steps"], c["guidance"]]),
                    ("run", [widgets.HBox([self.live, self.generate_button]), self.progress, self.status])]
        return widgets.VBox([w for title, items in sections for w in (_header(title), *items)],
                            layout=widgets.Layout(width="410px", min_width="410px"))

    def _views_box(self) -> widgets.Widget:
        views = widgets.HBox([_titled("reference(s)", self.reference_strip), _titled("target", self.target_view),
                              _titled("keypoint image", self.kps_view), _titled("result", self.result_view)],
                             layout=widgets.Layout(overflow="visible", flex_flow="row wrap"))
        return widgets.VBox([views, self.readout, _header("history (newest first)"), self.history_strip])

    def _build_sweep(self, values: Sequence[float]) -> widgets.Widget:
        self.sweep_field = widgets.Dropdown(options=[(SWEEP_LABELS[f], f) for f in SWEEPABLE], description="sweep")
        self.sweep_values = widgets.Text(value=", ".join(f"{v:g}" for v in values), description="values")
        self.sweep_button = widgets.Button(description="sweep", icon="th")
        self.sweep_button.on_click(lambda _: self.sweep())
        self.sweep_grid = widgets.HBox()
        return widgets.VBox([widgets.HBox([self.sweep_field, self.sweep_values, self.sweep_button]), self.sweep_grid])

    # ------------------------------------------------------------------ reacting

    def _on_change(self, change) -> None:
        if self._quiet:
            return
        self._preview()
        if self.live.value:
            self.generate()

    def _on_upload(self, change) -> None:
        for item in change["new"]:
            key = self.source.add(item["name"], bytes(item["content"]))
            picker = self.controls["references"]
            picker.options = [*picker.options, (self.source.label(key), key)]
            picker.value = (key,)

    def _preview(self) -> None:
        """The cheap part of a change, on the kernel's thread: prompt, reference strip, keypoint image, target."""
        request = self.request()
        self.prompt_view.value = f"prompt: <code>{html.escape(request.prompt)}</code>"
        side = DISPLAY_SIDE if len(request.references) <= 1 else DISPLAY_SIDE // 2 - 2
        self.reference_strip.children = [self._image(self.source.image(k), side) for k in request.references]
        if not request.references:
            return
        self.kps_view.value = self._png(self.studio.keypoint_image(request))
        target = self.source.target(request)
        self.target_view.value = self._png(target) if target is not None else b""

    def _show(self, generation: Generation) -> Generation:
        """In the worker thread: the result, its readouts, the history strip."""
        self.result_view.value = self._png(generation.image)
        self.readout.value = _readout_html(generation, self.source)
        self.history = (self.history + [generation])[-self.history_size:]
        self.history_strip.children = [self._history_cell(g) for g in reversed(self.history)]
        self.status.value = f"done: one image in {generation.seconds:.2f} s"
        return generation

    def _show_sweep(self, sweep: Sweep) -> Sweep:
        self.last_sweep = sweep
        cells = [_titled(f"{SWEEP_LABELS[sweep.field]} {v:g}", self._image(im),
                         f"similarity {r.identity_similarity:.2f} · keypoint error {r.keypoint_error:.1f}")
                 for v, im, r in zip(sweep.values, sweep.images, sweep.readouts)]
        self.sweep_grid.children = cells
        self.status.value = f"done: sweep of {len(sweep.values)} images in one call, {sweep.seconds:.2f} s"
        return sweep

    def _history_cell(self, generation: Generation) -> widgets.Widget:
        button = widgets.Button(description="restore", layout=widgets.Layout(width="90px"))
        button.on_click(lambda _: self.restore(generation))
        label = widgets.HTML(f"<small>{generation.readout.identity_similarity:.2f} · "
                             f"a {generation.request.adapter_scale:.2f} n {generation.request.identitynet_scale:.2f}"
                             f"</small>")
        return widgets.VBox([self._image(generation.image, DISPLAY_SIDE // 2), label, button])

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.value = done / max(total, 1)
        self.status.value = f"step {done} of {total}"

    def _submit(self, work) -> Future:
        """Run `work(job)` in the worker; a failure or a cancellation is shown in the status line (from the worker,
        so it is there before the Future is done)."""

        def reported(job: Job):
            try:
                return work(job)
            except Cancelled:
                self.status.value = "superseded by a newer request"
                raise
            except Exception as error:
                self.status.value = f"<b>error</b>: {html.escape(f'{type(error).__name__}: {error}')}"
                raise

        return self.runner.submit(reported)


    @property
    def _scale(self) -> int:
        return max(1, DISPLAY_SIDE // self._width)

    def _png(self, image, side: int = DISPLAY_SIDE) -> bytes:
        return png_bytes(enlarge(image, self._scale), max_side=side)

    def _image(self, image, side: int = DISPLAY_SIDE) -> widgets.Image:
        return widgets.Image(value=self._png(image, side), format="png", layout=widgets.Layout(width=f"{side}px"))


def parse_values(text: str) -> tuple:
    """"0, 0.5, 1" -> (0.0, 0.5, 1.0); raises `InputError` on anything that is not a number."""
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
    except ValueError as error:
        raise InputError(f"sweep values must be numbers separated by commas, got {text!r}") from error
    if not values:
        raise InputError("give at least one sweep value")
    return values


def _readout_html(generation: Generation, source) -> str:
    r, request = generation.readout, generation.request
    each = ""
    if len(r.per_identity) > 1:
        each = " (" + ", ".join(f"{source.label(k)}: {s:.2f}" for k, s in zip(request.references, r.per_identity)) + ")"
    return (f"<b>{html.escape(r.describe())}</b>{html.escape(each)}<br>"
            f"{html.escape(request.describe())} · {generation.seconds:.2f} s")


def _header(title: str) -> widgets.Widget:
    return widgets.HTML(f"<b>{html.escape(title)}</b>")


def _titled(title: str, child: widgets.Widget, *more: str) -> widgets.Widget:
    lines = "<br>".join(html.escape(line) for line in (title, *more))
    return widgets.VBox([widgets.HTML(f"<small>{lines}</small>"), child], layout=widgets.Layout(overflow="visible"))
