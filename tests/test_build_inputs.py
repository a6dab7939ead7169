"""Calibration and evaluation inputs are checked before anything is compiled."""

from pathlib import Path

import pytest
import yaml
from helpers import recipe_dict, synthetic_dataset

from factory.build import load_calibration
from factory.errors import FactoryError
from factory.evaluation import load_evaluation_set
from factory.recipe import load_recipe


def make(tmp_path: Path, **calibration):
    data = recipe_dict(synthetic_dataset(tmp_path / "faces"))
    data["data"]["calibration"].update(calibration)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_calibration_refuses_images_that_are_also_evaluated(tmp_path: Path) -> None:
    recipe = make(tmp_path, count=24)
    evaluation = load_evaluation_set(recipe)
    assert len(evaluation.pairs) == 12 and evaluation.pixels("NHWC").shape[1:] == (112, 112, 3)
    with pytest.raises(FactoryError, match="also evaluation images"):
        load_calibration(recipe, {p.resolve() for p in evaluation.paths})


def test_calibration_refuses_a_split_smaller_than_the_count(tmp_path: Path) -> None:
    recipe = make(tmp_path, count=100)
    with pytest.raises(FactoryError, match=r"lists 24 faces but data\.calibration\.count asks for 100"):
        load_calibration(recipe, set())
    pixels, paths = load_calibration(make(tmp_path / "ok", count=16), set())
    assert pixels.shape == (16, 3, 112, 112) and len(set(paths)) == 16


def test_evaluation_refuses_too_few_parity_images(tmp_path: Path) -> None:
    recipe = make(tmp_path)
    recipe.data.evaluation.min_parity_images = 1000
    with pytest.raises(FactoryError, match=r"fewer than data\.evaluation\.min_parity_images"):
        load_evaluation_set(recipe)
