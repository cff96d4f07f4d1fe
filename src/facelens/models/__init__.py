"""The model zoo: real pretrained face models ported to plain PyTorch, plus torchvision and user models."""

from .base import FaceModel, Task
from .registry import ZOO, ModelCard, list_models, load_model, wrap

__all__ = ["ZOO", "FaceModel", "ModelCard", "Task", "list_models", "load_model", "wrap"]
