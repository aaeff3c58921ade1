"""Channel-importance criteria: a registry of small functions over a layer's per-channel rows.

A criterion maps the rows of one layer (conv: one flattened filter per output
channel; BN: its γ as a one-column matrix; activation: per-channel statistics of
the layer's output measured on data, see `importance.taylor_statistics`) to one
score per channel. The lowest-scoring channels are removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from ..errors import ConfigError

Source = Literal["conv", "bn", "activation"]
ScoreFn = Callable[[Tensor, torch.Generator], Tensor]


@dataclass(frozen=True)
class Criterion:
    """A named scoring function and which layers of a group it reads."""

    name: str
    fn: ScoreFn
    source: Source
    description: str


_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, *, source: Source = "conv", description: str = ""):
    """Decorator: register `fn(rows, generator) -> scores` as criterion `name`."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        _CRITERIA[name] = Criterion(name, fn, source, description or (fn.__doc__ or "").strip())
        return fn

    return wrap


def list_criteria() -> list[str]:
    """Registered criterion names in registration order."""
    return list(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    """The criterion called `name`; unknown names are a ConfigError listing the known ones."""
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ConfigError(f"unknown criterion {name!r}; known criteria: {', '.join(_CRITERIA)}") from None


@register_criterion("l1")
def l1(rows: Tensor, generator: torch.Generator) -> Tensor:
    """‖W_i‖₁"""
    return rows.abs().sum(1)


@register_criterion("l2")
def l2(rows: Tensor, generator: torch.Generator) -> Tensor:
    """‖W_i‖₂"""
    return rows.norm(p=2, dim=1)


@register_criterion("fpgm")
def fpgm(rows: Tensor, generator: torch.Generator) -> Tensor:
    """Σ_j ‖W_i − W_j‖₂: small means close to the geometric median (redundant)."""
    return torch.cdist(rows.unsqueeze(0), rows.unsqueeze(0)).squeeze(0).sum(1)


@register_criterion("cosine")
def cosine(rows: Tensor, generator: torch.Generator) -> Tensor:
    """Σ_j (1 − cos(W_i, W_j))"""
    unit = torch.nn.functional.normalize(rows, dim=1)
    return (1.0 - unit @ unit.T).sum(1)


@register_criterion("bn_scale", source="bn")
def bn_scale(rows: Tensor, generator: torch.Generator) -> Tensor:
    """|γ| of the BN that follows the conv"""
    return rows.abs().sum(1)


@register_criterion("taylor", source="activation")
def taylor(rows: Tensor, generator: torch.Generator) -> Tensor:
    """first-order Taylor |a·∂L/∂a| on the scoring subset (Molchanov et al. 2017)"""
    return rows[:, 0]  # the statistics already are the per-channel mean over images of |mean over positions of a·g|


@register_criterion("random")
def random(rows: Tensor, generator: torch.Generator) -> Tensor:
    """uniform random scores (a control)"""
    return torch.rand(rows.shape[0], generator=generator, dtype=torch.float64).to(rows.dtype)
