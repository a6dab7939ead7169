"""Two builds of the same recipe, weights and faces write the same bytes and the same numbers.

Each build runs in its own process with a different PYTHONHASHSEED (Python's string hashing is what made
coremltools write protobuf maps in a different order per process) and its own reference-embedding cache
folder, so the first build computes the reference cold and the second reads it from the cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO

from factory.recipe import load_recipe
from factory.weights import sha256_of

pytestmark = pytest.mark.data

# Measured on the build machine, not properties of the artifacts.
TIMING_KEYS = {"created", "stages", "wall_seconds", "peers", "latency_ms", "op_profile", "host",
               "all_int8_latency_ms", "latency_cost_ms"}  # the last two: quantisation triage's timings


def small_recipe(tmp_path: Path, faces_root: Path) -> Path:
    """The shipped fastfacenet_0_25 recipe (11 M MACs, all seven artifacts) on 100 pairs and 128 calibration faces."""
    data = load_recipe(REPO / "recipes" / "fastfacenet_0_25.yaml").to_dict()
    for key in ("path", "train", "ablation", "pipeline"):
        data.pop(key)
    data["name"] = "fastfacenet_0_25_small"
    data["weights"]["path"] = str(REPO / "recipes" / data["weights"]["path"])
    data["data"]["root"] = str(faces_root)
    data["data"]["calibration"].update(count=128, allow_fewer_than_300=True)
    data["data"]["evaluation"].update(max_pairs=100, min_parity_images=150, emulated_max_pairs=100)
    data["data"]["benchmarks"] = []
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def build(recipe: Path, out: Path, cache: Path, hash_seed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "FACTORY_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "factory", "build", str(recipe), "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"stdout": result.stdout, "manifest": json.loads((out / "manifest.json").read_text()),
            "report": json.loads((out / "report.json").read_text())}


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_two_builds_write_identical_artifacts_and_numbers(tmp_path: Path, faces_root: Path) -> None:
    recipe = small_recipe(tmp_path, faces_root)
    cache = tmp_path / "cache"
    first = build(recipe, tmp_path / "first", cache, "1")
    second = build(recipe, tmp_path / "second", cache, "2")
    assert "(embeddings from the reference cache)" not in first["stdout"]
    assert "(embeddings from the reference cache)" in second["stdout"]

    artifacts = {entry["file"]: entry["sha256"] for entry in first["manifest"]["artifacts"]}
    assert {Path(f).suffix for f in artifacts} == {".tflite", ".pte", ".mlpackage"} and len(artifacts) == 7
    rebuilt = {entry["file"]: entry["sha256"] for entry in second["manifest"]["artifacts"]}
    assert rebuilt == artifacts, {f: (artifacts[f][:12], rebuilt.get(f, "")[:12]) for f in artifacts
                                  if rebuilt.get(f) != artifacts[f]}
    for name, digest in artifacts.items():  # the manifest's digest is the file's, in both folders
        assert sha256_of(tmp_path / "first" / name) == digest == sha256_of(tmp_path / "second" / name)
    assert first["manifest"]["inputs"] == second["manifest"]["inputs"]
    assert without_timings(first["report"]) == without_timings(second["report"])

    # A Core ML package holds no date and names its items by their paths, not by random UUIDs.
    package = tmp_path / "first" / "fastfacenet_0_25_small_fp16.mlpackage"
    manifest = json.loads((package / "Manifest.json").read_text())
    assert manifest["rootModelIdentifier"] in manifest["itemInfoEntries"]
    assert b"conversion_date" not in (package / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes()
