"""The build report's types: report.json is the serialisation of a `BuildReport`.

`read_report` parses a report.json into the types, refusing an unknown or missing key with its JSON path (a
report from another schema is an error that says so, never a half-read table); `to_data` writes the types back
as plain JSON data with the same keys. Field metadata: `key` is the JSON key where it is not a Python name
(`tar_at_far_1e-03`); `omit_none` leaves a None field out (keys that only some builds have).

Parity metrics stay a mapping from metric name to value: the gates (`factory.gates`) name them, and each stage
kind measures its own (the recogniser's cosines and LFW accuracy, a detector's detection agreement). A pipeline
kind's section (`pipeline`, see `factory.pipelines`) has the kind's name under `kind` and is typed by the kind's
own schema (checked when the kind builds it and when its card is rendered), with `Artifact`s for its artifacts;
read here it stays a mapping, so the device lab reads any report without the kinds' code.

Imports nothing heavy: the device lab and `factory compare` read reports without the toolchain.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from factory.errors import FactoryError

OPTIONAL = {"omit_none": True}


def _key(name: str) -> dict[str, Any]:
    return {"key": name}


@dataclass
class LatencyStats:
    """Milliseconds per call over `runs` timed calls (see `factory.latency.time_calls`)."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int


@dataclass
class Gate:
    """One gate of a recipe checked against a measured value (`factory.gates.evaluate`)."""

    name: str
    metric: str
    threshold: float
    op: str
    value: float | None
    passed: bool | None
    margin: float | None = field(default=None, metadata=OPTIONAL)
    note: str | None = field(default=None, metadata=OPTIONAL)


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str | None = field(default=None, metadata=OPTIONAL)
    layout: str | None = field(default=None, metadata=OPTIONAL)


@dataclass
class ArtifactIO:
    input: TensorSpec
    output: TensorSpec


@dataclass
class OtherRuntime:
    """The artifact verified in a further runtime of the host (Core ML's GPU and Neural Engine on macOS)."""

    verified_by: str
    parity: dict[str, float | None]
    gates: list[Gate]


@dataclass
class BenchmarkParity:
    accuracy: float
    accuracy_drop: float
    flip_rate: float
    flips: int


@dataclass
class ParitySet:
    """The pairs an artifact was verified on (fewer than all for an emulated runtime)."""

    pairs: int
    images: int
    reference_accuracy: float


@dataclass
class LayerSensitivity:
    """int8 error of one layer alone: mean cosine of the network's output with only this layer quantised (the
    rest float) to the float output, on the calibration faces (emulated: `factory.quant_layers.Emulation`)."""

    layer: str
    ops: list[str]
    cosine_mean: float


@dataclass
class TriageAttempt:
    """One int8 artifact compiled and checked against its gates during quantisation triage."""

    observer: str
    float_layers: list[str]
    parity: dict[str, float | None]
    gates: list[Gate]
    passed: bool


@dataclass
class Triage:
    """What quantisation triage did to an int8 artifact that missed its gates (`factory.triage`).

    `attempts` in order (the first is the artifact as the recipe asked for it); the artifact shipped is the
    passing attempt, or the best one when none passed. `sensitivity` lists the most sensitive layers first
    (`sensitivity_faces` calibration faces, `layers` quantised layers measured); `latency_cost_ms` is the
    shipped artifact's median minus the all-int8 first attempt's, per thread count.
    """

    observer: str
    float_layers: list[str]
    passed: bool
    attempts: list[TriageAttempt]
    max_float_layers: int
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    layers: int = 0
    sensitivity_faces: int = 0
    emulated_cosine_mean: float | None = None
    all_int8_latency_ms: dict[str, LatencyStats] | None = None
    latency_cost_ms: dict[str, float] | None = None


@dataclass
class Artifact:
    """One compiled and verified artifact."""

    file: str
    format: str
    precision: str
    bytes: int
    sha256: str
    quantization: str
    runtime: str
    io: ArtifactIO
    verified_by: str | None
    status: str | None
    parity: dict[str, float | None] | None  # metric name -> value; None where a rate is out of reach
    gates: list[Gate]
    latency_ms: dict[str, LatencyStats] | None
    details: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    other_runtimes: list[OtherRuntime] | None = field(default=None, metadata=OPTIONAL)
    benchmarks: dict[str, BenchmarkParity] | None = field(default=None, metadata=OPTIONAL)
    parity_set: ParitySet | None = field(default=None, metadata=OPTIONAL)
    teacher: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)  # a detector's recall vs its teacher
    triage: Triage | None = field(default=None, metadata=OPTIONAL)  # int8 that missed its gates at first
    op_profile: OpProfile | None = field(default=None, metadata=OPTIONAL)  # runtimes with a per-op tracer

    @property
    def label(self) -> str:
        return f"{self.format} {self.precision}"

    @property
    def passed(self) -> bool:
        return all(g.passed for row in (self, *(self.other_runtimes or [])) for g in row.gates)


@dataclass
class ProfiledOp:
    op: str  # the runtime's operator kind, e.g. XNNPACK's "Convolution (NHWC, QC8) DWConv"
    count: int  # instances in one inference
    ms: float  # summed over the instances, median over the profiled inferences
    share: float  # of the whole inference
    delegated: bool


@dataclass
class OpProfile:
    """Where one inference's time goes, per operator kind (ten slowest kinds)."""

    tool: str
    threads: int
    runs: int
    ops: int
    total_ms: float
    outside_ops_ms: float  # the runtime's own time around the operators
    top: list[ProfiledOp]


@dataclass
class Host:
    platform: str
    processor: str
    threads: int


@dataclass
class ModelInput:
    size: int
    color_order: str
    mean: list[float]
    std: list[float]


