"""Training on a tiny synthetic set: resumable, deterministic, safetensors only."""

from pathlib import Path

import pytest
import torch
import yaml
from helpers import recipe_dict, synthetic_dataset

from factory.errors import FactoryError
from factory.models import create_model
from factory.recipe import load_recipe
from factory.train import train
from factory.weights import load_weights


class Interrupt(Exception):
    pass


def make_recipe(tmp_path: Path, epochs: int, weights: str):
    data = recipe_dict(synthetic_dataset(tmp_path / "faces"), weights=weights)
    data["train"].update(epochs=epochs, batch_size=8, learning_rate=0.01)
    path = tmp_path / f"{weights}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    straight = make_recipe(tmp_path, epochs=2, weights="straight.safetensors")
    summary = train(straight, straight.resolve("straight.safetensors"), device="cpu", log=lambda _: None)
    assert len(summary["history"]) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])

    resumed = make_recipe(tmp_path, epochs=2, weights="resumed.safetensors")
    output = resumed.resolve("resumed.safetensors")

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(resumed, output, device="cpu", log=stop_after_first_epoch)
    assert not output.exists(), "no final weights before training finished"
    lines: list[str] = []
    train(resumed, output, device="cpu", log=lines.append)
    assert any(line.startswith("resumed from") for line in lines)

    a = load_weights(create_model("mobilefacenet"), straight.resolve("straight.safetensors"))
    b = load_weights(create_model("mobilefacenet"), output)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, epochs=1, weights="w.safetensors")
    output = recipe.resolve("w.safetensors")
    train(recipe, output, device="cpu", log=lambda _: None)
    recipe.train.learning_rate = 0.5
    with pytest.raises(FactoryError, match="other training settings"):
        train(recipe, output, device="cpu", log=lambda _: None)


def test_train_cli_writes_weights_log_and_evaluation(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from helpers import REPO

    recipe = make_recipe(tmp_path, epochs=1, weights="cli.safetensors")
    result = subprocess.run([sys.executable, "-m", "factory", "train", str(recipe.path), "--device", "cpu",
                             "--threads", "1"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights written to" in result.stdout
    summary = json.loads(recipe.resolve("cli.train.json").read_text())
    assert summary["images"] == 24 and summary["identities"] == 4
    assert summary["evaluation"]["pairs"] == 12
    assert 0.0 <= summary["evaluation"]["lfw_accuracy"] <= 1.0
    load_weights(create_model("mobilefacenet"), recipe.resolve("cli.safetensors"))


def test_learning_curve_scores_every_epoch_of_each_identity_fraction(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from helpers import REPO

    recipe = make_recipe(tmp_path, epochs=1, weights="curve.safetensors")
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "factory", "curve", str(recipe.path), "--fractions", "0.5", "1",
                             "--epochs", "2", "--device", "cpu", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [(run["identities"], run["images"]) for run in curve["runs"]] == [(2, 12), (4, 24)]
    for run in curve["runs"]:
        assert [point["epoch"] for point in run["epochs"]] == [1, 2]
        assert all(0.0 <= point["accuracy"] <= 1.0 for point in run["epochs"])
        assert 0.0 <= run["final_accuracy"] <= 1.0
    assert (out / "learning_curve.png").stat().st_size > 10_000
    text = (out / "learning_curve.md").read_text()
    assert "| 2 (50%) | 12 |" in text and "| 4 | 2 |" in text
    assert not recipe.resolve("curve.safetensors").exists(), "the shipped weights are never touched"


def test_identity_fraction_is_validated(tmp_path: Path) -> None:
    data = recipe_dict(synthetic_dataset(tmp_path / "faces"))
    data["train"]["identity_fraction"] = 0.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FactoryError, match=r"train\.identity_fraction: a fraction in \(0, 1\], got 0.0"):
        load_recipe(path)
