"""Face analysis: the identity embedding and the 5 keypoints InstantID is conditioned on.

Two backends behind one interface (`FaceAnalyzer`: `detect`, `get_face`, `embed`):

- "insightface": antelopev2 (SCRFD-10G + ArcFace R100), as the released InstantID; raw 512-d
  embeddings. Needs the model files placed by hand (see `find_antelopev2`).
- "dlib": offline, from the `dlib-bin` and `face-recognition-models` packages; 128-d
  embeddings compared by Euclidean distance. The default when antelopev2 is absent.
- plug-ins registered by name (`registry`): e.g. "miniature", the miniature world's analyzer.

    analyzer = get_face_analyzer()          # "auto"
    face = analyzer.get_face("photo.jpg")   # the largest face
    face.kps        # [5, 2] left eye, right eye, nose, left mouth, right mouth (image left/right)
    face.embedding  # [D] raw identity embedding
"""

from .base import Face, FaceAnalyzer
from .dlib_backend import DlibConfig, DlibFaceAnalyzer, kps_from_68
from .factory import BACKENDS, get_face_analyzer
from .registry import plugin_backends, register_backend
from .insightface_backend import (
    ANTELOPEV2_FILES,
    ENV_VAR,
    InsightFaceAnalyzer,
    InsightFaceConfig,
    antelopev2_search_path,
    find_antelopev2,
)

__all__ = [
    "ANTELOPEV2_FILES",
    "BACKENDS",
    "DlibConfig",
    "DlibFaceAnalyzer",
    "ENV_VAR",
    "Face",
    "FaceAnalyzer",
    "InsightFaceAnalyzer",
    "InsightFaceConfig",
    "antelopev2_search_path",
    "find_antelopev2",
    "get_face_analyzer",
    "kps_from_68",
    "plugin_backends",
    "register_backend",
]
