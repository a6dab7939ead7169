"""Reading and checking a build folder: the contract between the factory and the device lab."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class BuildFolderError(Exception):
    """A build folder that is missing, half-written, or whose artifacts do not match the manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def load_manifest(build_dir: Path) -> dict[str, Any]:
    """The manifest of a finished build, with every listed artifact checked by size and sha256."""
    manifest_path = build_dir / "manifest.json"
    if not manifest_path.is_file():
        raise BuildFolderError(f"{build_dir} has no manifest.json: the build did not finish; "
                               "run `python -m factory build RECIPE` again")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise BuildFolderError(f"{manifest_path} is not valid JSON ({error}); rebuild") from None
    for artifact in manifest.get("artifacts", []):
        path = build_dir / artifact["file"]
        io = artifact.get("io", {})
        if not all(key in io.get("input", {}) for key in ("name", "shape", "layout")) or "shape" not in io.get(
                "output", {}):
            raise BuildFolderError(f"{manifest_path} lists {artifact['file']} without its input name, shape and "
                                   "layout or its output shape (key `io`); rebuild with the current factory")
        if not path.exists():
            raise BuildFolderError(f"{path} is listed in the manifest but missing; rebuild")
        if _sha256(path) != artifact["sha256"]:
            raise BuildFolderError(f"{path} does not match its sha256 in the manifest (changed or corrupt); rebuild")
    return manifest


@dataclass
class Golden:
    """The build's golden faces: preprocessed inputs per layout, reference embeddings, pairs among them.

    Attributes:
        faces: Number of faces.
        inputs: Input file per layout ("NCHW", "NHWC"), raw float32 in [0, 255].
        reference: Reference embeddings, shape (faces, embedding size).
        pairs: [index_a, index_b, same] pairs among the faces, for decision flips.
        threshold: The reference's decision threshold on cosine similarity.
    """

    faces: int
    inputs: dict[str, Path]
    reference: np.ndarray
    pairs: list[list[int]]
    threshold: float


def load_golden(build_dir: Path, manifest: dict[str, Any]) -> Golden:
    """The golden set the manifest lists, every file checked by sha256 and size against its shape."""
    golden = manifest.get("golden")
    if not golden:
        raise BuildFolderError(f"{build_dir}/manifest.json lists no golden faces (key `golden`); rebuild with a "
                               "factory that writes them (`python -m factory build RECIPE`)")
    files = {**{f"inputs {layout}": entry for layout, entry in golden["inputs"].items()},
             "reference": golden["reference"]}
    for label, entry in files.items():
        path = build_dir / entry["file"]
        if not path.is_file():
            raise BuildFolderError(f"{path} (golden {label}) is listed in the manifest but missing; rebuild")
        expected_bytes = 4 * int(np.prod(entry["shape"]))
        if path.stat().st_size != expected_bytes or _sha256(path) != entry["sha256"]:
            raise BuildFolderError(f"{path} (golden {label}) does not match its sha256/shape in the manifest; rebuild")
    reference = np.fromfile(build_dir / golden["reference"]["file"], dtype=np.float32)
    return Golden(
        faces=int(golden["faces"]),
        inputs={layout: build_dir / entry["file"] for layout, entry in golden["inputs"].items()},
        reference=reference.reshape(golden["reference"]["shape"]),
        pairs=golden["pairs"],
        threshold=float(golden["threshold"]),
    )

