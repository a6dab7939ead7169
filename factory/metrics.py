"""Verification metrics computed as papers compute them."""

from __future__ import annotations

import numpy as np


def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of `a` and `b`."""
    return np.sum(l2_normalise(a) * l2_normalise(b), axis=1)


def cosine_summary(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean, minimum and 1st percentile of row-wise cosine between two embedding sets."""
    cos = cosine_rows(a.astype(np.float64), b.astype(np.float64))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "cosine_p1": float(np.percentile(cos, 1))}


def best_threshold(similarities: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The threshold maximising accuracy of `similarity > threshold == same`, and that accuracy.

    Candidate thresholds are midpoints between consecutive sorted similarities (plus both ends), so
    the search is exact, not a grid.
    """
    order = np.argsort(similarities)
    sims, labels = similarities[order], same[order].astype(np.int64)
    # Predicting "same" for everything above index i: correct = different at or below + same above.
    different_below = np.concatenate([[0], np.cumsum(1 - labels)])
    same_above = labels.sum() - np.concatenate([[0], np.cumsum(labels)])
    correct = different_below + same_above
    best = int(np.argmax(correct))
    if best == 0:
        threshold = sims[0] - 1e-6
    elif best == len(sims):
        threshold = sims[-1] + 1e-6
    else:
        threshold = 0.5 * (sims[best - 1] + sims[best])
    return float(threshold), float(correct[best] / len(sims))


def accuracy_at(similarities: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """Fraction of pairs decided correctly at `threshold`."""
    return float(np.mean((similarities > threshold) == same.astype(bool)))


def k_fold_accuracy(similarities: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, float]:
    """LFW View-2 protocol: per fold, threshold chosen on the other folds, accuracy on this one.

    Returns:
        `accuracy` (mean over folds), `accuracy_std`, and `threshold` (mean of the fold thresholds).
    """
    accuracies, thresholds = [], []
    for fold in np.unique(folds):
        test = folds == fold
        threshold, _ = best_threshold(similarities[~test], same[~test])
        thresholds.append(threshold)
        accuracies.append(accuracy_at(similarities[test], same[test], threshold))
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "threshold": float(np.mean(thresholds)),
    }


def pair_similarities(embeddings: np.ndarray, index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair given row indices into `embeddings`."""
    normalised = l2_normalise(embeddings.astype(np.float64))
    return np.sum(normalised[index_a] * normalised[index_b], axis=1)


def flip_rate(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> tuple[float, int]:
    """Fraction and number of pairs whose same/different decision differs at `threshold`."""
    flips = int(np.sum((reference > threshold) != (candidate > threshold)))
    return flips / len(reference), flips


def tar_at_far(similarities: np.ndarray, same: np.ndarray, far: float) -> float:
    """True-accept rate at the threshold where at most `far` of different-identity pairs are accepted.

    The threshold is the similarity of the k-th highest impostor pair with k = floor(far * impostors);
    a pair is accepted when its similarity is strictly above it. With fewer impostor pairs than 1/far
    the operating point is not reachable and the result is NaN, not a guess.
    """
    impostors = np.sort(similarities[~same.astype(bool)])[::-1]
    genuine = similarities[same.astype(bool)]
    allowed = int(np.floor(far * len(impostors)))
    if len(impostors) == 0 or len(genuine) == 0 or far * len(impostors) < 1:
        return float("nan")
    threshold = impostors[allowed] if allowed < len(impostors) else -np.inf
    return float(np.mean(genuine > threshold))
