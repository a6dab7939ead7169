"""MTCNN face detector with five landmarks.

Zhang, Zhang, Li, Qiao: "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks", IEEE Signal Processing Letters 23(10), 2016. Three cascaded networks: P-Net proposes
windows over an image pyramid, R-Net rejects and refines them, O-Net refines again and regresses the
five landmarks (left eye, right eye, nose, left mouth corner, right mouth corner).

The networks are defined here; their pretrained weights are read from the files that the
`facenet-pytorch` wheel ships (MIT licence) without installing or importing that package: the wheel
is a zip file, checked by sha256, and each network's state dict inside it is read with
`torch.load(weights_only=True)`, which builds tensors only and runs no pickled code.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.errors import FactoryError

WHEEL_NAME = "facenet_pytorch-2.6.0-py3-none-any.whl"
WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"
DEFAULT_WHEEL = Path(__file__).resolve().parents[2] / ".cache" / WHEEL_NAME
FETCH_COMMAND = "pip download --no-deps --dest .cache facenet-pytorch==2.6.0"


class PNet(nn.Module):
    """Proposal network: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(x))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(self.pool1(x)))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement network on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The weights come from a Caffe model that flattened in (W, H, C) order.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output network on 48x48 crops: score, box refinement and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)


def mtcnn_wheel() -> Path:
    """The facenet-pytorch wheel holding MTCNN's weights (`FACTORY_MTCNN_WHEEL` overrides the place)."""
    path = Path(os.environ.get("FACTORY_MTCNN_WHEEL", DEFAULT_WHEEL))
    if not path.is_file():
        raise FactoryError(f"MTCNN weights not found: {path} — fetch the wheel that ships them with "
                           f"`{FETCH_COMMAND}` (make does this on install) or set FACTORY_MTCNN_WHEEL")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise FactoryError(f"{path} has sha256 {digest}, expected {WHEEL_SHA256} ({WHEEL_NAME}); fetch it again")
    return path


def load_networks(wheel: Path | None = None) -> tuple[PNet, RNet, ONet]:
    """P-, R- and O-Net with their pretrained weights, in eval mode."""
    wheel = wheel or mtcnn_wheel()
    networks = (PNet(), RNet(), ONet())
    with zipfile.ZipFile(wheel) as archive:
        for name, network in zip(("pnet", "rnet", "onet"), networks, strict=True):
            blob = archive.read(f"facenet_pytorch/data/{name}.pt")
            network.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu"))
            network.eval()
    return networks


