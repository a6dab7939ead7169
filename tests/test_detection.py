"""The LEFV face detector: network shape, target encoding and decoding, augmentation, scoring, training.

Everything here runs on synthetic photos the tests draw themselves; the trained detector on real photos is
checked in test_detection_real.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import draw_photo, face_at

from factory.lefv.config import DetectorTrainConfig
from factory.lefv.detection import (
    FLIP_ORDER,
    MIN_FACE,
    DeployedDetector,
    DetectionScore,
    Face,
    Photo,
    augment,
    box_iou,
    decode,
    encode,
    letterbox,
    match,
    score_detector,
    split_held_out,
    to_photo,
    torch_runner,
    train_detector,
)
from factory.lefv.detector_net import OUTPUT_CHANNELS, LEFVDetector

SIZE = 192
def ideal_output(faces: list[Face], size: int = SIZE) -> np.ndarray:
    """The deployed output map a perfect detector would produce for `faces` (probability 1 at face centres)."""
    heatmap, regression, _, _ = encode(faces, size)
    probability = np.where(heatmap >= 0.999, 1.0, heatmap * 0.2)
    return np.concatenate([probability[None], regression], axis=0).astype(np.float32)


def test_detector_maps_a_192_canvas_to_a_12x12_grid_of_15_channels() -> None:
    model = LEFVDetector().eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, SIZE, SIZE))
    assert tuple(out.shape) == (2, OUTPUT_CHANNELS, SIZE // 16, SIZE // 16)
    # The score prior: every cell starts near 1% face probability.
    assert torch.sigmoid(out[:, 0]).max() < 0.05
    with torch.no_grad():
        deployed = DeployedDetector(model)(torch.full((1, 3, SIZE, SIZE), 127.5))
    assert deployed[:, 0].max() < 0.05 and deployed[:, 0].min() > 0  # the artifact outputs probabilities
    dilations = {m.dilation[0] for m in model.context.modules() if isinstance(m, torch.nn.Conv2d)}
    assert dilations == {1, 2, 3}
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())


def test_encode_then_decode_recovers_every_face_exactly() -> None:
    faces = [face_at(10, 20, 60), face_at(100, 90, 80), face_at(150, 10, 30)]
    found = decode(ideal_output(faces))
    assert len(found) == 3
    pairs = match(found, faces)
    assert len(pairs) == 3
    for i, j, iou in pairs:
        assert iou > 0.999
        np.testing.assert_allclose(found[i].landmarks, faces[j].landmarks, atol=1e-3)


def test_faces_below_the_minimum_size_are_ignored_not_taught_as_background() -> None:
    small = face_at(50, 50, MIN_FACE - 4)
    heatmap, _, weight, ignore = encode([small], SIZE)
    assert heatmap.max() == 0 and weight.max() == 0
    assert ignore[50 // 16, 50 // 16]


def test_augment_moves_landmarks_with_the_pixels_and_swaps_sides_when_mirrored() -> None:
    rng = np.random.default_rng(1)
    pixels = np.zeros((200, 300, 3), np.uint8)
    face = face_at(100, 50, 100)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(face.landmarks, colours, strict=True):
        cv2.circle(pixels, (round(x), round(y)), 4, colour, -1)
    photo = Photo(Path("p.jpg"), pixels, [face], face)
    kinds = []
    for _ in range(30):
        image, (moved,) = augment(photo, SIZE, rng)
        # Which drawn dot lies under each moved landmark (brightness jitter scales colours, not their pattern).
        under = []
        for x, y in moved.landmarks:
            seen = image[round(y), round(x)].astype(int)
            pattern = tuple(seen > seen.min() + 20) if seen.max() > 60 else None
            under.append(next((i for i, c in enumerate(colours) if tuple(np.array(c) > 0) == pattern), None))
        assert under in ([0, 1, 2, 3, 4], list(FLIP_ORDER)), under
        kinds.append(under == list(FLIP_ORDER))
        # Mirrored or not, landmark 0 is the eye on the image's left, as MTCNN labels it.
        assert moved.landmarks[0, 0] < moved.landmarks[1, 0]
    assert 0 < sum(kinds) < len(kinds), "the augmentation should mirror some samples and not others"


def test_letterbox_and_back_to_the_photo_are_inverse() -> None:
    pixels = np.zeros((300, 400, 3), np.uint8)
    canvas, scale = letterbox(pixels, SIZE)
    assert canvas.shape == (SIZE, SIZE, 3) and math.isclose(scale, SIZE / 400)
    face = face_at(20, 30, 50)
    (back,) = to_photo([face], scale)
    np.testing.assert_allclose(back.box * scale, face.box, rtol=1e-6)


def test_scoring_counts_recall_iou_and_unconfirmed_detections() -> None:
    truth = [face_at(0, 0, 100), face_at(200, 0, 100)]
    photo = Photo(Path("p.jpg"), np.zeros((200, 400, 3), np.uint8), truth, truth[0])
    found = [face_at(5, 5, 100), face_at(300, 120, 60)]  # one hit (IoU ~0.82), one false alarm
    score = DetectionScore()
    score.add(found, photo, scale=1.0, min_face=MIN_FACE)
    summary = score.summary()
    assert summary["teacher_faces"] == 2 and summary["matched"] == 1 and summary["recall"] == 0.5
    assert summary["reference_recall"] == 1.0
    assert summary["unconfirmed_detections"] == 1
    assert summary["iou_mean"] == pytest.approx(box_iou(found[0].box, truth[0].box))
    assert 0.8 < summary["iou_mean"] < 0.85


def test_held_out_split_is_fixed_by_path_order() -> None:
    photos = [Photo(Path(f"{name}.jpg"), np.zeros((1, 1, 3), np.uint8), []) for name in "edcbafghij"]
    train, held = split_held_out(photos, 5)
    assert [p.path.stem for p in held] == ["e", "j"]
    assert len(train) == 8 and not {p.path for p in train} & {p.path for p in held}


def test_a_short_training_run_learns_to_find_drawn_faces_on_unseen_photos() -> None:
    rng = np.random.default_rng(0)
    photos = [draw_photo(rng) for _ in range(48)]
    held_out = [draw_photo(rng) for _ in range(16)]
    torch.set_num_threads(2)
    cfg = DetectorTrainConfig(steps=300, batch_size=16, learning_rate=0.004)
    model, history = train_detector(photos, cfg, SIZE, log=lambda _line: None)
    first, last = history[0], history[-1]
    assert last["score"] < first["score"] and last["box"] < first["box"]
    summary = score_detector(torch_runner(DeployedDetector(model)), held_out, SIZE).summary()
    assert summary["recall"] >= 0.8, summary
    assert summary["iou_mean"] >= 0.6, summary
    assert summary["unconfirmed_per_photo"] <= 0.5, summary
