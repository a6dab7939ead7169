"""Training and scoring the LEFV face detector against MTCNN as the teacher.

There is no face-detection dataset here (no WIDER FACE), so the detector learns from the real raw photos
under `raw-samples/` with MTCNN's detections as pseudo-labels (boxes and five landmarks of every face it finds
with score >= `TEACHER_MIN_SCORE`), and is scored against MTCNN on photos it never trained on: recall of
MTCNN's faces at IoU >= 0.5, the IoU of each matched box, the landmark error normalised by the inter-ocular
distance, and the detections MTCNN does not confirm.

Deployment convention (what `letterbox` does, and what an app must do): scale the photo so its longer side
is the detector's input size, place it at the top-left of a black square canvas, feed float RGB pixels in
[0, 255]; `decode` maps the output map to boxes in canvas pixels, `to_photo` back to the photo.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.align.mtcnn import MTCNN, nms
from factory.align.prepare import read_photo, read_raw_samples
from factory.errors import FactoryError
from factory.io import atomic_path
from factory.lefv.config import DetectorTrainConfig
from factory.lefv.detector_net import OUTPUT_CHANNELS, REGRESSION_SCALE, STRIDE, LEFVDetector
from factory.recipe import Recipe, data_path
from factory.weights import save_weights

TEACHER_MIN_SCORE = 0.9
# Faces smaller than this (pixels at the detector's input) are neither learnt nor counted as missed: at
# stride 16 they cover about one cell. Their area is ignored by the loss, not taught as background.
MIN_FACE = 20
MATCH_IOU = 0.5
PEAK_THRESHOLD = 0.3
NMS_IOU = 0.4
# Flipping a face swaps its left and right landmarks: eyes 0<->1, mouth corners 3<->4.
FLIP_ORDER = (1, 0, 2, 4, 3)


@dataclass(eq=False)
class Face:
    """One face: box (x1, y1, x2, y2), five (x, y) landmarks, score, all in one image's pixels."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float = 1.0


@dataclass
class Photo:
    """A raw photo with the teacher's faces; `reference` is the face that the shared data aligned."""

    path: Path
    pixels: np.ndarray
    faces: list[Face]
    reference: Face | None = None
    aligned_reference: Path | None = None


def teacher_photos(samples: Sequence[tuple[Path, np.ndarray, Path | None]], teacher: MTCNN | None = None,
                   log: Callable[[str], None] = print) -> list[Photo]:
    """Each raw photo with MTCNN's faces; the face nearest the reference landmarks becomes `reference`."""
    teacher = teacher or MTCNN()
    photos = []
    started = time.perf_counter()
    for path, reference_landmarks, aligned in samples:
        pixels = read_photo(path)
        faces = [Face(d.box.astype(np.float32), d.landmarks.astype(np.float32), d.score)
                 for d in teacher.detect(pixels) if d.score >= TEACHER_MIN_SCORE]
        reference = None
        if faces:
            errors = [float(np.abs(f.landmarks - reference_landmarks).mean()) for f in faces]
            best = int(np.argmin(errors))
            if errors[best] < 0.1 * _interocular(reference_landmarks):
                reference = faces[best]
        photos.append(Photo(path, pixels, faces, reference, aligned))
    log(f"MTCNN teacher: {sum(len(p.faces) for p in photos)} faces in {len(photos)} photos "
        f"({time.perf_counter() - started:.0f} s)")
    return photos


def split_held_out(photos: Sequence[Photo], every: int) -> tuple[list[Photo], list[Photo]]:
    """(train, held-out): every `every`-th photo in path order is held out; the split never changes."""
    ordered = sorted(photos, key=lambda p: str(p.path))
    held = [p for i, p in enumerate(ordered) if i % every == every - 1]
    train = [p for i, p in enumerate(ordered) if i % every != every - 1]
    return train, held


def _interocular(landmarks: np.ndarray) -> float:
    return float(np.linalg.norm(landmarks[0] - landmarks[1]))


# ---------------------------------------------------------------------------------------------- geometry


def letterbox(pixels: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """The photo scaled so its longer side is `size`, at the top-left of a black size x size canvas."""
    scale = size / max(pixels.shape[:2])
    height, width = round(pixels.shape[0] * scale), round(pixels.shape[1] * scale)
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:height, :width] = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    return canvas, scale


