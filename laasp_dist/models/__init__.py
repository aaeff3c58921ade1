"""Model zoo: `create_model(name)`, `list_models()`, `model_entry(name)`."""

from . import cifar, imagenet  # noqa: F401  (registers the models)
from .registry import ModelEntry, create_model, list_models, model_entry, register_model

__all__ = ["ModelEntry", "create_model", "list_models", "model_entry", "register_model"]
