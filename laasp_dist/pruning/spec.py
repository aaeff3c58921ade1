"""The portable slim-model format: a JSON architecture spec plus a plain state dict.

`spec.json` names the registered model, its classes and input, the shape of every
conv/BN/linear layer, the original FLOPs and widths, and the list of prunes.
`weights.pt` is a state dict that `torch.load(weights_only=True)` reads. A slim
model is rebuilt by creating the registered model and resizing its layers to the
spec: no pickled module is ever loaded.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SpecError
from ..storage import Storage, as_storage
from ..models import create_model
from .network import Arch, PrunableNetwork, PruneRecord

FORMAT = "laasp-dist/slim-model"
VERSION = 1
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Shape of every conv, BN and linear layer, by qualified name."""
    shapes: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.BatchNorm2d):
            shapes[name] = {"num_features": m.num_features}
        elif isinstance(m, nn.Linear):
            shapes[name] = {"in_features": m.in_features, "out_features": m.out_features}
    return shapes


def network_spec(net: PrunableNetwork) -> dict[str, Any]:
    """The JSON-able spec of a (possibly pruned) network."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": net.arch.model,
        "num_classes": net.arch.num_classes,
        "in_channels": net.arch.in_channels,
        "input_size": net.arch.input_shape[1],
        "base_macs": net.base_macs,
        "macs": net.cost.macs,
        "params": net.cost.params,
        "original_widths": net.original_widths,
        "widths": net.widths(),
        "layers": layer_shapes(net.model),
        "prunes": [{"group": p.group, "channels": list(p.channels), "criterion": p.criterion} for p in net.prunes],
    }


def _resized(old: nn.Module, shape: dict[str, int]) -> nn.Module:
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(shape["in_channels"], shape["out_channels"], old.kernel_size, old.stride, old.padding,
                         old.dilation, shape["groups"], bias=old.bias is not None, padding_mode=old.padding_mode)
    if isinstance(old, nn.BatchNorm2d):
        return nn.BatchNorm2d(shape["num_features"], old.eps, old.momentum, old.affine, old.track_running_stats)
    return nn.Linear(shape["in_features"], shape["out_features"], bias=old.bias is not None)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A freshly built model with the spec's layer shapes (weights uninitialised for use)."""
    _check_format(spec)
    model = create_model(spec["model"], spec["num_classes"], spec["in_channels"])
    modules = dict(model.named_modules())
    for name, shape in spec["layers"].items():
        if name not in modules:
            raise SpecError(f"spec names layer {name!r}, which {spec['model']} does not have")
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, _resized(modules[name], shape))
    return model


def network_from_spec(spec: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None) -> PrunableNetwork:
    """Rebuild the slim network of a spec, loading `state_dict` into it when given."""
    model = build_model(spec)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()
            raise SpecError(f"weights do not match the spec: {detail[1].strip() if len(detail) > 1 else detail[0]}") from None
    arch = Arch(spec["model"], spec["num_classes"], spec["in_channels"], spec["input_size"])
    prunes = [PruneRecord(p["group"], tuple(p["channels"]), p.get("criterion")) for p in spec["prunes"]]
    return PrunableNetwork(model, arch, base_macs=spec["base_macs"], original_widths=spec["original_widths"],
                           prunes=prunes)


def replay(net: PrunableNetwork, prunes: list[PruneRecord]) -> PrunableNetwork:
    """Apply recorded prunes, in order, to an (unpruned) network; returns it."""
    for record in prunes:
        net.prune(record.group, record.channels, record.criterion)
    return net


def save_slim_model(net: PrunableNetwork, location: str | Path | Storage) -> Storage:
    """Write spec.json + weights.pt into a folder (local path or URI), replacing any earlier content.

    Locally the folder is swapped in by one rename; on an object store spec.json goes last,
    so a reader that finds it finds the matching weights.
    """
    spec = network_spec(net)
    state = {k: v.detach().cpu().clone() for k, v in net.model.state_dict().items()}

    def fill(tmp: Path) -> None:
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        torch.save(state, tmp / WEIGHTS_FILE)

    folder = as_storage(location)
    folder.write_dir("", fill, last=SPEC_FILE)
    return folder


def read_spec(location: str | Path | Storage) -> dict[str, Any]:
    """Read and check a spec.json, given the file or the slim-model folder that holds it."""
    store = as_storage(location)
    rel = "" if store.is_file("") else SPEC_FILE
    where = store.uri_of(rel)
    try:
        spec = json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        raise SpecError(f"no slim-model spec at {where}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{where} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    _check_format(spec, where)
    return spec


def load_state(location: str | Path | Storage) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a weights file, with clear errors for missing or damaged files."""
    store = as_storage(location)
    try:
        data = store.read_bytes("")
    except FileNotFoundError:
        raise SpecError(f"no weights file at {store}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        raise SpecError(f"{store} is not a readable weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise SpecError(f"{store} does not hold a state dict")
    return state


def load_slim_model(location: str | Path | Storage) -> PrunableNetwork:
    """Load a slim model written by `save_slim_model` (a local folder or a URI)."""
    folder = as_storage(location)
    spec = read_spec(folder)
    return network_from_spec(spec, load_state(folder.child(WEIGHTS_FILE)))


def _check_format(spec: Any, where: Path | str = "spec") -> None:
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise SpecError(f"{where} is not a {FORMAT} spec")
    if spec.get("version") != VERSION:
        raise SpecError(f"{where} has spec version {spec.get('version')}, this build reads {VERSION}")
    missing = {"model", "num_classes", "in_channels", "input_size", "layers", "prunes", "base_macs",
               "original_widths"} - spec.keys()
    if missing:
        raise SpecError(f"{where} lacks {', '.join(sorted(missing))}")


__all__ = ["build_model", "load_slim_model", "network_from_spec", "network_spec", "read_spec",
           "replay", "save_slim_model"]
