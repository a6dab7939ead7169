"""Small models and data the tests make themselves (no downloads, no real faces)."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from torch import nn

from factory.lefv.detection import Face, Photo, box_iou
from factory.models.mobilefacenet import Bottleneck, conv_block

REPO = Path(__file__).resolve().parents[1]
FACES = (REPO.parent / "shared" / "data" / "faces").resolve()


class TinyFaceNet(nn.Module):
    """A few MobileFaceNet blocks (PReLU, depthwise, residual, GDC head): the real op mix, fast to compile."""

    def __init__(self, embedding_size: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_block(3, 16, 3, stride=2),
            Bottleneck(16, 16, 1, 2),
            Bottleneck(16, 32, 2, 2),
            conv_block(32, 64, 1),
            conv_block(64, 64, 28, groups=64, linear=True),
            conv_block(64, embedding_size, 1, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)


class Unexportable(nn.Module):
    """A network no converter can export: its forward fails (for compile-failure tests)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this network cannot be traced")


def settle_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set batch-norm statistics from `images` so a randomly initialised model has sane activations."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def synthetic_faces(root: Path, identities: int = 4, per_identity: int = 6, size: int = 112) -> list[Path]:
    """Write face-like test images (one sub-folder per identity): a per-identity pattern plus noise."""
    rng = np.random.default_rng(0)
    paths = []
    for identity in range(identities):
        base = rng.integers(0, 256, size=(8, 8, 3)).astype(np.float32)
        folder = root / f"person_{identity}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(1, per_identity + 1):
            image = cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)
            image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
            path = folder / f"person_{identity}_{index:04d}.jpg"
            cv2.imwrite(str(path), image)
            paths.append(path)
    return paths


def synthetic_dataset(root: Path, identities: int = 4, per_identity: int = 6) -> Path:
    """A face folder with a training split and an LFW-format pairs file (2 folds), made from scratch."""
    paths = synthetic_faces(root / "aligned", identities, per_identity)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "train.txt").write_text(
        "".join(f"{p.relative_to(root)}\t{p.parent.name}\n" for p in paths)
    )
    lines = ["2\t3"]
    for fold in range(2):
        a, b = f"person_{2 * fold}", f"person_{2 * fold + 1}"
        lines += [f"{a}\t1\t{i}" for i in (2, 3, 4)]
        lines += [f"{a}\t{i}\t{b}\t{i}" for i in (1, 2, 3)]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


def shipped_recipe_dict(faces_root: Path) -> dict:
    """The shipped MobileFaceNet recipe as plain data, reading `faces_root`, without the ablation weights
    list (its paths are relative to recipes/; tests/test_ablation.py covers it)."""
    import yaml

    data = yaml.safe_load((REPO / "recipes" / "mobilefacenet.yaml").read_text())
    data["data"]["root"] = str(faces_root)
    data.pop("ablation")
    return data


def recipe_dict(data_root: Path, weights: str = "w.safetensors") -> dict:
    """A small valid recipe as plain data, pointing at `data_root`."""
    return {
        "name": "tiny",
        "model": {"architecture": "mobilefacenet", "embedding_size": 128},
        "weights": {"path": weights},
        "train": {"split": "splits/train.txt", "epochs": 1, "batch_size": 8, "warmup_steps": 1},
        "data": {
            "root": str(data_root),
            "calibration": {"split": "splits/train.txt", "count": 8, "allow_fewer_than_300": True},
            "evaluation": {"pairs": "pairs.txt", "images": "aligned", "min_parity_images": 4},
        },
        "targets": [{"format": "tflite", "precisions": ["fp32", "int8"]}],
    }


# Landmark layout of a synthetic face inside its box, as fractions (eyes, nose, mouth corners).
LAYOUT = np.array([[0.3, 0.38], [0.7, 0.38], [0.5, 0.58], [0.34, 0.78], [0.66, 0.78]], np.float32)


def face_at(x: float, y: float, side: float) -> Face:
    box = np.array([x, y, x + side, y + side], np.float32)
    return Face(box, (np.array([x, y]) + LAYOUT * side).astype(np.float32), 1.0)


def draw_photo(rng: np.random.Generator, height: int = 240, width: int = 320) -> Photo:
    """A noisy background with one or two drawn 'faces' (a skin disc with dark eyes and mouth)."""
    pixels = rng.integers(0, 90, (height, width, 3)).astype(np.uint8)
    faces = []
    for _ in range(rng.integers(1, 3)):
        side = float(rng.uniform(50, 110))
        x, y = float(rng.uniform(0, width - side)), float(rng.uniform(0, height - side))
        if any(box_iou(np.array([x, y, x + side, y + side]), f.box) > 0 for f in faces):
            continue
        face = face_at(x, y, side)
        cv2.ellipse(pixels, (int(x + side / 2), int(y + side / 2)), (int(side / 2), int(side / 2)), 0, 0, 360,
                    (220, 180, 150), -1)
        for lx, ly in face.landmarks[:2]:
            cv2.circle(pixels, (int(lx), int(ly)), max(int(side / 12), 2), (20, 20, 20), -1)
        cv2.line(pixels, tuple(int(v) for v in face.landmarks[3]), tuple(int(v) for v in face.landmarks[4]),
                 (120, 30, 30), max(int(side / 20), 1))
        faces.append(face)
    return Photo(Path(f"synthetic_{rng.integers(1 << 30)}.jpg"), pixels, faces, faces[0])


