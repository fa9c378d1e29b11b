"""Face-analysis backends by name: the kit's own, and plug-ins that register themselves.

The core knows "insightface" and "dlib". Any other backend (the miniature's, or a user's) is a
*factory* `f(model_dir, **options) -> FaceAnalyzer` found by name in one of two ways:

- registered at import time: `register_backend("name", factory)`;
- declared by an installed package as an entry point in the group `instantid_lab.face_analyzers`
  (this package declares "miniature" in its pyproject.toml), loaded on first use.

So `get_face_analyzer("miniature")` works without the core importing the miniature.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Optional

from .base import FaceAnalyzer

ENTRY_POINT_GROUP = "instantid_lab.face_analyzers"

Factory = Callable[..., FaceAnalyzer]
_FACTORIES: dict[str, Factory] = {}


def register_backend(name: str, factory: Factory) -> None:
    """Make `get_face_analyzer(name, model_dir, **options)` call `factory(model_dir, **options)`."""
    _FACTORIES[name.lower()] = factory


def plugin_backends() -> list[str]:
    """Names of the registered and the declared (entry-point) backends."""
    declared = {ep.name.lower() for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(declared | set(_FACTORIES))


def backend_factory(name: str) -> Optional[Factory]:
    """The factory of a plug-in backend (loading its entry point on first use), or None."""
    name = name.lower()
    if name not in _FACTORIES:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name.lower() == name:
                register_backend(name, ep.load())
    return _FACTORIES.get(name)
