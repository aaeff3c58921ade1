"""The scoring subset: seeded and stratified, dealt into balanced shards, Parquet round trip, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from laasp_dist.errors import DataError
from laasp_dist.search import build_subset, read_subset, write_subset
from laasp_dist.search.subset import calibration_shard


def test_same_seed_same_subset_and_shards(fashion_train):
    a = build_subset(fashion_train, 300, 4, seed=7)
    b = build_subset(fashion_train, 300, 4, seed=7)
    c = build_subset(fashion_train, 300, 4, seed=8)
    assert len(a) == 300 and a.num_shards == 4
    for sa, sb in zip(a.shards, b.shards):
        assert torch.equal(sa.sample_ids, sb.sample_ids) and torch.equal(sa.images, sb.images)
    assert not np.array_equal(a.sample_ids, c.sample_ids)
    assert len(np.unique(a.sample_ids)) == 300  # shards do not overlap


def test_subset_and_every_shard_are_class_stratified(fashion_train):
    sub = build_subset(fashion_train, 400, 4, seed=0)
    counts = np.bincount(fashion_train.labels.numpy()[sub.sample_ids], minlength=10)
    assert counts.tolist() == [40] * 10
    for shard in sub.shards:
        assert len(shard) == 100
        assert np.bincount(shard.labels.numpy(), minlength=10).tolist() == [10] * 10
        # images and labels are the source split's, at the recorded indices
        assert torch.equal(shard.images, fashion_train.images[shard.sample_ids])
        assert torch.equal(shard.labels, fashion_train.labels[shard.sample_ids])


def test_exclude_keeps_held_out_images_out(fashion_train):
    held = np.arange(0, 60000, 2)
    sub = build_subset(fashion_train, 200, 2, seed=0, exclude=held)
    assert not set(sub.sample_ids.tolist()) & set(held.tolist())


def test_parquet_round_trip_and_normalisation(fashion_train, tmp_path):
    sub = build_subset(fashion_train, 120, 3, seed=1)
    write_subset(sub, tmp_path / "subset")
    assert sorted(p.name for p in (tmp_path / "subset").iterdir()) == [
        "manifest.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    back = read_subset(tmp_path / "subset")
    assert back.seed == 1 and back.num_classes == 10
    for s, t in zip(sub.shards, back.shards):
        assert torch.equal(s.images, t.images) and torch.equal(s.labels, t.labels)
        assert torch.equal(s.sample_ids, t.sample_ids)
        assert torch.equal(s.inputs(), t.inputs())
    x = back.shards[0].inputs()
    expected = (fashion_train.images[back.shards[0].sample_ids].float() / 255 - fashion_train.mean[0]) / fashion_train.std[0]
    torch.testing.assert_close(x, expected)


def test_calibration_shard_is_the_subset_head(fashion_train):
    sub = build_subset(fashion_train, 100, 4, seed=0)
    cal = calibration_shard(sub, 30)
    assert len(cal) == 30
    assert torch.equal(cal.images, torch.cat([sub.shards[0].images, sub.shards[1].images[:5]]))
    assert calibration_shard(sub, 0) is None
    with pytest.raises(DataError, match="bn_recalibration asks for 101 images"):
        calibration_shard(sub, 101)


def test_subset_larger_than_data_is_a_clear_error(fashion_test):
    with pytest.raises(DataError, match="subset of 10001 images .* only 10000"):
        build_subset(fashion_test, 10001, 4, seed=0)
    with pytest.raises(DataError, match="only 5000"):
        build_subset(fashion_test, 6000, 4, seed=0, exclude=np.arange(5000))
    with pytest.raises(DataError, match="into 11 shards"):
        build_subset(fashion_test, 10, 11, seed=0)


def test_missing_or_damaged_shards_are_clear_errors(fashion_train, tmp_path):
    sub = build_subset(fashion_train, 60, 3, seed=0)
    d = tmp_path / "s"
    write_subset(sub, d)
    (d / "shard-00001.parquet").unlink()
    with pytest.raises(DataError, match="missing shard file.*shard-00001.parquet"):
        read_subset(d)
    write_subset(sub, d)
    (d / "shard-00002.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="shard-00002.parquet is not a readable Parquet file"):
        read_subset(d)
    write_subset(sub, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["shards"][0]["images"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="the manifest says 99"):
        read_subset(d)
    with pytest.raises(DataError, match="no search subset"):
        read_subset(tmp_path / "nowhere")
