"""The image-folder data path: the per-run index, reproducible DALI epochs, crop windows, the parallel subset decode."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.io
from torchvision.transforms.v2 import functional as TF

from data_pipelines import DaliImageIterator, ImageFolder, scan_image_folder, split_image_folder, stratified_sample
from data_pipelines.image_folder import (
    CROP_ATTEMPTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _build_pipeline,
    _EpochFeed,
    random_resized_crop_windows,
)
from laasp_dist.config import build_config, load_config
from laasp_dist.errors import ConfigError, DataError
from laasp_dist.training.data import (
    INDEX_FILE,
    build_data_index,
    decode_eval_images,
    load_splits,
    read_data_index,
    write_data_index,
)


def _config(root: Path, **data) -> object:
    return build_config({"model": {"name": "resnet20"}, "seed": 3, "data": {
        "dataset": "image_folder", "root": str(root), "image_size": 32, "val_size": 0.2, **data}})


def _epoch(it: DaliImageIterator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in it]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


# ------------------------------------------------------------------------------------------------ the index


@pytest.mark.timeout(60)
def test_index_holds_the_splits_the_folders_give_and_survives_parquet(jpeg_folder: Path, tmp_path: Path) -> None:
    config = _config(jpeg_folder, train_limit=50, test_limit=30)
    index = build_data_index(config)
    # the same splits, computed here straight from the folders (the pre-index code path)
    full = scan_image_folder(jpeg_folder / "train")
    train, val = split_image_folder(full, 0.2, seed=3)
    train = train.subset(stratified_sample(train.labels, 50, seed=5))
    test = scan_image_folder(jpeg_folder / "val", classes=full.classes)
    test = test.subset(stratified_sample(test.labels, 30, seed=5))
    assert all(p.startswith(("train/", "val/")) and not os.path.isabs(p) for p in index.paths)
    write_data_index(tmp_path, index)
    for splits in (load_splits(config, index=index), load_splits(config, tmp_path)):
        for got, want in ((splits.train, train), (splits.val, val), (splits.test, test)):
            assert got.files == want.files and np.array_equal(got.labels, want.labels)
            assert got.classes == full.classes and got.root == want.root
    again = read_data_index(tmp_path)
    assert again.info["verify"] == "header" and len(again) == 140  # 90 train/ + 50 val/ images, "unused" included


@pytest.mark.timeout(60)
def test_index_reroots_to_the_data_set_mounted_elsewhere(jpeg_folder: Path, tmp_path: Path) -> None:
    write_data_index(tmp_path / "run", build_data_index(_config(jpeg_folder)))
    moved = Path(shutil.copytree(jpeg_folder, tmp_path / "elsewhere"))
    splits = load_splits(_config(moved), tmp_path / "run")
    assert all(f.startswith(f"{moved}/train/") and Path(f).is_file() for f in splits.train.files + splits.val.files)
    assert all(f.startswith(f"{moved}/val/") and Path(f).is_file() for f in splits.test.files)


@pytest.mark.timeout(30)
def test_missing_or_foreign_index_and_bad_verify_are_one_line_errors(tmp_path: Path, jpeg_folder: Path) -> None:
    with pytest.raises(DataError, match=f"has no data index \\({INDEX_FILE}\\)"):
        read_data_index(tmp_path)
    (tmp_path / INDEX_FILE).write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="is not a readable data index"):
        read_data_index(tmp_path)
    with pytest.raises(DataError, match="no run folder was given"):
        load_splits(_config(jpeg_folder))
    assert load_config(None, ["data.verify=decode"]).data.verify == "decode"
    with pytest.raises(ConfigError, match="data.verify"):
        load_config(None, ["data.verify=full"])


@pytest.mark.timeout(30)
def test_verify_levels_and_a_val_class_unknown_to_train(jpeg_folder: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(jpeg_folder, tmp_path / "data"))
    text = root / "train" / "03_dress" / "notes.txt"
    text.write_bytes(b"not an image\n")
    photo = sorted((root / "train" / "10_photo").iterdir())[0]
    photo.write_bytes(photo.read_bytes()[:1500])
    # a plain listing, for comparison
    listed = sorted(str(Path(d) / f) for d, _, fs in os.walk(root / "train") for f in fs)
    assert sorted(scan_image_folder(root / "train", verify="none").files) == listed
    with pytest.raises(DataError, match=f"{text} is not a JPEG or PNG image; remove it, or set data.skip_bad=true"):
        build_data_index(_config(root))
    relative = {str(f.relative_to(root)) for f in (text, photo)}
    with pytest.warns(UserWarning, match="Skipped 1 unusable file"):  # the signature check passes the photo
        assert relative & set(build_data_index(_config(root, skip_bad=True)).paths) == {f"train/10_photo/{photo.name}"}
    with pytest.warns(UserWarning, match="Skipped 2 unusable file"):  # a full decode does not
        assert not relative & set(build_data_index(_config(root, skip_bad=True, verify="decode")).paths)
    (root / "val" / "99_stray").mkdir()
    with pytest.raises(DataError, match="class folders unknown to the training classes: 99_stray"):
        build_data_index(_config(root, skip_bad=True))


# ------------------------------------------------------------------------------------- training batches


def _torchvision_window(h: int, w: int, u: np.ndarray, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """torchvision's RandomResizedCrop.get_params, one image at a time, its random draws replaced by `u`."""
    area, log_ratio = h * w, (math.log(3 / 4), math.log(4 / 3))
    for j in range(k):
        target = area * (0.08 + (1.0 - 0.08) * float(u[j]))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(u[k + j]))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return (int(float(u[2 * k]) * (h - ch + 1)), int(float(u[2 * k + 1]) * (w - cw + 1))), (ch, cw)
    if w / h < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif w / h > 4 / 3:
        ch, cw = h, int(round(h * 4 / 3))
    else:
        cw, ch = w, h
    return ((h - ch) // 2, (w - cw) // 2), (ch, cw)


@pytest.mark.timeout(30)
def test_crop_windows_are_torchvisions_random_resized_crop() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([(375, 500), (500, 375), (32, 32), (8, 400), (400, 8), (1, 1), (224, 3000)] * 40)
    draws = rng.random((len(sizes), 2 * CROP_ATTEMPTS + 2), dtype=np.float32)
    draws[:7, :CROP_ATTEMPTS] = 0.999  # near-whole-image areas: the fallback for the elongated images
    anchors, shapes = random_resized_crop_windows(sizes, draws)
    fallbacks = 0
    for (h, w), u, a, s in zip(sizes, draws, anchors, shapes):
        (y, x), (ch, cw) = _torchvision_window(int(h), int(w), u, CROP_ATTEMPTS)
        assert (tuple(a), tuple(s)) == ((y, x), (ch, cw)), (h, w)
        assert 0 <= y and y + ch <= h and 0 <= x and x + cw <= w and ch >= 1 and cw >= 1
        fallbacks += (y, x) == ((h - ch) // 2, (w - cw) // 2)
    assert fallbacks >= 4  # both branches were exercised


@pytest.fixture(scope="module")
def photos(jpeg_folder: Path) -> ImageFolder:
    """The 10 real photographs (512 x 512) of the train split."""
    folder = scan_image_folder(jpeg_folder / "train")
    return folder.subset(np.flatnonzero(folder.labels == 10))


@pytest.mark.timeout(60)
def test_train_batch_is_the_window_decoded_resized_flipped_and_normalised(photos: ImageFolder) -> None:
    it = DaliImageIterator(photos, 5, train=True, image_size=64, seed=4, num_threads=1)
    x, y = next(iter(it))
    encoded, labels, draws, mirror = it._feed(SimpleNamespace(epoch_idx=0, iteration=0))  # what the batch was fed
    paths = [bytes(e).decode() for e in encoded]
    assert torch.equal(y, torch.tensor([int(v[0]) for v in labels]))
    anchors, shapes = random_resized_crop_windows(np.full((5, 2), 512), np.stack(draws))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for image, path, (top, left), (h, w), flip in zip(x, paths, anchors, shapes, mirror):
        pixels = torchvision.io.decode_image(torchvision.io.read_file(path))[:, top:top + h, left:left + w]
        pixels = TF.resize(pixels.float(), [64, 64], antialias=True)
        pixels = pixels.flip(-1) if flip[0] else pixels
        reference = (pixels / 255 - mean) / std
        assert (image - reference).abs().mean() < 0.03, path  # a wrong window or flip is off by ~0.5
    assert 0 < sum(int(m[0]) for m in mirror) < 5, "both flipped and unflipped images were checked"


@pytest.mark.timeout(120)
def test_an_epoch_reads_the_same_from_a_pipeline_built_for_it(jpeg_folder: Path) -> None:
    """The resume guarantee: pipelines built once and run since epoch 0 read, in epoch e, exactly what a
    fresh pipeline positioned at e reads (a resumed run is a new process with new pipelines)."""
    folder = scan_image_folder(jpeg_folder / "train")
    kw = dict(train=True, image_size=32, num_shards=2, seed=7, num_threads=1)
    once = [DaliImageIterator(folder, 8, shard_id=s, **kw) for s in (0, 1)]
    epochs = [[_epoch(it) for it in once] for _ in range(3)]
    for e in (1, 2):
        for s in (0, 1):
            assert _same(epochs[e][s], _epoch(DaliImageIterator(folder, 8, shard_id=s, epoch=e, **kw)))
    moved = DaliImageIterator(folder, 8, shard_id=1, **kw)
    moved.set_epoch(2)
    assert _same(epochs[2][1], _epoch(moved))
    for e in range(3):  # within an epoch the ranks share nothing; epochs differ in order and in crops
        labels = [torch.cat([y for _, y in epochs[e][s]]) for s in (0, 1)]
        assert len(labels[0]) == len(labels[1]) == 40
    assert not torch.equal(epochs[0][0][0][0], epochs[1][0][0][0])
    # capped epochs (train.steps_per_epoch) are not drained: the next epoch is still the right one
    capped = DaliImageIterator(folder, 8, shard_id=0, max_batches=2, **kw)
    first = [_epoch(capped) for _ in range(3)]
    assert [len(e) for e in first] == [2, 2, 2] and _same(first[2], epochs[2][0][:2])
    abandoned = DaliImageIterator(folder, 8, shard_id=0, **kw)
    next(iter(abandoned))  # epoch 0 given up after one batch: the next iteration serves epoch 1 whole
    assert _same(_epoch(abandoned), epochs[1][0])


@pytest.mark.timeout(60)
def test_disjoint_shards_cover_every_file_of_an_epoch(jpeg_folder: Path) -> None:
    folder = scan_image_folder(jpeg_folder / "train")
    traced = ImageFolder(folder.root, tuple(map(str, range(len(folder)))), folder.files, np.arange(len(folder)))
    seen = [[v for _, y in DaliImageIterator(traced, 5, train=True, image_size=16, shard_id=s, num_shards=3,
                                             seed=1, epoch=4, num_threads=1) for v in y.tolist()] for s in range(3)]
    assert [len(s) for s in seen] == [30, 30, 30] and len(set(sum(seen, []))) == 90


@pytest.mark.timeout(60)
def test_training_format_fp16_channels_last(photos: ImageFolder) -> None:
    kw = dict(train=True, image_size=48, seed=2, num_threads=1)
    x32, y32 = next(iter(DaliImageIterator(photos, 4, **kw)))
    x16, y16 = next(iter(DaliImageIterator(photos, 4, dtype=torch.float16, channels_last=True, **kw)))
    assert x16.shape == x32.shape == (4, 3, 48, 48) and x16.dtype == torch.float16
    assert x16.is_contiguous(memory_format=torch.channels_last) and not x16.is_contiguous()
    assert torch.equal(y16, y32) and torch.allclose(x16.float(), x32, atol=4e-3)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("train", [True, False])
def test_gpu_pipeline_graph_is_well_formed(photos: ImageFolder, train: bool) -> None:
    """CPU counterpart of the GPU test below: DALI checks every operator's arguments and the devices of its
    inputs while the graph is defined, so defining the "mixed"/GPU graph catches wiring errors without a GPU."""
    feed = _EpochFeed(photos, 4, train, 0, 1, 0, 0, None)
    assert _build_pipeline(feed, 64, 0, 1, torch.float16, True) is not None


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for DALI's mixed (nvJPEG) decoding")
def test_gpu_batches_match_the_cpu_pipeline(photos: ImageFolder) -> None:
    kw = dict(image_size=64, seed=5, num_threads=2)
    for train in (True, False):
        cpu = _epoch(DaliImageIterator(photos, 4, train=train, device_id=None, **kw))
        gpu = _epoch(DaliImageIterator(photos, 4, train=train, device_id=0, dtype=torch.float16,
                                       channels_last=True, **kw))
        for (x, y), (u, v) in zip(cpu, gpu):
            assert u.is_cuda and u.dtype == torch.float16 and u.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(y, v.cpu()) and (x - u.float().cpu()).abs().mean() < 0.03  # nvJPEG vs libjpeg


# ----------------------------------------------------------------------------------------- scoring subset


@pytest.mark.timeout(60)
def test_subset_decode_in_parallel_equals_one_by_one(jpeg_folder: Path) -> None:
    files = scan_image_folder(jpeg_folder / "val").files  # 64 x 64 JPEGs and 512 x 512 photos
    expected = []
    for f in files:
        image = torchvision.io.decode_image(torchvision.io.read_file(f), mode=torchvision.io.ImageReadMode.RGB)
        image = TF.resize(image, round(40 * 256 / 224), antialias=True)
        expected.append(TF.center_crop(image, [40, 40]))
    got = decode_eval_images(files, 40, num_workers=4)
    assert got.dtype == torch.uint8 and torch.equal(got, torch.stack(expected))
