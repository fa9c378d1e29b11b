"""instantid-lab: learn, test and extend InstantID.

Modules, one concept each (the paper's terms), in layers that only look down (a test reads the
imports: no cycle, and the core never imports the miniature, `tiny` or the UI):

The core
- `errors`, `types` the kit's errors; `PathLike`, `Scale` and the one check of a per-sample scale
- `building`       seeded initialisation and word-level tokenizers for small models built in code
- `images`         reading any image as upright RGB; `image_sheet` (the one grid writer)
- `face_analysis`  the identity embedding and the 5 keypoints (insightface or dlib; plug-ins register by name)
- `keypoints`      the keypoint image IdentityNet sees, and keypoint geometry
- `embeddings`     similarity and averaging of identity embeddings
- `adapter`        the image projection (Resampler) that makes identity tokens
- `attention`      decoupled cross-attention (text + scale * identity)
- `checkpoint`     safe loading and saving of the released adapter weights
- `identitynet`    the ControlNet on keypoints that sees identity tokens
- `pipeline`       `InstantIDPipeline`, a diffusers pipeline (verb-named stages over small records)
- `loading`        the real SDXL + InstantID weights from local folders

Above the core
- `tiny`           tiny random components, for tests only
- `miniature`      InstantID trained end to end on a CPU in a small cartoon-face world (weights in data/miniature)
- `worlds`         `open_world(mode)` / `load_pipeline(mode)`: "miniature" (default), "tiny" or "sdxl" in one call
- `viz`, `widgets` figures and the interactive explorers the notebooks use
- `notebooks`      `python -m instantid_lab.notebooks`: run every notebook headless
- `data`           the bundled photos and their index

Heavy modules (torch, diffusers) are imported on first use, so `import instantid_lab` is cheap.
"""

from .errors import (
    CheckpointError,
    ImageReadError,
    InputError,
    LabError,
    ModelFilesMissingError,
    NoFaceError,
    UnsafeCheckpointError,
)
from .images import load_image

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ImageReadError",
    "InputError",
    "LabError",
    "ModelFilesMissingError",
    "NoFaceError",
    "UnsafeCheckpointError",
    "load_image",
]
