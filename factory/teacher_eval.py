"""A teacher's verification accuracy on a pair list, through the same protocol code as every build."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from factory.evaluation import read_pair_set
from factory.teachers.registry import Teacher, load_teacher

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
DEFAULT_PAIRS = SHARED_FACES / "lfw" / "pairs.txt"


@dataclass
class TeacherEvaluation:
    """10-fold verification result of one teacher on one pair list."""

    teacher: str
    digest: str
    pairs_file: str
    pairs: int
    images: int
    accuracy: float
    accuracy_std: float
    threshold: float
    tar_at_far_1e_3: float | None
    seconds_per_face: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def default_image_root(pairs_file: Path) -> Path:
    """Images of a pair list: its folder's `aligned/` (the shared data's layout) or else its folder."""
    aligned = pairs_file.parent / "aligned"
    return aligned if aligned.is_dir() else pairs_file.parent


def evaluate_teacher(teacher: Teacher | str, pairs_file: Path = DEFAULT_PAIRS, image_root: Path | None = None,
                     max_pairs: int | None = None) -> TeacherEvaluation:
    """Embed every image of the pairs (aligned 112x112 crops) with the teacher and score the 10 folds.

    `max_pairs` keeps a fold-balanced subset (`factory.evaluation.subsample_pairs`).
    """
    teacher = load_teacher(teacher) if isinstance(teacher, str) else teacher
    evaluation = read_pair_set(pairs_file, image_root or default_image_root(pairs_file), 112, max_pairs)
    started = time.perf_counter()
    embeddings = teacher.embed(evaluation.pixels_nhwc)
    seconds = time.perf_counter() - started
    result = evaluation.verification(embeddings)
    return TeacherEvaluation(
        teacher=teacher.name, digest=teacher.digest, pairs_file=str(pairs_file), pairs=len(evaluation.pairs),
        images=len(evaluation.paths), accuracy=float(result["accuracy"]),
        accuracy_std=float(result["accuracy_std"]), threshold=float(result["threshold"]),
        tar_at_far_1e_3=result["tar_at_far_1e-03"], seconds_per_face=seconds / max(1, len(evaluation.paths)),
    )
