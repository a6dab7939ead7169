"""LEFV's face normaliser: yaw from landmarks, pixel targets, GAN training, identity scoring, and its artifacts.

The normaliser is briefly trained on faces the tests draw themselves (no real faces), compiled to .tflite and .pte
in fp32 and int8 by the same code a LEFV build runs, and each artifact must reproduce PyTorch's normalised faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TinyFaceNet, draw_photo, ideal_maps, recipe_dict, settle_batchnorm, synthetic_dataset

from factory.data import load_images, read_split
from factory.deploy import Embedder
from factory.evaluation import load_evaluation_set
from factory.lefv.card import end_to_end_lines, normaliser_lines
from factory.lefv.config import NormaliserTrainConfig
from factory.lefv.normalisation import (
    DeployedNormaliser,
    identity_report,
    normalise_pixels,
    prepare_data,
    read_landmarks,
    train_normaliser,
    yaw_proxy,
)
from factory.lefv.schema import EndToEnd, NormaliserSection
from factory.lefv.stages import StageRunners, end_to_end, normaliser_parity
from factory.models.mobilefacenet import MobileFaceNet
from factory.recipe import load_recipe
from factory.report_schema import from_data
from factory.stages import StageLog
from factory.weights import save_weights

E2E_SIZE = 192  # every drawn face is above the detector's minimum size at this input
FRONTAL = np.array([[40, 50], [70, 50], [55, 65], [43, 80], [67, 80]], np.float32)


def rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    return (points - 60) @ matrix.T + 60


def test_yaw_is_the_nose_offset_along_the_eye_line() -> None:
    assert yaw_proxy(FRONTAL) == pytest.approx(0.0, abs=1e-6)
    turned = FRONTAL.copy()
    turned[2, 0] += 6  # nose 6 px towards the right eye, eyes 30 px apart
    assert yaw_proxy(turned) == pytest.approx(0.2, abs=1e-6)
    # A tilted head (roll) is not a turned one: the estimate follows the eye line.
    assert yaw_proxy(rotate(FRONTAL, 30)) == pytest.approx(0.0, abs=1e-5)
    assert yaw_proxy(rotate(turned, -25)) == pytest.approx(0.2, abs=1e-5)


def test_pixel_targets_are_each_identitys_most_frontal_face_and_real_faces_the_most_frontal() -> None:
    items = [(Path(f"/f/{i}.jpg"), label) for i, label in enumerate("aaabbc")]
    yaws = [0.3, -0.05, 0.1, 0.2, None, None]  # c has no landmarks; b's second face neither
    landmarks = {}
    for (path, _), yaw in zip(items, yaws, strict=True):
        if yaw is not None:
            face = FRONTAL.copy()
            face[2, 0] += yaw * 30
            landmarks[path.resolve()] = face
    data = prepare_data(items, np.zeros((6, 4, 4, 3), np.uint8), landmarks, frontal_fraction=0.5)
    np.testing.assert_allclose(data.yaw[:4], [0.3, -0.05, 0.1, 0.2], atol=1e-5)
    assert np.isnan(data.yaw[4:]).all()
    assert data.target.tolist() == [1, 1, 1, 3, 3, 5]  # a -> its |yaw| 0.05 face; c -> itself
    assert data.frontal.tolist() == [1, 2]  # the 2 of 4 known faces with the smallest |yaw|


def test_landmark_tables_skip_centre_crop_fallbacks(tmp_path: Path) -> None:
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "landmarks.csv").write_text(
        "image,fallback_center_crop,landmarks_xy_source_pixels\n"
        "set/aligned/a.jpg,0,1 2 3 4 5 6 7 8 9 10\n"
        "set/aligned/b.jpg,1,0 0 0 0 0 0 0 0 0 0\n")
    table = read_landmarks(tmp_path)
    assert list(table) == [(tmp_path / "set/aligned/a.jpg").resolve()]
    np.testing.assert_array_equal(table[(tmp_path / "set/aligned/a.jpg").resolve()][4], [9, 10])


@pytest.fixture(scope="module")
def normaliser_setup(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic face set, a normaliser trained on it for a few steps, and a recipe naming both."""
    root = tmp_path_factory.mktemp("normaliser")
    data_root = synthetic_dataset(root / "faces")
    items = read_split(data_root / "splits" / "train.txt", data_root)
    images = load_images([p for p, _ in items], 112)
    torch.manual_seed(0)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
    encoder = settle_batchnorm(MobileFaceNet(), (pixels - 127.5) / 128.0)
    landmarks = {p.resolve(): FRONTAL + np.float32(i % 3) for i, (p, _) in enumerate(items)}
    data = prepare_data(items, images, landmarks, frontal_fraction=0.5)
    cfg = NormaliserTrainConfig(steps=30, batch_size=4, learning_rate=0.002, identity_weight=1.0)
    generator, history = train_normaliser(data, encoder, cfg, log=lambda _line: None, log_every=10)
    save_weights(generator, root / "normaliser.safetensors")
    save_weights(encoder, root / "encoder.safetensors")
    recipe = recipe_dict(data_root)
    recipe["targets"] = [{"format": "tflite", "precisions": ["fp32", "int8"]},
                         {"format": "executorch", "precisions": ["fp32", "int8"]}]
    (data_root / "photos.csv").write_text("raw_image,aligned_reference,landmarks_xy_source_pixels\n")
    recipe["pipeline"] = {
        "kind": "lefv",
        "detector": {"weights": {"path": str(root / "detector.safetensors")}, "photos": "photos.csv"},
        "normaliser": {"weights": {"path": str(root / "normaliser.safetensors")},
                       "encoder": {"path": str(root / "encoder.safetensors")}, "parity_faces": 16},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    recogniser = Embedder(settle_batchnorm(TinyFaceNet(), (pixels - 127.5) / 128.0), [127.5] * 3, [128.0] * 3, 32)
    return load_recipe(root / "recipe.yaml"), generator, history, recogniser.eval()


def test_training_lowers_the_generator_losses(normaliser_setup) -> None:
    _, _, history, _ = normaliser_setup
    first, last = history[0], history[-1]
    assert [entry["step"] for entry in history] == [10, 20, 30]
    # The generator's loss falls from the untrained decoder's, its pixel and identity terms with it (the
    # identity network here is an untrained MobileFaceNet, so identity stays far from kept after 30 steps).
    assert last["generator"] < 0.9 * first["generator"], history
    assert last["pixel"] < 0.9 * first["pixel"] and last["identity"] < first["identity"], history
    for entry in history:
        assert all(np.isfinite(entry[k]) for k in ("discriminator", "generator", "adversarial", "symmetry"))


def test_identity_report_of_a_do_nothing_normaliser_changes_nothing(normaliser_setup) -> None:
    recipe, _, _, recogniser = normaliser_setup
    evaluation = load_evaluation_set(recipe)
    original = evaluation.pixels("NCHW")
    report = identity_report(original.copy(), original, recogniser, evaluation)
    assert report["identity_cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert report["accuracy_with"] == report["accuracy_without"]
    # A mirrored face keeps its asymmetry; a blank face has none.
    assert report["symmetry_error_after"] == pytest.approx(report["symmetry_error_before"])
    blank = identity_report(np.full_like(original, 128.0), original, recogniser, evaluation)
    assert blank["symmetry_error_after"] == 0.0 and blank["identity_cosine_mean"] < 0.9


def test_normaliser_parity_measures_pixels_and_identity(normaliser_setup) -> None:
    recipe, generator, _, recogniser = normaliser_setup
    faces = load_evaluation_set(recipe).pixels("NCHW")[:8]
    reference = normalise_pixels(DeployedNormaliser(generator).eval(), faces)
    embeddings = recogniser(torch.from_numpy(reference)).detach().numpy()
    same = normaliser_parity(reference.copy(), reference, embeddings, recogniser)
    assert same["pixel_error_mean"] == 0.0 and same["embedding_cosine_min"] == pytest.approx(1.0, abs=1e-5)
    shifted = normaliser_parity(reference + 2.0, reference, embeddings, recogniser)
    assert shifted["pixel_error_mean"] == pytest.approx(2.0, abs=1e-4)
    assert shifted["psnr_db"] == pytest.approx(10 * np.log10(255**2 / 4.0), abs=1e-3)


def test_normaliser_artifacts_reproduce_pytorch(tmp_path: Path, normaliser_setup) -> None:
    from factory.lefv.stages import build_normaliser

    recipe, _, _, recogniser = normaliser_setup
    evaluation = load_evaluation_set(recipe)
    calibration = evaluation.pixels("NCHW")
    section, runners = build_normaliser(recipe, tmp_path, StageLog(lambda _line: None, tmp_path / "log"),
                                        lambda _line: None, evaluation, calibration, recogniser)
    rows = {f"{a['format']} {a['precision']}": a for a in section["artifacts"]}
    assert set(rows) == {"tflite fp32", "tflite int8", "executorch fp32", "executorch int8"}
    assert set(runners) == {"PyTorch fp32", *rows}
    assert section["identity"]["faces"] == len(evaluation.paths)
    assert section["parity_faces"] == min(16, len(evaluation.paths))
    for name, row in rows.items():
        parity = row["parity"]
        assert row["io"]["output"]["shape"] == [1, 3, 112, 112], row["io"]
        if name.endswith("fp32"):
            assert parity["pixel_error_mean"] < 0.01 and parity["embedding_cosine_min"] > 0.9999, (name, parity)
            assert all(g["passed"] for g in row["gates"]), row["gates"]
        else:
            assert parity["pixel_error_mean"] < 6.0 and parity["embedding_cosine_mean"] > 0.97, (name, parity)
        # A loaded runner takes NCHW pixels whatever the artifact's layout, and gives pixels back.
        out = runners[name]()(calibration[:2])
        assert out.shape == (2, 3, 112, 112) and 0.0 <= out.min() and out.max() <= 255.0
    card = "\n".join(normaliser_lines(from_data(NormaliserSection, section)))
    assert "## Stage 2: face normaliser" in card
    assert all(f"| `{a['file']}` |" in card for a in section["artifacts"])


def test_end_to_end_runs_the_normaliser_between_alignment_and_embedding(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    photos = [draw_photo(rng) for _ in range(3)]
    for index, photo in enumerate(photos):
        photo.aligned_reference = tmp_path / f"{index}.jpg"
    seen: list[float] = []

    def embed(crops: np.ndarray) -> np.ndarray:
        seen.append(float(crops.mean()))
        return np.tile(np.eye(8, dtype=np.float32)[0], (len(crops), 1))

    reference = {p.aligned_reference: np.eye(8, dtype=np.float32)[0] for p in photos}
    detect = lambda batch: ideal_maps(photos, batch, E2E_SIZE)  # noqa: E731
    plain = end_to_end(StageRunners("ideal", detect, embed), photos, E2E_SIZE, 112, reference, 0.5)
    plain_means = list(seen)
    seen.clear()
    darker = end_to_end(StageRunners("ideal", detect, embed, "NHWC", normalise=lambda x: x * 0.5), photos,
                        E2E_SIZE, 112, reference, 0.5)
    assert plain["found_rate"] == darker["found_rate"] == 1.0
    np.testing.assert_allclose(seen, np.array(plain_means) * 0.5, rtol=1e-5)
    rows = [{"photos_set": "held-out", "normalised": False, **plain},
            {"photos_set": "held-out", "normalised": True, **darker}]
    card = "\n".join(end_to_end_lines(from_data(EndToEnd, {"photos": 3, "held_out": 3, "rows": rows})))
    assert "| ideal | — | 3 (held-out) |" in card and "| ideal | yes | 3 (held-out) |" in card
