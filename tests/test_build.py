"""The real `build` CLI end to end on a reduced set of real faces, with the shipped weights."""

import json
import platform
from pathlib import Path

import pytest
import yaml
from helpers import ReducedBuild, reduced_recipe, run_build

from factory.weights import sha256_of
from mobile_harness.manifest import load_golden

pytestmark = pytest.mark.data

CONTRACT_ARTIFACT_KEYS = {"file", "format", "precision", "bytes", "sha256", "verified_by", "parity", "gates",
                          "latency_ms"}
PARITY_KEYS = {"cosine_mean", "cosine_min", "cosine_p1", "lfw_accuracy", "lfw_accuracy_drop", "flip_rate"}


def test_build_writes_seven_verified_artifacts_and_a_manifest(reduced_build: ReducedBuild) -> None:
    out, recipe, result = reduced_build.out, reduced_build.recipe, reduced_build.result
    for stage in ("[load]", "[torch.export]", "[quantise]", "[lower]", "[serialise]", "[verify]", "[report]"):
        assert stage in result.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass" and manifest["verdict"] == "pass"
    assert {"recipe", "verdict", "reference", "peers", "artifacts"} <= report.keys()
    assert report["evaluation"]["parity_images"] >= 300
    assert 0.5 < report["reference"]["lfw_accuracy"] <= 1.0
    assert {(a["format"], a["precision"]) for a in manifest["artifacts"]} == {
        ("tflite", "fp32"), ("tflite", "int8"), ("executorch", "fp32"), ("executorch", "int8"),
        ("coreml", "fp16"), ("coreml", "w8"), ("coreml", "int8")}
    for entry in manifest["artifacts"]:
        assert sha256_of(out / entry["file"]) == entry["sha256"]
        assert entry["io"]["input"]["dtype"].startswith("float32")
        assert entry["io"]["output"]["dtype"].startswith("float32"), entry["io"]
    assert manifest["resolved_recipe"]["model"]["architecture"] == "mobilefacenet"
    assert manifest["tools"]["executorch"] == "1.5.1"
    inputs = manifest["inputs"]
    assert inputs["recipe_file_sha256"] == sha256_of(recipe)
    assert inputs["weights_sha256"] == report["model"]["weights_sha256"]
    assert inputs["calibration_faces"]["count"] == report["evaluation"]["calibration_faces"]
    assert inputs["evaluation_faces"]["count"] == report["evaluation"]["parity_images"]
    assert len({inputs["calibration_faces"]["list_sha256"], inputs["evaluation_faces"]["list_sha256"]}) == 2
    golden = load_golden(out, manifest)
    assert golden.faces == 256 and golden.reference.shape == (256, 128)
    assert {same for _, _, same in golden.pairs} == {0, 1}
    # Golden faces are evaluation images, which the build already refuses to share with calibration.
    assert all(name.startswith(name.split("/")[0] + "/" + name.split("/")[0]) for name in manifest["golden"]["images"])

    for artifact in report["artifacts"]:
        assert CONTRACT_ARTIFACT_KEYS <= artifact.keys()
        assert PARITY_KEYS <= artifact["parity"].keys()
        assert artifact["gates"] and all(g["passed"] for g in artifact["gates"])
        assert {"name", "value", "threshold", "passed"} <= artifact["gates"][0].keys()
        floor = 0.9999 if artifact["precision"] == "fp32" else 0.99
        assert artifact["parity"]["cosine_mean"] >= floor
        if artifact["format"] == "coreml" and platform.system() != "Darwin":
            # Verified in the reference interpreter, which is not Core ML's speed: not timed.
            assert artifact["verified_by"] == "Core ML reference interpreter (factory, fp16 emulation)"
            assert artifact["latency_ms"] is None
            # Emulated: verified on a fold-balanced 100-pair subset, against the reference on it; no benchmarks.
            assert artifact["parity_set"]["pairs"] == 100 and artifact["benchmarks"] == {}
            continue
        assert artifact["parity_set"]["pairs"] == 200
        assert artifact["latency_ms"]["1_thread"]["runs"] >= 50
        if artifact["format"] == "executorch":
            assert artifact["details"]["delegated"] is True
    assert set(report["peers"]) == {"pytorch_eager_fp32", "onnxruntime_fp32"}
    celeba = report["benchmarks"][0]
    assert celeba["name"] == "CelebA pairs" and celeba["pairs"] == 100 and "sanity check" in celeba["note"]
    assert 0.6 < celeba["reference"]["accuracy"] <= 1.0, "training identities: far better than chance"
    assert sum(bool(a["benchmarks"]) for a in report["artifacts"]) >= 4, "every runtime-verified artifact"
    for artifact in report["artifacts"]:
        if artifact["benchmarks"]:
            assert abs(artifact["benchmarks"]["CelebA pairs"]["accuracy_drop"]) <= 0.05
    card = (out / "report.md").read_text()
    assert "## Further benchmarks (not gated)" in card
    assert "| `mobilefacenet_reduced_int8.mlpackage` | iOS 17 / macOS 14 | `image`: MLMultiArray Float32" in card
    if platform.system() != "Darwin":
        assert "— on 100 of the pairs" in card
    assert (out / "report.md").read_text().count("| `mobilefacenet_reduced_") >= 12
    assert (out / "roc.png").stat().st_size > 10_000 and (out / "cosine_histogram.png").stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html


def test_a_failed_gate_exits_1_and_still_reports_which_and_by_how_much(tmp_path: Path, faces_root: Path) -> None:
    recipe = reduced_recipe(
        tmp_path, faces_root,
        targets=[{"format": "tflite", "precisions": ["int8"]}],
        gates={"int8": {"cosine_mean_min": 0.99999}},
        triage={"max_float_layers": 1, "faces": 8},
    )
    out = tmp_path / "build"
    result = run_build(recipe, out)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "GATE FAILED mobilefacenet_reduced_int8.tflite: cosine_mean" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "fail"
    (gate,) = report["artifacts"][0]["gates"]
    assert not gate["passed"] and gate["value"] < 0.99999 and gate["margin"] < 0
    assert "**FAIL**" in (out / "report.md").read_text()
    assert (out / "manifest.json").is_file(), "a gate failure still describes the artifacts it built"
    # Before failing, quantisation triage tried the other observers and one float layer, and says so.
    triage = report["artifacts"][0]["triage"]
    assert [len(a["float_layers"]) for a in triage["attempts"]] == [0, 0, 0, 1] and not triage["passed"]
    assert triage["sensitivity_faces"] == 8 and triage["layers"] > 20
    assert triage["attempts"][-1]["float_layers"] == [triage["sensitivity"][0]["layer"]]
    assert "quantisation triage" in result.stdout and "## Quantisation triage" in (out / "report.md").read_text()


def test_corrupt_weights_fail_cleanly_with_nothing_written(tmp_path: Path, faces_root: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    data = yaml.safe_load(reduced_recipe(tmp_path, faces_root).read_text())
    data["weights"]["path"] = str(bad)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "build"
    result = run_build(recipe, out)
    assert result.returncode == 2
    # The recipe pins the weights' sha256, so a damaged file is caught before it is parsed.
    assert f"weights file {bad} has sha256" in result.stderr and "the recipe expects" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tflite"))
