"""Teacher embeddings computed once and reused across training runs and recipes.

A teacher such as dlib's ResNet takes about 100 ms a face on one CPU thread, so its outputs on the fixed
views of the training faces (`factory.augment.strong_views`, or the plain face as view "plain") are kept
in a cache folder, one safetensors file per (teacher, view), keyed by:

- the teacher's `digest` (sha256 of its weight files): a file made by other weights is never read, even
  under the same teacher name (it sits in another folder, and its recorded digest is checked again);
- each face's content digest (sha256 of its decoded pixels): a face whose image changed misses the cache
  and is computed again, whatever its path;
- the view's definition (augmentation version, seed, view number).

Files are rewritten atomically, so an interrupted run leaves the previous complete file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from factory.augment import STRONG_VERSION, face_keys, strong_views
from factory.errors import FactoryError
from factory.io import atomic_path
from factory.teachers.registry import Teacher


def default_cache_dir() -> Path:
    from factory.fetch import cache_dir

    return cache_dir() / "teacher-embeddings"


def face_digests(images: np.ndarray) -> list[str]:
    """sha256 of each face's decoded pixels (NHWC uint8), the faces' identity in the cache."""
    return [hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images]


def view_name(view: int | None, seed: int) -> str:
    """File stem of a view: `plain` for the face itself, else the strong view's definition."""
    return "plain" if view is None else f"strong-v{STRONG_VERSION}-seed{seed}-view{view}"


class TeacherCache:
    """The cached embeddings of one teacher.

    Args:
        teacher: The loaded teacher (its `digest` names the weights).
        root: Cache folder shared by all teachers.
        log: Where progress lines go.
    """

    def __init__(self, teacher: Teacher, root: Path, log: Callable[[str], None] = print) -> None:
        self.teacher = teacher
        self.folder = root / f"{teacher.name}-{teacher.digest[:16]}"
        self.log = log

    def _read(self, path: Path) -> dict[str, np.ndarray]:
        if not path.is_file():
            return {}
        try:
            with safe_open(str(path), "np") as handle:
                meta = handle.metadata() or {}
                embeddings = handle.get_tensor("embeddings")
            faces = json.loads(meta["faces"])
        except Exception as error:  # safetensors raises several types for corrupt files
            raise FactoryError(f"teacher cache file {path} is corrupt ({error}); delete it and it is computed "
                               "again") from None
        if meta.get("teacher_digest") != self.teacher.digest or len(faces) != len(embeddings):
            self.log(f"ignoring {path}: made by other {self.teacher.name} weights")
            return {}
        return dict(zip(faces, embeddings, strict=True))

    def embeddings(self, images: np.ndarray, digests: list[str], view: int | None, seed: int = 0,
                   batch_size: int = 256) -> np.ndarray:
        """The teacher's embeddings (N, D) of view `view` of each face, computing only the faces not cached.

        Args:
            images: Aligned faces, NHWC uint8.
            digests: `face_digests(images)`.
            view: Strong view number (`factory.augment.strong_views`), or None for the face itself.
            seed: Seed of the strong views.
            batch_size: Faces per teacher call while filling the cache.
        """
        path = self.folder / f"{view_name(view, seed)}.safetensors"
        known = self._read(path)
        missing = [i for i, digest in enumerate(digests) if digest not in known]
        if missing:
            self.log(f"{self.teacher.name}: computing {len(missing)} of {len(digests)} embeddings of view "
                     f"{view_name(view, seed)} into {path}")
            keys = face_keys([digests[i] for i in missing])
            for start in range(0, len(missing), batch_size):
                chunk = np.array(missing[start : start + batch_size])
                faces = images[chunk]
                if view is not None:
                    faces = strong_views(faces, keys[start : start + len(chunk)], np.full(len(chunk), view), seed)
                for index, embedding in zip(chunk, self.teacher.embed(faces), strict=True):
                    known[digests[index]] = embedding.astype(np.float32)
            self._write(path, known)
        return np.stack([known[digest] for digest in digests])

    def _write(self, path: Path, known: dict[str, np.ndarray]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        faces = list(known)
        meta = {"teacher": self.teacher.name, "teacher_digest": self.teacher.digest, "faces": json.dumps(faces)}
        with atomic_path(path) as tmp:
            save_file({"embeddings": np.stack([known[face] for face in faces])}, str(tmp), metadata=meta)


def cache_root(configured: str | None, resolve: Callable[[str], Path]) -> Path:
    """The cache folder: the recipe's `train.distill.cache_dir`, `$FACTORY_TEACHER_CACHE`, or the default."""
    if configured:
        return resolve(configured)
    if os.environ.get("FACTORY_TEACHER_CACHE"):
        return Path(os.environ["FACTORY_TEACHER_CACHE"])
    return default_cache_dir()
