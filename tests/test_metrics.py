import dataclasses

import numpy as np
import pytest

from factory import gates
from factory.lefv.config import DetectorGateConfig, NormaliserGateConfig
from factory.metrics import (
    accuracy_at,
    best_threshold,
    cosine_summary,
    flip_rate,
    k_fold_accuracy,
    pair_similarities,
    tar_at_far,
)
from factory.recipe import GateConfig


def test_best_threshold_on_a_hand_computed_example() -> None:
    sims = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    same = np.array([False, False, True, False, True, True])
    threshold, accuracy = best_threshold(sims, same)
    # Cutting between 0.4 and 0.8 gets 5 of 6 right; so does cutting between 0.2 and 0.35.
    assert accuracy == pytest.approx(5 / 6)
    assert threshold in (pytest.approx(0.275), pytest.approx(0.6))
    assert accuracy_at(sims, same, threshold) == pytest.approx(5 / 6)


def test_best_threshold_separable_data_is_perfect() -> None:
    sims = np.array([0.9, 0.1, 0.8, 0.2])
    same = np.array([True, False, True, False])
    threshold, accuracy = best_threshold(sims, same)
    assert accuracy == 1.0 and 0.2 < threshold < 0.8


def test_ten_fold_protocol_scores_each_fold_with_a_threshold_from_the_others() -> None:
    # Two folds. Fold 0 is separable at 0.5; fold 1 has one pair on the wrong side of 0.5.
    sims = np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.45, 0.3, 0.2])
    same = np.array([True, True, False, False, True, True, False, False])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    result = k_fold_accuracy(sims, same, folds)
    # Threshold for fold 0 comes from fold 1: best cut between 0.3 and 0.45 -> 0.375; fold 0 all right.
    # Threshold for fold 1 comes from fold 0: best cut between 0.2 and 0.8 -> 0.5; 0.45 is missed: 3/4.
    assert result["accuracy"] == pytest.approx((1.0 + 0.75) / 2)
    assert result["accuracy_std"] == pytest.approx(0.125)
    assert result["threshold"] == pytest.approx((0.375 + 0.5) / 2)


def test_cosine_summary_and_flips() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    summary = cosine_summary(a, a * 3.0)
    assert summary["cosine_min"] == pytest.approx(1.0)
    noisy = cosine_summary(a, a + rng.normal(scale=0.5, size=a.shape))
    assert 0.8 < noisy["cosine_mean"] < 0.99 and noisy["cosine_p1"] >= noisy["cosine_min"]
    rate, flips = flip_rate(np.array([0.1, 0.6, 0.7]), np.array([0.55, 0.6, 0.2]), 0.5)
    assert flips == 2 and rate == pytest.approx(2 / 3)


def test_pair_similarities_are_cosines() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    sims = pair_similarities(emb, np.array([0, 0]), np.array([1, 2]))
    assert sims == pytest.approx([0.0, np.sqrt(0.5)])


def test_tar_at_far_on_a_hand_computed_example() -> None:
    # 1000 impostor pairs at 0.000..0.999 and 4 genuine pairs.
    impostors = np.arange(1000) / 1000.0
    genuine = np.array([0.9985, 0.9995, 0.5, 1.2])
    sims = np.concatenate([impostors, genuine])
    same = np.concatenate([np.zeros(1000, bool), np.ones(4, bool)])
    # FAR 1e-3 allows 1 impostor above the threshold: threshold = 0.998 (the 2nd highest impostor).
    assert tar_at_far(sims, same, 1e-3) == pytest.approx(3 / 4)
    # FAR 2e-3 allows 2: threshold = 0.997.
    assert tar_at_far(sims, same, 2e-3) == pytest.approx(3 / 4)
    # FAR 1e-4 needs at least 10,000 impostor pairs to be measurable.
    assert np.isnan(tar_at_far(sims, same, 1e-4))


def test_a_value_at_its_threshold_passes_despite_float_noise() -> None:
    gate = GateConfig(cosine_mean_min=0.99, lfw_accuracy_drop_max=0.005)
    drop = 0.82 - 0.815  # 6 pairs of 1,200: exactly 0.5 pt, 0.0050000000000000044 in floating point
    results = gates.evaluate(gate, {"lfw_accuracy_drop": drop, "cosine_mean": 0.99 - 1e-12})
    assert [(r["metric"], r["passed"]) for r in results] == [("cosine_mean", True), ("lfw_accuracy_drop", True)]
    over = gates.evaluate(gate, {"lfw_accuracy_drop": 0.82 - 0.8142, "cosine_mean": 0.9899})
    assert [r["passed"] for r in over] == [False, False]
    assert over[0]["margin"] == pytest.approx(-0.0001) and over[0]["name"] == "cosine_mean >= 0.99"


def test_every_gate_schema_is_read_by_its_key_suffix() -> None:
    # Dataclass and mapping (the manifest's resolved recipe, as the phone reads it) give the same checks.
    detector = DetectorGateConfig(agreement_min=0.92, landmark_error_mean_max=0.07)
    assert gates.checks(detector) == [("agreement", 0.92, ">="), ("landmark_error_mean", 0.07, "<=")]
    assert gates.checks(dataclasses.asdict(detector)) == gates.checks(detector)
    normaliser = NormaliserGateConfig(embedding_cosine_mean_min=0.98, pixel_error_mean_max=3.6)
    results = gates.evaluate(normaliser, {"embedding_cosine_mean": 0.987, "pixel_error_mean": 3.7})
    assert [r["passed"] for r in results] == [True, False]
    assert gates.checks(None) == [] and gates.evaluate(GateConfig(), {}) == []
    with pytest.raises(KeyError):  # the host must measure what it gates
        gates.evaluate(GateConfig(flip_rate_max=0.01), {"cosine_mean": 1.0})
    with pytest.raises(ValueError, match="end in _min or _max"):
        gates.checks({"cosine_mean": 0.99})
