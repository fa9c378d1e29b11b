"""An interactive panel to explore identity embeddings on photos (ipywidgets).

`IdentityExplorer` holds the logic in a plain class: pick a photo (and a face, for group
photos) and it shows the detections with their keypoints, the keypoint image IdentityNet
would receive, and the photos whose identity embedding is nearest. Every photo is analysed
once, when the explorer is built; selecting is cheap. Tests and notebooks drive it with
`select(name, face)` or by setting `photo_picker.value`, exactly as a click would.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import ipywidgets as widgets
import numpy as np
from PIL import Image

from ..embeddings import DLIB_SAME_PERSON_DISTANCE, metric_for, nearest
from ..errors import InputError
from ..images import load_image
from ..keypoints import draw_kps
from ..viz import draw_faces, png_bytes
from .panel import Panel

if TYPE_CHECKING:
    from ..data import Photo


@dataclass(frozen=True)
class Neighbour:
    """One row of the nearest-identities table."""

    name: str
    identity: Optional[str]
    score: float


@dataclass(frozen=True)
class Selection:
    """What the explorer shows now."""

    name: str
    face: int  # index into the photo's faces, largest first; -1 if the photo has none
    neighbours: tuple[Neighbour, ...]


@dataclass(frozen=True)
class _Entry:
    name: str
    identity: Optional[str]
    source: Union[str, os.PathLike]
    faces: tuple


PhotoLike = Union["Photo", str, os.PathLike]


class IdentityExplorer(Panel):
    """Choose a photo; see its faces, its keypoint image and the nearest identities.

    :param photos: `data.Photo` records (their identity labels the table) or image paths.
    :param analyzer: a `FaceAnalyzer` (`detect(image) -> list[Face]`, `.backend`).
    :param k: rows of the nearest-identities table.
    :param faces: optional precomputed detections {photo name: [Face, ...]}, so a notebook
        that already analysed the photos does not do it again.
    :param max_side: size of the displayed images, in pixels.
    """

    def __init__(self, photos: Sequence[PhotoLike], analyzer, k: int = 5,
                 faces: Optional[Mapping[str, Sequence]] = None, max_side: int = 384):
        if len(photos) == 0:
            raise InputError("IdentityExplorer needs at least one photo")
        self.k, self.max_side = k, max_side
        self.metric = metric_for(analyzer.backend)
        self.entries = {e.name: e for e in (_entry(p, analyzer, faces) for p in photos)}
        self._gallery = [e for e in self.entries.values() if e.identity is not None and e.faces]
        self._views: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        self._quiet = False
        self._build_widgets()
        self.selection: Optional[Selection] = None
        self.select(next(iter(self.entries)))

    # ------------------------------------------------------------------ public

    def select(self, name: str, face: int = 0) -> Selection:
        """Show photo `name` and its face number `face` (0 = largest); returns the new selection."""
        if name not in self.entries:
            raise InputError(f"unknown photo {name!r}; choose one of {sorted(self.entries)}")
        with self._silenced():
            self.photo_picker.value = name
        self._show(name, face)
        return self.selection

    def neighbours(self, name: str, face: int = 0) -> tuple[Neighbour, ...]:
        """The k photos (other than `name`) whose largest face is nearest to this face."""
        entry = self.entries[name]
        if not entry.faces:
            return ()
        others = [e for e in self._gallery if e.name != name]
        if not others:
            return ()
        gallery = np.stack([e.faces[0].embedding for e in others])  # [N, D]
        ranked = nearest(entry.faces[face].embedding, gallery, k=self.k, metric=self.metric)
        return tuple(Neighbour(others[i].name, others[i].identity, score) for i, score in ranked)


    # ------------------------------------------------------------------ widgets

    def _build_widgets(self) -> None:
        self.photo_picker = widgets.Dropdown(options=list(self.entries), description="photo")
        self.face_picker = widgets.Dropdown(options=[], description="face")
        self.photo_view = widgets.Image(format="png", layout=widgets.Layout(max_width=f"{self.max_side}px"))
        self.kps_view = widgets.Image(format="png", layout=widgets.Layout(max_width=f"{self.max_side}px"))
        self.table = widgets.HTML()
        self.info = widgets.HTML()
        self.photo_picker.observe(self._on_photo, names="value")
        self.face_picker.observe(self._on_face, names="value")
        views = widgets.HBox([_titled("faces and keypoints", self.photo_view),
                              _titled("keypoint image (IdentityNet input)", self.kps_view)])
        self._panel = widgets.VBox([widgets.HBox([self.photo_picker, self.face_picker]), self.info, views, self.table])

    def _on_photo(self, change) -> None:
        if not self._quiet:
            self._show(change["new"], 0)

    def _on_face(self, change) -> None:
        if not self._quiet and change["new"] is not None:
            self._show(self.photo_picker.value, change["new"])


    # ------------------------------------------------------------------ drawing

    def _show(self, name: str, face: int) -> None:
        entry = self.entries[name]
        if entry.faces and not 0 <= face < len(entry.faces):
            raise InputError(f"{name} has {len(entry.faces)} face(s); face must be 0..{len(entry.faces) - 1}")
        face = face if entry.faces else -1
        with self._silenced():
            self.face_picker.options = [(f"{i + 1} of {len(entry.faces)}", i) for i in range(len(entry.faces))]
            self.face_picker.value = face if entry.faces else None
        self.photo_view.value, self.kps_view.value = self._views_of(entry, face)
        found = self.neighbours(name, face) if entry.faces else ()
        self.selection = Selection(name, face, found)
        self.info.value = self._describe(entry, face)
        self.table.value = self._table(entry, found)

    def _views_of(self, entry: _Entry, face: int) -> tuple[bytes, bytes]:
        key = (entry.name, face)
        if key not in self._views:
            image = load_image(entry.source)
            several = len(entry.faces) > 1
            labels = [str(i + 1) for i in range(len(entry.faces))] if several else None
            shown = draw_faces(image, entry.faces, labels=labels, highlight=face if several else None)
            kps = draw_kps(entry.faces[face].kps, image.size) if entry.faces else Image.new("RGB", image.size)
            self._views[key] = (png_bytes(shown, self.max_side), png_bytes(kps, self.max_side))
        return self._views[key]

    def _describe(self, entry: _Entry, face: int) -> str:
        who = html.escape(entry.identity or "unknown (group photo)")
        if not entry.faces:
            return f"<b>{html.escape(entry.name)}</b>: no face found ({self.metric} metric)."
        chosen = entry.faces[face]
        return (f"<b>{html.escape(entry.name)}</b> &middot; identity: {who} &middot; {len(entry.faces)} face(s) "
                f"&middot; face {face + 1}: detector score {chosen.det_score:.2f}, "
                f"embedding {chosen.embedding.shape[0]}-d, norm {np.linalg.norm(chosen.embedding):.2f}")

    def _table(self, entry: _Entry, found: Sequence[Neighbour]) -> str:
        if not found:
            return "<i>no neighbours to show</i>"
        score_name = "cosine similarity" if self.metric == "cosine" else "Euclidean distance"
        rows = "".join(
            f"<tr><td>{rank}</td><td>{html.escape(n.name)}</td><td>{html.escape(str(n.identity))}</td>"
            f"<td>{n.score:.3f}</td><td>{_verdict(entry.identity, n, self.metric)}</td></tr>"
            for rank, n in enumerate(found, start=1)
        )
        head = f"<tr><th>#</th><th>photo</th><th>identity</th><th>{score_name}</th><th>same person?</th></tr>"
        return f"<table>{head}{rows}</table>"


def identity_explorer(photos: Optional[Sequence[PhotoLike]] = None, analyzer=None, **kwargs) -> IdentityExplorer:
    """An `IdentityExplorer` on `photos` (default: all bundled photos) with `analyzer`
    (default: `face_analysis.get_face_analyzer()`). Keyword arguments go to `IdentityExplorer`."""
    if photos is None:
        from ..data import face_photos

        photos = face_photos()
    if analyzer is None:
        from ..face_analysis import get_face_analyzer

        analyzer = get_face_analyzer()
    return IdentityExplorer(photos, analyzer, **kwargs)


def _entry(photo: PhotoLike, analyzer, faces: Optional[Mapping[str, Sequence]]) -> _Entry:
    if hasattr(photo, "file") and hasattr(photo, "path"):  # data.Photo
        name, identity, source = photo.file, photo.identity, photo.path
    elif isinstance(photo, (str, os.PathLike)):
        name, identity, source = Path(photo).name, None, photo
    else:
        raise InputError(f"photos must be data.Photo records or image paths, got {type(photo).__name__}")
    found = faces[name] if faces is not None and name in faces else analyzer.detect(source)
    return _Entry(name, identity, source, tuple(found))


def _titled(title: str, child: widgets.Widget) -> widgets.Widget:
    return widgets.VBox([widgets.HTML(f"<b>{html.escape(title)}</b>"), child])


def _verdict(identity: Optional[str], neighbour: Neighbour, metric: str) -> str:
    """Whether the neighbour truly is the same person (if known), and what the score suggests."""
    truth = "" if identity is None else ("yes" if neighbour.identity == identity else "no")
    if metric == "euclidean":
        guess = "match" if neighbour.score < DLIB_SAME_PERSON_DISTANCE else "no match"
        return f"{truth} ({guess} at &lt; {DLIB_SAME_PERSON_DISTANCE})" if truth else guess
    return truth
