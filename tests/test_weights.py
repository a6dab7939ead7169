import os
from pathlib import Path

import pytest
import torch
from helpers import TinyFaceNet

from factory.errors import FactoryError
from factory.weights import load_weights, save_weights, sha256_of, state_dict_equal


def test_round_trip_is_exact_and_checksummed(tmp_path: Path) -> None:
    model = TinyFaceNet()
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    loaded = load_weights(TinyFaceNet(), path, expected_sha256=sha256_of(path))
    assert state_dict_equal(model, loaded)
    assert not list(tmp_path.glob(".*")), "atomic write left a temporary behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "weights get ordinary file permissions"


def test_corrupt_wrong_shape_and_wrong_checksum_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(TinyFaceNet(), path)
    with pytest.raises(FactoryError, match="recipe expects"):
        load_weights(TinyFaceNet(), path, expected_sha256="0" * 64)
    with pytest.raises(FactoryError, match="does not fit the model"):
        load_weights(TinyFaceNet(embedding_size=8), path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FactoryError, match="not a valid safetensors file"):
        load_weights(TinyFaceNet(), corrupt)
    pickle_file = tmp_path / "model.pt"
    torch.save(TinyFaceNet().state_dict(), pickle_file)
    with pytest.raises(FactoryError, match="not a valid safetensors file"):
        load_weights(TinyFaceNet(), pickle_file)
    with pytest.raises(FactoryError, match="weights file not found"):
        load_weights(TinyFaceNet(), tmp_path / "missing.safetensors")
