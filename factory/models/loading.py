"""A recipe's network with its weights, and where those weights come from.

The one place that turns `model.architecture` + `weights` into a module: the build, the evaluators, the
ablation, the learning curve and the LEFV normaliser's encoder all load through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from factory.models.registry import create_model, model_entry
from factory.weights import load_weights, sha256_of, training_summary

if TYPE_CHECKING:  # the recipe sits above the models; it is only read here, never imported at run time
    from factory.recipe import Recipe


def load_backbone(recipe: Recipe, weights: Path | None = None, sha256: str | None = None) -> nn.Module:
    """The recipe's architecture in eval mode with its weights.

    Args:
        recipe: Names the architecture, its builder arguments and (unless `weights` is given) the weights file.
        weights: Another safetensors file of the same architecture (an ablation run, a learning-curve point).
        sha256: The digest `weights` must have, if known.

    An architecture imported with its pretrained weights brings them itself (its builder converts them).
    """
    model = create_model(recipe.model.architecture, **recipe.model.builder_kwargs())
    if weights is not None:
        return load_weights(model, weights, sha256).eval()
    if model_entry(recipe.model.architecture).imported is not None:
        return model.eval()
    return load_weights(model, recipe.resolve(recipe.weights.path), recipe.weights.sha256).eval()


def weights_provenance(recipe: Recipe) -> dict[str, Any]:
    """Where the recipe's weights come from, for the report: the trained file's sha256 and training log, or the
    imported source (repository, licence, training data, sha256 of each source file)."""
    imported = model_entry(recipe.model.architecture).imported
    if imported is None:
        path = recipe.resolve(recipe.weights.path)
        return {"weights_file": recipe.weights.path, "weights_sha256": sha256_of(path),
                "training": training_summary(path)}
    return {"weights_sha256": None, "training": None, "imported": {
        "source": imported.source, "licence": imported.licence, "training_data": imported.training_data,
        "input_normalisation": imported.input_normalisation,
        "files": {path.name: sha256_of(path) for path in imported.files()},
    }}
