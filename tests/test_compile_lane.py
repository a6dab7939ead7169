"""The compile worker: artifacts compiled beside the build are the ones compiled in line, and its failures are
reported with the artifact's name and the build log's tail."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import Unexportable

from factory import compile_lane
from factory.compile_lane import CompileLane, compile_here
from factory.stages import StageLog
from factory.targets import CompileRequest, get_target
from factory.weights import sha256_of


def _request(backbone, out: Path, precision: str, suffix: str, log: StageLog) -> CompileRequest:
    faces = np.random.default_rng(0).uniform(0, 255, (8, 3, 112, 112)).astype(np.float32)
    return CompileRequest(backbone, [127.5] * 3, [128.0] * 3, 32, precision, faces, out / f"tiny_{precision}{suffix}",
                          stages=log)


def _state(pid: int) -> str:
    """A process's state letter from /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_the_worker_compiles_in_order_the_bytes_compiled_in_line(tiny_backbone, tmp_path: Path) -> None:
    lines: list[str] = []
    log = StageLog(lines.append, tmp_path / "build.log")
    tflite, pte = get_target("tflite"), get_target("executorch")
    jobs = [(tflite, _request(tiny_backbone, tmp_path / "worker", "int8", ".tflite", log)),
            (pte, _request(tiny_backbone, tmp_path / "worker", "fp32", ".pte", log))]
    (tmp_path / "worker").mkdir()
    lane = CompileLane(jobs, log)
    # While the build times an artifact the worker is stopped, and it goes on afterwards.
    (pid,) = list(compile_lane._WORKER._processes)
    with lane.quiet():
        assert _state(pid) == "T"
    assert _state(pid) != "T"
    artifacts = [lane.take(target, request) for target, request in jobs]
    assert [a.path.name for a in artifacts] == ["tiny_int8.tflite", "tiny_fp32.pte"]
    assert [a.precision for a in artifacts] == ["int8", "fp32"] and artifacts[0].input_layout == "NHWC"
    # The worker's stage timings join the build's records in compile order, and its tool output the build log.
    subjects = [(r["stage"], r["subject"].split(":")[0]) for r in log.records]
    assert subjects[0] == ("quantise", "tiny_int8.tflite") and subjects[-1] == ("serialise", "tiny_fp32.pte")
    assert all(line.endswith("(compile worker)") for line in lines) and len(lines) == len(log.records)
    assert "==== [lower] tiny_int8.tflite" in (tmp_path / "build.log").read_text()

    (tmp_path / "here").mkdir()
    for (target, request), artifact in zip(jobs, artifacts, strict=True):
        again = compile_here(target, replace(request, output=tmp_path / "here" / request.output.name))
        assert sha256_of(again.path) == sha256_of(artifact.path), f"{artifact.path.name}: worker and in-line differ"


def test_a_compile_that_fails_in_the_worker_names_the_artifact_and_the_log(tmp_path: Path) -> None:
    lines: list[str] = []
    log = StageLog(lines.append, tmp_path / "build.log")
    target = get_target("tflite")
    request = _request(Unexportable(), tmp_path, "fp32", ".tflite", log)
    lane = CompileLane([(target, request)], log)
    with pytest.raises(Exception, match="this network cannot be traced"):
        lane.take(target, request)
    assert lines[-1].startswith(f"compiling tiny_fp32.tflite FAILED; last lines of {tmp_path / 'build.log'}")
    assert not request.output.exists(), "nothing half-written"
