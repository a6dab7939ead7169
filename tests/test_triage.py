"""Quantisation triage: layers kept in float by any PT2E quantiser, the emulation it ranks layers with, and the
build's triage of an int8 artifact that misses its gates (a network made to fail; SeesawFaceNet in the slow set).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from factory.artifacts import Check, StageSpec, compile_and_verify
from factory.models.mobilefacenet import conv_block
from factory.quant_layers import Emulation, keep_float, quantised_layers
from factory.recipe import GateConfig, TriageConfig
from factory.stages import StageLog
from factory.targets import CompileRequest, get_target

MEAN, STD = [127.5] * 3, [128.0] * 3


class Spiky(nn.Module):
    """A small face-net-shaped network whose `spread` output has one channel 1,000x the others (undone by
    `gather`): int8 with one range per tensor leaves the other channels of that tensor almost no levels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_block(3, 16, 3, stride=2)
        self.spread = nn.Conv2d(16, 16, 1)
        self.gather = nn.Conv2d(16, 32, 1)
        self.head = nn.Sequential(conv_block(32, 32, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        with torch.no_grad():
            self.spread.weight[0] *= 1000.0
            self.spread.bias[0] *= 1000.0
            self.gather.weight[:, 0] /= 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gather(self.spread(self.stem(x))))


def _faces(count: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (noise blurred by a coarse grid), pixel values 0-255, NCHW."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (count, 3, 14, 14)).astype(np.float32)
    return np.ascontiguousarray(coarse.repeat(8, axis=2).repeat(8, axis=3))


@pytest.fixture(scope="module")
def spiky() -> nn.Module:
    torch.manual_seed(0)
    model = Spiky().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.fill_(1.0)
    return model


def _request(model: nn.Module, faces: np.ndarray, out: Path, **kwargs) -> CompileRequest:
    return CompileRequest(model, MEAN, STD, 32, "int8", faces, out, **kwargs)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_emulation_is_the_converted_graph_and_keep_float_leaves_layers_float(spiky, tmp_path: Path) -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    faces = _faces(24)
    request = _request(spiky, faces, tmp_path / "x.pte")
    target = get_target("executorch")
    inputs = torch.from_numpy(request.normalised_calibration()[:8])
    with torch.no_grad():
        reference = spiky(inputs).numpy()

    prepared = request.calibrated(*target.int8_quantizer(request))
    converted = convert_pt2e(copy.deepcopy(prepared), fold_quantize=True)
    assert set(quantised_layers(prepared)) == {"stem.0", "spread", "gather", "head.0.0", "head.1", "head.2"}
    emulation = Emulation(prepared)
    with torch.no_grad():
        int8 = torch.cat([converted(inputs[i : i + 1]) for i in range(len(inputs))]).numpy()
    emulation.quantise(None)
    assert np.allclose(emulation.embeddings(inputs), int8, atol=1e-5), "emulation = quantise/dequantise pairs"
    emulation.quantise([])
    assert np.allclose(emulation.embeddings(inputs), reference, atol=1e-4), "nothing quantised = the float net"
    all_int8 = _cosine(int8, reference)
    assert all_int8 < 0.98, f"the network is made to fail int8 (cosine {all_int8:.4f})"

    # Kept in float by the real quantiser: the layers leave the annotation; emulating the same choice agrees.
    quantizer, source = target.int8_quantizer(request)
    kept = request.calibrated(keep_float(quantizer, ["spread", "gather"]), source)
    assert set(quantised_layers(kept)) == {"stem.0", "head.0.0", "head.1", "head.2"}
    with torch.no_grad():
        float_kept = convert_pt2e(kept, fold_quantize=True)
        partial = torch.cat([float_kept(inputs[i : i + 1]) for i in range(len(inputs))]).numpy()
    emulation.quantise(["stem.0", "head.0.0", "head.1", "head.2"])
    assert np.allclose(emulation.embeddings(inputs), partial, atol=1e-5)
    assert _cosine(partial, reference) > 0.99


def _spec(model: nn.Module, faces: np.ndarray, held_out: np.ndarray, triage: TriageConfig | None) -> StageSpec:
    with torch.no_grad():
        expected = model(torch.from_numpy((held_out - 127.5) / 128.0)).numpy()

    def check(runner, artifact, target) -> Check:
        out = runner(held_out)
        return Check({"cosine_mean": _cosine(out, expected)})

    return StageSpec(stem="spiky", network=model, mean=MEAN, std=STD, calibration=faces, latency_input=held_out,
                     check=check, embedding_size=32, gates={"int8": GateConfig(cosine_mean_min=0.99)},
                     what=lambda target: f"{len(held_out)} faces", triage=triage)


def test_triage_keeps_the_most_sensitive_layers_in_float_until_the_gate_passes(spiky, tmp_path: Path) -> None:
    faces, held_out = _faces(32), _faces(16, seed=1)
    lines: list[str] = []
    log = StageLog(lambda _line: None, tmp_path / "log")
    spec = _spec(spiky, faces, held_out, TriageConfig(max_float_layers=3, faces=16))
    (result,) = compile_and_verify(spec, [("executorch", ["int8"])], tmp_path, log, lines.append, (1, 3))

    triage = result.report.triage
    assert result.passed and triage.passed and result.report.parity["cosine_mean"] >= 0.99
    first, *rest = triage.attempts
    assert first.observer == "default" and first.float_layers == [] and not first.passed
    assert first.parity["cosine_mean"] < 0.98
    assert [a.observer for a in rest[:2]] == ["min_max", "mean_min_max"], "every other observer is tried first"
    assert not any(a.passed for a in rest[:2]), "no observer rescues a 1,000x channel"
    # The shared range of spread's output and gather's input: both layers rank first, and both stay float.
    assert {row.layer for row in triage.sensitivity[:2]} == {"spread", "gather"}
    assert triage.sensitivity[1].cosine_mean < 0.99 < triage.sensitivity[2].cosine_mean
    assert triage.layers == 6 and triage.sensitivity_faces == 16
    layered = rest[2:]
    assert [len(a.float_layers) for a in layered] == [1, 2], "one more float layer per attempt, until it passes"
    assert not layered[0].passed and layered[1].passed
    assert sorted(triage.float_layers) == ["gather", "spread"] and triage.observer == layered[1].observer
    assert "2 layer(s) kept in float by quantisation triage" in result.report.quantization
    assert set(triage.latency_cost_ms) == set(result.report.latency_ms) == set(triage.all_int8_latency_ms)
    assert any("quantisation triage" in line for line in lines)
    assert any(r["stage"] == "triage" for r in log.records)
    # The shipped file is the passing attempt: run again, it gives the verified cosine.
    again = get_target("executorch").load_runner(result.path)(held_out)
    assert spec.check(lambda batch: again, None, None).parity["cosine_mean"] == pytest.approx(
        result.report.parity["cosine_mean"], abs=1e-6)


def test_triage_turned_off_or_bounded_leaves_the_gate_failed(spiky, tmp_path: Path) -> None:
    faces, held_out = _faces(32), _faces(16, seed=1)
    log = StageLog(lambda _line: None, tmp_path / "log")
    off = _spec(spiky, faces, held_out, TriageConfig(enabled=False))
    (result,) = compile_and_verify(off, [("executorch", ["int8"])], tmp_path, log, lambda _line: None, (1, 3))
    assert not result.passed and result.report.triage is None

    bounded = _spec(spiky, faces, held_out, TriageConfig(max_float_layers=1, faces=16))
    (result,) = compile_and_verify(bounded, [("executorch", ["int8"])], tmp_path, log, lambda _line: None, (1, 3))
    triage = result.report.triage
    assert not result.passed and not triage.passed and len(triage.attempts) == 4
    best = max(triage.attempts, key=lambda a: a.parity["cosine_mean"])
    assert result.report.parity["cosine_mean"] == pytest.approx(best.parity["cosine_mean"], abs=1e-6), \
        "with no attempt passing, the best one is shipped (and the build fails on its gate)"
