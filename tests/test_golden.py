"""Golden faces for on-device parity: whole pairs, both kinds, files that match the manifest entry."""

from pathlib import Path

import numpy as np

from factory.evaluation import EvaluationSet
from factory.golden import select_golden, write_golden
from factory.weights import sha256_of
from mobile_harness.manifest import load_golden


def evaluation_set(images: int = 12) -> EvaluationSet:
    rng = np.random.default_rng(0)
    # Pairs (0,1) (2,3) ... same identity, then (0,2) (1,3) ... different; image 0 is in several pairs.
    index_a = np.array([0, 2, 4, 6, 8, 10, 0, 1, 4, 5])
    index_b = np.array([1, 3, 5, 7, 9, 11, 2, 3, 6, 7])
    same = np.array([True] * 6 + [False] * 4)
    return EvaluationSet(pairs=[], paths=[Path(f"lfw/p{i}/p{i}_0001.jpg") for i in range(images)],
                         pixels_nhwc=rng.integers(0, 256, size=(images, 4, 4, 3), dtype=np.uint8),
                         index_a=index_a, index_b=index_b, same=same, folds=np.zeros(len(same), dtype=np.int64))


def test_golden_takes_whole_pairs_alternating_same_and_different() -> None:
    evaluation = evaluation_set()
    images, pairs = select_golden(evaluation, count=5)
    assert images == [0, 1, 2, 3]
    assert pairs == [[0, 1, 1], [0, 2, 0], [2, 3, 1], [1, 3, 0]]
    assert {p[2] for p in pairs} == {0, 1}


def test_golden_files_hold_the_chosen_faces_in_both_layouts(tmp_path: Path) -> None:
    evaluation = evaluation_set()
    reference = np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32)
    entry = write_golden(tmp_path, evaluation, reference, threshold=0.3, count=6)
    chosen = [int(name.split("/")[0][1:]) for name in entry["images"]]
    nhwc = np.fromfile(tmp_path / entry["inputs"]["NHWC"]["file"], dtype=np.float32).reshape(6, 4, 4, 3)
    nchw = np.fromfile(tmp_path / entry["inputs"]["NCHW"]["file"], dtype=np.float32).reshape(6, 3, 4, 4)
    assert np.array_equal(nhwc, evaluation.pixels_nhwc[chosen].astype(np.float32))
    assert np.array_equal(nchw, nhwc.transpose(0, 3, 1, 2))
    assert entry["reference"]["sha256"] == sha256_of(tmp_path / "golden" / "reference.bin")
    golden = load_golden(tmp_path, {"golden": entry})
    assert golden.faces == 6 and np.array_equal(golden.reference, reference[chosen])
    assert golden.threshold == 0.3 and golden.pairs == entry["pairs"]