def to_photo(faces: Sequence[Face], scale: float) -> list[Face]:
    """Faces decoded on a letterboxed canvas, in the original photo's pixels."""
    return [Face(f.box / scale, f.landmarks / scale, f.score) for f in faces]


def _transform_face(face: Face, matrix: np.ndarray, flipped: bool) -> Face:
    corners = np.array([[face.box[0], face.box[1]], [face.box[2], face.box[1]],
                        [face.box[0], face.box[3]], [face.box[2], face.box[3]]], np.float32)
    corners = corners @ matrix[:, :2].T + matrix[:, 2]
    landmarks = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    if flipped:
        landmarks = landmarks[list(FLIP_ORDER)]
    box = np.array([corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()], np.float32)
    return Face(box, landmarks.astype(np.float32), face.score)


def augment(photo: Photo, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[Face]]:
    """A random zoom, shift and mirror of the photo onto a size x size canvas, with its faces moved along.

    The zoom draws the largest face's side uniformly between 12% and 60% of the canvas, so the detector
    sees faces of every size it is meant to find, and the shift keeps that face's centre on the canvas.
    """
    anchor = max(photo.faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    side = max(anchor.box[2] - anchor.box[0], anchor.box[3] - anchor.box[1])
    scale = rng.uniform(0.12, 0.6) * size / side
    centre = (anchor.box[:2] + anchor.box[2:]) / 2 * scale
    target = rng.uniform(0.15 * size, 0.85 * size, 2)
    flipped = bool(rng.random() < 0.5)
    matrix = np.array([[scale, 0, target[0] - centre[0]], [0, scale, target[1] - centre[1]]], np.float32)
    if flipped:
        matrix = np.array([[-1, 0, size - 1], [0, 1, 0]], np.float32) @ np.vstack([matrix, [0, 0, 1]])
    image = cv2.warpAffine(photo.pixels, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    # Brightness and contrast jitter, as photos come from many cameras.
    image = np.clip(image.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-25, 25), 0, 255).astype(np.uint8)
    return image, [_transform_face(f, matrix, flipped) for f in photo.faces]


# ------------------------------------------------------------------------------------------------ targets


def encode(faces: Sequence[Face], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training targets on the output grid: heatmap, regression (14 channels), its weight, ignore mask.

    The heatmap is a Gaussian around each face centre's cell (sigma = face side / 6 cells, at least 0.5);
    the regression is taught at cells whose heatmap is >= 0.5, so the peak and its close neighbours all
    predict the whole face. Faces under `MIN_FACE` pixels mark their cells as ignored.
    """
    cells = size // STRIDE
    heatmap = np.zeros((cells, cells), np.float32)
    regression = np.zeros((OUTPUT_CHANNELS - 1, cells, cells), np.float32)
    weight = np.zeros((cells, cells), np.float32)
    ignore = np.zeros((cells, cells), bool)
    centres = (np.arange(cells, dtype=np.float32) + 0.5) * STRIDE
    for face in faces:
        width, height = face.box[2] - face.box[0], face.box[3] - face.box[1]
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        if not (0 <= cx < size and 0 <= cy < size) or width <= 1 or height <= 1:
            continue
        if max(width, height) < MIN_FACE:
            x0, y0 = max(int(face.box[0] // STRIDE), 0), max(int(face.box[1] // STRIDE), 0)
            ignore[y0 : int(face.box[3] // STRIDE) + 1, x0 : int(face.box[2] // STRIDE) + 1] = True
            continue
        sigma = max(max(width, height) / STRIDE / 6.0, 0.5)
        peak_x, peak_y = int(cx // STRIDE), int(cy // STRIDE)
        gx = np.exp(-((np.arange(cells) - peak_x) ** 2) / (2 * sigma**2))
        gy = np.exp(-((np.arange(cells) - peak_y) ** 2) / (2 * sigma**2))
        gaussian = np.outer(gy, gx).astype(np.float32)
        heatmap = np.maximum(heatmap, gaussian)
        mine = (gaussian >= 0.5) & (gaussian >= weight)
        ys, xs = np.nonzero(mine)
        for y, x in zip(ys, xs, strict=True):
            ox, oy = centres[x], centres[y]
            regression[0, y, x] = (cx - ox) / REGRESSION_SCALE
            regression[1, y, x] = (cy - oy) / REGRESSION_SCALE
            regression[2, y, x] = math.log(width / REGRESSION_SCALE)
            regression[3, y, x] = math.log(height / REGRESSION_SCALE)
            regression[4::2, y, x] = (face.landmarks[:, 0] - ox) / REGRESSION_SCALE
            regression[5::2, y, x] = (face.landmarks[:, 1] - oy) / REGRESSION_SCALE
        weight = np.where(mine, gaussian, weight)
    ignore &= heatmap < 0.5
    return heatmap, regression, weight, ignore


def detection_loss(output: torch.Tensor, heatmap: torch.Tensor, regression: torch.Tensor, weight: torch.Tensor,
                   ignore: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """CenterNet's penalty-reduced focal loss on the score plus weighted L1 on boxes and landmarks."""
    score = output[:, 0].sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = heatmap.eq(1.0).float()
    negative = (1.0 - positive) * (~ignore).float()
    pos_loss = -(torch.log(score) * (1 - score) ** 2 * positive).sum()
    neg_loss = -(torch.log(1 - score) * score**2 * (1 - heatmap) ** 4 * negative).sum()
    faces = positive.sum().clamp(min=1.0)
    focal = (pos_loss + neg_loss) / faces
    w = weight.unsqueeze(1)
    per_cell = F.l1_loss(output[:, 1:], regression, reduction="none") * w
    normaliser = w.sum().clamp(min=1.0)
    box = per_cell[:, :4].sum() / normaliser
    landmarks = per_cell[:, 4:].sum() / normaliser / 2.5  # 10 landmark channels weigh as 4 box channels
    total = focal + box + landmarks
    return total, {"score": focal.item(), "box": box.item(), "landmarks": landmarks.item()}


# ------------------------------------------------------------------------------------------------- decode


def decode(output: np.ndarray, threshold: float = PEAK_THRESHOLD, nms_iou: float = NMS_IOU) -> list[Face]:
    """Faces (canvas pixels) from one deployed (15, H, W) output map: local peaks of the face probability
    (channel 0) above `threshold`, then non-maximum suppression."""
    score = output[0]
    padded = np.pad(score, 1, constant_values=-1.0)
    neighbourhood = np.max([padded[dy : dy + score.shape[0], dx : dx + score.shape[1]]
                            for dy in range(3) for dx in range(3)], axis=0)
    ys, xs = np.nonzero((score >= neighbourhood) & (score >= threshold))
    if not len(ys):
        return []
    ox, oy = (xs + 0.5) * STRIDE, (ys + 0.5) * STRIDE
    reg = output[1:, ys, xs] * REGRESSION_SCALE
    cx, cy = ox + reg[0], oy + reg[1]
    width = np.exp(np.clip(output[3, ys, xs], -10, 10)) * REGRESSION_SCALE
    height = np.exp(np.clip(output[4, ys, xs], -10, 10)) * REGRESSION_SCALE
    boxes = np.stack([cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2], axis=1)
    landmarks = np.stack([ox + reg[4::2], oy + reg[5::2]], axis=-1).transpose(1, 0, 2)
    scores = score[ys, xs]
    keep = nms(boxes, scores, nms_iou)
    return [Face(boxes[i].astype(np.float32), landmarks[i].astype(np.float32), float(scores[i])) for i in keep]


# ---------------------------------------------------------------------------------------------- scoring


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match(found: Sequence[Face], truth: Sequence[Face], min_iou: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by IoU: (found index, truth index, IoU) with IoU >= `min_iou`."""
    candidates = sorted(((box_iou(f.box, t.box), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)),
                        reverse=True)
    used_found, used_truth, pairs = set(), set(), []
    for iou, i, j in candidates:
        if iou < min_iou:
            break
        if i in used_found or j in used_truth:
            continue
        used_found.add(i)
        used_truth.add(j)
        pairs.append((i, j, iou))
    return pairs


@dataclass
class DetectionScore:
    """How a detector's faces compare with the teacher's on a set of photos."""

    photos: int = 0
    faces: int = 0
    matched: int = 0
    ious: list[float] = field(default_factory=list)
    landmark_nme: list[float] = field(default_factory=list)
    unconfirmed: int = 0
    reference_faces: int = 0
    reference_found: int = 0

    def add(self, found: Sequence[Face], photo: Photo, scale: float, min_face: float) -> None:
        """Score one photo; `found` is in photo pixels, faces under `min_face` canvas pixels are not counted."""
        truth = [f for f in photo.faces if max(f.box[2] - f.box[0], f.box[3] - f.box[1]) * scale >= min_face]
        self.photos += 1
        self.faces += len(truth)
        pairs = match(found, truth)
        self.matched += len(pairs)
        for i, j, iou in pairs:
            self.ious.append(iou)
            self.landmark_nme.append(float(np.linalg.norm(found[i].landmarks - truth[j].landmarks, axis=1).mean()
                                           / max(_interocular(truth[j].landmarks), 1.0)))
        # A detection overlapping a small (uncounted) teacher face is not a false alarm.
        small = [f for f in photo.faces if not any(f is t for t in truth)]
        matched_found = {i for i, _, _ in pairs}
        self.unconfirmed += sum(1 for i, f in enumerate(found) if i not in matched_found
                                and not any(box_iou(f.box, s.box) >= 0.3 for s in small))
        if photo.reference is not None and any(photo.reference is t for t in truth):
            self.reference_faces += 1
            self.reference_found += any(truth[j] is photo.reference for _, j, _ in pairs)

    def summary(self) -> dict[str, float | int]:
        ious, nme = np.asarray(self.ious), np.asarray(self.landmark_nme)
        return {
            "photos": self.photos, "teacher_faces": self.faces, "matched": self.matched,
            "recall": self.matched / max(self.faces, 1),
            "reference_recall": self.reference_found / max(self.reference_faces, 1),
            "reference_faces": self.reference_faces,
            "iou_mean": float(ious.mean()) if len(ious) else 0.0,
            "iou_median": float(np.median(ious)) if len(ious) else 0.0,
            "landmark_nme_mean": float(nme.mean()) if len(nme) else 0.0,
            "landmark_nme_median": float(np.median(nme)) if len(nme) else 0.0,
            "unconfirmed_detections": self.unconfirmed,
            "unconfirmed_per_photo": self.unconfirmed / max(self.photos, 1),
        }


def score_detector(run: Callable[[np.ndarray], np.ndarray], photos: Sequence[Photo], size: int) -> DetectionScore:
    """Run a detector (batch of NCHW float canvases -> output maps) over photos and score it against MTCNN."""
    scored = DetectionScore()
    for photo in photos:
        canvas, scale = letterbox(photo.pixels, size)
        output = run(np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32))[0]
        scored.add(to_photo(decode(output), scale), photo, scale, MIN_FACE)
    return scored


# ----------------------------------------------------------------------------------------------- training


class DeployedDetector(nn.Module):
    """What detector artifacts compute: (pixels - 127.5) / 128 in, the output map with channel 0 as a probability.

    Every artifact's output is float32, int8 ones too, so that apps need no quantisation maths. LiteRT's converter
    runs the sigmoid and the concatenation in int8 after a quantised network (it has int8 kernels for both) and then
    leaves the graph's output int8 (measured: `real = 0.018 * (q - 127)`); the two scalings at the end are by
    powers of two, so they change no float value, and keep the output float32 (tests/test_pipeline.py checks it).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.network(normalise(pixels))
        return torch.cat([torch.sigmoid(out[:, :1]), out[:, 1:]], dim=1) * 2.0 * 0.5


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """The detector's input normalisation: (pixel - 127.5) / 128."""
    return (pixels - 127.5) * (1.0 / 128.0)


def train_detector(photos: Sequence[Photo], cfg: DetectorTrainConfig, input_size: int,
                   log: Callable[[str], None] = print, evaluate: Callable[[nn.Module], dict] | None = None,
                   evaluate_every: int = 0) -> tuple[nn.Module, list]:
    """Train a fresh `LEFVDetector` on `photos` (those with at least one teacher face); returns it and the log.

    `evaluate` (called every `evaluate_every` steps and at the end, on the deployed graph) adds held-out
    scores to the log.
    """
    usable = [p for p in photos if p.faces]
    if not usable:
        raise FactoryError("no training photo has a teacher face; check the raw photos and MTCNN's weights")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = LEFVDetector()
    deployed = DeployedDetector(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.learning_rate, total_steps=cfg.steps,
                                                   pct_start=0.05)
    history, running, started = [], {}, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        images, targets = [], [[], [], [], []]
        for index in rng.integers(0, len(usable), cfg.batch_size):
            image, faces = augment(usable[index], input_size, rng)
            images.append(image)
            for bucket, value in zip(targets, encode(faces, input_size), strict=True):
                bucket.append(value)
        x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32))
        heatmap, regression, weight, ignore = (torch.from_numpy(np.stack(t)) for t in targets)
        model.train()
        loss, parts = detection_loss(model(normalise(x)), heatmap, regression, weight, ignore)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        for key, value in parts.items():
            running[key] = running.get(key, 0.0) + value
        if step % 100 == 0 or step == cfg.steps:
            entry = {"step": step, **{k: round(v / 100, 4) for k, v in running.items()},
                     "elapsed_s": round(time.perf_counter() - started, 1)}
            running = {}
            if evaluate is not None and evaluate_every and (step % evaluate_every == 0 or step == cfg.steps):
                deployed.eval()
                entry["held_out"] = evaluate(deployed)
            history.append(entry)
            log(f"step {step}/{cfg.steps}: {entry}")
    model.eval()
    return model, history


def torch_runner(deployed: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Batch runner of a deployed PyTorch detector (eval mode, no gradients)."""

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return deployed(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    deployed.eval()
    return run


def load_photos(recipe: Recipe, log: Callable[[str], None] = print) -> tuple[list[Photo], list[Photo]]:
    """(train, held-out) raw photos of the recipe's detector, with MTCNN's faces."""
    detector = recipe.pipeline.detector
    root = recipe.resolve(recipe.data.root)
    photos = teacher_photos(read_raw_samples(root, data_path(recipe, detector.photos)), log=log)
    return split_held_out(photos, detector.held_out_every)


def train_detector_stage(recipe: Recipe, output: Path, log: Callable[[str], None] = print) -> dict:
    """`factory train RECIPE --stage detector`: train, score on held-out photos, save weights and the log."""
    if recipe.pipeline is None:
        raise FactoryError(f"recipe {recipe.name!r} has no 'pipeline' section, so no detector to train")
    detector = recipe.pipeline.detector
    train_photos, held_out = load_photos(recipe, log)
    size = detector.input_size
    log(f"training the LEFV detector on {len(train_photos)} photos; {len(held_out)} held out")

    def evaluate(deployed: nn.Module) -> dict:
        return score_detector(torch_runner(deployed), held_out, size).summary()

    started = time.perf_counter()
    model, history = train_detector(train_photos, detector.train, size, log, evaluate,
                                    evaluate_every=max(detector.train.steps // 5, 1))
    wall = time.perf_counter() - started
    deployed = DeployedDetector(model)
    summary = {
        "architecture": "lefv_detector",
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "teacher": f"MTCNN (faces with score >= {TEACHER_MIN_SCORE}); faces under {MIN_FACE} px at the input ignored",
        "photos": {"train": len(train_photos), "held_out": len(held_out),
                   "train_faces": sum(len(p.faces) for p in train_photos),
                   "held_out_faces": sum(len(p.faces) for p in held_out)},
        "train_config": {"input_size": size, **dataclasses.asdict(detector.train)},
        "history": history,
        "wall_time_s": round(wall, 1),
        "evaluation": {"held_out": evaluate(deployed),
                       "train": score_detector(torch_runner(deployed), train_photos, size).summary()},
    }
    log(f"held-out: {summary['evaluation']['held_out']}")
    save_weights(model, output, {"architecture": "lefv_detector", "training": json.dumps(summary)})
    with atomic_path(output.with_suffix(".train.json")) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
