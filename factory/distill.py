"""Knowledge distillation from pretrained teachers during `factory train` (recipe block `train.distill`).

Every augmented view a student sees gets the teachers' embeddings of that same view as its target: a
learned linear projection of the student embedding is pulled towards each teacher's embedding (cosine
loss), and the batch's pairwise cosine matrix towards the teachers' (relational loss, any embedding size).
Teacher outputs come either from running the teachers on each view (`online`) or from a cache of a fixed
number of strong views per face (`cached`, `factory.teachers.cache`), which a CPU-only teacher needs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.augment import face_keys
from factory.losses import projected_cosine_loss, relational_loss
from factory.recipe import DistillConfig
from factory.teachers import load_teacher
from factory.teachers.cache import TeacherCache, face_digests


class Distiller(nn.Module):
    """The teachers, their targets for a batch of views, the projections and the distillation losses.

    Args:
        cfg: The recipe's `train.distill`.
        embedding_size: The student's embedding size.
        images: Every training face (NHWC uint8), in the order batches index them.
        seed: Seed of the strong views.
        cache_folder: Where teacher embeddings are cached.
        device: Where the losses (and online PyTorch teachers) run.
        log: Where progress lines go.
    """

    def __init__(self, cfg: DistillConfig, embedding_size: int, images: np.ndarray, seed: int, cache_folder: Path,
                 device: str, log: Callable[[str], None] = print) -> None:
        super().__init__()
        self.cfg, self.seed, self.device = cfg, seed, device
        self.teachers = {name: load_teacher(name, device=device) for name in cfg.teachers}
        self.caches = {name: TeacherCache(teacher, cache_folder, log) for name, teacher in self.teachers.items()}
        self.projections = nn.ModuleDict({
            name: nn.Linear(embedding_size, teacher.embedding_size, bias=False)
            for name, teacher in self.teachers.items()
        })
        self.digests = face_digests(images)
        self.keys = face_keys(self.digests)
        self.cached: dict[str, np.ndarray] = {}
        if cfg.teacher_outputs == "cached":
            for name, cache in self.caches.items():  # (faces, views, D)
                self.cached[name] = np.stack(
                    [cache.embeddings(images, self.digests, view, seed) for view in range(cfg.cached_views)], axis=1)
        # Each teacher's mean embedding of the (un-augmented) training faces, subtracted from its targets.
        self.centres: dict[str, np.ndarray] = {}
        if cfg.center_teachers:
            self.centres = {name: cache.embeddings(images, self.digests, None).mean(axis=0)
                            for name, cache in self.caches.items()}

    def _unit(self, name: str, embeddings: np.ndarray) -> np.ndarray:
        """A teacher's embeddings as targets: centred on its training mean (`center_teachers`), unit length."""
        if name not in self.centres:
            return embeddings
        centred = embeddings - self.centres[name]
        return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-12)

    def centre_norms(self) -> dict[str, float]:
        """Length of each centred teacher's mean unit embedding (1: every face the same; 0: no common axis)."""
        return {name: round(float(np.linalg.norm(centre)), 4) for name, centre in self.centres.items()}

    def targets(self, index: np.ndarray, views: np.ndarray, batch: np.ndarray) -> dict[str, torch.Tensor]:
        """Each teacher's unit embeddings of the views `batch` (faces `index`, view numbers `views`)."""
        out = {}
        for name, teacher in self.teachers.items():
            if self.cfg.teacher_outputs == "cached":
                embeddings = self.cached[name][index, views]
            else:
                embeddings = teacher.embed(batch)
            out[name] = torch.from_numpy(np.ascontiguousarray(self._unit(name, embeddings))).to(self.device)
        return out

    def losses(self, student: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cosine loss (mean over the teachers) and relational loss (against the teachers' mean cosines)."""
        cosine = torch.stack([projected_cosine_loss(student, target, self.projections[name])
                              for name, target in targets.items()]).mean()
        # The mean of the teachers' cosine matrices is the cosine matrix of their concatenated unit embeddings.
        joint = torch.cat(list(targets.values()), dim=1) / len(targets) ** 0.5
        return {"cosine": cosine, "relational": relational_loss(student, joint)}

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cfg.cosine_weight * losses["cosine"] + self.cfg.relational_weight * losses["relational"]

    def teacher_embeddings(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        """Each teacher's embeddings of un-augmented faces (cached), e.g. held-out faces to monitor."""
        digests = face_digests(faces)
        return {name: self._unit(name, cache.embeddings(faces, digests, None)) for name, cache in self.caches.items()}

    @torch.no_grad()
    def agreement(self, student: torch.Tensor, teacher: dict[str, np.ndarray]) -> dict[str, float]:
        """Mean cosine between the projected student embeddings and each teacher's, per teacher."""
        return {name: round(float(F.cosine_similarity(
            self.projections[name](student), torch.from_numpy(embeddings).to(student.device), dim=1).mean()), 4)
            for name, embeddings in teacher.items()}
