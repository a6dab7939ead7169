"""Pipeline stages before the recogniser: a detector compiled to mobile formats and verified against PyTorch.

A detector briefly trained on drawn photos is compiled to .tflite and .pte in fp32 and int8 by the same code a
LEFV build runs; its artifacts must reproduce PyTorch's detections (fp32 exactly, int8 closely) with float
outputs, and the end-to-end pass must align and embed the faces it finds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import draw_photo, ideal_maps, recipe_dict, synthetic_dataset

from factory.lefv.card import detector_lines, end_to_end_lines
from factory.lefv.config import DetectorTrainConfig
from factory.lefv.detection import train_detector
from factory.lefv.schema import DetectorSection, EndToEnd
from factory.lefv.stages import StageRunners, detection_parity, end_to_end
from factory.recipe import load_recipe
from factory.report_schema import from_data
from factory.stages import StageLog
from factory.weights import save_weights

SIZE = 96
E2E_SIZE = 192  # every drawn face is above the detector's minimum size at this input


@pytest.fixture(scope="module")
def drawn() -> tuple[list, list]:
    rng = np.random.default_rng(3)
    return [draw_photo(rng) for _ in range(40)], [draw_photo(rng) for _ in range(10)]


@pytest.fixture(scope="module")
def detector_recipe(tmp_path_factory: pytest.TempPathFactory, drawn: tuple[list, list]):
    root = tmp_path_factory.mktemp("pipeline")
    data_root = synthetic_dataset(root / "faces")
    (data_root / "photos.csv").write_text("raw_image,aligned_reference,landmarks_xy_source_pixels\n")
    torch.manual_seed(0)
    model, _ = train_detector(drawn[0], DetectorTrainConfig(steps=200, batch_size=16, learning_rate=0.004), SIZE,
                              log=lambda _line: None)
    save_weights(model, root / "detector.safetensors")
    data = recipe_dict(data_root)
    data["targets"] = [{"format": "tflite", "precisions": ["fp32", "int8"]},
                       {"format": "executorch", "precisions": ["fp32", "int8"]}]
    data["pipeline"] = {"kind": "lefv", "detector": {"weights": {"path": str(root / "detector.safetensors")},
                                     "photos": "photos.csv", "input_size": SIZE}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(data))
    return load_recipe(root / "recipe.yaml"), model


def test_detector_artifacts_reproduce_pytorch_detections(tmp_path: Path, detector_recipe, drawn) -> None:
    from factory.lefv.stages import build_detector

    recipe, _ = detector_recipe
    section, runners = build_detector(recipe, tmp_path, StageLog(lambda _line: None, tmp_path / "log"),
                                      lambda _line: None, drawn)
    rows = {f"{a['format']} {a['precision']}": a for a in section["artifacts"]}
    assert set(rows) == {"tflite fp32", "tflite int8", "executorch fp32", "executorch int8"}
    assert set(runners) == {"PyTorch fp32", *rows}
    assert section["reference"]["recall"] >= 0.7, section["reference"]
    for name in ("tflite fp32", "executorch fp32"):
        parity = rows[name]["parity"]
        assert parity["agreement"] == 1.0 and parity["box_iou_mean"] > 0.999, (name, parity)
        assert all(g["passed"] for g in rows[name]["gates"]), rows[name]["gates"]
    for name in ("tflite int8", "executorch int8"):
        parity = rows[name]["parity"]
        # int8 artifacts give float detections close to PyTorch's (an int8 output read raw scores ~0).
        assert parity["map_cosine_mean"] > 0.97, (name, parity)
        assert parity["agreement"] >= 0.8 and parity["box_iou_mean"] > 0.85, (name, parity)
    assert rows["tflite int8"]["bytes"] < 0.6 * rows["tflite fp32"]["bytes"]
    # int8 artifacts keep float32 input and output, like the recogniser's: apps need no quantisation maths.
    assert {(a["io"]["input"]["dtype"], a["io"]["output"]["dtype"]) for a in section["artifacts"]} == {
        ("float32", "float32")}, [a["io"] for a in section["artifacts"]]
    assert all(a["latency_ms"]["1_thread"]["median_ms"] > 0 for a in section["artifacts"])
    # The model card's detector section: one row per artifact plus PyTorch, with its gates.
    card = "\n".join(detector_lines(from_data(DetectorSection, section)))
    assert "## Stage 1: face detector" in card
    for a in section["artifacts"]:
        assert f"| `{a['file']}` |" in card
    assert card.count("pass agreement >= ") == len(section["artifacts"])


def test_a_stage_observer_sets_that_stage_s_int8_activation_ranges(tmp_path: Path, detector_recipe, drawn) -> None:
    from dataclasses import replace

    from factory.lefv.stages import build_detector
    from factory.observers import DESCRIPTIONS

    recipe, _ = detector_recipe
    recipe = replace(recipe, targets=[replace(recipe.targets[0], format="tflite", precisions=["int8"])],
                     pipeline=replace(recipe.pipeline, detector=replace(recipe.pipeline.detector,
                                                                         observer="mean_min_max")))
    assert recipe.data.calibration.observer == "default"
    section, _ = build_detector(recipe, tmp_path, StageLog(lambda _line: None, tmp_path / "log"),
                                lambda _line: None, drawn)
    (artifact,) = section["artifacts"]
    assert DESCRIPTIONS["mean_min_max"] in artifact["quantization"], artifact["quantization"]
    # Ranges from the mean of each canvas's min and max still reproduce PyTorch's detections closely.
    assert artifact["parity"]["map_cosine_mean"] > 0.97, artifact["parity"]


def test_detection_parity_counts_missing_and_moved_faces(drawn) -> None:
    photos = drawn[1][:3]
    reference = np.zeros((3, 15, 6, 6), np.float32)  # boxes of 64 x 64 px centred on their cell
    reference[:, 0, 2, 2] = 0.9  # one face per photo
    moved = reference.copy()
    moved[1, 1, 2, 2] += 0.25  # photo 1: its box centre shifts by 16 px
    moved[2, 0, 2, 2] = 0.1  # photo 2: the face is lost
    parity = detection_parity(moved, reference, [1.0, 1.0, 1.0], photos)
    assert parity["reference_detections"] == 3 and parity["detections"] == 2
    assert parity["agreement"] == pytest.approx(2 / 3)
    shifted = 48 * 64 / (2 * 64 * 64 - 48 * 64)  # a 64 px box against itself moved by 16 px
    assert parity["box_iou_min"] == pytest.approx(shifted, abs=1e-4)
    assert parity["box_iou_mean"] == pytest.approx((1 + shifted) / 2, abs=1e-4)


def test_end_to_end_aligns_the_largest_face_and_compares_with_the_reference_crop(tmp_path: Path, drawn) -> None:
    photos = drawn[1][:4]
    for index, photo in enumerate(photos):
        photo.aligned_reference = tmp_path / f"{index}.jpg"
    reference = {p.aligned_reference: np.eye(8, dtype=np.float32)[0] for p in photos}
    perfect = StageRunners("ideal", detect=lambda batch: ideal_maps(photos, batch, E2E_SIZE),
                           embed=lambda crops: np.tile(np.eye(8, dtype=np.float32)[0], (len(crops), 1)))
    row = end_to_end(perfect, photos, E2E_SIZE, 112, reference, threshold=0.5)
    assert row["found_rate"] == 1.0 and row["cosine_mean"] == pytest.approx(1.0) and row["same_person_rate"] == 1.0
    blind = StageRunners("blind", detect=lambda batch: np.zeros((len(batch), 15, 12, 12), np.float32),
                         embed=perfect.embed)
    blind_row = end_to_end(blind, photos, E2E_SIZE, 112, reference, threshold=0.5)
    assert blind_row["found_rate"] == 0.0 and blind_row["same_person_rate"] == 0.0 and len(blind_row["missed"]) == 4
    rows = [{"photos_set": "held-out", "normalised": False, **r} for r in (row, blind_row)]
    card = "\n".join(end_to_end_lines(from_data(EndToEnd, {"photos": 4, "held_out": 4, "rows": rows})))
    assert "| ideal | — | 4 (held-out) | 100.00% |" in card and "| blind | — | 4 (held-out) | 0.00% |" in card
