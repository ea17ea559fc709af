import json

import numpy as np
import pytest
import torch

from daemon.store.versions import read_version, write_version
from model.checkpoint import CLUSTERER, MANIFEST, WEIGHTS, CheckpointError, pack, unpack
from model.cluster import ClusterConfig, fit_clusterer
from model.spectra import FeatureConfig
from model.vae import VAE, VAEConfig


@pytest.fixture
def files() -> dict[str, bytes]:
    torch.manual_seed(0)
    model = VAE(VAEConfig(n_in=20))
    mu = np.random.default_rng(0).normal(size=(100, 2))
    clus = fit_clusterer(mu, np.ones(100), ClusterConfig(k_max=3))
    return pack(model, clus, FeatureConfig(), "spectra", {"epochs": 3})


def test_round_trip(files, tmp_path):
    path = write_version(tmp_path / "v1", files)
    v = read_version(path)
    assert v.manifest["epochs"] == 3 and v.input_kind == "spectra" and v.features == FeatureConfig()
    torch.manual_seed(0)
    ref = VAE(VAEConfig(n_in=20))
    for k, t in ref.state_dict().items():
        assert torch.equal(t, v.model.state_dict()[k])
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS, CLUSTERER, MANIFEST])


@pytest.mark.parametrize("name", [WEIGHTS, CLUSTERER])
def test_tampered_or_truncated_file_is_refused(files, tmp_path, name):
    path = write_version(tmp_path / "v1", files)
    data = bytearray((path / name).read_bytes())
    data[-1] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} does not match the checksum"):
        read_version(path)
    (path / name).write_bytes(files[name][:50])
    with pytest.raises(CheckpointError, match="truncated or modified"):
        read_version(path)


def test_forged_checksum_still_needs_valid_safetensors(files):
    import hashlib

    forged = dict(files)
    forged[WEIGHTS] = b"\x80\x04K\x01."  # a pickle, not a safetensors file
    doc = json.loads(files[MANIFEST])
    doc["files"][WEIGHTS] = hashlib.sha256(forged[WEIGHTS]).hexdigest()
    forged[MANIFEST] = json.dumps(doc).encode()
    with pytest.raises(CheckpointError, match="cannot parse a safetensors file"):
        unpack(forged)


def test_bad_manifest_and_missing_dir(files, tmp_path):
    with pytest.raises(CheckpointError, match="not valid JSON"):
        unpack({**files, MANIFEST: b"{nope"})
    with pytest.raises(CheckpointError, match="no such model directory"):
        read_version(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model version"):
        read_version(tmp_path / "empty")


def test_write_is_atomic_and_refuses_to_overwrite(files, tmp_path):
    write_version(tmp_path / "v1", files)
    with pytest.raises(FileExistsError):
        write_version(tmp_path / "v1", files)
    write_version(tmp_path / "v1", files, replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no temporary directories left behind

    class Boom(dict):
        def items(self):  # fails half-way through writing
            yield WEIGHTS, files[WEIGHTS]
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_version(tmp_path / "v2", Boom())
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]
