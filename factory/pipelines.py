"""Pipeline kinds: stages that run before the recogniser on raw photos (a detector, a normaliser, ...), plugged in.

A recipe's `pipeline:` section names its kind (`kind: <name>`); the kind reads the rest of the section into its
own config, checks it, builds and verifies its stages (through `factory.artifacts.compile_and_verify`, like the
recogniser), renders its model-card sections and trains its stages. The generic build, recipe, report and CLI only
talk to this interface, so they name no seed system.

Kinds are found through the `factory.pipelines` entry-point group of the installed packages (this project's own
`pyproject.toml` declares its kinds there, so a separate package can add one the same way), and through
`register_pipeline` (tests, notebooks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.errors import FactoryError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from factory.evaluation import EvaluationSet
    from factory.recipe import Recipe, WeightsConfig
    from factory.stages import StageLog

ENTRY_POINT_GROUP = "factory.pipelines"


@dataclass(frozen=True)
class PipelineInputs:
    """What the build hands a pipeline kind once the recogniser's artifacts are built and verified.

    `recognisers`: by "format precision", a function loading that recogniser artifact's runner, and the input
    layout it takes ("NCHW" or "NHWC").
    """

    recipe: Recipe
    out: Path
    log: StageLog
    printer: Callable[[str], None]
    evaluation: EvaluationSet
    calibration: np.ndarray
    reference_model: nn.Module
    reference_threshold: float
    recognisers: Mapping[str, tuple[Callable[[], Callable[[np.ndarray], np.ndarray]], str]]


@dataclass(frozen=True)
class PipelineOutput:
    """The kind's report section (report.json `pipeline`, with its `kind`) and the report entries of every
    artifact it built, whose gates join the build's verdict."""

    section: dict[str, Any]
    artifacts: list[dict[str, Any]]


@dataclass(frozen=True)
class TrainableStage:
    """A pipeline stage `python -m factory train RECIPE --stage NAME` trains: its weights entry in the kind's
    config (None where the recipe leaves the stage out) and the trainer (recipe, output path) -> training summary
    (with `wall_time_s` and `device`)."""

    weights: Callable[[Any], WeightsConfig | None]
    train: Callable[[Recipe, Path], dict[str, Any]]


@dataclass(frozen=True)
class PipelineKind:
    """One pipeline kind.

    config: the dataclass the recipe's `pipeline:` mapping is read into (by the recipe's own schema reader); it
        has a `kind: str` field.
    check: cross-field rules and files of that config, appended to the recipe's problems.
    build: builds and verifies the stages; returns the report section and its artifacts.
    card_lines: the model card's sections for the report section (markdown lines).
    summary: one line about the report section for `python -m factory list`.
    stages: the stages `train --stage` can train, by name.
    """

    name: str
    description: str
    config: type
    check: Callable[[Recipe, list[str]], None]
    build: Callable[[PipelineInputs], PipelineOutput]
    card_lines: Callable[[dict[str, Any]], list[str]]
    summary: Callable[[dict[str, Any]], str]
    stages: Mapping[str, TrainableStage] = field(default_factory=dict)

    def weights(self, config: Any) -> list[WeightsConfig]:
        """The weights files of the stages a recipe's config builds."""
        return [w for stage in self.stages.values() if (w := stage.weights(config)) is not None]


_REGISTERED: dict[str, PipelineKind] = {}
_INSTALLED: dict[str, PipelineKind] | None = None


def register_pipeline(kind: PipelineKind) -> PipelineKind:
    """Add a kind by hand (the installed ones come from entry points); returns it."""
    _REGISTERED[kind.name] = kind
    return kind


def unregister_pipeline(name: str) -> None:
    _REGISTERED.pop(name, None)


def _installed() -> dict[str, PipelineKind]:
    global _INSTALLED
    if _INSTALLED is None:
        found = {}
        for point in entry_points(group=ENTRY_POINT_GROUP):
            kind = point.load()
            if not isinstance(kind, PipelineKind) or kind.name != point.name:
                raise FactoryError(f"entry point {point.name} = {point.value} in group {ENTRY_POINT_GROUP} is not a "
                                   f"PipelineKind named {point.name!r}; fix the package that declares it")
            found[point.name] = kind
        _INSTALLED = found
    return _INSTALLED


def pipeline_kinds() -> dict[str, PipelineKind]:
    """Every known kind by name (installed, then registered by hand)."""
    return {**_installed(), **_REGISTERED}


def pipeline_kind(name: str) -> PipelineKind:
    kinds = pipeline_kinds()
    if name not in kinds:
        known = ", ".join(sorted(kinds)) or "none (is the project installed? `pip install -e .` declares its kinds)"
        raise FactoryError(f"pipeline kind {name!r} is not registered; registered: {known}")
    return kinds[name]
