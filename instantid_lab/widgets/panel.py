"""What every widget of the kit shares: several ipywidgets shown as one panel."""

from __future__ import annotations

import contextlib
from typing import Iterator

import ipywidgets as widgets


class Panel:
    """A notebook widget built from ipywidgets: subclasses set `self._panel`; displaying the object shows it.

    Observers that should not react to a change made from code check `self._quiet` (see `_silenced`).
    """

    _panel: widgets.Widget
    _quiet: bool = False

    @property
    def panel(self) -> widgets.Widget:
        """The whole panel, to display in a notebook."""
        return self._panel

    def _repr_mimebundle_(self, **kwargs):
        return self._panel._repr_mimebundle_(**kwargs)

    @contextlib.contextmanager
    def _silenced(self) -> Iterator[None]:
        """Change widget values without their observers reacting."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False
