"""Quantisation triage: what a build does when an int8 artifact misses its gates, instead of just failing.

1. **Observers.** The artifact is compiled again with each other activation observer (`factory.observers`)
   and checked against its gates. The best attempt's observer (`_score`: the highest mean cosine) is kept for
   the next steps.
2. **Sensitivity.** With that observer, every quantised layer (`factory.quant_layers`) is quantised alone, the
   rest of the network float, in an emulation of the target's own quantiser calibrated on every calibration
   face; the mean cosine of the network's output to the float output on the first `faces` calibration faces is
   the layer's sensitivity (the output is what the gates judge; a layer's own output error says little about
   how much of it survives to the embedding).
3. **Float layers.** The most sensitive layers are kept in float one at a time (1, 2, ... up to
   `max_float_layers`), each time a real artifact compiled by the target and checked against the gates,
   until one passes.

The artifact shipped is the first passing attempt, or the best attempt when none passed (the build then
fails on its gates as before, with the triage in the report). It is verified in full (every runtime,
benchmarks, latency), and its report entry carries what triage did: the observer, the float layers, every
attempt with its gates, the most sensitive layers, and the latency the float layers cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from factory import gates
from factory.compile_lane import compile_here
from factory.metrics import cosine_rows
from factory.observers import observer_names
from factory.report_schema import Gate, LayerSensitivity, Triage, TriageAttempt, from_data
from factory.stages import Stage, StageLog
from factory.targets import CompiledArtifact, CompileRequest, Target

# How many of the most sensitive layers the report lists.
REPORTED_LAYERS = 10

# Compiles a request and checks the artifact: (compiled artifact, its parity metrics).
Attempt = Callable[[CompileRequest], tuple[CompiledArtifact, dict[str, Any]]]


def supports(target: Target) -> bool:
    """Whether `target` exposes the PT2E quantiser triage works with."""
    return callable(getattr(target, "int8_quantizer", None))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return cosine_rows(a.astype(np.float64), b.astype(np.float64))


def sensitivity(target: Target, request: CompileRequest, faces: int,
                log: StageLog) -> tuple[list[LayerSensitivity], float, int]:
    """Every quantised layer's sensitivity (most sensitive first), the all-int8 emulated mean cosine, and the
    number of faces measured (`faces`, or every calibration face when there are fewer)."""
    from factory.quant_layers import Emulation

    quantizer, source = target.int8_quantizer(request)
    faces = min(faces, len(request.calibration))
    with log.stage(Stage.TRIAGE, f"{request.label}: per-layer int8 sensitivity on {faces} calibration faces"):
        emulation = Emulation(request.calibrated(quantizer, source))
        inputs = torch.from_numpy(request.normalised_calibration()[:faces])
        emulation.quantise([])
        reference = emulation.embeddings(inputs)
        rows = []
        for layer, ops in emulation.layers.items():
            emulation.quantise([layer])
            rows.append(LayerSensitivity(layer, ops, float(_cosines(emulation.embeddings(inputs), reference).mean())))
        emulation.quantise(None)
        everything = float(_cosines(emulation.embeddings(inputs), reference).mean())
    rows.sort(key=lambda row: (row.cosine_mean, row.layer))
    return rows, everything, faces


def _score(attempt: TriageAttempt) -> tuple[float, int, float]:
    """The order in which attempts are preferred: the highest mean cosine to the fp32 reference (the measure of
    int8 error itself; an accuracy drop on a subset of pairs moves in steps of a few pairs), then the most gates
    passed, then the sum of their margins (stages whose parity has no cosine)."""
    cosine = attempt.parity.get("cosine_mean")
    margins = sum(g.margin or 0.0 for g in attempt.gates)
    return (float(cosine) if cosine is not None else 0.0), sum(bool(g.passed) for g in attempt.gates), margins


def run(request: CompileRequest, target: Target, first: tuple[CompiledArtifact, dict[str, Any]], gate: object,
        attempt: Attempt, settings: Any, log: StageLog,
        printer: Callable[[str], None]) -> tuple[CompileRequest, CompiledArtifact, Triage]:
    """Triage the int8 artifact `first` (compiled from `request`, with its parity metrics) that missed `gate`.

    Returns the request and artifact to ship (the file at `request.output` is that artifact when this returns)
    and the triage record (without latency, which the caller measures on the shipped artifact).
    """

    def checked(req: CompileRequest, parity: dict[str, Any]) -> TriageAttempt:
        rows = [from_data(Gate, row, "gate") for row in gates.evaluate(gate, parity)]
        result = TriageAttempt(req.observer, list(req.float_layers), dict(parity), rows,
                               all(bool(g.passed) for g in rows))
        failed = ", ".join(f"{g.metric} {g.value:.6f}" for g in rows if not g.passed) or "all gates pass"
        printer(f"  triage {req.label}: observer {req.observer}, {len(req.float_layers)} float layer(s): {failed}")
        return result

    requests, artifacts, attempts = [request], [first[0]], [checked(request, first[1])]

    def try_request(req: CompileRequest) -> None:
        artifact, parity = attempt(req)
        requests.append(req)
        artifacts.append(artifact)
        attempts.append(checked(req, parity))

    for observer in observer_names():
        if attempts[-1].passed:
            break
        if observer != request.observer:
            try_request(dataclasses.replace(request, observer=observer, float_layers=[]))

    rows: list[LayerSensitivity] = []
    everything, faces = None, 0
    if not attempts[-1].passed:
        base = requests[max(range(len(attempts)), key=lambda i: _score(attempts[i]))]
        rows, everything, faces = sensitivity(target, base, settings.faces, log)
        printer(f"  triage {request.label}: {len(rows)} quantised layers; most sensitive: "
                + ", ".join(f"{row.layer} {row.cosine_mean:.5f}" for row in rows[:3]))
        for count in range(1, min(settings.max_float_layers, len(rows)) + 1):
            try_request(dataclasses.replace(base, float_layers=[row.layer for row in rows[:count]]))
            if attempts[-1].passed:
                break

    chosen = len(attempts) - 1 if attempts[-1].passed else max(range(len(attempts)),
                                                              key=lambda i: _score(attempts[i]))
    if chosen != len(attempts) - 1:  # the file on disk is the last attempt's
        artifacts[chosen] = compile_here(target, requests[chosen])
    record = Triage(
        observer=requests[chosen].observer, float_layers=list(requests[chosen].float_layers),
        passed=attempts[chosen].passed, attempts=attempts, max_float_layers=settings.max_float_layers,
        sensitivity=rows[:REPORTED_LAYERS], layers=len(rows), sensitivity_faces=faces,
        emulated_cosine_mean=everything,
    )
    return requests[chosen], artifacts[chosen], record
