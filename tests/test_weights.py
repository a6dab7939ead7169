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


def test_float16_storage_halves_the_file_keeps_metadata_and_loads_as_float32(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from factory.cli import main
    from factory.weights import training_summary

    torch.manual_seed(0)
    model = TinyFaceNet().eval()
    path = tmp_path / "w.safetensors"
    save_weights(model, path, {"training": '{"epochs": 3, "device": "cpu"}'})
    before = path.stat().st_size
    assert main(["weights-float16", str(path)]) == 0
    assert "update weights.sha256" in capsys.readouterr().out
    assert path.stat().st_size < 0.55 * before
    assert training_summary(path) == {"epochs": 3, "device": "cpu"}
    loaded = load_weights(TinyFaceNet(), path)
    for key, value in model.state_dict().items():
        restored = loaded.state_dict()[key]
        assert restored.dtype == value.dtype
        if value.is_floating_point():  # float16 keeps 11 significant bits
            torch.testing.assert_close(restored, value, rtol=1e-3, atol=1e-5)
        else:
            assert torch.equal(restored, value)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(model(x), loaded(x))
    assert cosine.min() > 0.9999
    assert main(["weights-float16", str(tmp_path / "missing.safetensors")]) == 2
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    assert main(["weights-float16", str(tmp_path / "bad.safetensors")]) == 2
    assert (tmp_path / "bad.safetensors").read_bytes() == b"not safetensors", "a failed rewrite leaves the file alone"
