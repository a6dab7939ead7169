"""The teacher registry: strong pretrained face networks whose embeddings the students learn from.

A teacher maps aligned 112x112 RGB faces (the ArcFace five-point template, uint8 NHWC, the layout
`factory.data.load_images` returns) to L2-normalised float32 embeddings, doing its own alignment or
preprocessing inside. Its weights are files pinned by sha256; `digest` names the exact weights, so
embeddings cached from one teacher file are never reused for another (`factory.teachers.cache`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from factory.errors import FactoryError


class Teacher(Protocol):
    """A loaded teacher network."""

    name: str
    embedding_size: int
    digest: str  # sha256 over the weight files that define the network

    def embed(self, faces: np.ndarray) -> np.ndarray:
        """Unit-length float32 embeddings (N, embedding_size) of aligned 112x112 RGB uint8 NHWC faces."""
        ...


@dataclass(frozen=True)
class TeacherEntry:
    """One registered teacher.

    Attributes:
        name: Registry key used by recipes (`train.distill.teachers`).
        loader: Callable returning the loaded `Teacher` (reads and checks its weight files; `device` picks
            where a PyTorch teacher runs).
        embedding_size: Length of its embedding.
        licence: Licence of its weights.
        provenance: What its weights were trained on, as far as published.
        lfw_identity_free: Whether its training data was chosen to exclude LFW identities, so that a student
            taught only by it has an LFW score free of any LFW-identity exposure.
        published_lfw: LFW accuracy its authors publish.
        source: Where a user gets its weights.
        files: The checked weight files its loader reads. Copied into `<models>/<model_folder>/`, they are
            found there when `FACTORY_MODELS=<models>` is set (`factory pack` does this for another machine).
        model_folder: The folder under `FACTORY_MODELS` that holds `files`.
    """

    name: str
    loader: Callable[..., Teacher]
    embedding_size: int
    licence: str
    provenance: str
    lfw_identity_free: bool
    published_lfw: float
    source: str
    files: Callable[[], list[Path]]
    model_folder: str


_REGISTRY: dict[str, TeacherEntry] = {}


def register_teacher(entry: TeacherEntry) -> TeacherEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"teacher {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def teacher_names() -> list[str]:
    return sorted(_REGISTRY)


def teacher_entry(name: str) -> TeacherEntry:
    if name not in _REGISTRY:
        raise FactoryError(f"unknown teacher {name!r}; registered teachers: {', '.join(teacher_names())}")
    return _REGISTRY[name]


def teacher_card(name: str, digest: str) -> dict[str, object]:
    """What a model card says of a teacher: weights digest, licence, provenance, LFW-identity exposure."""
    entry = teacher_entry(name)
    return {"digest": digest, "licence": entry.licence, "provenance": entry.provenance,
            "lfw_identity_free": entry.lfw_identity_free, "source": entry.source}


def load_teacher(name: str, device: str = "cpu") -> Teacher:
    """Load a registered teacher by name (its weight files are checked against their pinned sha256)."""
    return teacher_entry(name).loader(device=device)
