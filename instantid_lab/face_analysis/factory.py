"""`get_face_analyzer`: pick and build a backend."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from ..errors import InputError
from .base import FaceAnalyzer
from .dlib_backend import DlibConfig, DlibFaceAnalyzer
from ..types import PathLike
from .insightface_backend import InsightFaceAnalyzer, InsightFaceConfig, antelopev2_search_path, find_antelopev2
from .registry import backend_factory, plugin_backends

logger = logging.getLogger(__name__)

#: The backends the core builds itself; plug-ins (e.g. "miniature") come from `registry`.
BACKENDS = ("auto", "insightface", "dlib")
_CONFIGS = {"insightface": InsightFaceConfig, "dlib": DlibConfig}


def get_face_analyzer(backend: str = "auto", model_dir: Optional[PathLike] = None, **kw) -> FaceAnalyzer:
    """Build a face analyzer.

    :param backend: "insightface" (antelopev2, the real InstantID path), "dlib" (offline,
        128-d embeddings), "auto": insightface if the antelopev2 files are found, else dlib
        (prints which, and `.backend` says it), or a plug-in backend (`registry`), e.g. "miniature"
        (the miniature world's cartoon faces: its inspector's keypoints and its conditioning
        recogniser's 64-d embedding).
    :param model_dir: folder of the antelopev2 files (see `find_antelopev2` for the search); for
        "miniature", the miniature's folder (default: the shipped `data/miniature`).
    :param kw: fields of `InsightFaceConfig` or `DlibConfig` (e.g. det_thresh=0.4, num_jitters=5), or a plug-in's options;
        with "auto", fields of the backend not chosen are ignored.
    :raises ModelFilesMissingError: "insightface" was asked for and its files are missing.
    :raises InputError: unknown backend or keyword.
    """
    name = str(backend).lower()
    if name not in BACKENDS:
        return _plugin(name, model_dir, kw)
    _check_keywords(name, kw)
    if name == "auto":
        name = _choose(model_dir)
        fields = {f.name for f in dataclasses.fields(_CONFIGS[name])}
        kw = {k: v for k, v in kw.items() if k in fields}
    if name == "insightface":
        return InsightFaceAnalyzer(model_dir, InsightFaceConfig(**kw))
    return DlibFaceAnalyzer(DlibConfig(**kw))


def _plugin(name: str, model_dir: Optional[PathLike], kw: dict) -> FaceAnalyzer:
    factory = backend_factory(name)
    if factory is None:
        raise InputError(f"unknown face analysis backend {name!r}; choose one of {(*BACKENDS, *plugin_backends())}.")
    return factory(model_dir, **kw)


def _choose(model_dir: Optional[PathLike]) -> str:
    folder = find_antelopev2(model_dir)
    if folder is not None:
        message = f"face analysis: insightface backend (antelopev2 in {folder})"
        name = "insightface"
    else:
        looked = ", ".join(str(f) for f in antelopev2_search_path(model_dir))
        message = f"face analysis: dlib backend (no antelopev2 files in {looked})"
        name = "dlib"
    logger.info(message)
    print(message)
    return name


def _check_keywords(name: str, kw: dict) -> None:
    configs = list(_CONFIGS.values()) if name == "auto" else [_CONFIGS[name]]
    known = {f.name for config in configs for f in dataclasses.fields(config)}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for the {name} backend; valid: {sorted(known)}.")
