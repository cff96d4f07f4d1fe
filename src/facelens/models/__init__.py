"""The model zoo: real pretrained face models ported to plain PyTorch, plus torchvision and user models."""

from .base import FaceModel, Task
from .registry import ZOO, ModelCard, is_model_file, list_models, list_user_models, load_model, wrap
from .user_file import load_model_file

__all__ = [
    "ZOO", "FaceModel", "ModelCard", "Task", "is_model_file", "list_models", "list_user_models", "load_model",
    "load_model_file", "wrap",
]
