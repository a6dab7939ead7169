"""Where dlib's 150x150 face chip lies in our 112x112 ArcFace-template crop.

dlib's recognition network was trained on chips cut by `dlib.get_face_chip_details(shape, size=150,
padding=0.25)` around its own five-point shape predictor's landmarks; our faces are 112x112 crops
aligned by MTCNN landmarks onto the ArcFace template (`factory.align.template`). Both alignments are
similarities of the photo, so one fixed affine takes a crop to (nearly) the chip dlib would have cut
from the photo. It is fitted here on raw photos that have both: for each photo, dlib's photo -> chip
transform composed with the inverse of our photo -> crop transform, then one least-squares affine over
a grid of crop points of all photos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CROP_SIZE = 112
CHIP_SIZE = 150
CHIP_PADDING = 0.25

# 112x112 crop coordinates -> 150x150 chip coordinates. Fitted by
#   python -m factory teacher fit-dlib-chip
# on ../shared/data/faces/raw-samples: 292 of the 300 photos (8 have no dlib frontal face at the reference
# landmarks). One affine for all photos leaves an RMS of 5.43 chip px over the crop grid (per-photo p95 9.27):
# MTCNN's and dlib's landmark detectors disagree photo by photo, which no fixed warp can undo; dlib's own five
# landmarks land 2.62 chip px (mean) from where its chip puts them. Its rotation has the opposite sign to the
# earlier estimate [[1.510, 0.031, -10.862], [-0.031, 1.510, -29.741]] (up to 5.25 chip px apart). Embeddings
# of the warped reference crops are the closer to those of dlib's own chips (mean cosine 0.9918 against
# 0.9910), and LFW View-2 (`python -m factory teacher eval dlib_resnet_v1`) is 99.00% ± 0.41 against 98.82%
# with the earlier matrix (98.97% with a replicated instead of a black border).
CROP_TO_CHIP = np.array([[1.5276, -0.0136, -9.9639], [0.0136, 1.5276, -34.9089]])


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, 2) points mapped by a 2x3 affine."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine applying `inner` first, then `outer`."""
    return np.hstack([outer[:, :2] @ inner[:, :2], (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]])


def invert(matrix: np.ndarray) -> np.ndarray:
    linear = np.linalg.inv(matrix[:, :2])
    return np.hstack([linear, (-linear @ matrix[:, 2])[:, None]])


