"""`laasp-dist export` and `laasp-dist latency` on a pruned ResNet-20.

Export: TorchScript and ONNX round trips (outputs within 1e-4 of PyTorch at batch sizes
other than the traced one), and refusals that write nothing. Latency: it runs and reports
a sane structure; no timing is asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from laasp_dist.cli import main
from laasp_dist.export import ExportError, export_model
from laasp_dist.pruning import load_slim_model
from laasp_dist.pruning.spec import read_spec

TOL = 1e-4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose final/ is a ResNet-20 pruned by 50 % FLOPs (l1), as the prune command writes it."""
    run = tmp_path_factory.mktemp("export") / "run"
    assert main(["prune", "resnet20", "--criterion", "l1", "--flops-reduction", "0.5", "--step-flops", "0.05",
                 "--round-to", "1", "--out", str(run / "final")]) == 0
    return run


@pytest.fixture(scope="module")
def cases(run_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, PyTorch output) pairs at batch sizes 1 and 5 (neither is the traced batch size)."""
    net = load_slim_model(run_dir / "final")
    model = net.model.eval()
    gen = torch.Generator().manual_seed(7)
    inputs = [torch.randn((b, *net.arch.input_shape), generator=gen) for b in (1, 5)]
    with torch.inference_mode():
        return [(x, model(x)) for x in inputs]


@pytest.mark.timeout(120)
def test_torchscript_round_trip_from_run_folder(run_dir: Path, cases: list[tuple[torch.Tensor, torch.Tensor]],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    report = json.loads(capsys.readouterr().out)
    out = run_dir / "export" / "model.pt"
    assert Path(report["out"]) == out and out.is_file()
    assert report["max_abs_diff"] <= TOL
    with pytest.warns(FutureWarning):  # torch 2.14 deprecates torch.jit; it still loads
        loaded = torch.jit.load(str(out))
    for x, expected in cases:
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), expected, atol=TOL, rtol=0)


@pytest.mark.timeout(120)
def test_onnx_round_trip_from_slim_model_folder(run_dir: Path, cases: list[tuple[torch.Tensor, torch.Tensor]],
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime

    out = tmp_path / "sub" / "r20.onnx"
    assert main(["export", str(run_dir / "final"), "--format", "onnx", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] <= TOL
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str), f"batch axis should be dynamic, got {inp.shape}"
    for x, expected in cases:
        got = session.run(None, {inp.name: x.numpy()})[0]
        np.testing.assert_allclose(got, expected.numpy(), atol=TOL, rtol=0)
    assert [p.name for p in out.parent.iterdir()] == ["r20.onnx"]  # no temp files left


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_unfinished_run_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: unfinished\n")
    out = tmp_path / "model.out"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finished run" in err[0] and "final/spec.json" in err[0]
    assert not out.exists() and not (run / "export").exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


@pytest.mark.timeout(60)
def test_missing_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_export_that_fails_its_check_leaves_no_file(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_model(run_dir, "torchscript", out, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_latency_json_compares_slim_with_original(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["latency", str(run_dir), "--batch", "1,4", "--repeats", "2", "--warmup", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    spec = read_spec(run_dir / "final")
    assert report["model"] == "resnet20" and report["input_shape"] == [3, 32, 32] and report["device"] == "cpu"
    assert report["macs"]["original"] == spec["base_macs"] and report["macs"]["slim"] == spec["macs"]
    assert report["macs"]["ratio"] == pytest.approx(spec["macs"] / spec["base_macs"], abs=1e-6)
    assert 0.45 < report["macs"]["ratio"] < 0.55
    assert [b["batch"] for b in report["batches"]] == [1, 4]
    for row in report["batches"]:
        assert row["original_ms"] > 0 and row["slim_ms"] > 0 and row["speedup"] > 0
        assert row["slim_images_per_s"] == pytest.approx(1000 * row["batch"] / row["slim_ms"], rel=1e-2)


@pytest.mark.timeout(120)
def test_latency_table_and_errors(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["latency", str(run_dir.parent), "--batch", "2", "--repeats", "1", "--warmup", "0"]) == 2
    assert "not a finished run" in capsys.readouterr().err
    assert main(["latency", str(run_dir), "--batch", "2", "--repeats", "1", "--warmup", "0", "--bf16"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "speed-up" in out and "FLOPs -" in out
    assert main(["latency", str(run_dir), "--batch", "x"]) == 2
    assert "--batch" in capsys.readouterr().err
