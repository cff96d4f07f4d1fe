"""facelens: explain face CNNs — what they learned, where they look, whether to trust it.

The data flow is image → faces → model → target → explain → evaluate → studies → report.
"""

from . import explain  # callable: facelens.explain(model, image, method=...)
from .errors import FaceLensError, ImageError, ModelError, NoFaceError, WeightsError
from .faces import Face, detect_faces, pick_face
from .image import load_image
from .models import FaceModel, list_models, load_model, wrap

__version__ = "0.1.0"

__all__ = [
    "Face",
    "FaceLensError",
    "FaceModel",
    "ImageError",
    "ModelError",
    "NoFaceError",
    "WeightsError",
    "__version__",
    "detect_faces",
    "explain",
    "list_models",
    "load_image",
    "load_model",
    "pick_face",
    "wrap",
]
