"""Counting multiply-accumulates (MACs) of convs and linear layers; FLOPs = 2 × MACs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class CostReport:
    """MACs per conv/linear layer at one input size, and the parameter count."""

    layer_macs: dict[str, int]
    params: int

    @property
    def macs(self) -> int:
        return sum(self.layer_macs.values())

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def as_dict(self) -> dict[str, int]:
        return {"macs": self.macs, "flops": self.flops, "params": self.params}


def trace_once(model: nn.Module, input_shape: tuple[int, int, int], types: tuple[type[nn.Module], ...],
               hook: Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]) -> None:
    """One eval-mode forward of a zero image of `input_shape` with `hook` on every module of `types`
    (the model's train/eval mode is restored and the hooks removed afterwards)."""
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, types)]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def count_cost(model: nn.Module, input_shape: tuple[int, int, int]) -> CostReport:
    """MACs of every Conv2d/Linear for one image of `input_shape` (C, H, W), and params."""
    names = {m: n for n, m in model.named_modules()}
    layer_macs: dict[str, int] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_out = module.in_channels // module.groups * kh * kw
            layer_macs[names[module]] = output[0].numel() * per_out
        else:
            layer_macs[names[module]] = output[0].numel() * module.in_features

    trace_once(model, input_shape, (nn.Conv2d, nn.Linear), hook)
    params = sum(p.numel() for p in model.parameters())
    return CostReport(layer_macs, params)
