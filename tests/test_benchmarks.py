"""Benchmark readers: simple pair lists and insightface .bin files, the latter without unsafe unpickling."""

import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from helpers import recipe_dict, synthetic_dataset

from factory.benchmarks import read_insightface_bin, read_pairs
from factory.errors import FactoryError
from factory.evaluation import load_evaluation_set
from factory.recipe import load_recipe


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([b"x", b"y"], [Exploit(marker)])))
    with pytest.raises(FactoryError, match="refused to load global"):
        read_insightface_bin(evil)
    assert not marker.exists()
    numpy_payload = tmp_path / "numpy.bin"
    numpy_payload.write_bytes(pickle.dumps(([b"x", b"y"], np.array([True]))))
    with pytest.raises(FactoryError, match="refused to load global"):
        read_insightface_bin(numpy_payload)


@pytest.mark.parametrize("protocol", [2, 4])
def test_insightface_bin_evaluates_like_an_image_folder(tmp_path: Path, protocol: int) -> None:
    root = synthetic_dataset(tmp_path / "faces")
    folder_recipe = recipe_dict(root)
    pairs = load_evaluation_set(_load(tmp_path / "a.yaml", folder_recipe)).pairs
    blobs, flags = [], []
    for pair in pairs:
        blobs += [cv2.imencode(".jpg", cv2.imread(str(p)))[1].tobytes() for p in (pair.path_a, pair.path_b)]
        flags.append(pair.same)
    (root / "set.bin").write_bytes(pickle.dumps((blobs, flags), protocol=protocol))
    bin_recipe = recipe_dict(root)
    bin_recipe["data"]["evaluation"]["pairs"] = "set.bin"
    evaluation = load_evaluation_set(_load(tmp_path / "b.yaml", bin_recipe))
    assert evaluation.same.tolist() == flags
    assert evaluation.pixels_nhwc.shape == (2 * len(flags), 112, 112, 3)
    assert sorted(set(evaluation.folds.tolist())) == list(range(10))


def test_simple_pair_list_and_its_errors(tmp_path: Path) -> None:
    lines = [f"a/{i}.jpg b/{i}.jpg {i % 2}" for i in range(20)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pairs = read_pairs(tmp_path / "pairs.txt", tmp_path)
    assert len(pairs) == 20 and sum(p.same for p in pairs) == 10
    assert [p.fold for p in pairs[:4]] == [0, 0, 1, 1] and pairs[0].path_a == tmp_path / "a/0.jpg"
    (tmp_path / "bad.txt").write_text("a.jpg b.jpg maybe\n")
    with pytest.raises(FactoryError, match=r"bad\.txt:1: expected 'path_a path_b same'"):
        read_pairs(tmp_path / "bad.txt", tmp_path)


def _load(path: Path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)
