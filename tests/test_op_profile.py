"""The per-operator profile of an ExecuTorch artifact (ETDump + Inspector) and its model-card section."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from factory.report import op_profile_lines
from factory.report_schema import Artifact, from_data
from factory.targets import CompileRequest, get_target


def test_executorch_profile_names_xnnpack_operators_and_adds_up(tiny_backbone, tmp_path: Path) -> None:
    faces = np.random.default_rng(0).uniform(0, 255, (4, 3, 112, 112)).astype(np.float32)
    target = get_target("executorch")
    artifact = target.compile(CompileRequest(tiny_backbone, [127.5] * 3, [128.0] * 3, 32, "fp32", faces,
                                             tmp_path / "tiny_fp32.pte"))
    profile = target.op_profile(artifact.path, faces[:1], 1, runs=5)

    assert profile["threads"] == 1 and profile["runs"] == 5 and profile["total_ms"] > 0
    top = profile["top"]
    assert 1 <= len(top) <= 10
    assert [op["ms"] for op in top] == sorted((op["ms"] for op in top), reverse=True)
    # TinyFaceNet's convolutions run in XNNPACK, and are named by XNNPACK's operator kind without an index.
    convolutions = [op for op in top if op["op"].startswith("Convolution (NHWC, F32)")]
    assert convolutions and all(op["delegated"] and "#" not in op["op"] for op in convolutions)
    assert sum(op["count"] for op in top) <= profile["ops"]
    # The operators' medians and the runtime's own time make up the whole inference (medians: not exactly).
    assert 0 < sum(op["ms"] for op in top) <= profile["total_ms"] * 1.5
    assert 0 < sum(op["share"] for op in top) <= 1.5 and profile["outside_ops_ms"] >= 0

    entry = {"file": "tiny_fp32.pte", "format": "executorch", "precision": "fp32", "bytes": 1, "sha256": "0",
             "quantization": "none", "runtime": "ExecuTorch", "verified_by": "ExecuTorch", "status": "verified",
             "io": {"input": {"name": "x", "layout": "NCHW", "shape": [1, 3, 112, 112], "dtype": "float32"},
                    "output": {"name": "y", "shape": [1, 32], "dtype": "float32"}},
             "parity": None, "gates": [], "latency_ms": None, "op_profile": profile}
    lines = op_profile_lines([from_data(Artifact, entry)])
    assert "## Per-op profile" in lines
    assert f"| {top[0]['op']} | {top[0]['count']} | {top[0]['ms']:.3f} | {top[0]['share']:.1%} |" in lines
