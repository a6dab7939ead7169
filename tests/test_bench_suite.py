"""The pytest-benchmark suite (`benchmarks/`, `make bench`) on a small build made here: it times every artifact a
host runtime runs, at 1 and 2 threads, with its fixed warm-up and rounds, saves JSON, and says what to do when
there is no build. (Its timings are never asserted: speed is read from the saved runs, not from tests.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from factory.targets import CompileRequest, get_target
from factory.weights import sha256_of

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_benchmarks_time_each_artifact_at_fixed_rounds_and_save_json(tiny_backbone, tmp_path: Path) -> None:
    build = tmp_path / "reports" / "tiny"
    (build / "golden").mkdir(parents=True)
    faces = np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    faces.astype("<f4").tofile(build / "golden" / "inputs_nchw.bin")
    entries = []
    for fmt in ("tflite", "executorch"):
        target = get_target(fmt)
        artifact = target.compile(CompileRequest(tiny_backbone, [127.5] * 3, [128.0] * 3, 32, "fp32", faces,
                                                 build / f"tiny_fp32{target.suffix}"))
        entries.append({"file": artifact.path.name, "precision": "fp32", "sha256": sha256_of(artifact.path),
                        "runtime": target.runtime_name, "io": {"input": {"layout": artifact.input_layout}}})
    manifest = {"artifacts": entries, "golden": {"inputs": {"NCHW": {"file": "golden/inputs_nchw.bin",
                                                                     "shape": [2, 3, 112, 112]}}}}
    (build / "manifest.json").write_text(json.dumps(manifest))

    out = tmp_path / "run.json"
    done = _run("--bench-reports", str(tmp_path / "reports"), "--bench-recipe", "tiny", "-k", "test_artifact",
                f"--benchmark-json={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(out.read_text())["benchmarks"]
    assert sorted(b["name"] for b in runs) == [
        "test_artifact[tiny_fp32.pte-1thread]", "test_artifact[tiny_fp32.pte-2thread]",
        "test_artifact[tiny_fp32.tflite-1thread]", "test_artifact[tiny_fp32.tflite-2thread]"]
    for run in runs:
        assert run["stats"]["rounds"] == 50 and 0 < run["stats"]["min"] <= run["stats"]["median"]
        assert run["extra_info"]["sha256"] == sha256_of(build / run["extra_info"]["artifact"])
        assert run["extra_info"]["threads"] in (1, 2)


def test_benchmarks_without_a_build_name_the_command_to_build(tmp_path: Path) -> None:
    done = _run("--bench-reports", str(tmp_path), "--bench-recipe", "mobilefacenet")
    assert done.returncode != 0
    assert "no build to benchmark" in done.stdout + done.stderr
    assert "python -m factory build recipes/mobilefacenet.yaml" in done.stdout + done.stderr