def ideal_maps(photos: list[Photo], batch: np.ndarray, size: int) -> np.ndarray:
    """Detector maps of each photo's largest drawn face, found by matching the canvas to the photo."""
    from factory.lefv.detection import encode, letterbox
    from factory.lefv.stages import largest_face

    out = []
    for canvas in batch:
        photo = next(p for p in photos if np.array_equal(letterbox(p.pixels, size)[0].transpose(2, 0, 1), canvas))
        _, scale = letterbox(photo.pixels, size)
        face = largest_face(photo.faces)
        scaled = Face(face.box * scale, face.landmarks * scale)
        heatmap, regression, _, _ = encode([scaled], size)
        out.append(np.concatenate([np.where(heatmap >= 0.999, 1.0, 0.0)[None], regression]).astype(np.float32))
    return np.stack(out)


class Server:
    """Serves `files`; `cut_once` names files whose first response stops half way."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[name], 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


# Synthetic build reports: the committed MobileFaceNet report with the numbers a test sets, so that they fit the
# report types (factory/report_schema.py) exactly as a real build's do.
REPORT_TEMPLATE = REPO / "reports" / "mobilefacenet" / "report.json"


def synthetic_artifact(fmt: str, precision: str, accuracy: float, drop: float = 0.0, size: int = 400_000,
                       median: float | None = 1.0, pairs: int = 6000) -> dict:
    """A report's artifact entry: LFW `accuracy` (a `drop` from the reference), host latency `median` (None:
    not timed) and the pairs it was verified on."""
    import copy
    import json

    entry = copy.deepcopy(json.loads(REPORT_TEMPLATE.read_text())["artifacts"][0])
    entry.update(file=f"m_{precision}.{fmt}", format=fmt, precision=precision, bytes=size, status="verified",
                 benchmarks={}, parity_set={"pairs": pairs, "images": 100, "reference_accuracy": accuracy + drop})
    entry["parity"].update(cosine_mean=0.999, lfw_accuracy=accuracy, lfw_accuracy_drop=drop)
    entry["latency_ms"] = None if median is None else {
        "1_thread": {"median_ms": median, "p90_ms": median * 1.1, "mean_ms": median, "min_ms": median, "runs": 50}}
    return entry


def synthetic_report(recipe: str, accuracy: float, artifacts: list[dict], **model: object) -> dict:
    """A build report of `recipe` with reference LFW `accuracy`, these artifacts, and `model` fields replaced."""
    import copy
    import json

    report = copy.deepcopy(json.loads(REPORT_TEMPLATE.read_text()))
    report.pop("ablation", None)
    report.update(recipe=recipe, verdict="pass", created="2026-11-23T00:00:00+00:00", artifacts=artifacts)
    report["model"].update(architecture=recipe, params=1_000_000, weights_sha256="ab" * 32)
    report["model"].update(model)
    report["evaluation"]["pairs"] = 6000
    report["reference"].update({"lfw_accuracy": accuracy, "lfw_accuracy_std": 0.01, "tar_at_far_1e-03": 0.2})
    return report


def write_report(folder: Path, report: dict) -> Path:
    import json

    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def reduced_recipe(tmp_path: Path, faces_root: Path, **changes) -> Path:
    """The shipped MobileFaceNet recipe on 200 LFW pairs and 128 calibration faces."""
    data = shipped_recipe_dict(faces_root)
    data["name"] = "mobilefacenet_reduced"
    data["weights"]["path"] = str(REPO / "recipes" / data["weights"]["path"])
    data["data"]["calibration"].update(count=128, allow_fewer_than_300=True)
    data["data"]["evaluation"].update(max_pairs=200, min_parity_images=300)
    data["data"]["benchmarks"][0]["max_pairs"] = 100
    data["data"]["evaluation"]["emulated_max_pairs"] = 100
    # 200 pairs: one flipped decision moves accuracy by 0.5 pt, so the drop gate is wider here.
    data["gates"]["int8"]["lfw_accuracy_drop_max"] = 0.03
    data.pop("train")
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_build(recipe: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factory", "build", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=1500)


@dataclass
class ReducedBuild:
    """The shipped MobileFaceNet weights built by the real CLI on a reduced set of real faces."""

    out: Path
    recipe: Path
    result: subprocess.CompletedProcess
