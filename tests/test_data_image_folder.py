"""ImageNet-style folders: listing and checking once, and DALI's CPU pipeline on real JPEGs written by make_folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io

from data_pipelines import DaliImageIterator, ImageFolder, scan_image_folder, split_image_folder
from data_pipelines.image_folder import IMAGENET_MEAN, IMAGENET_STD
from laasp_dist.errors import DataError

LOW = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


@pytest.fixture
def val_copy(jpeg_folder: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the val split (10 x 4 Fashion-MNIST JPEGs + 10 photos)."""
    return Path(shutil.copytree(jpeg_folder / "val", tmp_path / "val"))


def _traceable(folder: ImageFolder) -> ImageFolder:
    """The same files, each labelled with its own index, to trace which file a batch holds."""
    n = len(folder)
    return ImageFolder(folder.root, tuple(str(i) for i in range(n)), folder.files, np.arange(n))


def _labels(it: DaliImageIterator) -> list[int]:
    """All labels of one epoch of `it`."""
    return [v for _, y in it for v in y.tolist()]


@pytest.mark.timeout(30)
def test_scan_sorts_classes_and_files_and_val_reuses_train_ids(jpeg_folder: Path) -> None:
    train = scan_image_folder(jpeg_folder / "train")
    assert train.classes[0] == "00_t_shirt_top" and train.classes[-1] == "10_photo" and train.num_classes == 11
    assert len(train) == 90 and np.bincount(train.labels).tolist() == [8] * 10 + [10]
    for label, name in enumerate(train.classes):
        files = [f for f, y in zip(train.files, train.labels) if y == label]
        assert files == sorted(files) and all(Path(f).parent.name == name for f in files)
    val = scan_image_folder(jpeg_folder / "val", classes=train.classes, verify="decode")
    assert val.classes == train.classes and np.bincount(val.labels).tolist() == [4] * 10 + [10]
    fit, held = split_image_folder(train, 0.25, seed=0)
    assert len(fit) + len(held) == 90 and not set(fit.files) & set(held.files)
    assert np.bincount(held.labels, minlength=11).tolist() == [2] * 11  # round(0.25 * 90) = 22, proportional


@pytest.mark.timeout(60)
@pytest.mark.parametrize("train", [False, True])
def test_dali_shards_of_two_ranks_do_not_overlap(jpeg_folder: Path, train: bool) -> None:
    folder = _traceable(scan_image_folder(jpeg_folder / "val"))
    iters = [DaliImageIterator(folder, 8, train=train, image_size=32, shard_id=s, num_shards=2, seed=3, num_threads=1)
             for s in (0, 1)]
    for _ in range(2):  # two epochs from the same pipelines
        seen = [_labels(it) for it in iters]
        assert not set(seen[0]) & set(seen[1])
        if train:  # 25 images per shard, whole batches of 8 only
            assert [len(s) for s in seen] == [24, 24] and len(set(seen[0] + seen[1])) == 48
        else:  # every image exactly once, the last batch partial
            assert sorted(seen[0] + seen[1]) == list(range(50))


@pytest.mark.timeout(60)
def test_dali_eval_iterator_returns_normalised_nchw_in_shard_order(jpeg_folder: Path) -> None:
    folder = scan_image_folder(jpeg_folder / "val")
    iters = [
        DaliImageIterator(folder, 8, train=False, image_size=56, shard_id=s, num_shards=2, num_threads=1)
        for s in (0, 1)
    ]
    assert iters[0].device_id is None and [len(it) for it in iters] == [4, 4]
    for _ in range(2):  # two epochs: each rank serves the same, interleaved shard
        batches = [list(it) for it in iters]
        labels = [torch.cat([y for _, y in b]) for b in batches]
        assert labels[0].dtype == torch.int64
        for rank in (0, 1):
            assert torch.equal(labels[rank], torch.from_numpy(folder.labels[rank::2])), "rank r reads files r, r+2, ..."
    first = batches[0][0][0]
    assert first.shape == (8, 3, 56, 56) and first.dtype == torch.float32
    # 64 x 64 JPEGs: shorter side to round(56 * 256 / 224) = 64 (no change), centre crop 56 = rows/cols 4..59.
    # DALI's CPU decoder and torchvision both use libjpeg-turbo, so the pixels agree exactly.
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for image, path in zip(first, folder.files[0::2]):
        reference = torchvision.io.decode_image(torchvision.io.read_file(path)).float()[:, 4:60, 4:60] / 255
        assert torch.allclose(image, (reference - mean) / std, atol=1e-4), path
    photos = torch.cat([x for b in batches for x, _ in b])[torch.cat(labels) == 10]
    assert photos.shape == (10, 3, 56, 56) and LOW - 1e-4 <= photos.min() and photos.max() <= HIGH + 1e-4


