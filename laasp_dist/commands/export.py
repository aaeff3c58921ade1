"""`laasp-dist export RUN_DIR --format torchscript|onnx [--out FILE]`: the final slim model as a deployable file."""

from __future__ import annotations

import argparse
import json

from ..export import FORMATS, export_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a finished run's slim model to TorchScript or ONNX (checked)")
    p.add_argument("run_dir", help="run folder with final/ (or a slim-model folder with spec.json)")
    p.add_argument("--format", required=True, choices=FORMATS, help="torchscript (torch.jit.trace) or onnx")
    p.add_argument("--out", default=None, help="output file (default: RUN_DIR/export/model.pt or model.onnx)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = export_model(args.run_dir, args.format, args.out)
    print(json.dumps({"format": result.format, "out": str(result.path), "model_dir": str(result.model_dir),
                      "max_abs_diff": result.max_abs_diff, "dynamic_batch": True}))
    return 0
