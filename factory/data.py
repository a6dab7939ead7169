"""Reading aligned face folders, the training split and pair lists; preprocessing to tensors."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from factory.errors import FactoryError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Pair:
    """One verification pair: two image paths, whether they show the same person, and the fold."""

    path_a: Path
    path_b: Path
    same: bool
    fold: int


def require_file(path: Path, what: str, fix: str) -> Path:
    """Return `path` if it is a file, else raise an error naming it and the fix."""
    if not path.is_file():
        raise FactoryError(f"{what} not found: {path} — {fix}")
    return path


def load_image(path: Path, size: int | None = None) -> np.ndarray:
    """Read an image file as an RGB uint8 HWC array, resized to `size` x `size` if given."""
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if image is None:
        raise FactoryError(f"cannot read image {path}: the file is missing or not a valid image")
    if size is not None and image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_images(paths: Sequence[Path], size: int | None = None, workers: int | None = None) -> np.ndarray:
    """Read many images into one NHWC uint8 array (decoding in threads; OpenCV releases the GIL)."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(lambda p: load_image(p, size), paths))
    return np.stack(images) if images else np.zeros((0, size or 0, size or 0, 3), np.uint8)


def list_identity_folder(root: Path) -> list[tuple[Path, str]]:
    """(image path, identity) for every image in a folder of one sub-folder per identity."""
    if not root.is_dir():
        raise FactoryError(f"face folder not found: {root} — point the recipe at a folder of identity sub-folders")
    items = [
        (path, identity.name)
        for identity in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(identity.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise FactoryError(f"no face images under {root}: expected <identity>/<image>.jpg sub-folders")
    return items


def read_split(split_file: Path, root: Path) -> list[tuple[Path, str]]:
    """Read a `path<TAB>label` split file; paths are relative to `root`."""
    require_file(split_file, "training split", "set data.train_split in the recipe to an existing file")
    items = []
    for number, line in enumerate(split_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise FactoryError(f"{split_file}:{number}: expected 'path<TAB>label', got {line!r}")
        items.append((root / parts[0], parts[1]))
    return items


def read_lfw_pairs(pairs_file: Path, image_root: Path) -> list[Pair]:
    """Read an LFW View-2 `pairs.txt` ("folds n" header, then n same and n different pairs per fold)."""
    require_file(pairs_file, "pairs file", "set data.eval_pairs in the recipe to an LFW-format pairs.txt")
    lines = [line.split() for line in pairs_file.read_text().splitlines() if line.strip()]
    try:
        folds, per_fold = int(lines[0][0]), int(lines[0][1])
    except (IndexError, ValueError):
        raise FactoryError(f"{pairs_file}: first line must be '<folds> <pairs per class>'") from None

    def image(name: str, number: str) -> Path:
        return image_root / name / f"{name}_{int(number):04d}.jpg"

    pairs = []
    for index, fields in enumerate(lines[1:]):
        fold = index // (2 * per_fold)
        if len(fields) == 3:
            pairs.append(Pair(image(fields[0], fields[1]), image(fields[0], fields[2]), True, fold))
        elif len(fields) == 4:
            pairs.append(Pair(image(fields[0], fields[1]), image(fields[2], fields[3]), False, fold))
        else:
            raise FactoryError(f"{pairs_file}:{index + 2}: expected 3 or 4 fields, got {' '.join(fields)!r}")
    if len(pairs) != folds * 2 * per_fold:
        raise FactoryError(f"{pairs_file}: header promises {folds * 2 * per_fold} pairs, found {len(pairs)}")
    return pairs


def unique_pair_images(pairs: Sequence[Pair]) -> list[Path]:
    """Every image used by `pairs`, each once, in first-seen order."""
    return list(dict.fromkeys(p for pair in pairs for p in (pair.path_a, pair.path_b)))


def sample_paths(paths: Sequence[Path], count: int, seed: int) -> list[Path]:
    """A seeded sample of `count` paths (all of them, shuffled, if fewer)."""
    chosen = list(paths)
    random.Random(seed).shuffle(chosen)
    return chosen[:count]


def to_input_tensor(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], layout: str, color_order: str = "RGB"
) -> np.ndarray:
    """RGB uint8 NHWC images to the float32 model input: (x - mean) / std in the given layout and colour order."""
    if color_order == "BGR":
        images = images[..., ::-1]
    x = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)