@pytest.mark.timeout(60)
def test_dali_train_iterator_equal_steps_per_rank_and_whole_epochs(jpeg_folder: Path) -> None:
    folder = scan_image_folder(jpeg_folder / "train")
    iters = [
        DaliImageIterator(folder, 8, train=True, image_size=64, shard_id=s, num_shards=2, seed=1, num_threads=1)
        for s in (0, 1)
    ]
    assert [len(it) for it in iters] == [5, 5], "45 images per shard, full batches only"
    labels = []
    for it in iters:
        x, y = next(iter(it))  # abandon the epoch after one batch ...
        assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert LOW - 1e-4 <= x.min() and x.max() <= HIGH + 1e-4
        epoch = list(it)  # ... the next iteration is still a whole epoch
        assert len(epoch) == 5
        labels.append(torch.cat([y for _, y in epoch]))
    assert sum(len(v) for v in labels) == 80
    assert set(torch.cat(labels).tolist()) <= set(range(11))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, payload", [("x.jpg", bytes(range(256)) * 4), ("readme.txt", b"not an image\n")])
def test_non_image_files_raise_or_are_skipped(val_copy: Path, name: str, payload: bytes) -> None:
    bad = val_copy / "03_dress" / name
    bad.write_bytes(payload)
    with pytest.raises(DataError, match=f"{bad}.*not a JPEG or PNG"):
        scan_image_folder(val_copy)
    with pytest.warns(UserWarning, match=f"Skipped 1 unusable file.*{name}"):
        folder = scan_image_folder(val_copy, skip_bad=True)
    assert len(folder) == 50 and str(bad) not in folder.files


@pytest.mark.timeout(60)
def test_empty_class_raises_or_is_kept_without_images(val_copy: Path) -> None:
    (val_copy / "05_aaa_empty").mkdir()
    with pytest.raises(DataError, match="05_aaa_empty has no usable images"):
        scan_image_folder(val_copy)
    with pytest.warns(UserWarning, match="05_aaa_empty"):
        folder = scan_image_folder(val_copy, skip_bad=True)
    assert folder.num_classes == 12 and folder.classes.index("05_aaa_empty") == 5
    assert 5 not in folder.labels and folder.classes.index("05_sandal") == 6
    batches = list(DaliImageIterator(folder, 16, train=False, image_size=32, num_threads=1))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(folder.labels))


@pytest.mark.timeout(60)
def test_truncated_jpeg_is_caught_by_verify_or_by_dali_without_hanging(val_copy: Path) -> None:
    source = val_copy / "10_photo"
    victim = sorted(source.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:1500])  # valid JPEG signature, body cut short
    with pytest.raises(DataError, match=f"{victim} is a corrupt or truncated image.*data.skip_bad=true"):
        scan_image_folder(val_copy, verify="decode")
    folder = scan_image_folder(val_copy)  # the cheap check only reads the signature
    with pytest.raises(DataError, match=f"DALI could not decode {victim}: set data.verify=decode"):
        for _ in DaliImageIterator(folder, 8, train=False, image_size=32, num_threads=1):
            pass


@pytest.mark.timeout(60)
def test_a_file_left_unchecked_by_verify_none_is_named_when_dali_fails_on_it(val_copy: Path) -> None:
    bad = val_copy / "03_dress" / "zz_notes.jpg"
    bad.write_bytes(b"not an image\n")
    folder = scan_image_folder(val_copy, verify="none")  # listing only: nothing was opened
    assert str(bad) in folder.files and len(folder) == 51
    with pytest.raises(DataError, match=f"DALI could not decode {bad}: set data.verify=decode"):
        for _ in DaliImageIterator(folder, 17, train=True, image_size=32, num_threads=1):  # 3 batches, all files
            pass


@pytest.mark.timeout(10)
def test_missing_root_no_classes_and_foreign_class_folders(tmp_path: Path, val_copy: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "img.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path / "flat")
    with pytest.raises(DataError, match="class folders unknown to the training classes: 10_photo"):
        scan_image_folder(
            val_copy, classes=[f"{i:02d}" for i in range(3)] + sorted(p.name for p in val_copy.iterdir())[:-1]
        )


@pytest.mark.timeout(10)
def test_iterator_rejects_too_few_images(jpeg_folder: Path) -> None:
    folder = scan_image_folder(jpeg_folder / "val")
    small = folder.subset(np.arange(3))
    assert isinstance(small, ImageFolder) and small.files == folder.files[:3]
    with pytest.raises(DataError, match="too few for 2 shard"):
        DaliImageIterator(small, 2, train=True, image_size=32, num_shards=2)
    with pytest.raises(DataError, match="too few for 4 shard"):
        DaliImageIterator(small, 2, train=False, image_size=32, num_shards=4)
