"""Report figures: ROC curves of all verified artifacts and reference-vs-artifact cosine histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt
import numpy as np

from factory.io import atomic_path


def roc_points(similarities: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-accept and true-accept rates at every threshold (descending similarity)."""
    order = np.argsort(-similarities)
    labels = same[order].astype(bool)
    tar = np.cumsum(labels) / max(1, labels.sum())
    far = np.cumsum(~labels) / max(1, (~labels).sum())
    return far, tar


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """One ROC plot (log FAR axis) with a curve per name: name -> (similarities, same), reference first."""
    figure, axis = plt.subplots(figsize=(7, 5), dpi=110)
    for index, (name, (similarities, same)) in enumerate(curves.items()):
        far, tar = roc_points(similarities, same)
        keep = far > 0
        # The first curve is the reference: dashed and on top, so identical artifacts stay visible under it.
        style = {"color": "black", "linestyle": "--", "zorder": 10} if index == 0 else {}
        axis.plot(far[keep], tar[keep], label=name, linewidth=1.4, **style)
    axis.set_xscale("log")
    axis.set_xlabel("false accept rate")
    axis.set_ylabel("true accept rate")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    _save(figure, path)


def plot_cosine_histograms(cosines: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Histogram of per-image reference-vs-artifact cosine, one panel per artifact."""
    count = max(1, len(cosines))
    figure, axes = plt.subplots(count, 1, figsize=(7, 1.8 * count + 0.6), dpi=110, squeeze=False)
    for axis, (name, values) in zip(axes[:, 0], cosines.items(), strict=False):
        # fp32 artifacts can agree to the last bit: give the bins a minimum width.
        low, high = min(values.min(), values.max() - 1e-6), values.max() + 1e-9
        axis.hist(values, bins=np.linspace(low, high, 61), color="tab:blue")
        axis.set_yscale("log")
        axis.set_title(f"{name}: mean {values.mean():.5f}, min {values.min():.5f}", fontsize=9)
    axes[-1, 0].set_xlabel("cosine(reference embedding, artifact embedding) per held-out face")
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
