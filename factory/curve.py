"""Learning curve: held-out accuracy against the amount of training data and the number of epochs.

`python -m factory curve RECIPE --fractions 0.25 0.5 1 --epochs 4` trains the recipe's model once per
share of the training identities (a seeded subset, all images of each chosen identity), scores it on
the recipe's evaluation pairs after every epoch, and writes `learning_curve.{json,md,png}` into the
recipe's report folder. The runs' weights stay in `reports/<recipe>/.curve/` (resumable, not shipped).
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from factory.deploy import Embedder
from factory.errors import FactoryError
from factory.evaluation import EvaluationSet, load_evaluation_set, load_pair_set, torch_embeddings
from factory.io import atomic_path, display_path, write_text_atomic
from factory.models import load_backbone
from factory.recipe import Recipe


def pair_scorer(recipe: Recipe, evaluation: EvaluationSet) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Scores a backbone on `evaluation` with the recipe's deployed preprocessing (10-fold accuracy)."""
    spec = recipe.model.input
    pixels = evaluation.pixels("NCHW")

    def score(backbone: torch.nn.Module) -> dict[str, float]:
        embedder = Embedder(backbone.eval(), spec.mean, spec.std, recipe.model.embedding_size).eval()
        result = evaluation.verification(torch_embeddings(embedder, pixels))
        return {"lfw_accuracy": result["accuracy"], "lfw_accuracy_std": result["accuracy_std"],
                "pairs": len(evaluation.pairs)}

    return score


def learning_curve(
    recipe: Recipe,
    fractions: Sequence[float],
    epochs: int,
    out_dir: Path,
    device: str = "auto",
    log: Callable[[str], None] = print,
    pairs_per_epoch: int | None = 1200,
) -> dict:
    """Train one model per identity fraction, scoring every epoch; write the curve files.

    Args:
        pairs_per_epoch: Score the epochs on this many of the evaluation pairs (a fold-balanced subset, to
            keep CPU curves affordable); each run's final model is also scored on every pair. None: all.

    Returns:
        The curve as written to `learning_curve.json`.
    """
    from factory.train import train

    if recipe.train is None:
        raise FactoryError(f"recipe {recipe.name!r} has no 'train' section; a learning curve needs one")
    if epochs <= 0 or not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise FactoryError("--epochs must be positive and every --fractions value in (0, 1]")
    evaluation = load_evaluation_set(recipe)
    score_all = pair_scorer(recipe, evaluation)
    cfg = recipe.data.evaluation
    per_epoch = evaluation if pairs_per_epoch is None else load_pair_set(recipe, cfg.pairs, cfg.images, pairs_per_epoch)
    score = pair_scorer(recipe, per_epoch)
    curve = {
        "recipe": recipe.name,
        "command": f"python -m factory curve {display_path(recipe.path)} --fractions "
                   f"{' '.join(f'{f:g}' for f in fractions)} --epochs {epochs} "
                   f"--pairs-per-epoch {pairs_per_epoch or 0}",
        "evaluation": {"pairs": recipe.data.evaluation.pairs, "count": len(evaluation.pairs),
                       "per_epoch_count": len(per_epoch.pairs),
                       "protocol": "10-fold verification accuracy, fp32 PyTorch"},
        "train_config": dataclasses.asdict(recipe.train) | {"epochs": epochs, "warmup_steps": "scaled per run"},
        "host": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "runs": [],
    }
    curve["shipped"] = _shipped_point(recipe, score_all)
    for fraction in sorted(fractions):
        # The warm-up keeps its share of the recipe's schedule, which shrinks with data and epochs.
        warmup = max(1, round(recipe.train.warmup_steps * fraction * epochs / recipe.train.epochs))
        run_recipe = dataclasses.replace(recipe, train=dataclasses.replace(
            recipe.train, epochs=epochs, identity_fraction=fraction, warmup_steps=warmup))
        weights = out_dir / ".curve" / f"fraction-{fraction:g}-epochs-{epochs}.safetensors"
        log(f"--- {fraction:g} of the training identities, {epochs} epochs")
        summary = train(run_recipe, weights, device=device, evaluate=score, log=log, evaluate_every_epoch=True)
        final = score_all(load_backbone(recipe, weights))
        curve["runs"].append({
            "identity_fraction": fraction,
            "images": summary["images"],
            "identities": summary["identities"],
            "device": summary["device"],
            "train_time_s": summary["wall_time_s"],
            "epochs": [{"epoch": h["epoch"], "loss": h["loss"], "accuracy": h["evaluation"]["lfw_accuracy"],
                        "accuracy_std": h["evaluation"]["lfw_accuracy_std"]} for h in summary["history"]],
            "final_accuracy": final["lfw_accuracy"],
            "final_accuracy_std": final["lfw_accuracy_std"],
        })
        # Written after every run: a long curve interrupted later still leaves what it measured.
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "learning_curve.json", json.dumps(curve, indent=2) + "\n")
        _plot(curve, out_dir / "learning_curve.png")
        write_text_atomic(out_dir / "learning_curve.md", curve_markdown(curve))
    return curve


