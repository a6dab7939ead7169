"""The recipe's training ablation: other weights files of its architecture, scored by the build itself.

A recipe may list `ablation` runs (a label and a weights file each: e.g. the same student trained with labels
only, with each teacher, with both). The build scores every one on its own evaluation pairs with the fp32
PyTorch reference, reads how each was trained from the file's `factory train` metadata, and the model card
tabulates them next to the built weights. No number in the table is typed or copied from a training log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factory.deploy import Embedder
from factory.evaluation import EvaluationSet
from factory.models import load_backbone
from factory.recipe import Recipe
from factory.reference_cache import reference_embeddings
from factory.weights import sha256_of, training_summary


def training_row(training: dict[str, Any] | None) -> dict[str, Any]:
    """How a weights file was trained, in the terms of the ablation table (from its training metadata)."""
    training = training or {}
    cfg = training.get("train_config") or {}
    distill = cfg.get("distill") or {}
    outputs = distill.get("teacher_outputs")
    if outputs == "cached":
        outputs = f"cached, {distill.get('cached_views')} views a face"
    if outputs and distill.get("center_teachers"):
        outputs += ", centred"
    return {
        "teachers": list(distill.get("teachers") or []),
        "teacher_outputs": outputs,
        "augmentation": cfg.get("augmentation", "basic"),
        "started_from": Path(cfg["init_from"]).name if cfg.get("init_from") else None,
        "started_from_sha256": training.get("init_from_sha256"),
        "epochs": training.get("epochs"),
        "train_minutes": round(training["wall_time_s"] / 60, 1) if training.get("wall_time_s") else None,
        "device": training.get("device"),
        "lfw_identity_free": all((training.get("teachers") or {}).get(name, {}).get("lfw_identity_free", False)
                                 for name in distill.get("teachers") or []),
    }


def ablation_rows(recipe: Recipe, evaluation: EvaluationSet) -> list[dict[str, Any]]:
    """Each of the recipe's `ablation` weights scored on `evaluation` (10-fold accuracy), with its training."""
    spec = recipe.model.input
    pixels = evaluation.pixels("NCHW") if recipe.ablation else None
    rows = []
    for run in recipe.ablation:
        path = recipe.resolve(run.weights.path)
        backbone = load_backbone(recipe, path, run.weights.sha256)
        embedder = Embedder(backbone, spec.mean, spec.std, recipe.model.embedding_size).eval()
        verification = evaluation.verification(reference_embeddings(embedder, pixels)[0])
        rows.append({
            "label": run.label, "weights": run.weights.path, "sha256": sha256_of(path),
            **training_row(training_summary(path)),
            "lfw_accuracy": verification["accuracy"], "lfw_accuracy_std": verification["accuracy_std"],
            "tar_at_far_1e-03": verification["tar_at_far_1e-03"],
        })
    return rows
