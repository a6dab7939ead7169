"""The types of the `lefv` kind's report section (report.json `pipeline`): the build checks its section against
them before the report is written, and the model card reads them. Same rules as `factory.report_schema`: an
unknown or missing key is an error with its JSON path. Artifacts are the common `Artifact`; parity and a
detector artifact's recall against its teacher stay metric mappings; `training` is the weights file's own
training summary, kept as written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from factory.report_schema import OPTIONAL, Artifact, LatencyStats


@dataclass
class DetectorInput:
    size: int
    letterbox: str
    mean: list[float]
    std: list[float]


@dataclass
class DetectorScore:
    """A detector scored against MTCNN (its teacher) on raw photos (`factory.lefv.detection.DetectionScore`)."""

    photos: int
    teacher_faces: int
    matched: int
    recall: float
    reference_recall: float
    reference_faces: int
    iou_mean: float
    iou_median: float
    landmark_nme_mean: float
    landmark_nme_median: float
    unconfirmed_detections: int
    unconfirmed_per_photo: float


@dataclass
class DetectorSection:
    architecture: str
    weights_sha256: str
    training: dict[str, Any] | None
    params: int
    macs: int
    input: DetectorInput
    held_out_photos: int
    calibration_canvases: int
    reference: DetectorScore
    pytorch_latency_ms: dict[str, LatencyStats]
    artifacts: list[Artifact]


@dataclass
class IdentityReport:
    """How well PyTorch's normaliser keeps identity on the evaluation set (`factory.lefv.normalisation`)."""

    faces: int
    identity_cosine_mean: float
    identity_cosine_median: float
    identity_cosine_p10: float
    accuracy_without: float
    accuracy_with: float
    accuracy_std_without: float
    accuracy_std_with: float
    threshold_with: float
    symmetry_error_before: float
    symmetry_error_after: float


@dataclass
class NormaliserSection:
    architecture: str
    weights_sha256: str
    training: dict[str, Any] | None
    params: int
    decoder_params: int
    macs: int
    parity_faces: int
    identity: IdentityReport
    pytorch_latency_ms: dict[str, LatencyStats]
    artifacts: list[Artifact]


@dataclass
class EndToEndRow:
    """One runtime's raw-photo-to-embedding run on one set of photos (`factory.lefv.stages.end_to_end`)."""

    photos_set: str
    normalised: bool
    runtime: str
    photos: int
    faces_found: int
    found_rate: float
    cosine_mean: float
    cosine_median: float
    cosine_p10: float
    same_person_rate: float
    threshold: float
    host_ms_per_photo_median: float | None
    missed: list[str]


@dataclass
class EndToEnd:
    photos: int
    held_out: int
    rows: list[EndToEndRow]


@dataclass
class LEFVSection:
    kind: str
    detector: DetectorSection
    end_to_end: EndToEnd
    normaliser: NormaliserSection | None = field(default=None, metadata=OPTIONAL)
