"""Portable slim-model format: round trips, replay, and damaged files."""

import json

import pytest
import torch

from laasp_dist.errors import ConfigError, SpecError
from laasp_dist.pruning import Arch, PrunableNetwork, load_slim_model, network_spec, replay, save_slim_model
from laasp_dist.pruning.baseline import prune_by_criterion
from laasp_dist.pruning.spec import build_model


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    torch.manual_seed(0)
    net = PrunableNetwork.create(Arch("resnet20", 10))
    original = {k: v.clone() for k, v in net.model.state_dict().items()}
    prune_by_criterion(net, "fpgm", 0.3, step_fraction=0.03)
    out = tmp_path_factory.mktemp("slim") / "final"
    save_slim_model(net, out)
    return net, original, out


def test_round_trip_is_bit_identical(pruned):
    net, _, out = pruned
    loaded = load_slim_model(out)
    x = torch.randn(8, 3, 32, 32)
    net.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(net.model(x), loaded.model(x))
    assert loaded.cost.macs == net.cost.macs and loaded.widths() == net.widths()
    assert loaded.base_macs == net.base_macs and loaded.prunes == net.prunes
    # the weights file is a plain state dict
    state = torch.load(out / "weights.pt", weights_only=True)
    assert set(state) == set(net.model.state_dict())


def test_replay_rebuilds_the_identical_network(pruned):
    net, original, _ = pruned
    fresh = PrunableNetwork.create(Arch("resnet20", 10))
    fresh.model.load_state_dict(original)
    replay(fresh, net.prunes)
    a, b = fresh.model.state_dict(), net.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert network_spec(fresh)["layers"] == network_spec(net)["layers"]


def test_spec_records_widths(pruned):
    net, _, out = pruned
    spec = json.loads((out / "spec.json").read_text())
    assert spec["model"] == "resnet20" and spec["widths"] == net.widths()
    assert spec["macs"] < spec["base_macs"]
    model = build_model(spec)
    assert model.layer1[0].conv1.out_channels == net.model.layer1[0].conv1.out_channels


def test_weights_that_do_not_match_the_spec(pruned, tmp_path):
    _, original, out = pruned
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spec.json").write_text((out / "spec.json").read_text())
    torch.save(original, bad / "weights.pt")  # unpruned weights under a pruned spec
    with pytest.raises(SpecError, match="weights do not match the spec"):
        load_slim_model(bad)


def test_truncated_and_missing_files(pruned, tmp_path):
    _, _, out = pruned
    bad = tmp_path / "trunc"
    bad.mkdir()
    (bad / "spec.json").write_text((out / "spec.json").read_text())
    data = (out / "weights.pt").read_bytes()
    (bad / "weights.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SpecError, match="not a readable weights file"):
        load_slim_model(bad)
    (bad / "spec.json").write_text('{"format": "laasp-dist/slim-model"')
    with pytest.raises(SpecError, match="not valid JSON"):
        load_slim_model(bad)
    with pytest.raises(SpecError, match="no slim-model spec"):
        load_slim_model(tmp_path / "nothing")


def test_spec_of_unknown_model(pruned, tmp_path):
    _, _, out = pruned
    spec = json.loads((out / "spec.json").read_text())
    spec["model"] = "resnet9000"
    with pytest.raises(ConfigError, match="unknown model"):
        build_model(spec)


def test_save_replaces_atomically(pruned, tmp_path):
    net, _, _ = pruned
    target = tmp_path / "model"
    save_slim_model(PrunableNetwork.create(Arch("resnet20", 10)), target)
    save_slim_model(net, target)
    assert load_slim_model(target).widths() == net.widths()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp leftovers