@dataclass
class ImportedSource:
    """Where an imported architecture's pretrained weights come from (`factory.models.ImportedWeights`)."""

    source: str
    licence: str
    training_data: str
    input_normalisation: str | None
    files: dict[str, str]  # file name -> sha256


@dataclass
class ModelInfo:
    architecture: str
    paper: str
    paper_numbers: dict[str, float]
    paper_numbers_at: dict[str, Any]
    params: int
    macs: int
    input: ModelInput
    weights_sha256: str | None
    training: dict[str, Any] | None  # the weights file's `factory train` metadata, as written
    weights_file: str | None = field(default=None, metadata=OPTIONAL)
    imported: ImportedSource | None = field(default=None, metadata=OPTIONAL)


@dataclass
class EvaluationInfo:
    pairs_file: str
    pairs: int
    parity_images: int
    calibration_faces: int
    calibration_observer: str
    protocol: str


@dataclass
class Reference:
    """The PyTorch fp32 reference on the evaluation pairs."""

    framework: str
    lfw_accuracy: float
    lfw_accuracy_std: float
    threshold: float
    # None where the pairs are too few to reach the rate (fewer than 1,000 different-person pairs for 1e-3).
    tar_at_far_1e_03: float | None = field(metadata=_key("tar_at_far_1e-03"))
    tar_at_far_1e_04: float | None = field(metadata=_key("tar_at_far_1e-04"))


@dataclass
class BenchmarkReference:
    accuracy: float
    accuracy_std: float
    threshold: float
    tar_at_far_1e_03: float | None = field(metadata=_key("tar_at_far_1e-03"))


@dataclass
class Benchmark:
    name: str
    pairs_file: str
    pairs: int
    images: int
    note: str | None
    reference: BenchmarkReference


@dataclass
class LatencySettings:
    batch: int
    warmup: int
    runs: int


@dataclass
class AblationRow:
    """The same architecture trained another way, scored by the build (`factory.ablation`)."""

    label: str
    weights: str
    sha256: str
    teachers: list[str]
    teacher_outputs: str | None
    augmentation: str
    started_from: str | None
    started_from_sha256: str | None
    epochs: int | None
    train_minutes: float | None
    device: str | None
    lfw_identity_free: bool
    lfw_accuracy: float
    lfw_accuracy_std: float
    tar_at_far_1e_03: float | None = field(metadata=_key("tar_at_far_1e-03"))


@dataclass
class StageRecord:
    stage: str
    subject: str
    seconds: float
    # True: the compile worker ran it while the build verified earlier artifacts (`factory.compile_lane`).
    worker: bool | None = field(default=None, metadata=OPTIONAL)


@dataclass
class BuildReport:
    """Everything a build measured; report.json is `to_data(report)`."""

    recipe: str
    verdict: str
    created: str
    command: str
    host: Host
    model: ModelInfo
    evaluation: EvaluationInfo
    reference: Reference
    benchmarks: list[Benchmark]
    latency_settings: LatencySettings
    peers: dict[str, dict[str, LatencyStats]]
    artifacts: list[Artifact]
    stages: list[StageRecord]
    pipeline: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)  # a pipeline kind's own section
    ablation: list[AblationRow] | None = field(default=None, metadata=OPTIONAL)
    # What determines the artifacts (`factory.build.build_inputs`); reports from before it lack it.
    inputs: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    # Wall time from the start of the build to its report (stages overlap, so they add up to more).
    wall_seconds: float | None = field(default=None, metadata=OPTIONAL)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


# ----------------------------------------------------------------------------------------------- conversion


def _json_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def to_data(value: Any) -> Any:
    """The plain JSON data of a report type (dataclasses become mappings with their JSON keys)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_json_key(f): to_data(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, list):
        return [to_data(item) for item in value]
    if isinstance(value, dict):
        return {key: to_data(item) for key, item in value.items()}
    return value


class ReportSchemaError(FactoryError):
    """A report.json that does not fit the report types."""


def from_data(cls: type, data: Any, where: str = "report") -> Any:
    """`data` (parsed JSON) as an instance of the report type `cls`; raises `ReportSchemaError` with the path."""
    return _convert(data, cls, where)


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if len(options) < len(get_args(tp)):
                return None
            raise ReportSchemaError(f"{where}: null where a value is required")
        return _convert(value, options[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise ReportSchemaError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(item, get_args(tp)[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ReportSchemaError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {key: _convert(item, get_args(tp)[1], f"{where}.{key}") for key, item in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ReportSchemaError(f"{where}: expected a mapping, got {type(value).__name__}")
        hints = get_type_hints(tp)
        fields = {_json_key(f): f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ReportSchemaError(f"{where}: unknown key(s) {', '.join(unknown)}; this report was written by "
                                    "another version of the factory: rebuild it")
        kwargs = {}
        for key, f in fields.items():
            if key in value:
                kwargs[f.name] = _convert(value[key], hints[f.name], f"{where}.{key}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ReportSchemaError(f"{where}.{key}: missing; this report was written by another version of "
                                        "the factory: rebuild it")
        return tp(**kwargs)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return value  # JSON writes 1.0 as 1.0 and an integral float field may hold an int: kept as read
    if tp in (int, str, bool, float) and not isinstance(value, tp):
        raise ReportSchemaError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def read_report(path: Path) -> BuildReport:
    """A build folder's report.json (or the file itself) as a `BuildReport`."""
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise FactoryError(f"no build report at {path}: build it first (`python -m factory build RECIPE`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FactoryError(f"{path} is not valid JSON ({error}); rebuild it") from None
    try:
        return from_data(BuildReport, data)
    except ReportSchemaError as error:
        raise ReportSchemaError(f"{path}: {error}") from None
