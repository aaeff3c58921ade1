"""Model registry: thin `@register_model` entry points over a few builders (timm-style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import ConfigError

BlocksFn = Callable[[nn.Module], list[nn.Module]]


@dataclass(frozen=True)
class ModelEntry:
    """What the rest of the system needs to know about a registered architecture."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: int
    classifier: str
    blocks: BlocksFn
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(*, input_size: int, classifier: str, blocks: BlocksFn, description: str):
    """Decorator: register `fn(num_classes, in_channels) -> nn.Module` under its function name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[fn.__name__] = ModelEntry(fn.__name__, fn, input_size, classifier, blocks, description)
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of `name`; unknown names are a ConfigError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised (unpruned) model."""
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"num_classes and in_channels must be >= 1 (got {num_classes}, {in_channels})")
    return model_entry(name).builder(num_classes=num_classes, in_channels=in_channels)
