"""`factory eval` scores the PyTorch model and a built artifact with the same code path."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, recipe_dict, settle_batchnorm, synthetic_dataset

from factory.models import create_model
from factory.targets import CompileRequest, get_target
from factory.weights import save_weights


def run_eval(recipe: Path, out: Path, *extra: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "factory", "eval", str(recipe), "--json", str(out), *extra],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy" in result.stdout
    return json.loads(out.read_text())


def test_pytorch_and_tflite_fp32_score_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = settle_batchnorm(create_model("mobilefacenet"), torch.randn(16, 3, 112, 112))
    save_weights(model, tmp_path / "w.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(synthetic_dataset(tmp_path / "faces"))))

    reference = run_eval(recipe, tmp_path / "ref.json")
    assert reference["pairs"] == 12 and reference["images"] > 12
    assert reference["tar_at_far_1e-03"] is None, "6 impostor pairs cannot measure FAR 1e-3"

    target = get_target("tflite")
    calibration = np.zeros((1, 3, 112, 112), np.float32)
    artifact = target.compile(CompileRequest(model, [127.5] * 3, [128.0] * 3, 128, "fp32", calibration,
                                             tmp_path / "m_fp32.tflite")).path
    scored = run_eval(recipe, tmp_path / "art.json", "--artifact", str(artifact))
    assert scored["subject"].startswith("m_fp32.tflite")
    assert scored["accuracy"] == reference["accuracy"]
    assert scored["threshold"] == pytest.approx(reference["threshold"], abs=1e-4)

    flipped = run_eval(recipe, tmp_path / "flip.json", "--flip")
    assert flipped["flip_test"] is True and 0.0 <= flipped["accuracy"] <= 1.0


def test_eval_of_a_missing_artifact_is_a_clear_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    data = recipe_dict(synthetic_dataset(tmp_path / "faces"))
    recipe.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "factory", "eval", str(recipe), "--artifact", "nope.tflite"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "artifact not found: nope.tflite" in result.stderr


def test_fold_balanced_subset_keeps_its_pairs_images_and_reference_rows() -> None:
    import numpy as np

    from factory.data import Pair
    from factory.evaluation import EvaluationSet

    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(10), 20)
    same = np.tile(np.repeat([True, False], 10), 10)
    index_a, index_b = rng.integers(0, 150, 200), rng.integers(0, 150, 200)
    paths = [Path(f"img{i}.jpg") for i in range(150)]
    full = EvaluationSet(
        pairs=[Pair(paths[a], paths[b], bool(s), int(f))
               for a, b, s, f in zip(index_a, index_b, same, folds, strict=True)],
        paths=paths, pixels_nhwc=np.arange(150, dtype=np.uint8).reshape(150, 1, 1, 1),
        index_a=index_a, index_b=index_b, same=same, folds=folds,
    )
    subset, images = full.subset(60)
    assert len(subset.pairs) == 60 and subset.same.sum() == 30
    assert np.bincount(subset.folds).tolist() == [6] * 10
    embeddings = rng.normal(size=(150, 8))
    # The subset's pairs point at the same images as the full set's pairs they came from.
    for k, pair in enumerate(subset.pairs):
        assert subset.paths[subset.index_a[k]] == pair.path_a and subset.paths[subset.index_b[k]] == pair.path_b
        assert int(subset.pixels_nhwc[subset.index_a[k], 0, 0, 0]) == paths.index(pair.path_a)
    sims_subset = subset.verification(embeddings[images])["similarities"]
    sims_full = full.verification(embeddings)["similarities"]
    chosen = [k for k, p in enumerate(full.pairs) if p in subset.pairs]
    assert np.allclose(np.sort(sims_subset), np.sort(sims_full[chosen]))
