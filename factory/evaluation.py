"""The held-out face set a build verifies on: pairs, their images, and the reference embeddings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from factory.benchmarks import FOLDS, decode_images, read_insightface_bin, read_pairs
from factory.data import Pair, load_images, unique_pair_images
from factory.deploy import Embedder
from factory.errors import FactoryError
from factory.metrics import best_threshold, k_fold_accuracy, pair_similarities, tar_at_far
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

    _layouts: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def pixels(self, layout: str) -> np.ndarray:
        """Float32 pixel values in [0, 255] in the given layout, made once per layout and shared: callers must
        not modify the array. (A build asks for the 7,701 LFW faces a dozen times; the NCHW transpose alone
        took 2.5-5 s each time.)"""
        if layout not in self._layouts:
            x = self.pixels_nhwc.astype(np.float32)
            self._layouts[layout] = np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)
        return self._layouts[layout]

    def subset(self, max_pairs: int) -> tuple[EvaluationSet, np.ndarray]:
        """A fold-balanced subset of about `max_pairs` pairs, and the indices of its images in this set."""
        chosen = np.sort(balanced_pair_indices(self.same, self.folds, max_pairs))
        images = np.unique(np.concatenate([self.index_a[chosen], self.index_b[chosen]]))
        position = np.full(len(self.paths), -1)
        position[images] = np.arange(len(images))
        subset = EvaluationSet(
            pairs=[self.pairs[i] for i in chosen], paths=[self.paths[i] for i in images],
            pixels_nhwc=self.pixels_nhwc[images], index_a=position[self.index_a[chosen]],
            index_b=position[self.index_b[chosen]], same=self.same[chosen], folds=self.folds[chosen],
        )
        return subset, images

    def verification(self, embeddings: np.ndarray) -> dict[str, object]:
        """10-fold accuracy, TAR at FAR 1e-3 / 1e-4, best threshold, and the pair similarities.

        TAR values are None where the pair list has too few impostor pairs to reach that FAR.
        """
        similarities = pair_similarities(embeddings, self.index_a, self.index_b)
        folds = k_fold_accuracy(similarities, self.same, self.folds)
        threshold, _ = best_threshold(similarities, self.same)
        tars = {f"tar_at_far_{far:.0e}": tar_at_far(similarities, self.same, far) for far in (1e-3, 1e-4)}
        return {"similarities": similarities, "accuracy": folds["accuracy"],
                "accuracy_std": folds["accuracy_std"], "threshold": threshold,
                **{key: None if np.isnan(value) else value for key, value in tars.items()}}


def balanced_pair_indices(same: np.ndarray, folds: np.ndarray, max_pairs: int) -> np.ndarray:
    """Indices of the first pairs of each fold, as many same as different, about `max_pairs` in all."""
    fold_ids = np.unique(folds)
    per_class = max(1, max_pairs // (2 * len(fold_ids)))
    kept = [np.flatnonzero((folds == fold) & (same == flag))[:per_class] for fold in fold_ids for flag in (True, False)]
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def subsample_pairs(pairs: list[Pair], max_pairs: int) -> list[Pair]:
    """Keep the first pairs of each fold, as many same as different, `max_pairs` in all."""
    index = balanced_pair_indices(np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]), max_pairs)
    return [pairs[i] for i in index]


def load_evaluation_set(recipe: Recipe) -> EvaluationSet:
    """Read the recipe's evaluation pairs and every image they use; refuse too small a parity set."""
    cfg = recipe.data.evaluation
    evaluation = load_pair_set(recipe, cfg.pairs, cfg.images, cfg.max_pairs)
    if len(evaluation.paths) < cfg.min_parity_images:
        raise FactoryError(
            f"the evaluation pairs use {len(evaluation.paths)} images, fewer than data.evaluation.min_parity_images "
            f"({cfg.min_parity_images}); use more pairs (max_pairs) or lower the minimum"
        )
    return evaluation


