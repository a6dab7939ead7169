"""Triplet loss with online semi-hard selection, its P x 2 sampler, the softmax head, and the `loss` setting."""

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import recipe_dict, synthetic_dataset

from factory.errors import FactoryError
from factory.losses import (
    SoftmaxHead,
    identity_pair_batches,
    select_triplets,
    semi_hard_mask,
    squared_distances,
    triplet_loss,
    triplet_steps_per_epoch,
)
from factory.recipe import RecipeError, TrainConfig, load_recipe


def on_circle(*degrees: float) -> torch.Tensor:
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def distance(degrees: float) -> float:
    """Squared distance between unit vectors `degrees` apart."""
    return 2 - 2 * math.cos(math.radians(degrees))


# Identity 0 at 0 and 10 degrees, identity 1 at 30 and 70 degrees.
BATCH = on_circle(0, 10, 30, 70)
LABELS = torch.tensor([0, 0, 1, 1])


def test_triplet_loss_matches_a_hand_computed_batch() -> None:
    # (0, 1): d_ap = d(10); negatives d(30), d(70); none in (d(10), d(10) + 0.2), hardest d(30): loss 0.
    # (1, 0): d_ap = d(10); negatives d(20), d(60); d(20) is semi-hard: d(10) - d(20) + 0.2.
    # (2, 3): d_ap = d(40); negatives d(30), d(20); none semi-hard, hardest d(20): d(40) - d(20) + 0.2.
    # (3, 2): d_ap = d(40); negatives d(70), d(60); none semi-hard, hardest d(60): below zero, loss 0.
    expected = (0 + (distance(10) - distance(20) + 0.2) + (distance(40) - distance(20) + 0.2) + 0) / 4
    # The loss normalises its input: scaled embeddings give the same value.
    assert triplet_loss(3 * BATCH, LABELS, 0.2).item() == pytest.approx(expected, abs=1e-9)


def test_selection_keeps_every_pair_and_falls_back_to_the_hardest_negative() -> None:
    anchors, positives, negatives = select_triplets(BATCH, LABELS, 0.2)
    assert list(zip(anchors.tolist(), positives.tolist(), negatives.tolist(), strict=True)) == [
        (0, 1, 2),  # no semi-hard negative: the hardest (30 degrees away)
        (1, 0, 2),  # the one semi-hard negative
        (2, 3, 1),  # no semi-hard negative: the hardest (20 degrees away)
        (3, 2, 1),  # no semi-hard negative: the hardest (60 degrees away)
    ]


def test_semi_hard_mask_is_exactly_the_band_between_the_positive_and_the_margin() -> None:
    # Anchor at 0 and positive at 20 degrees (d_ap = 0.121); one negative identity per image:
    # 5 degrees (hard, d 0.008), 24 and 28 degrees (semi-hard, d 0.175 and 0.241), 40 degrees (easy, d 0.468).
    embeddings = on_circle(0, 20, 5, 24, 28, 40)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    anchors, positives, negative, semi_hard = semi_hard_mask(squared_distances(embeddings), labels, 0.2)
    row = [i for i, (a, p) in enumerate(zip(anchors.tolist(), positives.tolist(), strict=True)) if (a, p) == (0, 1)]
    assert semi_hard[row[0]].nonzero().flatten().tolist() == [3, 4]
    assert negative[row[0]].nonzero().flatten().tolist() == [2, 3, 4, 5]
    _, _, negatives = select_triplets(embeddings, labels, 0.2)
    assert negatives[0].item() == 3, "the closest semi-hard negative, not the hard one at 5 degrees"


def test_triplet_loss_refuses_a_batch_without_triplets() -> None:
    with pytest.raises(FactoryError, match="two identities"):
        triplet_loss(on_circle(0, 10), torch.tensor([0, 0]), 0.2)


