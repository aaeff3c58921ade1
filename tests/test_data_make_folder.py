"""make_folder writes a traceable ImageNet-layout JPEG folder from Fashion-MNIST."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision.io

from data_pipelines import ImageArrays
from data_pipelines.make_folder import class_folder_names, main


@pytest.mark.timeout(30)
def test_cli_writes_traceable_jpegs(
    tmp_path: Path, fashion_test: ImageArrays, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path), "--image-size", "48", "--train-per-class", "1", "--val-per-class", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)
    names = class_folder_names()
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == names
    files = sorted((tmp_path / "val").glob("*/*.jpg"))
    assert len(files) == 20 and len(list((tmp_path / "train").glob("*/*.jpg"))) == 10
    for f in files:
        index = int(re.fullmatch(r"val_(\d{5})\.jpg", f.name).group(1))
        assert f.parent.name == names[fashion_test.labels[index]]
        image = torchvision.io.decode_image(torchvision.io.read_file(str(f)))
        assert image.shape == (3, 48, 48)
        original = fashion_test.images[index : index + 1, :1, 2:30, 2:30].float()
        upsampled = torch.nn.functional.interpolate(original, size=(48, 48), mode="bilinear")[0]
        error = (image.float() - upsampled).abs()
        assert error.mean() < 3, (
            f"{f.name} is not the upsampled Fashion-MNIST image ({error.mean():.1f} grey levels off)"
        )


@pytest.mark.timeout(10)
def test_cli_reports_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "out"), "--fashion-root", str(tmp_path)]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
