"""The `laasp-dist` core commands as a user runs them: output, and one-line errors with exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

CONSOLE_SCRIPT = Path(sys.executable).parent / "laasp-dist"


def cli(*args, check=True):
    proc = run_cli(*args)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_flops_json():
    # the installed console script, in a process of its own; the other tests call its `main` in this one
    proc = subprocess.run([str(CONSOLE_SCRIPT), "flops", "resnet18", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "resnet18" and out["params"] == 11_689_512
    assert out["flops"] == 2 * out["macs"] and abs(out["macs"] - 1.82e9) / 1.82e9 < 0.01
    small = json.loads(cli("flops", "resnet20", "--input", "1x32x32", "--classes", "10", "--json").stdout)
    assert small["macs"] < 41e6


def test_groups_lists_widths():
    out = cli("groups", "resnet20").stdout
    assert "layer1.0.conv1" in out and "12 groups" in out


def test_prune_writes_a_loadable_slim_model_reproducibly(tmp_path):
    runs = [json.loads(cli("prune", "resnet20", "--criterion", "l1", "--flops-reduction", "0.4",
                           "--out", str(tmp_path / f"slim{i}")).stdout) for i in (0, 1)]
    out = runs[0]
    assert 0.4 <= out["flops_reduction"] < 0.43
    from laasp_dist.pruning import load_slim_model

    assert load_slim_model(tmp_path / "slim0").cost.macs == out["macs_after"]
    assert runs[1]["macs_after"] == out["macs_after"]  # same seed, same network


@pytest.mark.parametrize("args, message", [
    (("flops", "resnet9000"), "unknown model 'resnet9000'"),
    (("prune", "resnet20", "--criterion", "nope", "--flops-reduction", "0.5", "--out", "X"), "unknown criterion"),
    (("prune", "resnet20", "--criterion", "taylor", "--flops-reduction", "0.5", "--out", "X"),
     "--criterion taylor is measured on training data"),
    (("prune", "resnet20", "--criterion", "l1", "--flops-reduction", "1.5", "--out", "X"), "must be in (0, 1)"),
    (("flops", "resnet20", "--input", "3x32"), "CxHxW"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    proc = cli(*[a.replace("X", str(tmp_path / "x")) for a in args], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_damaged_weights_are_one_line(tmp_path):
    cli("prune", "resnet20", "--criterion", "l1", "--flops-reduction", "0.2", "--out", str(tmp_path / "slim"))
    weights = tmp_path / "slim" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = cli("prune", "resnet20", "--weights", str(tmp_path / "slim"), "--criterion", "l1",
               "--flops-reduction", "0.4", "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "not a readable weights file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
