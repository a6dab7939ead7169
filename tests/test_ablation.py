"""The training ablation a recipe lists: weights scored by the build itself, training read from metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, shipped_recipe_dict

from factory.ablation import ablation_rows
from factory.evaluation import load_evaluation_set
from factory.recipe import load_recipe

WEIGHTS = REPO / "recipes" / "weights"


def _recipe(tmp_path: Path, faces_root: Path, ablation: list[dict]) -> Path:
    data = shipped_recipe_dict(faces_root)
    data["weights"] = {"path": str(WEIGHTS / "mobilefacenet_stage1.safetensors")}
    data["data"]["evaluation"].update(max_pairs=200, min_parity_images=300)
    data.pop("train")
    data["ablation"] = ablation
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.data
def test_ablation_scores_each_weights_file_and_reads_how_it_was_trained(tmp_path: Path, faces_root: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, faces_root, [
        {"label": "labels only", "weights": {"path": str(WEIGHTS / "mobilefacenet_labels.safetensors")}},
        {"label": "MobileFace V2", "weights": {"path": str(WEIGHTS / "mobilefacenet_stage1.safetensors")}},
    ]))
    labels, distilled = ablation_rows(recipe, load_evaluation_set(recipe))
    assert labels["teachers"] == [] and labels["lfw_identity_free"] and labels["started_from"] is None
    assert labels["sha256"] == "2f7c1f26c7784b5a52c41d9674b68dfb0af971d37a80748eede5afdde50b4771"
    assert distilled["teachers"] == ["mobileface_v2"] and not distilled["lfw_identity_free"]
    assert distilled["teacher_outputs"] == "cached, 8 views a face" and distilled["augmentation"] == "strong"
    # Stage 1 was trained from the label-only file under its old name; its sha256 says which file it was.
    assert distilled["started_from_sha256"] == labels["sha256"] and distilled["epochs"] == 14
    # On all 6,000 pairs: 84.55% and 95.90%; on these 200 fold-balanced pairs each must still sit near its own.
    assert 0.78 < labels["lfw_accuracy"] < 0.91 and distilled["lfw_accuracy"] > 0.92
    assert distilled["lfw_accuracy"] - labels["lfw_accuracy"] > 0.05


def test_ablation_entries_are_validated(tmp_path: Path) -> None:
    from helpers import recipe_dict, synthetic_dataset

    data = synthetic_dataset(tmp_path / "faces")
    recipe = recipe_dict(data, weights=str(WEIGHTS / "mobilefacenet_labels.safetensors"))
    path = tmp_path / "recipe.yaml"

    def problems(ablation: list[dict]) -> str:
        path.write_text(yaml.safe_dump({**recipe, "ablation": ablation}))
        result = subprocess.run([sys.executable, "-m", "factory", "validate", str(path)],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 2
        return result.stderr

    found = problems([{"label": "a", "weights": {"path": str(tmp_path / "missing.safetensors")}},
                      {"label": "a", "weights": {"path": str(WEIGHTS / "mobilefacenet_labels.safetensors")}}])
    assert "ablation[0].weights.path: file not found" in found and "ablation[1].label: 'a' is used twice" in found
    assert "ablation[0].label: required key is missing" in problems([{"weights": {"path": "x"}}])


def test_committed_model_card_tabulates_the_recipes_ablation() -> None:
    recipe = yaml.safe_load((REPO / "recipes" / "mobilefacenet.yaml").read_text())
    report = json.loads((REPO / "reports" / "mobilefacenet" / "report.json").read_text())
    assert [row["label"] for row in report["ablation"]] == [run["label"] for run in recipe["ablation"]]
    card = (REPO / "reports" / "mobilefacenet" / "report.md").read_text()
    assert "## Training ablation" in card
    for row in report["ablation"]:
        assert f"| {row['label']} |" in card
        assert 0.5 < row["lfw_accuracy"] <= report["reference"]["lfw_accuracy"] + 0.02
