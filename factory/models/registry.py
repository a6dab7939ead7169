"""The model registry: the single list of architectures the factory can build."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from factory.errors import FactoryError

# Exact layer tables reproduce a paper's params and MACs to about 1%; 2% leaves room for counting conventions.
DEFAULT_TOLERANCE = 0.02


@dataclass(frozen=True)
class ImportedWeights:
    """Where an imported architecture's pretrained weights come from; its builder returns the network with them.

    A recipe for such a model has no `weights` or `train` section: the builder converts the source files each
    time, so only the files' checksums are recorded (the converted weights are never stored).

    Attributes:
        source: The public repository, commit and folder the files come from.
        licence: Licence of the weights.
        training_data: What the weights were trained on, as far as published (and whether it may share
            identities with LFW, which decides how far an LFW score can be trusted).
        files: Callable returning the verified source files (raises `FactoryError` naming how to get them).
        input_normalisation: The pixel normalisation the imported graph applies itself, if any; the recipe's
            `model.input` mean and std must then be 0 and 1, so that no pixel is normalised twice.
    """

    source: str
    licence: str
    training_data: str
    files: Callable[[], list[Path]]
    input_normalisation: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    Attributes:
        name: Registry key used by recipes (`model.architecture`).
        builder: Callable returning an `nn.Module` that maps an NCHW image batch to embeddings.
        paper: Citation of the paper the architecture follows.
        paper_numbers: Published figures (params_m, macs_m, lfw_accuracy, ...) for comparison.
        paper_kwargs: Builder keyword arguments under which `paper_numbers` hold, where the paper's network
            differs from the factory's default build (e.g. a 512-D embedding instead of 128-D).
        channels_last_training: Whether training on CPU runs faster with channels-last tensors (true for plain
            convolution stacks; false where channel splits and shuffles make it slower).
        tolerance: Relative deviation from each of `paper_numbers` that the tests accept (default
            `DEFAULT_TOLERANCE`); wider where a paper prints rounded figures such as "1.3M".
        imported: For an architecture imported with its pretrained weights, where they come from; None for
            architectures the factory trains (their weights are the recipe's `weights.path`).
    """

    name: str
    builder: Callable[..., nn.Module]
    paper: str
    paper_numbers: dict[str, float] = field(default_factory=dict)
    paper_kwargs: dict[str, object] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    channels_last_training: bool = True
    imported: ImportedWeights | None = None

    def tolerance_of(self, key: str) -> float:
        """Accepted relative deviation from `paper_numbers[key]`."""
        return self.tolerance.get(key, DEFAULT_TOLERANCE)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    paper: str,
    paper_numbers: dict[str, float] | None = None,
    paper_kwargs: dict[str, object] | None = None,
    tolerance: dict[str, float] | None = None,
    channels_last_training: bool = True,
    imported: ImportedWeights | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model builder to the registry under `name` (see `ModelEntry` for the fields)."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(
            name, builder, paper, dict(paper_numbers or {}), dict(paper_kwargs or {}), dict(tolerance or {}),
            channels_last_training, imported,
        )
        return builder

    return decorate


def model_names() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """Registry entry for `name`; the error lists what is registered."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FactoryError(
            f"unknown model architecture {name!r}; registered: {', '.join(model_names())}"
        ) from None


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Instantiate the registered model `name` with builder keyword arguments."""
    return model_entry(name).builder(**kwargs)
