"""The model registry: the single list of architectures the factory can build."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from factory.errors import FactoryError


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    Attributes:
        name: Registry key used by recipes (`model.architecture`).
        builder: Callable returning an `nn.Module` that maps an NCHW image batch to embeddings.
        paper: Citation of the paper the architecture follows.
        paper_numbers: Published figures (params_m, macs_m, lfw_accuracy, ...) for comparison.
    """

    name: str
    builder: Callable[..., nn.Module]
    paper: str
    paper_numbers: dict[str, float] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, paper: str, paper_numbers: dict[str, float] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model builder to the registry under `name`."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, paper, dict(paper_numbers or {}))
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
