"""The device lab reads a build folder through its manifest and refuses a half or tampered build."""

import json
from pathlib import Path

import pytest

from factory.weights import sha256_of
from mobile_harness.cli import main
from mobile_harness.manifest import BuildFolderError, load_manifest


def make_build(folder: Path) -> Path:
    folder.mkdir()
    (folder / "m_fp32.tflite").write_bytes(b"model bytes")
    bundle = folder / "m_fp16.mlpackage"
    (bundle / "Data").mkdir(parents=True)
    (bundle / "Data" / "weights.bin").write_bytes(b"weights")
    artifacts = [
        {"file": p.name, "format": fmt, "precision": prec, "bytes": 1, "sha256": sha256_of(p),
         "io": {"input": {"name": "image", "shape": [1, 3, 112, 112], "layout": "NCHW"}, "output": {"shape": [1, 128]}}}
        for p, fmt, prec in ((folder / "m_fp32.tflite", "tflite", "fp32"), (bundle, "coreml", "fp16"))
    ]
    (folder / "manifest.json").write_text(json.dumps({"artifacts": artifacts}))
    return folder


def test_manifest_checksums_agree_between_factory_and_harness(tmp_path: Path, capsys) -> None:
    build = make_build(tmp_path / "build")
    assert len(load_manifest(build)["artifacts"]) == 2
    assert main(["check", str(build)]) == 0
    assert "m_fp32.tflite: tflite fp32" in capsys.readouterr().out


def test_half_written_or_tampered_builds_are_refused(tmp_path: Path) -> None:
    build = make_build(tmp_path / "build")
    (build / "m_fp16.mlpackage" / "Data" / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(BuildFolderError, match="does not match its sha256"):
        load_manifest(build)
    manifest = json.loads((build / "manifest.json").read_text())
    del manifest["artifacts"][0]["io"]["input"]["name"]
    (build / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildFolderError, match=r"m_fp32\.tflite without its input name"):
        load_manifest(build)
    (build / "manifest.json").unlink()
    with pytest.raises(BuildFolderError, match=r"no manifest\.json"):
        load_manifest(build)
    assert main(["check", str(build)]) == 2
