"""Parity of embeddings computed on a phone with the build's reference embeddings.

The same measures and gates as the factory's host verification (cosine mean / min / p1 per face,
decision flips over pairs at the reference threshold); the gates are read from the manifest's
resolved recipe and checked by the factory's own gate code (`factory.gates`), never restated here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from factory import gates

# A gate the phone cannot check: LFW accuracy needs the full 10-fold protocol, which the golden subset is not.
UNMEASURED = "not measured on the device (needs the full LFW protocol; see the host report)"


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def parity(embeddings: np.ndarray, reference: np.ndarray, pairs: list[list[int]], threshold: float
           ) -> dict[str, Any]:
    """Cosine summary per face and decision flips over `pairs` ([a, b, same]) at `threshold`."""
    if embeddings.shape != reference.shape:
        raise ValueError(f"device embeddings have shape {embeddings.shape}, the reference {reference.shape}")
    device, ref = _normalise(embeddings), _normalise(reference)
    cosine = np.sum(device * ref, axis=1)
    index_a = np.array([p[0] for p in pairs], dtype=np.int64)
    index_b = np.array([p[1] for p in pairs], dtype=np.int64)
    ref_similarity = np.sum(ref[index_a] * ref[index_b], axis=1)
    device_similarity = np.sum(device[index_a] * device[index_b], axis=1)
    flips = int(np.sum((ref_similarity > threshold) != (device_similarity > threshold)))
    return {"faces": len(cosine), "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "cosine_p1": float(np.percentile(cosine, 1)), "pairs": len(pairs), "flips": flips,
            "flip_rate": flips / len(pairs) if pairs else 0.0, "threshold": threshold}


def evaluate_gates(gate: dict[str, float | None] | None, measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Each configured gate with its measured value and whether it passed (`factory.gates.evaluate`).

    A gate on a value the phone cannot measure is listed as not measured rather than silently dropped.
    """
    return gates.evaluate(gate, measured, unmeasured=UNMEASURED)