def fit_affine(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares 2x3 affine taking (K, 2) `source` points to `target` points (K >= 3, not collinear)."""
    design = np.hstack([source, np.ones((len(source), 1))])
    solution, _, rank, _ = np.linalg.lstsq(design, target, rcond=None)
    if rank < 3:
        raise ValueError("points are collinear: no unique affine fits them")
    return solution.T


def chip_to_photo(rect: tuple[float, float, float, float], angle: float, rows: int, cols: int) -> np.ndarray:
    """2x3 affine from chip pixel coordinates to photo coordinates, as dlib's `extract_image_chip` samples.

    dlib takes chip corners (0, 0), (cols-1, 0) and (0, rows-1) to the top-left, top-right and
    bottom-left corners of `rect` (left, top, right, bottom) rotated by `angle` about its centre.
    """
    left, top, right, bottom = rect
    centre = np.array([(left + right) / 2, (top + bottom) / 2])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = (np.array([[left, top], [right, top], [left, bottom]]) - centre) @ rotation.T + centre
    return fit_affine(np.array([[0.0, 0.0], [cols - 1.0, 0.0], [0.0, rows - 1.0]]), corners)


def crop_grid(step: float = 4.0, size: int = CROP_SIZE) -> np.ndarray:
    """Points of the crop every `step` pixels, (K, 2)."""
    axis = np.arange(0.0, size, step)
    return np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)


def fit_crop_to_chip(crop_to_chip: Sequence[np.ndarray], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One affine for many photos' crop -> chip transforms, fitted on `grid`; and each photo's RMS residual.

    Returns:
        The 2x3 affine, and per photo the RMS distance in chip pixels between where it and the photo's
        own transform put the grid points.
    """
    source = np.concatenate([grid] * len(crop_to_chip))
    target = np.concatenate([apply_affine(m, grid) for m in crop_to_chip])
    matrix = fit_affine(source, target)
    residuals = np.array([np.sqrt(np.mean(np.sum((apply_affine(matrix, grid) - apply_affine(m, grid)) ** 2, 1)))
                          for m in crop_to_chip])
    return matrix, residuals


def max_displacement(a: np.ndarray, b: np.ndarray, size: int = CROP_SIZE) -> float:
    """Largest distance (output pixels) between where two affines put any point of a `size` x `size` crop."""
    corners = np.array([[0.0, 0.0], [size - 1.0, 0.0], [0.0, size - 1.0], [size - 1.0, size - 1.0]])
    return float(np.max(np.linalg.norm(apply_affine(a, corners) - apply_affine(b, corners), axis=1)))


@dataclass
class PhotoAlignment:
    """Both alignments of one raw photo: ours (MTCNN landmarks -> crop) and dlib's (its landmarks -> chip)."""

    path: Path
    photo_to_crop: np.ndarray
    photo_to_chip: np.ndarray
    dlib_landmarks: np.ndarray  # dlib's five points in photo pixels
    dlib_chip: np.ndarray | None = None  # the 150x150 RGB chip dlib cuts from the photo
    reference_crop: Path | None = None  # the shared data's aligned 112x112 crop of this face

    @property
    def crop_to_chip(self) -> np.ndarray:
        return compose(self.photo_to_chip, invert(self.photo_to_crop))


@dataclass
class ChipFit:
    """The fitted crop -> chip affine and how well one affine serves every photo.

    Attributes:
        matrix: The 2x3 affine (crop pixels -> chip pixels).
        photos: Photos it was fitted on.
        skipped: Photos left out, by reason.
        grid_rms: RMS over photos and crop grid points of the distance (chip pixels) between the fitted
            affine and each photo's own crop -> chip transform.
        grid_rms_p95: 95th percentile over photos of each photo's RMS on the grid.
        landmark_error_mean: Mean distance (chip pixels) between where dlib puts its five landmarks in its
            chip and where the fitted affine puts them, coming through our crop.
        landmark_error_p95: Its 95th percentile over all landmarks.
        displacement_from: Largest distance (chip pixels) over the crop between the fitted affine and the
            one it replaces (`CROP_TO_CHIP` when fitted).
    """

    matrix: np.ndarray
    photos: int
    skipped: dict[str, list[str]] = field(default_factory=dict)
    grid_rms: float = 0.0
    grid_rms_p95: float = 0.0
    landmark_error_mean: float = 0.0
    landmark_error_p95: float = 0.0
    displacement_from: float = 0.0


def summarise_fit(alignments: Sequence[PhotoAlignment], skipped: dict[str, list[str]],
                  previous: np.ndarray = CROP_TO_CHIP) -> ChipFit:
    """Fit one crop -> chip affine over `alignments` and measure it on the grid and on dlib's landmarks."""
    if len(alignments) < 2:
        raise ValueError(f"need at least 2 photos with both alignments to fit, got {len(alignments)}")
    grid = crop_grid()
    matrix, residuals = fit_crop_to_chip([a.crop_to_chip for a in alignments], grid)
    landmark_errors = np.concatenate([
        np.linalg.norm(apply_affine(compose(matrix, a.photo_to_crop), a.dlib_landmarks)
                       - apply_affine(a.photo_to_chip, a.dlib_landmarks), axis=1)
        for a in alignments
    ])
    return ChipFit(matrix=matrix, photos=len(alignments), skipped=skipped,
                   grid_rms=float(np.sqrt(np.mean(residuals**2))), grid_rms_p95=float(np.percentile(residuals, 95)),
                   landmark_error_mean=float(landmark_errors.mean()),
                   landmark_error_p95=float(np.percentile(landmark_errors, 95)),
                   displacement_from=max_displacement(matrix, previous))


def dlib_alignments(samples: Sequence[tuple[Path, np.ndarray, Path | None]],
                    shape_predictor: Path) -> tuple[list[PhotoAlignment], dict[str, list[str]]]:
    """Both alignments of each raw photo (`factory.align.prepare.read_raw_samples` rows), and the photos skipped.

    dlib's frontal detector (one upsampling) finds the faces; the one whose box holds the centre of the
    reference landmarks is the photo's reference face. Photos without such a face are skipped, by name.
    """
    import dlib

    from factory.align.prepare import read_photo
    from factory.align.template import similarity_transform

    detector, predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(shape_predictor))
    alignments, skipped = [], {}
    for path, landmarks, reference_crop in samples:
        pixels = read_photo(path)
        centre = landmarks.mean(axis=0)
        faces = [box for box in detector(pixels, 1)
                 if box.left() <= centre[0] <= box.right() and box.top() <= centre[1] <= box.bottom()]
        if not faces:
            skipped.setdefault("no dlib face at the reference landmarks", []).append(str(path))
            continue
        box = min(faces, key=lambda b: math.hypot(b.center().x - centre[0], b.center().y - centre[1]))
        shape = predictor(pixels, box)
        details = dlib.get_face_chip_details(shape, size=CHIP_SIZE, padding=CHIP_PADDING)
        rect = (details.rect.left(), details.rect.top(), details.rect.right(), details.rect.bottom())
        alignments.append(PhotoAlignment(
            path=path,
            photo_to_crop=similarity_transform(landmarks, CROP_SIZE).astype(np.float64),
            photo_to_chip=invert(chip_to_photo(rect, details.angle, details.rows, details.cols)),
            dlib_landmarks=np.array([[p.x, p.y] for p in shape.parts()], np.float64),
            dlib_chip=dlib.get_face_chip(pixels, shape, size=CHIP_SIZE, padding=CHIP_PADDING),
            reference_crop=reference_crop,
        ))
    return alignments, skipped


def raw_sample_alignments(faces_root: Path,
                          limit: int | None = None) -> tuple[list[PhotoAlignment], dict[str, list[str]]]:
    """`dlib_alignments` of the raw photos of `faces_root/raw-samples/landmarks.csv` (the first `limit`)."""
    from factory.align.prepare import read_raw_samples
    from factory.teachers.dlib_files import SHAPE_PREDICTOR_5, model_file

    samples = read_raw_samples(faces_root, faces_root / "raw-samples" / "landmarks.csv")[:limit]
    return dlib_alignments(samples, model_file(SHAPE_PREDICTOR_5))
