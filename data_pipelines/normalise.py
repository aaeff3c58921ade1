"""The one input normalisation: uint8 pixels to the network's input, (x − 255·mean) / (255·std).

`mean` and `std` are per channel on the [0, 1] pixel scale (as torchvision writes them). The
in-memory loaders, the scoring subset and the benchmarks call `Normalise`; DALI's
`crop_mirror_normalize` gets the same constants from `pixel_scale`.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pixel_scale(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """`mean` and `std` on the 0–255 pixel scale, the form DALI's normalisation takes."""
    return [255.0 * m for m in mean], [255.0 * s for s in std]


class Normalise:
    """uint8 (or float) NCHW pixels on any device → float32 network input, with the constants kept on `device`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> None:
        shift, scale = pixel_scale(mean, std)
        self.shift = torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        self.inv_scale = (1 / torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1)).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.shift) * self.inv_scale
