"""One compile-and-verify path for every deployed network: the recogniser and each pipeline stage.

A `StageSpec` says what to deploy (the network, the graph around it, its input normalisation and output),
which faces calibrate int8, and how an artifact is checked (`check`: runner in, parity metrics out).
`compile_and_verify` compiles it with every target and precision of the recipe, runs each artifact in its
runtime (and in any further runtime the target names on this host), evaluates the stage's gates on the
parity metrics (`factory.gates`), times the artifact where its runtime runs natively, and returns one typed
`ArtifactResult` per artifact; `ArtifactResult.to_dict` is its report.json entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from factory import gates, triage
from factory.compile_lane import CompileLane, compile_here
from factory.io import artifact_bytes
from factory.latency import latency_rows
from factory.report_schema import Artifact, from_data, to_data
from factory.stages import Stage, StageLog
from factory.targets import CompiledArtifact, CompileRequest, Runner, Target, get_target, verification_runner
from factory.weights import sha256_of


@dataclass
class Check:
    """What a stage's check measured on one artifact: `parity` is gated; `extra` goes into the artifact's
    report entry under keys of `report_schema.Artifact` (e.g. a detector's recall against its teacher, the
    recogniser's parity pair set); a key the report type does not have fails the build with its name."""

    parity: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageSpec:
    """One deployed network of a build and how its artifacts are verified.

    Attributes:
        stem: Artifact file stem; files are `<stem>_<precision><suffix>`.
        network: The fp32 network in eval mode (what int8 quantises).
        mean, std: The pixel normalisation the deployed graph applies before the network.
        calibration: NCHW float pixels that set int8 activation ranges.
        latency_input: One NCHW input, for host latency.
        check: Runs an artifact's runner (input in the artifact's layout) on the stage's held-out inputs; called
            for the artifact's runtime and for every further runtime its target names on this host.
        follow_up: Further measurements with the artifact's own runtime only (the recogniser's benchmarks),
            after the check; returns entries for the artifact's report entry.
        gates: Gate dataclass per precision (`factory.gates` reads their `_min`/`_max` keys).
        what: For the log line of each artifact's verification: what it runs on (may depend on the target).
        graph: Builds the deployed graph around the network; None: the face embedder (`factory.deploy.Embedder`).
        embedding_size: The embedder's width (the recogniser); 0 for other stages.
        output_name, output_shape, description, observer, w8_keep_float16_up_to: See `CompileRequest`.
        triage: Quantisation triage settings (`factory.recipe.TriageConfig`) for int8 artifacts that miss their
            gates; None: no triage.
    """

    stem: str
    network: nn.Module
    mean: list[float]
    std: list[float]
    calibration: np.ndarray
    latency_input: np.ndarray
    check: Callable[[Runner, CompiledArtifact, Target], Check]
    gates: Mapping[str, object]
    what: Callable[[Target], str]
    follow_up: Callable[[Runner, CompiledArtifact, Target], dict[str, Any]] | None = None
    graph: Callable[[nn.Module], nn.Module] | None = None
    embedding_size: int = 0
    output_name: str = "embedding"
    output_shape: list[int] | None = None
    description: str = "Face embedding model built by the mobile face-model factory"
    observer: str = "default"
    w8_keep_float16_up_to: dict[str, int] = field(default_factory=dict)  # by target format
    triage: Any = None


@dataclass
class ArtifactResult:
    """One compiled and verified artifact: its report entry (`report`, the report's own type; report.json holds
    `to_dict()`) and what it takes to run it again (its file and target)."""

    path: Path
    target: Target
    report: Artifact

    @property
    def format(self) -> str:
        return self.report.format

    @property
    def precision(self) -> str:
        return self.report.precision

    @property
    def input_layout(self) -> str:
        return self.report.io.input.layout

    @property
    def passed(self) -> bool:
        return self.report.passed

    def nchw_runner(self, threads: int | None = None) -> Runner:
        """A runner of the artifact that takes NCHW input whatever its layout (loaded now)."""
        runner = (verification_runner(self.target, self.path) if threads is None
                  else self.target.load_runner(self.path, threads))
        return nchw(runner, self.input_layout)

    def to_dict(self) -> dict[str, Any]:
        return to_data(self.report)


def nchw(runner: Runner, layout: str) -> Runner:
    """A runner taking NCHW input, for an artifact whose input is `layout`."""
    if layout == "NHWC":
        return lambda batch: runner(batch.transpose(0, 2, 3, 1).copy())
    return runner


def in_layout(nchw_pixels: np.ndarray, layout: str) -> np.ndarray:
    """NCHW pixels in an artifact's input layout."""
    return nchw_pixels.transpose(0, 2, 3, 1).copy() if layout == "NHWC" else nchw_pixels


def artifact_call(target: Target, path: Path, example: np.ndarray) -> Callable[[int], Callable[[], object]]:
    """For a thread count, a zero-argument call that runs the artifact once on `example`."""

    def make_call(threads: int) -> Callable[[], object]:
        runner = target.load_runner(path, threads)
        return lambda: runner(example)

    return make_call


def _io(artifact: CompiledArtifact) -> dict[str, Any]:
    return {
        "input": {"name": artifact.input_name, "shape": artifact.input_shape, "dtype": artifact.input_dtype,
                  "layout": artifact.input_layout},
        "output": {"name": artifact.output_name, "shape": artifact.output_shape, "dtype": artifact.output_dtype},
    }


def compile_and_verify(spec: StageSpec, targets: list[tuple[str, list[str]]], out: Path, log: StageLog,
                       printer: Callable[[str], None], latency: tuple[int, int]) -> list[ArtifactResult]:
    """Compile `spec` for each (format, precisions) of `targets` into `out` and verify every artifact.

    `latency` is (warm-up calls, timed runs) of the host latency measurement.
    """
    jobs = []
    for fmt, precisions in targets:
        target = get_target(fmt)
        for precision in precisions:
            jobs.append((target, CompileRequest(
                backbone=spec.network, mean=spec.mean, std=spec.std, embedding_size=spec.embedding_size,
                precision=precision, calibration=spec.calibration,
                output=out / f"{spec.stem}_{precision}{target.suffix}", stages=log, graph=spec.graph,
                output_name=spec.output_name, output_shape=spec.output_shape, description=spec.description,
                observer=spec.observer, w8_keep_float16_up_to=spec.w8_keep_float16_up_to.get(fmt, 0),
            )))
    # Every artifact compiles in the worker, in this order, while the ones before it are verified here.
    lane = CompileLane(jobs, log)
    results = []
    try:
        for target, request in jobs:
            artifact = lane.take(target, request)
            artifact.quantization = request.describe_quantization(artifact.quantization)
            result = _verify(spec, target, artifact, log, printer, latency, lane.quiet)
            if (request.precision == "int8" and not result.passed and spec.triage is not None
                    and spec.triage.enabled and triage.supports(target)):
                result = _triage(spec, target, request, artifact, result, log, printer, latency, lane.quiet)
            results.append(result)
    finally:
        lane.cancel()
    return results


def _triage(spec: StageSpec, target: Target, request: CompileRequest, first_artifact: CompiledArtifact,
            first: ArtifactResult, log: StageLog, printer: Callable[[str], None], latency: tuple[int, int],
            quiet: Callable[[], AbstractContextManager]) -> ArtifactResult:
    """Quantisation triage of an int8 artifact that missed its gates (`factory.triage`); the shipped attempt,
    verified in full, with the triage record in its report entry."""

    def attempt(req: CompileRequest) -> tuple[CompiledArtifact, dict[str, Any]]:
        artifact = compile_here(target, req)
        with log.stage(Stage.TRIAGE, f"{artifact.path.name} on {spec.what(target)} (observer {req.observer}, "
                                     f"{len(req.float_layers)} float layer(s))"):
            return artifact, spec.check(verification_runner(target, artifact.path), artifact, target).parity

    printer(f"  {first.report.file} missed its gates: quantisation triage (triage.enabled: false turns it off)")
    chosen, artifact, record = triage.run(request, target, (first_artifact, first.report.parity),
                                          spec.gates.get(request.precision), attempt, spec.triage, log, printer)
    if artifact is not first_artifact:
        artifact.quantization = chosen.describe_quantization(artifact.quantization)
    result = _verify(spec, target, artifact, log, printer, latency, quiet)
    record.all_int8_latency_ms = first.report.latency_ms
    if first.report.latency_ms and result.report.latency_ms:
        record.latency_cost_ms = {
            threads: round(result.report.latency_ms[threads].median_ms - stats.median_ms, 4)
            for threads, stats in first.report.latency_ms.items() if threads in result.report.latency_ms}
    result.report.triage = record
    return result


def _verify(spec: StageSpec, target: Target, artifact: CompiledArtifact, log: StageLog,
            printer: Callable[[str], None], latency: tuple[int, int],
            quiet: Callable[[], AbstractContextManager] = nullcontext) -> ArtifactResult:
    """Check, gate and time one artifact; `quiet` holds other work of the build (the compile worker) while the
    artifact is timed."""
    gate = spec.gates.get(artifact.precision)
    with log.stage(Stage.VERIFY, f"{artifact.path.name} on {spec.what(target)}"):
        others = []
        for runtime, other_runner in target.extra_runners(artifact.path).items():
            other = spec.check(other_runner, artifact, target)
            others.append({"verified_by": runtime, "parity": other.parity,
                           "gates": gates.evaluate(gate, other.parity)})
        # The artifact's own runtime is checked last: a check that keeps per-artifact data (the build's plots)
        # keeps the last call's, so the shipped artifact's own runtime wins over further runtimes and over
        # quantisation triage's earlier attempts.
        runner = verification_runner(target, artifact.path)
        measured = spec.check(runner, artifact, target)
    extra = {**measured.extra, **(spec.follow_up(runner, artifact, target) if spec.follow_up else {})}
    latency_ms = op_profile = None
    if target.host_latency:
        with log.stage(Stage.VERIFY, f"{artifact.path.name} latency"), quiet():
            example = in_layout(spec.latency_input[:1], artifact.input_layout)
            latency_ms = latency_rows(artifact_call(target, artifact.path, example), *latency)
        profile = getattr(target, "op_profile", None)  # runtimes with a per-operator event tracer
        if profile is not None:
            with log.stage(Stage.VERIFY, f"{artifact.path.name} per-op profile (1 thread)"), quiet():
                op_profile = profile(artifact.path, example, 1)
    entry = {
        "file": artifact.path.name, "format": artifact.format, "precision": artifact.precision,
        "bytes": artifact_bytes(artifact.path), "sha256": sha256_of(artifact.path),
        "quantization": artifact.quantization, "runtime": target.runtime_name, "io": _io(artifact),
        "details": artifact.details, "verified_by": target.runtime_name, "status": "verified",
        "parity": measured.parity, "gates": gates.evaluate(gate, measured.parity), "latency_ms": latency_ms,
        "other_runtimes": others, **({"op_profile": op_profile} if op_profile else {}), **extra,
    }
    # The entry is read into the report's type here: a measurement the report has no key for fails at once.
    result = ArtifactResult(artifact.path, target, from_data(Artifact, entry, f"artifact {artifact.path.name}"))
    report = result.report
    for row in (report, *report.other_runtimes):
        for failed in (g for g in row.gates if not g.passed):
            printer(f"  GATE FAILED {report.file}{'' if row is report else f' ({row.verified_by})'}: "
                    f"{failed.metric} = {failed.value:.6f}, needs {failed.op} {failed.threshold} "
                    f"(off by {-failed.margin:.6f})")
    return result
