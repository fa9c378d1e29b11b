"""Where the bundled data lives, and the index of the bundled face photos."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: The repository's `data/` folder (the kit is installed in editable mode from a checkout).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
FACES_DIR = DATA_DIR / "faces"
#: The shipped miniature weights (see `data/miniature/MODEL_CARD.md`).
MINIATURE_DIR = DATA_DIR / "miniature"


@dataclass(frozen=True)
class Photo:
    """One bundled photo: its file, who is in it (None for group photos) and notes."""

    file: str
    identity: Optional[str]
    role: str
    faces: int
    notes: str

    @property
    def path(self) -> Path:
        return FACES_DIR / self.file


def face_photos(role: Optional[str] = None) -> list[Photo]:
    """The bundled photos from `data/faces/index.json`, optionally only one role
    ("astronaut", "politician", "navy", "group")."""
    index = json.loads((FACES_DIR / "index.json").read_text())
    photos = [Photo(**entry) for entry in index["photos"]]
    return [p for p in photos if role is None or p.role == role]


def photo(file: str) -> Photo:
    """The bundled photo called `file` (e.g. "helms_1.jpg")."""
    for p in face_photos():
        if p.file == file:
            return p
    raise KeyError(f"no bundled photo {file!r}; see {FACES_DIR / 'index.json'}")
