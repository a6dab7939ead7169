"""Distillation: losses on known values, strong views, the teacher cache, recipe rules, a real short run."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import shipped_recipe_dict
from torch import nn

from factory.augment import face_keys, strong_view, strong_views, view_generator
from factory.errors import FactoryError
from factory.losses import projected_cosine_loss, relational_loss
from factory.recipe import RecipeError, load_recipe
from factory.teachers.cache import TeacherCache, face_digests

REPO = Path(__file__).resolve().parents[1]


def test_projected_cosine_loss_known_values() -> None:
    identity = nn.Linear(2, 2, bias=False)
    identity.weight.data = torch.eye(2)
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # cosines 1, 0, 1/sqrt(2): loss = mean(0, 1, 1 - 0.7071)
    expected = (0.0 + 1.0 + (1.0 - 1.0 / math.sqrt(2.0))) / 3.0
    assert projected_cosine_loss(student, teacher, identity).item() == pytest.approx(expected, abs=1e-6)
    widen = nn.Linear(2, 3, bias=False)  # student and teacher sizes may differ
    widen.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert projected_cosine_loss(student, torch.cat([teacher, torch.zeros(3, 1)], 1), widen).item() == pytest.approx(
        expected, abs=1e-6)


def test_relational_loss_known_values() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    assert relational_loss(student, student * 3.0).item() == pytest.approx(0.0, abs=1e-7)
    teacher = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # student cosines: (0,1)=0, (0,2)=0.7071, (1,2)=0.7071; teacher: 1, 0, 0; off-diagonal entries twice each
    expected = 2 * ((0 - 1) ** 2 + 0.5 + 0.5) / 6
    assert relational_loss(student, teacher).item() == pytest.approx(expected, abs=1e-5)


def test_strong_views_are_a_function_of_seed_face_and_view() -> None:
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, size=(4, 112, 112, 3), dtype=np.uint8)
    keys = face_keys(face_digests(faces))
    first = strong_views(faces, keys, np.array([0, 1, 2, 3]), seed=7)
    again = strong_views(faces[::-1], keys[::-1], np.array([3, 2, 1, 0]), seed=7)[::-1]
    assert first.shape == faces.shape and first.dtype == np.uint8
    assert np.array_equal(first, again), "a view must not depend on the batch it is drawn in"
    with ThreadPoolExecutor(3) as pool:  # drawn on threads (training on a GPU): the same views
        assert np.array_equal(first, strong_views(faces, keys, np.array([0, 1, 2, 3]), seed=7, pool=pool))
    other_view = strong_views(faces, keys, np.array([1, 1, 1, 1]), seed=7)
    assert not np.array_equal(first[0], other_view[0])
    other_seed = strong_views(faces, keys, np.array([0, 1, 2, 3]), seed=8)
    assert not np.array_equal(first, other_seed)


def test_strong_view_keeps_a_face_recognisable_on_average() -> None:
    """Views move pixels (warp, colour, erasing) but stay close to the face: mean change well under the range."""
    rng = np.random.default_rng(1)
    face = np.clip(rng.normal(128, 40, size=(112, 112, 3)), 0, 255).astype(np.uint8)
    face = np.ascontiguousarray(np.repeat(np.linspace(40, 220, 112, dtype=np.uint8)[None, :, None], 112, 0)
                                .repeat(3, 2) // 2 + face // 2)
    views = [strong_view(face, view_generator(0, 1, v)) for v in range(40)]
    changes = [np.abs(v.astype(float) - face).mean() for v in views]
    assert 2.0 < float(np.median(changes)) < 60.0
    flipped = sum(np.abs(v.astype(float) - face[:, ::-1]).mean() < np.abs(v.astype(float) - face).mean()
                  for v in views)
    assert 8 <= flipped <= 32, "about half of the views are mirrored"


class CountingTeacher:
    """A fake teacher: the mean colour of each face as its 'embedding'; counts faces embedded."""

    name = "counting"
    embedding_size = 3

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.faces_embedded = 0

    def embed(self, faces: np.ndarray) -> np.ndarray:
        self.faces_embedded += len(faces)
        means = faces.reshape(len(faces), -1, 3).mean(1) + 1.0
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def test_teacher_cache_reuses_entries_and_refuses_stale_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, size=(6, 112, 112, 3), dtype=np.uint8)
    teacher = CountingTeacher("a" * 64)
    cache = TeacherCache(teacher, tmp_path, log=lambda _: None)
    first = cache.embeddings(faces, face_digests(faces), view=2)
    assert teacher.faces_embedded == 6
    assert np.allclose(first, teacher.embed(strong_views(faces, face_keys(face_digests(faces)),
                                                         np.full(6, 2), seed=0)))
    teacher.faces_embedded = 0
    assert np.array_equal(TeacherCache(teacher, tmp_path).embeddings(faces, face_digests(faces), view=2), first)
    assert teacher.faces_embedded == 0, "a second run must read the cache"

    changed = faces.copy()
    changed[3] = 255 - changed[3]  # same position, other image: its entry is stale
    cache.embeddings(changed, face_digests(changed), view=2)
    assert teacher.faces_embedded == 1

    other_weights = CountingTeacher("b" * 64)  # same teacher name, other weight file
    TeacherCache(other_weights, tmp_path, log=lambda _: None).embeddings(faces, face_digests(faces), view=2)
    assert other_weights.faces_embedded == 6, "embeddings of other weights must never be reused"

    moved = tmp_path / "moved"  # a file copied under another digest's folder is refused by its recorded digest
    target = moved / f"counting-{'c' * 16}"
    target.mkdir(parents=True)
    source = next((tmp_path / f"counting-{'a' * 16}").glob("*.safetensors"))
    (target / source.name).write_bytes(source.read_bytes())
    impostor = CountingTeacher("c" * 64)
    TeacherCache(impostor, moved, log=lambda _: None).embeddings(faces, face_digests(faces), view=2)
    assert impostor.faces_embedded == 6

    (target / source.name).write_bytes(b"garbage")
    with pytest.raises(FactoryError, match=r"corrupt.*delete it"):
        TeacherCache(impostor, moved).embeddings(faces, face_digests(faces), view=2)


def test_centred_targets_spread_a_teacher_cone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher whose embeddings share one axis (mean colours: unrelated faces at cosine > 0.9) gets targets
    centred on its training mean: unit length, unrelated faces near cosine 0, held-out faces centred alike."""
    from factory import distill
    from factory.recipe import DistillConfig

    monkeypatch.setattr(distill, "load_teacher", lambda name, device: CountingTeacher("d" * 64))
    rng = np.random.default_rng(1)
    faces = rng.integers(0, 256, size=(48, 112, 112, 3), dtype=np.uint8)
    raw = CountingTeacher("d" * 64).embed(faces)
    off = ~np.eye(len(faces), dtype=bool)
    assert (raw @ raw.T)[off].mean() > 0.9, "the fake teacher must have a narrow cone for this test to mean anything"

    def build(center: bool) -> distill.Distiller:
        cfg = DistillConfig(teachers=["counting"], teacher_outputs="online", center_teachers=center)
        return distill.Distiller(cfg, 8, faces, 0, tmp_path, "cpu", log=lambda _: None)

    index, views = np.arange(len(faces)), np.zeros(len(faces), dtype=int)
    plain = build(False).targets(index, views, faces)["counting"].numpy()
    assert np.allclose(plain, raw, atol=1e-6), "without center_teachers the targets are the teacher's own"

    centred_distiller = build(True)
    centre = raw.mean(axis=0)
    assert np.allclose(centred_distiller.centres["counting"], centre, atol=1e-6)
    assert centred_distiller.centre_norms()["counting"] == pytest.approx(float(np.linalg.norm(centre)), abs=1e-4)
    targets = centred_distiller.targets(index, views, faces)["counting"].numpy()
    expected = (raw - centre) / np.linalg.norm(raw - centre, axis=1, keepdims=True)
    assert np.allclose(targets, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(targets, axis=1), 1.0, atol=1e-5)
    assert abs((targets @ targets.T)[off].mean()) < 0.1

    held_out = rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)
    monitored = centred_distiller.teacher_embeddings(held_out)["counting"]
    held_raw = CountingTeacher("d" * 64).embed(held_out)
    assert np.allclose(monitored, (held_raw - centre) / np.linalg.norm(held_raw - centre, axis=1, keepdims=True),
                       atol=1e-5), "held-out faces are centred on the training mean, not their own"


