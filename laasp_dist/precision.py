"""Arithmetic and memory layout of a forward pass: one helper for training, evaluation, scoring and latency.

`resolve(precision, channels_last, device)` turns the config's choices into a `Numerics`:

- ``precision``: ``auto`` (bf16 on a GPU, fp32 on the CPU), ``fp32`` or ``bf16``
  (``torch.autocast(device_type, dtype=torch.bfloat16)`` around the forward; it works on
  the CPU too, where it is slow on CPUs without native bf16 instructions);
- ``channels_last``: ``auto`` (on a GPU only), ``true`` or ``false``: the model's 4-D
  parameters and the input batches in ``torch.channels_last`` memory format.

Losses and metrics are always reduced in float32/float64 from the (possibly bf16) logits.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Numerics:
    """A resolved choice: `precision` and `channels_last` on a device of type `device_type` ("cpu" | "cuda")."""

    precision: Precision = "fp32"
    channels_last: bool = False
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")

    def autocast(self) -> AbstractContextManager:
        """The autocast context of a forward pass (a disabled one for fp32)."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def model(self, model: nn.Module) -> nn.Module:
        """`model` in this memory format, in place (parameters and buffers of rank 4)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """An NCHW batch in this memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def on(self, device: torch.device | str) -> "Numerics":
        """The same choice for another device (an actor, a re-measurement)."""
        return Numerics(self.precision, self.channels_last, torch.device(device).type)

    def describe(self) -> dict[str, object]:
        return {"precision": self.precision, "channels_last": self.channels_last}


def resolve(precision: str, channels_last: str | bool, device: torch.device | str) -> Numerics:
    """The config's ``auto | fp32 | bf16`` and ``auto | true | false`` on `device` (auto: bf16 + channels_last on GPU)."""
    kind = torch.device(device).type
    gpu = kind == "cuda"
    if precision == "auto":
        precision = "bf16" if gpu else "fp32"
    if channels_last == "auto":
        channels_last = gpu
    if not isinstance(channels_last, bool):
        raise ConfigError(f"channels_last must be auto, true or false (got {channels_last!r})")
    return Numerics(precision, channels_last, kind)  # type: ignore[arg-type]


def train_numerics(config: "RunConfig", device: torch.device | str) -> Numerics:
    """Training and evaluation arithmetic of a run on `device` (``train.precision``, ``train.channels_last``)."""
    return resolve(config.train.precision, config.train.channels_last, device)


def score_numerics(config: "RunConfig", device: torch.device | str) -> Numerics:
    """Candidate scoring's: ``prune.score_precision`` (auto = the training's), in the training's memory format."""
    base = train_numerics(config, device)
    chosen = config.prune.score_precision
    return base if chosen == "auto" else Numerics(chosen, base.channels_last, base.device_type)  # type: ignore[arg-type]