def test_triplet_loss_trains_the_embeddings_apart() -> None:
    embeddings = BATCH.float().clone().requires_grad_(True)
    triplet_loss(embeddings, LABELS, 0.2).backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_sampler_deals_two_distinct_images_of_each_identity() -> None:
    # Identity 0 has one image (cannot form a pair); identities 1-7 have 2 to 5.
    labels = np.array([0] + [1] * 2 + [2] * 3 + [3] * 5 + [4] * 2 + [5] * 4 + [6] * 2 + [7] * 3)
    batches = identity_pair_batches(labels, 3, np.random.default_rng(0))
    assert len(batches) == triplet_steps_per_epoch(labels, 3) == 7 // 3
    seen: set[int] = set()
    for batch in batches:
        assert len(batch) == 6
        identities = labels[batch]
        assert 0 not in identities
        assert all((identities == identity).sum() == 2 for identity in np.unique(identities))
        assert len(np.unique(identities)) == 3
        assert len(set(batch.tolist())) == 6, "two distinct images per identity"
        assert (identities[0::2] == identities[1::2]).all(), "an identity's two images sit together"
        seen.update(identities.tolist())
    assert len(seen) == 6
    again = identity_pair_batches(labels, 3, np.random.default_rng(0))
    assert all((a == b).all() for a, b in zip(batches, again, strict=True)), "seeded, so training resumes exactly"


def test_sampler_names_the_fix_when_identities_are_too_few() -> None:
    with pytest.raises(FactoryError, match="batch_size"):
        identity_pair_batches(np.array([0, 0, 1, 1, 2]), 3, np.random.default_rng(0))


def test_softmax_head_is_a_linear_classifier() -> None:
    head = SoftmaxHead(8, 5)
    embeddings = torch.randn(4, 8)
    torch.testing.assert_close(head(embeddings, torch.zeros(4, dtype=torch.long)), head.classifier(embeddings))


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    return synthetic_dataset(tmp_path / "faces")


def recipe_with_train(tmp_path: Path, data_root: Path, **train: object):
    data = recipe_dict(data_root)
    data["train"].update(train)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_the_loss_defaults_to_arcface(tmp_path: Path, data_root: Path) -> None:
    recipe = recipe_with_train(tmp_path, data_root)
    assert recipe.train.loss == "arcface" and recipe.train.triplet_margin == 0.2


def test_loss_settings_are_validated_with_their_keys(tmp_path: Path, data_root: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        recipe_with_train(tmp_path, data_root, loss="contrastive")
    assert any(p.startswith("train.loss:") and "'triplet'" in p for p in caught.value.problems)
    with pytest.raises(RecipeError) as caught:
        recipe_with_train(tmp_path, data_root, loss="triplet", batch_size=7, triplet_margin=0.0)
    problems = caught.value.problems
    assert any(p.startswith("train.batch_size:") and "even" in p for p in problems)
    assert any(p.startswith("train.triplet_margin:") for p in problems)


def test_checkpoints_from_before_the_loss_setting_still_resume() -> None:
    from factory.train import _same_settings

    cfg = TrainConfig(split="splits/train.txt")
    older = {k: v for k, v in asdict(cfg).items() if k not in ("loss", "triplet_margin")}
    assert _same_settings(older, cfg)
    assert not _same_settings(older, TrainConfig(split="splits/train.txt", loss="triplet"))
    assert _same_settings(asdict(cfg), cfg)


@pytest.mark.parametrize(("architecture", "loss"), [("fastfacenet_0_25", "triplet"), ("lefv", "softmax")])
def test_one_epoch_trains_with_each_seed_loss(tmp_path: Path, data_root: Path, architecture: str, loss: str) -> None:
    from factory.train import train

    torch.set_num_threads(1)
    data = recipe_dict(data_root)
    data["model"]["architecture"] = architecture
    data["train"].update(loss=loss, epochs=1, batch_size=8, learning_rate=0.01)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    summary = train(recipe, recipe.resolve("w.safetensors"), device="cpu", log=lambda _: None)
    assert summary["train_config"]["loss"] == loss
    assert len(summary["history"]) == 1 and math.isfinite(summary["history"][0]["loss"])
    assert recipe.resolve("w.safetensors").is_file()
