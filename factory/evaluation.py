"""The held-out face set a build verifies on: pairs, their images, and the reference embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from factory.data import Pair, load_images, read_lfw_pairs, unique_pair_images
from factory.deploy import Embedder
from factory.errors import FactoryError
from factory.metrics import best_threshold, k_fold_accuracy, pair_similarities
from factory.recipe import Recipe, data_path


@dataclass
class EvaluationSet:
    """Pairs, the unique images they use (as pixel arrays), and pair indices into those images."""

    pairs: list[Pair]
    paths: list[Path]
    pixels_nhwc: np.ndarray
    index_a: np.ndarray
    index_b: np.ndarray
    same: np.ndarray
    folds: np.ndarray

    def pixels(self, layout: str) -> np.ndarray:
        """Float32 pixel values in [0, 255] in the given layout."""
        x = self.pixels_nhwc.astype(np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)

    def verification(self, embeddings: np.ndarray) -> dict[str, object]:
        """10-fold accuracy, best single threshold, and the pair similarities of `embeddings`."""
        similarities = pair_similarities(embeddings, self.index_a, self.index_b)
        folds = k_fold_accuracy(similarities, self.same, self.folds)
        threshold, _ = best_threshold(similarities, self.same)
        return {"similarities": similarities, "accuracy": folds["accuracy"],
                "accuracy_std": folds["accuracy_std"], "threshold": threshold}


def subsample_pairs(pairs: list[Pair], max_pairs: int) -> list[Pair]:
    """Keep the first pairs of each fold, as many same as different, `max_pairs` in all."""
    folds = sorted({p.fold for p in pairs})
    per_class = max(1, max_pairs // (2 * len(folds)))
    kept = []
    for fold in folds:
        for same in (True, False):
            kept.extend([p for p in pairs if p.fold == fold and p.same == same][:per_class])
    return kept


def load_evaluation_set(recipe: Recipe) -> EvaluationSet:
    """Read the recipe's pairs and every image they use; refuse too small a parity set."""
    cfg = recipe.data.evaluation
    pairs = read_lfw_pairs(data_path(recipe, cfg.pairs), data_path(recipe, cfg.images))
    if cfg.max_pairs is not None:
        pairs = subsample_pairs(pairs, cfg.max_pairs)
    paths = unique_pair_images(pairs)
    if len(paths) < cfg.min_parity_images:
        raise FactoryError(
            f"the evaluation pairs use {len(paths)} images, fewer than data.evaluation.min_parity_images "
            f"({cfg.min_parity_images}); use more pairs (max_pairs) or lower the minimum"
        )
    position = {path: i for i, path in enumerate(paths)}
    pixels = load_images(paths, recipe.model.input.size)
    if recipe.model.input.color_order == "BGR":
        pixels = np.ascontiguousarray(pixels[..., ::-1])
    return EvaluationSet(
        pairs=pairs,
        paths=paths,
        pixels_nhwc=pixels,
        index_a=np.array([position[p.path_a] for p in pairs]),
        index_b=np.array([position[p.path_b] for p in pairs]),
        same=np.array([p.same for p in pairs]),
        folds=np.array([p.fold for p in pairs]),
    )


def torch_embeddings(model: Embedder, pixels_nchw: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Embeddings of the PyTorch deployed graph, in batches."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(pixels_nchw), batch_size):
            outputs.append(model(torch.from_numpy(pixels_nchw[start : start + batch_size])).numpy())
    return np.concatenate(outputs)
