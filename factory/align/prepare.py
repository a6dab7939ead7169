"""`factory data prepare SRC DST`: raw photos in, aligned 112x112 faces out, nothing dropped silently."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from factory.align.mtcnn import MTCNN, Detection
from factory.align.template import align_face
from factory.data import IMAGE_SUFFIXES
from factory.errors import FactoryError
from factory.io import atomic_path, write_text_atomic


def read_photo(path: Path) -> np.ndarray:
    """An RGB uint8 array of a photo, upright per its EXIF orientation; grayscale and RGBA become RGB.

    Raises:
        ValueError: the file is not a readable, complete image.
    """
    try:
        with Image.open(path) as image:
            image.load()  # forces a full decode, so truncated files fail here
            upright = ImageOps.exif_transpose(image)
            if upright.mode in ("RGBA", "LA", "P"):
                background = Image.new("RGB", upright.size, (0, 0, 0))
                rgba = upright.convert("RGBA")
                background.paste(rgba, mask=rgba.getchannel("A"))
                upright = background
            return np.array(upright.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"unreadable image ({error})") from None


def read_raw_samples(root: Path, landmarks_csv: Path) -> list[tuple[Path, np.ndarray, Path | None]]:
    """The raw photos listed in `landmarks_csv` (paths relative to `root`): each with its reference landmarks
    and the shared data's aligned crop of that face (None where the list names none)."""
    if not landmarks_csv.is_file():
        raise FactoryError(f"raw-photo list not found: {landmarks_csv}; it comes with the shared face data "
                           "(../shared/data/faces/raw-samples/landmarks.csv)")
    out = []
    with landmarks_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            path = root / row["raw_image"]
            if not path.is_file():
                raise FactoryError(f"{landmarks_csv} lists {row['raw_image']}, which is not under {root}")
            aligned = root / row["aligned_reference"] if row.get("aligned_reference") else None
            out.append((path, np.array(row["landmarks_xy_source_pixels"].split(), np.float32).reshape(5, 2),
                        aligned if aligned is not None and aligned.is_file() else None))
    if not out:
        raise FactoryError(f"{landmarks_csv} lists no photos")
    return out


def choose_face(faces: list[Detection], shape: tuple[int, ...], select: str) -> Detection:
    """The largest face, or the one whose centre is nearest the image centre (LFW-style crops)."""
    if select == "central":
        centre = np.array([shape[1] / 2, shape[0] / 2])
        return min(faces, key=lambda f: float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - centre)))
    return max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))


@dataclass
class PrepareSummary:
    """What `prepare` kept and skipped, and why."""

    kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    several_faces: int = 0
    landmark_error: dict[str, float] | None = None

    def skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(path)


def list_photos(source: Path) -> list[tuple[Path, str]]:
    """(photo, identity) pairs: one sub-folder per identity, or a flat folder (identity = "")."""
    if not source.is_dir():
        raise FactoryError(f"source folder not found: {source}")
    photos = [p for p in sorted(source.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not photos:
        raise FactoryError(f"no photos ({', '.join(IMAGE_SUFFIXES)}) under {source}")
    return [(p, "" if p.parent == source else p.parent.relative_to(source).as_posix()) for p in photos]


def landmark_error(produced: list[list[str]], reference_csv: Path) -> dict[str, float]:
    """Normalised mean error of our landmarks against reference ones, per face / inter-ocular distance.

    `reference_csv` has `raw_image` and `landmarks_xy_source_pixels` columns (the shared data's format);
    a reference row matches a photo when its `raw_image` path ends with the photo's path under SOURCE.
    """
    if not reference_csv.is_file():
        raise FactoryError(f"reference landmarks not found: {reference_csv}")
    with reference_csv.open() as handle:
        reference = {row["raw_image"]: row["landmarks_xy_source_pixels"] for row in csv.DictReader(handle)}
    errors = []
    for _, source_image, _, points in produced:
        match = next((v for k, v in reference.items() if k == source_image or k.endswith("/" + source_image)), None)
        if match is None:
            continue
        ref = np.array(match.split(), float).reshape(5, 2)
        ours = np.array(points.split(), float).reshape(5, 2)
        errors.append(float(np.linalg.norm(ours - ref, axis=1).mean() / np.linalg.norm(ref[0] - ref[1])))
    if not errors:
        raise FactoryError(f"no photo under SOURCE matches a raw_image of {reference_csv}")
    values = np.asarray(errors)
    return {"faces": len(values), "nme_mean": float(values.mean()), "nme_median": float(np.median(values)),
            "nme_p95": float(np.percentile(values, 95)), "nme_max": float(values.max()),
            "over_0.05": int(np.sum(values > 0.05))}


def prepare(source: Path, destination: Path, select: str = "largest", size: int = 112,
            detector: MTCNN | None = None, reference_landmarks: Path | None = None) -> PrepareSummary:
    """Detect, align and save every face photo under `source` into `destination`.

    Writes `destination/<identity>/<stem>.jpg`, `landmarks.csv` (landmarks in source pixels) and
    `summary.json` (counts, and every skipped file with its reason).
    """
    photos = list_photos(source)
    detector = detector or MTCNN()
    summary = PrepareSummary()
    rows = []
    for path, identity in tqdm(photos, desc="aligning", unit="photo", mininterval=2):
        relative = path.relative_to(source).as_posix()
        try:
            image = read_photo(path)
        except ValueError as error:
            summary.skip(str(error).split(" (")[0], relative)
            continue
        faces = detector.detect(image)
        if not faces:
            summary.skip("no face detected", relative)
            continue
        summary.several_faces += len(faces) > 1
        face = choose_face(faces, image.shape, select)
        aligned = align_face(image, face.landmarks, size)
        target = destination / identity / f"{path.stem}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(aligned).save(buffer, format="JPEG", quality=95)
        with atomic_path(target) as tmp:
            tmp.write_bytes(buffer.getvalue())
        rows.append([target.relative_to(destination).as_posix(), relative, f"{face.score:.4f}",
                     " ".join(f"{v:.2f}" for v in face.landmarks.reshape(-1))])
        summary.kept += 1
    with atomic_path(destination / "landmarks.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["aligned_image", "source_image", "score", "landmarks_xy_source_pixels"])
        writer.writerows(rows)
    report = {
        "source": str(source), "destination": str(destination), "select": select, "size": size,
        "photos": len(photos), "kept": summary.kept, "several_faces": summary.several_faces,
        "skipped": {reason: {"count": len(files), "files": files} for reason, files in summary.skipped.items()},
    }
    if reference_landmarks is not None:
        summary.landmark_error = report["landmark_error"] = landmark_error(rows, reference_landmarks)
    write_text_atomic(destination / "summary.json", json.dumps(report, indent=2) + "\n")
    return summary
