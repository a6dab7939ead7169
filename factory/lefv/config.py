"""LEFV's `pipeline:` recipe section: the face detector and the face normaliser, their training schedules and the
parity gates of their artifacts. Read by the recipe's schema reader (unknown keys, wrong types and values outside a
registry are reported like any recipe key); `check` adds the cross-field rules and files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from factory.recipe import ActivationObserver, Precision, Recipe, WeightsConfig


@dataclass
class DetectorTrainConfig:
    """The face detector's schedule: `steps` of AdamW (one-cycle learning rate) on batches of augmented photos."""

    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 0.002
    weight_decay: float = 0.0001
    seed: int = 0


@dataclass
class DetectorGateConfig:
    """Parity gates of one precision of a detector against its PyTorch fp32 output (None = not gated).

    agreement: share of PyTorch's detections on the held-out photos that the artifact also makes (IoU >= 0.5);
    box_iou_mean: mean IoU of those matched boxes; landmark_error_mean: mean landmark distance over the
    inter-ocular distance; map_cosine_mean: cosine of the output maps; recall_drop: how much lower the artifact's
    recall of MTCNN's faces is than PyTorch's.
    """

    agreement_min: float | None = None
    box_iou_mean_min: float | None = None
    landmark_error_mean_max: float | None = None
    map_cosine_mean_min: float | None = None
    recall_drop_max: float | None = None


def _default_detector_gates() -> dict[str, DetectorGateConfig]:
    return {
        "fp32": DetectorGateConfig(agreement_min=1.0, box_iou_mean_min=0.999, landmark_error_mean_max=0.002,
                                   recall_drop_max=0.0),
        "fp16": DetectorGateConfig(agreement_min=0.98, box_iou_mean_min=0.98, landmark_error_mean_max=0.02,
                                   recall_drop_max=0.02),
        "w8": DetectorGateConfig(agreement_min=0.95, box_iou_mean_min=0.95, landmark_error_mean_max=0.04,
                                 recall_drop_max=0.03),
        "int8": DetectorGateConfig(agreement_min=0.92, box_iou_mean_min=0.93, landmark_error_mean_max=0.07,
                                   recall_drop_max=0.035),
    }


@dataclass
class DetectorConfig:
    """A pipeline's face detector, taught by MTCNN on raw photos (see `factory.lefv.detection`).

    `photos` lists the raw photos (a `raw-samples/landmarks.csv`-style file under data.root); every
    `held_out_every`-th of them, in path order, is never trained on and scores the detector. `observer` chooses
    its int8 activation ranges (`factory.observers`); None: the recipe's `data.calibration.observer`.
    """

    weights: WeightsConfig
    photos: str = "raw-samples/landmarks.csv"
    held_out_every: int = 5
    input_size: int = 192
    observer: ActivationObserver | None = None
    train: DetectorTrainConfig = field(default_factory=DetectorTrainConfig)
    gates: dict[Precision, DetectorGateConfig] = field(default_factory=_default_detector_gates)


@dataclass
class NormaliserTrainConfig:
    """The face normaliser's GAN schedule (Adam, both networks) and loss weights (see `factory.lefv.normalisation`).

    `frontal_fraction`: the most frontal share of the training faces (by the landmarks' yaw) is what the
    discriminator learns as real, normalised faces.
    """

    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 0.0002
    adversarial_weight: float = 0.05
    identity_weight: float = 1.0
    pixel_weight: float = 1.0
    symmetry_weight: float = 0.3
    frontal_fraction: float = 0.3
    seed: int = 0


@dataclass
class NormaliserGateConfig:
    """Parity gates of one precision of a normaliser against its PyTorch fp32 output (None = not gated).

    embedding_cosine_mean: cosine between the recogniser's (PyTorch) embeddings of the artifact's output and of
    PyTorch's output; pixel_error_mean: mean absolute difference of the output pixels, in 0-255 levels.
    """

    embedding_cosine_mean_min: float | None = None
    pixel_error_mean_max: float | None = None


def _default_normaliser_gates() -> dict[str, NormaliserGateConfig]:
    return {
        "fp32": NormaliserGateConfig(embedding_cosine_mean_min=0.9999, pixel_error_mean_max=0.1),
        "fp16": NormaliserGateConfig(embedding_cosine_mean_min=0.999, pixel_error_mean_max=1.0),
        "w8": NormaliserGateConfig(embedding_cosine_mean_min=0.99, pixel_error_mean_max=3.0),
        "int8": NormaliserGateConfig(embedding_cosine_mean_min=0.98, pixel_error_mean_max=4.0),
    }


@dataclass
class NormaliserConfig:
    """A pipeline's face normaliser (an encoder-decoder GAN generator, see `factory.lefv.normalisation`).

    `encoder` is the trained MobileFaceNet whose frozen layers encode the face (and whose embedding the identity
    loss compares); `parity_faces` held-out evaluation faces check each artifact against PyTorch. `observer`
    chooses its int8 activation ranges (`factory.observers`); None: the recipe's `data.calibration.observer`.
    """

    weights: WeightsConfig
    encoder: WeightsConfig
    parity_faces: int = 500
    observer: ActivationObserver | None = None
    train: NormaliserTrainConfig = field(default_factory=NormaliserTrainConfig)
    gates: dict[Precision, NormaliserGateConfig] = field(default_factory=_default_normaliser_gates)


@dataclass
class LEFVPipelineConfig:
    """The recipe's `pipeline:` section with `kind: lefv`: the stages that run before the recogniser (the recipe's
    `model`) on raw photos."""

    kind: str
    detector: DetectorConfig
    normaliser: NormaliserConfig | None = None


def check(recipe: Recipe, problems: list[str]) -> None:
    """Cross-field rules and files of a recipe's LEFV section, appended to `problems`."""
    config: LEFVPipelineConfig = recipe.pipeline
    detector = config.detector
    if detector.input_size <= 0 or detector.input_size % 16:
        problems.append(f"pipeline.detector.input_size: must be a positive multiple of 16, "
                        f"got {detector.input_size}")
    if detector.held_out_every < 2:
        problems.append(f"pipeline.detector.held_out_every: at least 2 (every n-th photo is held out), "
                        f"got {detector.held_out_every}")
    for name in ("steps", "batch_size"):
        if getattr(detector.train, name) <= 0:
            problems.append(f"pipeline.detector.train.{name}: must be positive")
    photos = recipe.resolve(str(Path(recipe.data.root) / detector.photos))
    if not photos.is_file():
        problems.append(f"pipeline.detector.photos: file not found: {photos}")
    normaliser = config.normaliser
    if normaliser is not None:
        train = normaliser.train
        for name in ("steps", "batch_size", "learning_rate", "parity_faces"):
            if getattr(train if name != "parity_faces" else normaliser, name) <= 0:
                problems.append(f"pipeline.normaliser.{'' if name == 'parity_faces' else 'train.'}{name}: "
                                "must be positive")
        if not 0.0 < train.frontal_fraction <= 1.0:
            problems.append(f"pipeline.normaliser.train.frontal_fraction: a fraction in (0, 1], "
                            f"got {train.frontal_fraction}")
        for name in ("adversarial_weight", "identity_weight", "pixel_weight", "symmetry_weight"):
            if getattr(train, name) < 0:
                problems.append(f"pipeline.normaliser.train.{name}: must be 0 or more")
        encoder = recipe.resolve(normaliser.encoder.path)
        if not encoder.is_file():
            problems.append(f"pipeline.normaliser.encoder.path: file not found: {encoder} (a trained "
                            "MobileFaceNet's weights: `python -m factory train recipes/mobilefacenet.yaml`)")
