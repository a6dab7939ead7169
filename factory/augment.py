"""Training augmentation of aligned faces.

`basic`: a random horizontal flip and a small translation, what the seed recipes train with.
`strong`: for distillation, where every view of a face gets its true target from the teacher, so the views
may move far from the aligned crop: flip, one random similarity warp (scale, rotation, shift; the area it
uncovers is black, like the aligned crops' own borders), colour and brightness jitter, grey scale, blur or
a lower resolution, and random erasing. Each face's view is drawn from its own generator, so a view is a
pure function of (seed, face, view number) and teacher outputs of fixed views can be cached
(`factory.teachers.cache`).
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass

import cv2
import numpy as np

# Bumped whenever `strong_view` changes what it draws or how: cached teacher outputs of older views are stale.
STRONG_VERSION = 1


@dataclass(frozen=True)
class StrongAugmentation:
    """Ranges of the strong augmentation (defaults suit 112x112 ArcFace-template crops)."""

    scale: tuple[float, float] = (0.9, 1.1)
    rotation_degrees: float = 10.0
    shift_fraction: float = 0.06
    colour_probability: float = 0.8
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    grey_probability: float = 0.1
    blur_probability: float = 0.15
    low_resolution_probability: float = 0.15
    erase_probability: float = 0.25
    erase_area: tuple[float, float] = (0.02, 0.15)


@dataclass(frozen=True)
class BasicDraw:
    """The random choices of `basic` augmentation for a batch: which faces flip, and each one's shift."""

    flip: np.ndarray  # (N,) bool
    shifts: np.ndarray | None  # (N, 2) offsets into the padded face, None without shifting

    def __getitem__(self, part: slice) -> BasicDraw:
        """The draws of a slice of the batch (a distributed rank's share of a global batch)."""
        return BasicDraw(self.flip[part], None if self.shifts is None else self.shifts[part])


def draw_basic(rng: np.random.Generator, count: int, max_shift: int) -> BasicDraw:
    """Draw `basic` augmentation for `count` faces (flips first, then shifts: the order fixes the stream)."""
    flip = rng.random(count) < 0.5
    shifts = rng.integers(0, 2 * max_shift + 1, size=(count, 2)) if max_shift else None
    return BasicDraw(flip, shifts)


def apply_basic(batch: np.ndarray, draw: BasicDraw, max_shift: int) -> np.ndarray:
    """Flip and translate (zero padded) an NHWC uint8 batch as `draw` says."""
    out = batch.copy()
    out[draw.flip] = out[draw.flip, :, ::-1]
    if draw.shifts is not None:
        padded = np.pad(out, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
        side = batch.shape[1]
        for index, (dy, dx) in enumerate(draw.shifts):
            out[index] = padded[index, dy : dy + side, dx : dx + side]
    return out


def basic_batch(batch: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Random horizontal flip and a small translation (zero padded) of an NHWC uint8 batch."""
    return apply_basic(batch, draw_basic(rng, len(batch), max_shift), max_shift)


def strong_view(image: np.ndarray, rng: np.random.Generator,
                spec: StrongAugmentation = StrongAugmentation()) -> np.ndarray:
    """One strongly augmented view of an HWC uint8 RGB face (a new array)."""
    size = image.shape[0]
    out = image[:, ::-1] if rng.random() < 0.5 else image
    scale = rng.uniform(*spec.scale)
    angle = rng.uniform(-spec.rotation_degrees, spec.rotation_degrees)
    shift = rng.uniform(-spec.shift_fraction, spec.shift_fraction, size=2) * size
    matrix = cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), angle, scale)
    matrix[:, 2] += shift
    out = cv2.warpAffine(np.ascontiguousarray(out), matrix, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.float32)
    if rng.random() < spec.colour_probability:
        out *= 1.0 + rng.uniform(-spec.brightness, spec.brightness)
        mean = out.mean()
        out = (out - mean) * (1.0 + rng.uniform(-spec.contrast, spec.contrast)) + mean
        grey = out @ np.array([0.299, 0.587, 0.114], np.float32)
        out = grey[..., None] + (out - grey[..., None]) * (1.0 + rng.uniform(-spec.saturation, spec.saturation))
    if rng.random() < spec.grey_probability:
        out = np.repeat((out @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], 3, axis=2)
    if rng.random() < spec.blur_probability:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < spec.low_resolution_probability:
        small = int(size * rng.uniform(0.35, 0.7))
        out = cv2.resize(cv2.resize(out, (small, small), interpolation=cv2.INTER_AREA), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    if rng.random() < spec.erase_probability:
        area = rng.uniform(*spec.erase_area) * size * size
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
        height = min(size, round(math.sqrt(area * aspect)))
        width = min(size, round(math.sqrt(area / aspect)))
        top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
        out[top : top + height, left : left + width] = rng.uniform(0, 255, size=(height, width, 3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def view_generator(seed: int, face_key: int, view: int) -> np.random.Generator:
    """The generator that draws view `view` of the face with stable key `face_key` (see `face_keys`)."""
    return np.random.default_rng([seed, STRONG_VERSION, face_key, view])


def face_keys(digests: list[str]) -> np.ndarray:
    """Stable integer keys of faces from their content digests (hex), independent of split order."""
    return np.array([int(digest[:15], 16) for digest in digests], np.int64)


def strong_views(images: np.ndarray, keys: np.ndarray, views: np.ndarray, seed: int,
                 pool: Executor | None = None) -> np.ndarray:
    """View `views[i]` of face `images[i]` (keys from `face_keys`) for a whole NHWC uint8 batch.

    `pool` draws the views on its threads (OpenCV releases the GIL); each view has its own generator, so the
    batch is the same either way.
    """
    if len(images) != len(keys) or len(images) != len(views):
        raise ValueError(f"{len(images)} images, {len(keys)} keys, {len(views)} views: expected one of each per face")

    def one(i: int) -> np.ndarray:
        return strong_view(images[i], view_generator(seed, int(keys[i]), int(views[i])))

    indices = range(len(images))
    return np.stack(list(pool.map(one, indices)) if pool is not None else [one(i) for i in indices])
