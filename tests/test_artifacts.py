"""The one compile-and-verify path: what it compiles, how it checks, gates and times each artifact.

A stand-in target (registered for the test) keeps this fast: it "compiles" by saving the deployed graph's
weights and runs them in PyTorch; one of its further runtimes perturbs the output, so a gate fails there only.
The real targets go through the same function in tests/test_build.py and tests/test_pipeline.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.artifacts import ArtifactResult, Check, StageSpec, compile_and_verify, in_layout, nchw
from factory.recipe import GateConfig
from factory.report_schema import ReportSchemaError
from factory.stages import StageLog
from factory.targets import CompiledArtifact, CompileRequest, base


class StandIn:
    """A target with an NHWC input whose runner is the deployed PyTorch graph."""

    format, suffix, precisions, runtime_name, host_latency = "standin", ".standin", ("fp32", "int8"), "Stand-in", True

    def __init__(self) -> None:
        self.graphs: dict[Path, torch.nn.Module] = {}

    def compile(self, request: CompileRequest) -> CompiledArtifact:
        self.graphs[request.output] = request.deployable()
        request.output.write_bytes(request.precision.encode())
        return CompiledArtifact(request.output, self.format, request.precision, "pixels", "NHWC", [1, 112, 112, 3],
                                "float32", request.output_name, request.artifact_output_shape, "float32",
                                "none", {"ops": 1})

    def load_runner(self, path: Path, threads: int | None = None):
        graph = self.graphs[path]

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return graph(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())).numpy()

        return run

    def extra_runners(self, path: Path):
        runner = self.load_runner(path)
        return {"Stand-in, noisy": lambda batch: runner(batch) + 0.5}


@pytest.fixture()
def standin(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    target = StandIn()
    monkeypatch.setitem(base._TARGETS, target.format, target)
    return target


def test_every_artifact_is_compiled_checked_gated_and_timed(standin, tiny_backbone, tmp_path: Path) -> None:
    faces = np.random.default_rng(0).uniform(0, 255, (6, 3, 112, 112)).astype(np.float32)
    reference = standin.compile(CompileRequest(tiny_backbone, [127.5] * 3, [128.0] * 3, 32, "fp32", faces,
                                               tmp_path / "ref"))
    expected = standin.load_runner(reference.path)(in_layout(faces, "NHWC"))
    checked, followed, lines = [], [], []

    def check(runner, artifact, target) -> Check:
        out = runner(in_layout(faces, artifact.input_layout))
        cosine = (out * expected).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(expected, axis=1)
        checked.append(artifact.precision)
        return Check({"cosine_mean": float(cosine.mean())}, {"parity_set": {"pairs": 3, "images": len(out),
                                                                            "reference_accuracy": 1.0}})

    def follow_up(runner, artifact, target) -> dict:
        followed.append(artifact.precision)
        again = float(runner(in_layout(faces[:1], artifact.input_layout)).sum() != 0)
        return {"benchmarks": {"again": {"accuracy": again, "accuracy_drop": 0.0, "flip_rate": 0.0, "flips": 0}}}

    spec = StageSpec(stem="demo", network=tiny_backbone, mean=[127.5] * 3, std=[128.0] * 3, calibration=faces,
                     latency_input=faces, check=check, follow_up=follow_up, embedding_size=32,
                     gates={"fp32": GateConfig(cosine_mean_min=0.9999)}, what=lambda t: f"{len(faces)} faces")
    log = StageLog(lambda _line: None, tmp_path / "log")
    results = compile_and_verify(spec, [("standin", ["fp32", "int8"])], tmp_path, log, lines.append, (1, 3))

    assert [r.report.file for r in results] == ["demo_fp32.standin", "demo_int8.standin"]
    assert checked == ["fp32", "fp32", "int8", "int8"], "each artifact in its runtime and in the further one"
    assert followed == ["fp32", "int8"], "the follow-up runs with the artifact's own runtime only"
    fp32, int8 = results
    assert isinstance(fp32, ArtifactResult) and fp32.report.parity["cosine_mean"] > 0.9999
    assert [(g.metric, g.passed) for g in fp32.report.gates] == [("cosine_mean", True)]
    assert int8.report.gates == [], "a precision the stage does not gate has no gate rows"
    (noisy,) = fp32.report.other_runtimes
    assert noisy.verified_by == "Stand-in, noisy" and noisy.gates[0].passed is False and not fp32.passed
    assert len(lines) == 1 and lines[0].startswith("  GATE FAILED demo_fp32.standin (Stand-in, noisy): cosine_mean")
    assert fp32.report.latency_ms["1_thread"].runs == 3 and fp32.report.benchmarks["again"].accuracy == 1.0
    entry = fp32.to_dict()
    assert entry["io"]["input"] == {"name": "pixels", "shape": [1, 112, 112, 3], "dtype": "float32", "layout": "NHWC"}
    assert (entry["parity_set"]["images"], entry["details"], entry["status"]) == (6, {"ops": 1}, "verified")
    assert entry["other_runtimes"][0]["gates"][0]["passed"] is False
    assert np.allclose(fp32.nchw_runner()(faces), expected, atol=1e-5)
    subjects = [(r["stage"], r["subject"]) for r in log.records]
    assert subjects == [("verify", "demo_fp32.standin on 6 faces"), ("verify", "demo_fp32.standin latency"),
                        ("verify", "demo_int8.standin on 6 faces"), ("verify", "demo_int8.standin latency")]
    # A measurement the report has no key for fails at once, naming it, before anything is reported.
    stray = replace(spec, check=lambda runner, artifact, target: Check({"cosine_mean": 1.0}, {"faces": 6}),
                    follow_up=None)
    with pytest.raises(ReportSchemaError, match=r"artifact demo_fp32.standin: unknown key\(s\) faces"):
        compile_and_verify(stray, [("standin", ["fp32"])], tmp_path, log, lines.append, (1, 3))


def test_nchw_and_in_layout_are_inverse_for_an_nhwc_runtime() -> None:
    pixels = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    identity_nhwc = nchw(lambda batch: batch, "NHWC")
    assert identity_nhwc(pixels).shape == (2, 4, 4, 3)
    assert np.array_equal(in_layout(pixels, "NHWC").transpose(0, 3, 1, 2), pixels)
    assert nchw(len, "NCHW") is len
