"""Export a finished run's slim model to TorchScript or ONNX, checked against PyTorch before it is kept.

A run is *finished* when ``RUN_DIR/final/spec.json`` exists (the training job writes
``final/`` last). A bare slim-model directory (``spec.json`` + ``weights.pt``, as written
by ``laasp-dist prune``) is accepted too. The exported file is written to a temporary
name, loaded back and compared with the PyTorch model on a batch size other than the
one it was traced with (the batch axis is dynamic); only if the outputs agree within
``tolerance`` is it renamed into place, so a failed export leaves no file.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LaaspError, UnfinishedRunError
from .pruning import PrunableNetwork, load_slim_model
from .pruning.spec import SPEC_FILE
from .storage import Storage, as_storage

FORMATS: tuple[str, ...] = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
TOLERANCE = 1e-4
TRACE_BATCH = 2
CHECK_BATCH = 3


class ExportError(LaaspError):
    """The model directory cannot be exported, or the export does not reproduce the model."""


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and how closely it reproduces the PyTorch model."""

    path: str
    format: str
    model_dir: str
    max_abs_diff: float


def resolve_model_dir(location: str | Path | Storage) -> Storage:
    """The slim-model folder of a run folder (``final/``) or a bare slim-model folder (a local path or a URI)."""
    folder = as_storage(location)
    if folder.is_file(SPEC_FILE):
        return folder
    if folder.is_file(f"final/{SPEC_FILE}"):
        return folder.child("final")
    if not folder.exists() or folder.is_file(""):
        raise ExportError(f"{folder} is not a directory")
    raise UnfinishedRunError(f"{folder} is not a finished run: no final/{SPEC_FILE} (a run writes final/ when it ends)")


def default_output(location: str | Path | Storage, fmt: str) -> Storage:
    """``<dir>/export/model.pt`` (TorchScript) or ``<dir>/export/model.onnx``."""
    return as_storage(location).child(f"export/model{SUFFIX[fmt]}")


def example_input(net: PrunableNetwork, batch: int, seed: int = 0) -> torch.Tensor:
    """A fixed random batch at the model's input shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *net.arch.input_shape), generator=gen)


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch 2.14 marks torch.jit as deprecated on every call; TorchScript is still what was asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        yield


def _torchscript(model: nn.Module, example: torch.Tensor, check: torch.Tensor) -> Callable[[Path], torch.Tensor]:
    with _quiet_jit():
        traced = torch.jit.trace(model, example)

    def write(tmp: Path) -> torch.Tensor:
        with _quiet_jit():
            traced.save(str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu")
        with torch.inference_mode():
            return loaded(check)

    return write


def _onnx(model: nn.Module, example: torch.Tensor, check: torch.Tensor) -> Callable[[Path], torch.Tensor]:
    import onnxruntime

    def write(tmp: Path) -> torch.Tensor:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its passes on stdout
            torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                              external_data=False)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": check.numpy()})[0])

    return write


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def export_model(path: str | Path, fmt: str, out: str | Path | None = None,
                 tolerance: float = TOLERANCE) -> ExportResult:
    """Export the slim model under `path` (run folder or slim-model folder) to the file `out` in `fmt`.

    Both may be local paths or URIs; by default the file goes to ``export/`` beside the model.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    model_dir = resolve_model_dir(path)
    out = as_storage(out) if out is not None else default_output(path, fmt)
    if out.exists() and not out.is_file(""):
        raise ExportError(f"--out {out} is a directory; give a file name")
    net = load_slim_model(model_dir)
    model = net.model.eval()
    example, check = example_input(net, TRACE_BATCH), example_input(net, CHECK_BATCH, seed=1)
    with torch.inference_mode():
        expected = model(check)
    try:
        write = (_torchscript if fmt == "torchscript" else _onnx)(model, example, check)
    except Exception as exc:  # tracing raises many types; the user needs one line
        raise ExportError(f"{fmt} export of {model_dir} failed: {_first_line(exc)}") from None
    diff: list[float] = []

    def write_and_check(tmp: Path) -> None:
        try:
            got = write(tmp)
        except Exception as exc:  # exporter / runtime errors of any type
            raise ExportError(f"{fmt} export of {model_dir} failed: {_first_line(exc)}") from None
        if got.shape != expected.shape:
            raise ExportError(f"{fmt} export gives shape {tuple(got.shape)} for a batch of {CHECK_BATCH}, "
                              f"PyTorch {tuple(expected.shape)}")
        diff.append(float((got.float() - expected).abs().max()))
        if diff[0] > tolerance:
            raise ExportError(f"{fmt} export differs from PyTorch by {diff[0]:.2e} (> {tolerance:.0e}); not written")

    out.write_with("", write_and_check)
    return ExportResult(out.location, fmt, model_dir.location, diff[0])
