"""Detection and alignment: exact transforms on synthetic landmarks, robust photo reading, real faces."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from factory.align.template import ARCFACE_TEMPLATE, align_face, similarity_transform


def transform(points: np.ndarray, angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.deg2rad(angle_deg)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T + np.asarray(shift)


@pytest.mark.parametrize(("angle", "scale", "shift"), [(0, 1, (0, 0)), (17, 2.3, (140, 60)), (-35, 0.7, (5, 300))])
def test_similarity_transform_is_exact_for_a_known_transform(angle, scale, shift) -> None:
    landmarks = transform(ARCFACE_TEMPLATE, angle, scale, shift)
    matrix = similarity_transform(landmarks)
    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(mapped - ARCFACE_TEMPLATE).max() < 1e-3


def test_align_face_moves_marked_points_onto_the_template() -> None:
    landmarks = transform(ARCFACE_TEMPLATE, 20, 2.0, (100, 80))
    image = np.zeros((400, 400, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(image, (round(x), round(y)), 4, (255, 255, 255), -1)
    aligned = align_face(image, landmarks)
    assert aligned.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE:
        assert aligned[round(y), round(x)].min() > 200, "each landmark lands on its template point"
    assert aligned[2, 2].max() == 0


def test_read_photo_handles_exif_grayscale_rgba_and_truncation(tmp_path: Path) -> None:
    from factory.align.prepare import read_photo

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(wide).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    upright = read_photo(tmp_path / "rotated.jpg")
    assert upright.shape == (40, 20, 3)
    assert upright[:15].mean() > 200 and upright[-15:].mean() < 50

    Image.fromarray(np.full((8, 8), 90, np.uint8), mode="L").save(tmp_path / "gray.png")
    assert read_photo(tmp_path / "gray.png").shape == (8, 8, 3)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert read_photo(tmp_path / "rgba.png")[0, 0].tolist() == [255, 0, 0]

    data = (tmp_path / "rotated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("truncated.jpg", "text.jpg"):
        with pytest.raises(ValueError, match="unreadable image"):
            read_photo(tmp_path / name)


@pytest.mark.data
def test_prepare_real_photos_matches_reference_landmarks(tmp_path: Path, faces_root: Path) -> None:
    from factory.align.prepare import prepare

    rows = list(csv.DictReader((faces_root / "raw-samples" / "landmarks.csv").open()))[:12]
    source = tmp_path / "raw"
    for row in rows:
        target = source / Path(row["raw_image"]).parent.name / Path(row["raw_image"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((faces_root / row["raw_image"]).read_bytes())
    (source / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(source / "blank.jpg")

    out = tmp_path / "aligned"
    summary = prepare(source, out, select="central",
                      reference_landmarks=faces_root / "raw-samples" / "landmarks.csv")
    report = json.loads((out / "summary.json").read_text())
    assert summary.kept == report["kept"] == len(rows)
    assert report["skipped"]["unreadable image"]["files"] == ["broken.jpg"]
    assert report["skipped"]["no face detected"]["files"] == ["blank.jpg"]
    assert report["landmark_error"]["faces"] == len(rows)
    assert report["landmark_error"]["nme_mean"] < 0.02, report["landmark_error"]
    for row in csv.DictReader((out / "landmarks.csv").open()):
        assert cv2.imread(str(out / row["aligned_image"])).shape == (112, 112, 3)