def _recipe(tmp_path: Path, faces_root: Path, train: dict) -> Path:
    data = shipped_recipe_dict(faces_root)
    data["weights"] = {"path": str(tmp_path / "student.safetensors")}
    data["data"].pop("benchmarks")
    data["train"] = train
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.data
def test_recipe_rules_for_distillation(tmp_path: Path, faces_root: Path) -> None:
    base = {"split": "splits/train.txt", "loss": "triplet",
            "distill": {"teachers": ["nobody", "mobileface_v2"], "cosine_weight": 0, "relational_weight": 0,
                        "teacher_outputs": "cached", "cached_views": 0}}
    with pytest.raises(RecipeError) as error:
        load_recipe(_recipe(tmp_path, faces_root, base))
    text = str(error.value)
    for expected in ("train.distill.teachers[0]: 'nobody' is not a registered teacher", "nothing is distilled",
                     "set train.augmentation: strong", "cached_views: at least 1", "classifier losses"):
        assert expected in text


@pytest.mark.data
def test_unlabelled_faces_of_evaluation_identities_are_refused(tmp_path: Path, faces_root: Path) -> None:
    from factory.train import train

    pairs = (faces_root / "lfw" / "pairs.txt").read_text().splitlines()
    name, number = pairs[1].split()[:2]
    split = tmp_path / "unlabelled.txt"
    split.write_text(f"lfw/aligned/{name}/{name}_{int(number):04d}.jpg\n")
    recipe = load_recipe(_recipe(tmp_path, faces_root, {
        "split": "splits/train.txt", "augmentation": "strong",
        "distill": {"teachers": ["mobileface_v2"], "unlabelled": [str(split)]}}))
    with pytest.raises(FactoryError, match="identities in the evaluation pairs"):
        train(recipe, tmp_path / "student.safetensors", device="cpu", log=lambda _: None)