@dataclass
class Detection:
    """One face: box (x1, y1, x2, y2) in pixels, confidence, and five (x, y) landmarks."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (overlap by IoU, or by the smaller area)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)[::-1]
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        denominator = np.minimum(area[best], area[rest]) if mode == "min" else area[best] + area[rest] - inter
        order = rest[inter / denominator <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _refine(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply regressed offsets (fractions of the box size) to boxes."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] += offsets[:, 0] * w
    out[:, 1] += offsets[:, 1] * h
    out[:, 2] += offsets[:, 2] * w
    out[:, 3] += offsets[:, 3] * h
    return out


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


class MTCNN:
    """The three-stage cascade on RGB uint8 images.

    Args:
        min_face: Smallest face side (pixels) searched for.
        thresholds: Score thresholds of the three stages.
        pyramid_factor: Scale step of the image pyramid.
    """

    def __init__(self, min_face: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 pyramid_factor: float = 0.709, wheel: Path | None = None) -> None:
        self.pnet, self.rnet, self.onet = load_networks(wheel)
        self.min_face, self.thresholds, self.factor = min_face, thresholds, pyramid_factor

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 HWC image, most confident first."""
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float()
        height, width = image.shape[:2]
        boxes = self._propose(tensor, height, width)
        if len(boxes):
            boxes = self._stage(tensor, boxes, height, width, self.rnet, 24, self.thresholds[1])[0]
        if not len(boxes):
            return []
        boxes, landmarks = self._stage(tensor, boxes, height, width, self.onet, 48, self.thresholds[2])
        order = np.argsort(-boxes[:, 4])
        return [Detection(boxes[i, :4], float(boxes[i, 4]), landmarks[i]) for i in order]

    def _propose(self, image: torch.Tensor, height: int, width: int) -> np.ndarray:
        scale = 12.0 / self.min_face
        side = min(height, width) * scale
        candidates = []
        while side >= 12:
            size = (int(height * scale + 1), int(width * scale + 1))
            offsets, probs = self.pnet(_normalise(F.interpolate(image, size=size, mode="area")))
            score = probs[0, 1].numpy()
            ys, xs = np.nonzero(score >= self.thresholds[0])
            if len(ys):
                cells = np.stack([xs, ys], axis=1).astype(np.float32)
                # P-Net sees 12x12 windows at stride 2 of the scaled image.
                top_left = np.floor((2 * cells + 1) / scale)
                bottom_right = np.floor((2 * cells + 12) / scale)
                found = np.concatenate([top_left, bottom_right, score[ys, xs, None],
                                        offsets[0, :, ys, xs].numpy().T], axis=1)
                candidates.append(found[nms(found[:, :4], found[:, 4], 0.5)])
            scale *= self.factor
            side *= self.factor
        if not candidates:
            return np.zeros((0, 5), np.float32)
        found = np.concatenate(candidates)
        found = found[nms(found[:, :4], found[:, 4], 0.7)]
        w, h = found[:, 2] - found[:, 0], found[:, 3] - found[:, 1]
        refined = np.stack([found[:, 0] + found[:, 5] * w, found[:, 1] + found[:, 6] * h,
                            found[:, 2] + found[:, 7] * w, found[:, 3] + found[:, 8] * h, found[:, 4]], axis=1)
        return _square(refined)

    def _stage(self, image: torch.Tensor, boxes: np.ndarray, height: int, width: int, network: nn.Module,
               crop: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Crop every box (1-based inclusive pixel coordinates, clipped), score and refine it."""
        whole = np.trunc(boxes[:, :4]).astype(np.int64)
        x1, y1 = np.maximum(whole[:, 0], 1), np.maximum(whole[:, 1], 1)
        x2, y2 = np.minimum(whole[:, 2], width), np.minimum(whole[:, 3], height)
        valid = (x2 > x1 - 1) & (y2 > y1 - 1)
        boxes, x1, y1, x2, y2 = boxes[valid], x1[valid], y1[valid], x2[valid], y2[valid]
        if not len(boxes):
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        crops = torch.cat([
            F.interpolate(image[:, :, y1[i] - 1 : y2[i], x1[i] - 1 : x2[i]], size=(crop, crop), mode="area")
            for i in range(len(boxes))
        ])
        outputs = [o.numpy() for o in network(_normalise(crops))]
        offsets, probs = outputs[0], outputs[-1]
        keep = probs[:, 1] > threshold
        scored = np.concatenate([boxes[keep, :4], probs[keep, 1:2]], axis=1)
        offsets = offsets[keep]
        if len(outputs) == 2:  # R-Net: suppress, refine, square
            picked = nms(scored[:, :4], scored[:, 4], 0.7)
            return _square(_refine(scored[picked], offsets[picked])), np.zeros((0, 5, 2), np.float32)
        points = outputs[1][keep]
        w = scored[:, 2] - scored[:, 0] + 1
        h = scored[:, 3] - scored[:, 1] + 1
        landmarks = np.stack([w[:, None] * points[:, :5] + scored[:, 0:1] - 1,
                              h[:, None] * points[:, 5:] + scored[:, 1:2] - 1], axis=2)
        refined = _refine(scored, offsets)
        picked = nms(refined[:, :4], refined[:, 4], 0.7, mode="min")
        return refined[picked], landmarks[picked]

