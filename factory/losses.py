"""Losses of the seed systems other than ArcFace (which lives with the training loop in `factory.train`).

Triplet loss with online semi-hard selection: Schroff, Kalenichenko, Philbin, "FaceNet: A Unified Embedding
for Face Recognition and Clustering", CVPR 2015 (Eq. 1-4), used by Fast-FaceNet (Xu et al., IJIS 2021, whose
Eq. 6 is the same negative filter). Distances are squared Euclidean between L2-normalised embeddings, as in
FaceNet, so the margin (alpha = 0.2) is on the same scale as theirs.

Softmax cross-entropy: a plain linear classifier over the training identities, as the LEFV system trains.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.errors import FactoryError


class SoftmaxHead(nn.Module):
    """Linear classification logits over the training identities (labels are not used)."""

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(embedding_size, num_classes)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        del labels  # same call signature as the margin heads, which need them
        return self.classifier(embeddings)


def squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between all rows of an already L2-normalised batch, shape (B, B)."""
    # For unit vectors ||a - b||^2 = 2 - 2 a.b; the clamp removes tiny negatives from rounding.
    return (2.0 - 2.0 * embeddings @ embeddings.T).clamp_min(0.0)


def semi_hard_mask(
    distances: torch.Tensor, labels: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All anchor-positive pairs of a batch and, for each, which negatives are semi-hard.

    Args:
        distances: Squared distances between the batch's embeddings, shape (B, B).
        labels: Identity of each embedding, shape (B,).
        margin: The triplet margin alpha.

    Returns:
        anchors and positives (index tensors of shape (T,), every ordered pair of distinct images of one
        identity), the (T, B) mask of negatives (other identities), and the (T, B) mask of semi-hard negatives:
        d(a, p) < d(a, n) < d(a, p) + margin.
    """
    same = labels[:, None] == labels[None, :]
    anchors, positives = torch.nonzero(same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device),
                                       as_tuple=True)
    negative = ~same[anchors]
    positive_distance = distances[anchors, positives][:, None]
    to_negatives = distances[anchors]
    semi_hard = negative & (to_negatives > positive_distance) & (to_negatives < positive_distance + margin)
    return anchors, positives, negative, semi_hard


def select_triplets(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online triplet selection within a mini-batch (FaceNet section 3.2).

    Every anchor-positive pair is kept. Its negative is the closest semi-hard one; where no negative is
    semi-hard, the hardest negative (closest to the anchor) is used instead, so every pair still contributes a
    gradient. FaceNet warns that the hardest negatives alone can collapse training early on; the fallback only
    applies to pairs that have no semi-hard choice.

    Args:
        embeddings: L2-normalised embeddings, shape (B, D).
        labels: Identity of each embedding, shape (B,).
        margin: The triplet margin alpha.

    Returns:
        Index tensors (anchors, positives, negatives) into the batch, one entry per triplet.
    """
    with torch.no_grad():
        distances = squared_distances(embeddings)
        anchors, positives, negative, semi_hard = semi_hard_mask(distances, labels, margin)
        to_negatives = distances[anchors]
        closest_semi_hard = torch.where(semi_hard, to_negatives, torch.inf).argmin(dim=1)
        hardest = torch.where(negative, to_negatives, torch.inf).argmin(dim=1)
        negatives = torch.where(semi_hard.any(dim=1), closest_semi_hard, hardest)
        has_negative = negative.any(dim=1)  # a batch of one identity has no triplets
    return anchors[has_negative], positives[has_negative], negatives[has_negative]


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean of [d(a, p) - d(a, n) + margin]_+ over the triplets selected online from the batch.

    Args:
        embeddings: Raw embeddings from the model, shape (B, D); they are L2-normalised here.
        labels: Identity of each embedding, shape (B,).
        margin: The triplet margin alpha (0.2 in FaceNet).

    Raises:
        FactoryError: The batch holds no triplet (fewer than two identities, or no identity twice).
    """
    normalised = F.normalize(embeddings, dim=1)
    anchors, positives, negatives = select_triplets(normalised, labels, margin)
    if len(anchors) == 0:
        raise FactoryError("a triplet batch needs at least two identities with two images each")
    positive = (normalised[anchors] - normalised[positives]).square().sum(dim=1)
    negative = (normalised[anchors] - normalised[negatives]).square().sum(dim=1)
    return F.relu(positive - negative + margin).mean()


def identity_pair_batches(
    labels: np.ndarray, identities_per_batch: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of mini-batches of P identities x 2 images each, for online triplet selection.

    Identities are shuffled and dealt P at a time; each contributes two distinct images drawn at random.
    Identities with a single image cannot form a positive pair and are left out; leftover identities that do
    not fill a batch wait for the next epoch's shuffle.

    Args:
        labels: Identity index of every training image.
        identities_per_batch: P, at least 2 so that every anchor has negatives.
        rng: Source of the shuffle (seeded per epoch by the caller, for resumable training).

    Returns:
        Index arrays of length 2P, images of one identity adjacent.
    """
    if identities_per_batch < 2:
        raise FactoryError(f"a triplet batch needs at least 2 identities, got {identities_per_batch}")
    images_of: dict[int, np.ndarray] = {}
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)
        if len(indices) >= 2:
            images_of[int(label)] = indices
    if len(images_of) < identities_per_batch:
        raise FactoryError(
            f"triplet training needs {identities_per_batch} identities with at least 2 images per batch "
            f"(batch_size / 2), but only {len(images_of)} have 2 images; lower train.batch_size"
        )
    order = rng.permutation(sorted(images_of))
    batches = []
    for start in range(0, len(order) - identities_per_batch + 1, identities_per_batch):
        chosen = [rng.choice(images_of[int(label)], size=2, replace=False)
                  for label in order[start : start + identities_per_batch]]
        batches.append(np.concatenate(chosen))
    return batches


def triplet_steps_per_epoch(labels: np.ndarray, identities_per_batch: int) -> int:
    """How many batches `identity_pair_batches` yields per epoch (for the learning-rate schedule)."""
    _, counts = np.unique(labels, return_counts=True)
    return int((counts >= 2).sum()) // identities_per_batch


def projected_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """Mean of 1 - cos(projection(student), teacher) over a batch (the teacher's own embedding space).

    Args:
        student: Student embeddings (B, d), any scale.
        teacher: Teacher embeddings of the same views (B, D).
        projection: Learned map from d to D (a linear layer), trained with the student.
    """
    return (1.0 - F.cosine_similarity(projection(student), teacher, dim=1)).mean()


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the batch's pairwise cosine matrices, off the diagonal.

    Works for any two embedding sizes: only how the faces relate to one another is matched (relational
    knowledge distillation, Park et al., CVPR 2019, here on cosines as the verification score uses them).
    """
    unit_s, unit_t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    count = len(student)
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=student.device)
    difference = (unit_s @ unit_s.T - unit_t @ unit_t.T)[off_diagonal]
    return difference.square().mean()