@pytest.mark.data
def test_short_distillation_run_pulls_the_student_towards_the_teacher(tmp_path: Path, faces_root: Path) -> None:
    """320 real faces, cached MobileFace V2 views, from the shipped weights: the held-out student-teacher cosine
    rises epoch by epoch (measured 0.11 -> 0.18 over 6 epochs of 10 steps) and the cosine loss falls."""
    from factory.evaluation import load_evaluation_set
    from factory.train import train

    lines = (faces_root / "splits" / "train.txt").read_text().splitlines()
    (tmp_path / "small.txt").write_text("\n".join(lines[:: len(lines) // 320][:320]) + "\n")
    recipe = load_recipe(_recipe(tmp_path, faces_root, {
        "split": str(tmp_path / "small.txt"), "epochs": 6, "batch_size": 32, "learning_rate": 0.05,
        "warmup_steps": 2, "augmentation": "strong",
        "init_from": str(REPO / "recipes" / "weights" / "mobilefacenet_labels.safetensors"),
        "distill": {"teachers": ["mobileface_v2"], "cosine_weight": 100.0, "relational_weight": 100.0,
                    "label_weight": 0.1, "teacher_outputs": "cached", "cached_views": 2,
                    "cache_dir": str(tmp_path / "cache")}}))
    held_out, _ = load_evaluation_set(recipe).subset(100)
    torch.manual_seed(0)
    summary = train(recipe, tmp_path / "student.safetensors", device="cpu", held_out=held_out, log=lambda _: None)
    cosines = [epoch["held_out"]["cosine_to_mobileface_v2"] for epoch in summary["history"]]
    losses = [epoch["losses"]["cosine"] for epoch in summary["history"]]
    assert cosines[-1] > cosines[0] + 0.04 and cosines[-1] == max(cosines), cosines
    assert losses[-1] < losses[0] - 0.05, losses
    assert summary["teachers"]["mobileface_v2"]
    assert (tmp_path / "student.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").glob("*/*.safetensors")) == [
        "plain.safetensors", "strong-v1-seed0-view0.safetensors", "strong-v1-seed0-view1.safetensors"]