def load_pair_set(recipe: Recipe, pairs_file: str, images: str, max_pairs: int | None = None) -> EvaluationSet:
    """Read a pairs file (LFW format, simple list or insightface .bin) under the data root, with its images."""
    return read_pair_set(data_path(recipe, pairs_file), data_path(recipe, images), recipe.model.input.size,
                         max_pairs, recipe.model.input.color_order)


def read_pair_set(pairs_path: Path, image_root: Path, size: int, max_pairs: int | None = None,
                  color_order: str = "RGB") -> EvaluationSet:
    """Read a pairs file (LFW format, simple list or insightface .bin) with its images, `size` x `size` pixels."""
    encoded: dict[Path, bytes] = {}
    if pairs_path.suffix == ".bin":
        blobs, flags = read_insightface_bin(pairs_path)
        encoded = {pairs_path.with_name(f"{pairs_path.name}#{i}"): blob for i, blob in enumerate(blobs)}
        keys = list(encoded)
        pairs = [Pair(keys[2 * i], keys[2 * i + 1], bool(flag), i * FOLDS // len(flags))
                 for i, flag in enumerate(flags)]
    else:
        pairs = read_pairs(pairs_path, image_root)
    if max_pairs is not None:
        pairs = subsample_pairs(pairs, max_pairs)
    paths = unique_pair_images(pairs)
    position = {path: i for i, path in enumerate(paths)}
    pixels = decode_images([encoded[p] for p in paths], size, pairs_path) if encoded else load_images(paths, size)
    if color_order == "BGR":
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


def flip_test(embed: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, layout: str) -> np.ndarray:
    """Flip-test embeddings: embedding of each image plus that of its mirror image."""
    width_axis = 3 if layout == "NCHW" else 2
    return embed(pixels) + embed(np.ascontiguousarray(np.flip(pixels, axis=width_axis)))


# Faces per reference forward pass. Eager PyTorch on the 2-core build machine runs MobileFaceNet at about
# 2.5 ms a face at batch 16 with channels-last input on 2 workers of 1 thread (`factory.parallel`), 3.4 ms on one
# worker of 2 threads, and 8.4 ms at batch 64 NCHW: small batches keep activations in cache, and oneDNN's
# channels-last depthwise convolutions are faster.
REFERENCE_BATCH = 16
REFERENCE_LAYOUT = "channels_last, 1 intra-op thread per batch"


def torch_embeddings(model: Embedder, pixels_nchw: np.ndarray, batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """Embeddings of the PyTorch deployed graph, in batches (channels-last input; the model is not changed)."""
    from factory.parallel import map_batches

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)).numpy()

    return map_batches(run, pixels_nchw, batch_size)


def evaluate(recipe: Recipe, artifact: Path | None = None, flip: bool = False) -> dict[str, object]:
    """Verification metrics of the recipe's PyTorch model, or of a built artifact, on the recipe's pairs.

    The same code computes the build report's numbers, so results are comparable across formats.
    """
    from factory.models import load_backbone
    from factory.targets import target_for_path, verification_runner

    evaluation = load_evaluation_set(recipe)
    spec = recipe.model.input
    if artifact is None:
        model = Embedder(load_backbone(recipe), spec.mean, spec.std, recipe.model.embedding_size).eval()
        weights = recipe.weights.path if recipe.weights is not None else "imported pretrained weights"
        layout, subject = "NCHW", f"PyTorch fp32 ({weights})"

        def embed(pixels: np.ndarray) -> np.ndarray:
            return torch_embeddings(model, pixels)
    else:
        if not artifact.exists():
            raise FactoryError(f"artifact not found: {artifact} — build it with `python -m factory build RECIPE`")
        target = target_for_path(artifact)
        runner = verification_runner(target, artifact)
        layout = "NHWC" if target.format == "tflite" else "NCHW"
        subject = f"{artifact.name} in {target.runtime_name}"
        embed = runner
    pixels = evaluation.pixels(layout)
    embeddings = flip_test(embed, pixels, layout) if flip else embed(pixels)
    result = evaluation.verification(embeddings)
    result.pop("similarities")
    return {"subject": subject, "pairs": len(evaluation.pairs), "images": len(evaluation.paths), "flip_test": flip,
            **result}