def _shipped_point(recipe: Recipe, score: Callable[[torch.nn.Module], dict[str, float]]) -> dict | None:
    """The recipe's own trained weights on every pair, with their training log, for comparison."""
    weights = recipe.resolve(recipe.weights.path)
    log_file = weights.with_suffix(".train.json")
    if not weights.is_file() or not log_file.is_file():
        return None
    training = json.loads(log_file.read_text())
    result = score(load_backbone(recipe))
    return {"weights": recipe.weights.path, "epochs": training["epochs"], "images": training["images"],
            "identities": training["identities"], "device": training["device"],
            "train_time_s": training["wall_time_s"], "accuracy": result["lfw_accuracy"],
            "accuracy_std": result["lfw_accuracy_std"]}


def curve_markdown(curve: dict) -> str:
    """The curve as Markdown: final accuracy per data size, then accuracy after every epoch."""
    ev = curve["evaluation"]
    lines = [
        f"# Learning curve: {curve['recipe']}",
        "",
        f"Produced by `{curve['command']}` on {curve['runs'][0]['device']}. Protocol: {ev['protocol']} on "
        f"`{ev['pairs']}` (no test identity is trained on). Each share of the training identities is its own "
        "run with the recipe's schedule compressed into the given epochs.",
        "",
        f"## After the last epoch ({ev['count']} pairs)",
        "",
        "| identities used | images | train time | accuracy |",
        "|---|---|---|---|",
    ]
    for run in curve["runs"]:
        lines.append(f"| {run['identities']} ({100 * run['identity_fraction']:.0f}%) | {run['images']} | "
                     f"{run['train_time_s'] / 60:.1f} min | "
                     f"{100 * run['final_accuracy']:.2f}% ± {100 * run['final_accuracy_std']:.2f} |")
    shipped = curve.get("shipped")
    if shipped:
        lines.append(f"| {shipped['identities']} (100%), shipped weights: {shipped['epochs']} epochs | "
                     f"{shipped['images']} | {shipped['train_time_s'] / 60:.1f} min | "
                     f"{100 * shipped['accuracy']:.2f}% ± {100 * shipped['accuracy_std']:.2f} |")
    lines += [
        "",
        f"## During training ({ev['per_epoch_count']} fold-balanced pairs, scored after every epoch)",
        "",
        "| identities used | epoch | train loss | accuracy |",
        "|---|---|---|---|",
    ]
    for run in curve["runs"]:
        for point in run["epochs"]:
            lines.append(f"| {run['identities']} | {point['epoch']} | {point['loss']:.2f} | "
                         f"{100 * point['accuracy']:.2f}% ± {100 * point['accuracy_std']:.2f} |")
    lines += ["", "![learning curve](learning_curve.png)", ""]
    return "\n".join(lines)


def _plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_epoch, by_data) = plt.subplots(1, 2, figsize=(10, 4))
    for run in curve["runs"]:
        epochs = [p["epoch"] for p in run["epochs"]]
        by_epoch.plot(epochs, [100 * p["accuracy"] for p in run["epochs"]], marker="o",
                      label=f"{run['identities']} identities ({run['images']} images)")
    by_epoch.set(xlabel="epoch", ylabel="LFW accuracy (%)",
                 title=f"during training ({curve['evaluation']['per_epoch_count']} pairs)")
    by_epoch.legend(fontsize=8)
    images = [run["images"] for run in curve["runs"]]
    final = [100 * run["final_accuracy"] for run in curve["runs"]]
    by_data.plot(images, final, marker="o", label=f"{curve['train_config']['epochs']} epochs")
    shipped = curve.get("shipped")
    if shipped:
        by_data.plot([shipped["images"]], [100 * shipped["accuracy"]], marker="*", markersize=12, linestyle="",
                     label=f"shipped weights, {shipped['epochs']} epochs")
    by_data.legend(fontsize=8)
    by_data.set_xscale("log")
    by_data.set(xlabel="training images (log scale)", ylabel="LFW accuracy (%)",
                title=f"after the last epoch ({curve['evaluation']['count']} pairs)")
    for axis in (by_epoch, by_data):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
