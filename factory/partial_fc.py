"""A margin classifier head sharded across ranks: the model-parallel classifier of Partial FC.

An, Zhu, Xiao, Wu, Zhang, Zhang, Wang, Wu, Feng, Yang, "Killing Two Birds with One Stone: Efficient and Robust
Training of Face Recognition CNNs by Partial FC", CVPR 2022 (arXiv:2203.15565); reference implementation
insightface `recognition/arcface_torch/partial_fc_v2.py` (MIT). The maths here is written afresh for this project.

Rank r of W holds the class centres [class_start, class_end) (an even split; the first num_classes % W ranks
hold one more). Each step every rank gathers the whole batch's embeddings and labels, computes the cosine logits
of its own centres, puts the margin on the samples whose true class it holds, and the softmax cross-entropy over
all classes is assembled with three all-reduces (row max, sum of exponentials, true-class logit). No rank ever
holds a [batch, num_classes] tensor or the full centre matrix, so a classifier over 600k identities fits.

With `sample_rate` < 1 each rank keeps, per training step, the centres of every class in the global batch plus
random negatives up to `sample_rate` of its centres; only those get logits and gradient (Partial FC).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from factory.errors import FactoryError

MarginType = Literal["arcface", "cosface"]
MARGIN_TYPES: tuple[str, ...] = get_args(MarginType)
# Centres are initialised in blocks of this many classes, each from its own seeded generator, so the initial
# matrix is the same whatever the world size and a rank draws only the blocks it holds.
_INIT_BLOCK = 4096


class _Ranks:
    """The process group a head is sharded over; every collective is a no-op for a world of one."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if group is not None and not distributed:
            raise ValueError("ShardedMarginHead: a process group was given but torch.distributed is not initialised")
        self.group = group
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on every rank), in rank order."""
        if self.world_size == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts

    def all_gather_rows(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's rows concatenated in rank order; rank i holds sizes[i] rows (padded for the collective)."""
        if self.world_size == 1:
            return tensor
        padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, max(sizes) - len(tensor)))
        return torch.cat([part[:size] for part, size in zip(self.all_gather(padded), sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, with the gradient of this rank's rows summed over every rank's use of them.

    Written here rather than `torch.distributed.nn.functional.all_gather` (deprecated in torch 2.13 and limited
    to equal row counts): ranks may hold different batch sizes (the last batch of an epoch), and `grad_scale`
    lets the head undo DistributedDataParallel's averaging of the backbone's gradient.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, ranks: _Ranks, sizes: list[int], grad_scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.ranks, ctx.grad_scale = ranks, grad_scale
        ctx.start = sum(sizes[: ranks.rank])
        ctx.stop = ctx.start + sizes[ranks.rank]
        return ranks.all_gather_rows(local, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        # Every rank's loss uses every rank's embeddings; this rank's share of the total is the sum of the
        # gradients all ranks computed for its rows. One all-reduce of the (small) batch gradient is enough.
        total = ctx.ranks.all_reduce(grad.contiguous().clone(), dist.ReduceOp.SUM)
        return total[ctx.start : ctx.stop] * ctx.grad_scale, None, None, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over classes split across ranks, from each rank's slice of the logits.

    `target[i]` is the column of sample i's true class on this rank, or -1 where another rank holds it; every
    sample's true class is held by exactly one rank.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ranks: _Ranks) -> torch.Tensor:  # type: ignore[override]
        row_max = ranks.all_reduce(logits.detach().amax(dim=1), dist.ReduceOp.MAX)
        exps = (logits.detach() - row_max[:, None]).exp()
        exp_sum = ranks.all_reduce(exps.sum(dim=1), dist.ReduceOp.SUM)
        owned = torch.nonzero(target >= 0).squeeze(1)
        true_logit = torch.zeros_like(row_max)
        true_logit[owned] = logits.detach()[owned, target[owned]]
        true_logit = ranks.all_reduce(true_logit, dist.ReduceOp.SUM)
        # log-sum-exp minus the true logit: exact where the true class's probability underflows. A global batch
        # without samples (every face unlabelled) gives 0, not the NaN of an empty mean.
        loss = (exp_sum.log() + row_max - true_logit).sum() / max(len(logits), 1)
        ctx.save_for_backward(exps.div_(exp_sum[:, None]), target, owned)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        probabilities, target, owned = ctx.saved_tensors
        grad_logits = probabilities.clone()
        grad_logits[owned, target[owned]] -= 1.0
        return grad_logits * (grad / max(len(probabilities), 1)), None, None


class ShardedMarginHead(nn.Module):
    """ArcFace or CosFace head whose class centres are split across the ranks of a process group.

    Not to be wrapped in DistributedDataParallel: each rank holds different centres and their gradients are
    already complete on their rank (only the backbone goes in DDP). With world size 1, or without an
    initialised process group, it is the plain unsharded head (`factory.train.ArcFaceHead` + cross-entropy).

    Optimiser state: `weight` is one parameter per rank, of shape [num_local, D], and each rank's optimiser
    steps only its own slice. With `sample_rate` < 1 the kept centres are indexed out of that full parameter
    (`weight[kept]`), so the gradient of every unsampled row is exactly zero and its optimiser state stays
    attached to the right class; plain SGD leaves such rows unchanged, while momentum and weight decay still
    move them (as in Partial FC v2, which trains this way with SGD).

    Attributes:
        class_start, class_end: The classes [class_start, class_end) whose centres this rank holds.
        num_local: class_end - class_start.
        sampling_step: Sampled training steps so far; the sampling of a step depends only on (seed, rank,
            sampling_step), so set it to the resumed step on resume to repeat an uninterrupted run's sampling.
        last_kept: Global class indices of the centres this rank used in the last forward (all of them
            without sampling), sorted.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float,
        margin: float,
        margin_type: MarginType = "arcface",
        sample_rate: float = 1.0,
        group: dist.ProcessGroup | None = None,
        ddp_backbone: bool = False,
        seed: int = 0,
    ) -> None:
        """Build this rank's slice of the head.

        Args:
            embedding_size: Width D of the embeddings.
            num_classes: Identities in the training data (all ranks together); at least the world size.
            scale: Logit scale s.
            margin: ArcFace's additive angle m (radians) or CosFace's cosine margin.
            margin_type: "arcface" (s cos(theta + m) for the true class, with ArcFaceHead's linear fallback
                beyond theta = pi - m) or "cosface" (s (cos theta - m)); margin 0 gives a normalised softmax.
            sample_rate: Share of this rank's centres used per training step, in (0, 1]; positives always kept.
            group: Process group to shard over (default: the whole world when distributed is initialised).
            ddp_backbone: True when the backbone making the embeddings is wrapped in DistributedDataParallel.
                DDP averages the backbone's gradient over ranks while this head's loss is already the global
                batch's mean, so the embeddings' gradient is multiplied by the world size to compensate (as
                Partial FC does). False: the embeddings get exactly the unsharded head's gradient.
            seed: Seeds the centres' initialisation (the same matrix at any world size) and the sampling.
        """
        super().__init__()
        if margin_type not in MARGIN_TYPES:
            raise ValueError(f"ShardedMarginHead: margin_type {margin_type!r} is not one of {', '.join(MARGIN_TYPES)}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"ShardedMarginHead: sample_rate must be in (0, 1], got {sample_rate}")
        self.ranks = _Ranks(group)
        world, rank = self.ranks.world_size, self.ranks.rank
        if num_classes < world:
            raise ValueError(f"ShardedMarginHead: {num_classes} classes cannot be split over {world} ranks; "
                             "use fewer ranks for the head")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.scale, self.margin, self.margin_type = scale, margin, margin_type
        self.sample_rate, self.ddp_backbone, self.seed = sample_rate, ddp_backbone, seed
        self.class_start, self.class_end = _shard_bounds(num_classes, world, rank)
        self.num_local = self.class_end - self.class_start
        self.num_sample = max(1, int(sample_rate * self.num_local))
        self.weight = nn.Parameter(_initial_centres(self.class_start, self.class_end, embedding_size, seed))
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        # Beyond theta = pi - m, cos(theta + m) stops decreasing; insightface's linear fallback, as ArcFaceHead.
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin
        self.sampling_step = 0
        self.last_kept = torch.arange(self.class_start, self.class_end)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Mean margin softmax cross-entropy over the global batch (every rank's samples); collective.

        Every rank of the group must call it in the same step. It returns the same scalar on every rank;
        call `backward()` on it on every rank.

        Args:
            local_embeddings: This rank's embeddings, shape [B_rank, D] (B_rank may differ between ranks).
            local_labels: Their class indices in [0, num_classes), shape [B_rank].
        """
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise FactoryError(f"ShardedMarginHead: embeddings of shape {tuple(local_embeddings.shape)} given to a "
                               f"head for {self.embedding_size}-d embeddings; the model's embedding_size must match")
        if local_labels.shape != local_embeddings.shape[:1]:
            raise FactoryError(f"ShardedMarginHead: {tuple(local_labels.shape)} labels for "
                               f"{len(local_embeddings)} embeddings; pass one class index per embedding")
        sizes = self._batch_sizes(len(local_embeddings), local_embeddings.device)
        grad_scale = float(self.ranks.world_size) if self.ddp_backbone else 1.0
        embeddings = _GatherRows.apply(local_embeddings, self.ranks, sizes, grad_scale)
        labels = self.ranks.all_gather_rows(local_labels.long(), sizes)
        outside = (labels < 0) | (labels >= self.num_classes)
        if bool(outside.any()):
            raise FactoryError(f"ShardedMarginHead: label {int(labels[outside][0])} is outside [0, "
                               f"{self.num_classes}); labels must index the {self.num_classes} training identities")
        local = labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        kept = self._kept_centres(local[owned]) if self.training and self.sample_rate < 1.0 else None
        weight = self.weight if kept is None else self.weight[kept]
        target = torch.full_like(labels, -1)
        target[owned] = local[owned] if kept is None else torch.searchsorted(kept, local[owned])
        self.last_kept = self.class_start + (torch.arange(self.num_local) if kept is None else kept.cpu())
        cosine = F.linear(F.normalize(embeddings), F.normalize(weight))
        if cosine.dtype in (torch.float16, torch.bfloat16):  # under autocast: margin and softmax in float32
            cosine = cosine.float()
        logits = self.scale * self._with_margin(cosine.clamp(-1.0, 1.0), target)
        return _ShardedCrossEntropy.apply(logits, target, self.ranks)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosines of `embeddings` with this rank's centres, shape [B, num_local]; not collective.

        Column j is class class_start + j; with world size 1 this is ArcFaceHead.scores. For the best class
        over all ranks use `predict`.
        """
        return F.linear(F.normalize(embeddings), F.normalize(self.weight))

    @torch.no_grad()
    def predict(self, local_embeddings: torch.Tensor) -> torch.Tensor:
        """The class of the nearest centre (largest cosine) over all ranks for each local embedding; collective.

        Ties go to the lowest class index, as `scores(...).argmax(1)` of an unsharded head.
        """
        sizes = self._batch_sizes(len(local_embeddings), local_embeddings.device)
        best_cosine, best_column = self.scores(self.ranks.all_gather_rows(local_embeddings, sizes)).max(dim=1)
        rank_cosines = torch.stack(self.ranks.all_gather(best_cosine))
        rank_classes = torch.stack(self.ranks.all_gather(best_column + self.class_start))
        best = rank_classes.gather(0, rank_cosines.argmax(dim=0, keepdim=True))[0]
        start = sum(sizes[: self.ranks.rank])
        return best[start : start + len(local_embeddings)]

    @torch.no_grad()
    def gather_classes(self, local_rows: torch.Tensor) -> torch.Tensor:
        """Every rank's per-class rows concatenated into [num_classes, ...], on every rank; collective.

        For the centres (`full_weight`) and for per-centre optimiser state such as SGD's momentum buffer.
        """
        if len(local_rows) != self.num_local:
            raise ValueError(f"gather_classes: {len(local_rows)} rows given, this rank holds {self.num_local} classes")
        sizes = [end - start for start, end in (_shard_bounds(self.num_classes, self.ranks.world_size, rank)
                                                for rank in range(self.ranks.world_size))]
        return self.ranks.all_gather_rows(local_rows, sizes)

    def local_classes(self, full_rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows [class_start, class_end) of a [num_classes, ...] tensor; not collective."""
        if len(full_rows) != self.num_classes:
            raise FactoryError(f"ShardedMarginHead: a tensor with {len(full_rows)} class rows given to a head over "
                               f"{self.num_classes} classes; resume with the same training identities")
        return full_rows[self.class_start : self.class_end]

    def full_weight(self) -> torch.Tensor:
        """The whole [num_classes, D] centre matrix, on every rank (save it from rank 0); collective."""
        return self.gather_classes(self.weight.detach())

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Keep this rank's slice of a whole [num_classes, D] centre matrix saved at any world size."""
        if weight.shape != (self.num_classes, self.embedding_size):
            raise FactoryError(f"ShardedMarginHead: centre matrix of shape {tuple(weight.shape)} given, this head "
                               f"needs ({self.num_classes}, {self.embedding_size})")
        self.weight.copy_(self.local_classes(weight))

    def _batch_sizes(self, local_size: int, device: torch.device) -> list[int]:
        if self.ranks.world_size == 1:
            return [local_size]
        size = torch.tensor([local_size], device=device)
        return [int(part) for part in self.ranks.all_gather(size)]

    def _kept_centres(self, positives: torch.Tensor) -> torch.Tensor:
        """Sorted local indices of the centres used this step: every positive, then random negatives."""
        positives = torch.unique(positives)
        key = (self.seed, self.ranks.rank, self.sampling_step)
        self.sampling_step += 1
        if len(positives) >= self.num_sample:
            return positives
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        priority = torch.rand(self.num_local, generator=generator).to(positives.device)
        priority[positives] = 2.0  # above every random draw in [0, 1)
        return priority.topk(self.num_sample).indices.sort().values

    def _with_margin(self, cosine: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`cosine` with the margin applied at each sample's true class where this rank holds it."""
        rows = torch.nonzero(target >= 0).squeeze(1)
        true_cosine = cosine[rows, target[rows]]
        if self.margin_type == "cosface":
            penalised = true_cosine - self.margin
        else:
            sine = torch.sqrt((1.0 - true_cosine.square()).clamp_min(1e-7))
            penalised = torch.where(true_cosine > self.threshold, true_cosine * self.cos_m - sine * self.sin_m,
                                    true_cosine - self.fallback)
        return cosine.index_put((rows, target[rows]), penalised)


def _shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Classes [start, end) of `rank`: an even split, the first num_classes % world_size ranks one larger."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def _initial_centres(start: int, end: int, embedding_size: int, seed: int) -> torch.Tensor:
    """Rows [start, end) of the N(0, 0.01) initial centre matrix of `seed` (ArcFaceHead's distribution)."""
    blocks = []
    for block in range(start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK + 1):
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, block)).generate_state(1)[0]))
        rows = torch.randn(_INIT_BLOCK, embedding_size, generator=generator) * 0.01
        first = block * _INIT_BLOCK
        blocks.append(rows[max(start, first) - first : min(end, first + _INIT_BLOCK) - first])
    return torch.cat(blocks)
