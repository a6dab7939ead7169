"""The sharded margin head against the unsharded ArcFaceHead: world size 1 here, world size 2 in two gloo processes.

The two-process runs (one `torch.multiprocessing.spawn` for the whole module) write what each rank computed to
a file; the tests compare it with the unsharded head on the whole batch in this process, in float64.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from factory.errors import FactoryError
from factory.partial_fc import MARGIN_TYPES, ShardedMarginHead
from factory.train import ArcFaceHead

CLASSES, DIM, SCALE, MARGIN = 37, 16, 10.0, 0.5
# Ranks of different batch sizes; rank 0 holds classes [0, 19), rank 1 [19, 37). Both ranks have samples of
# classes the other rank holds, and rows 1 and 9 sit beyond theta = pi - m (ArcFace's linear fallback).
RANK_ROWS = (slice(0, 7), slice(7, 12))
LABELS = torch.tensor([0, 18, 19, 36, 5, 19, 30, 2, 36, 18, 7, 25])
INPUT_DIM = 8
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch embeddings [12, D] and the centre matrix [37, D]."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(CLASSES, DIM, generator=generator, dtype=torch.float64)
    embeddings = torch.randn(len(LABELS), DIM, generator=generator, dtype=torch.float64)
    for row in (1, 9):
        embeddings[row] = -F.normalize(weight[LABELS[row]], dim=0) + 0.05 * embeddings[row]
    return embeddings, weight


def _backbone() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(INPUT_DIM, DIM).double()


def _inputs() -> torch.Tensor:
    return torch.randn(len(LABELS), INPUT_DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _reference(margin_type: str, embeddings: torch.Tensor, weight: torch.Tensor,
               columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradients (embeddings, centres) of the unsharded head + F.cross_entropy on the whole batch.

    `columns`: restrict the softmax to these classes (what sampling keeps), as one dense head would.
    """
    embeddings = embeddings.clone().requires_grad_()
    head = ArcFaceHead(DIM, CLASSES, SCALE, MARGIN).double()
    head.weight.data.copy_(weight)
    if margin_type == "arcface":
        logits = head(embeddings, LABELS)
    else:  # cosface, written out densely
        cosine = F.linear(F.normalize(embeddings), F.normalize(head.weight)).clamp(-1.0, 1.0)
        logits = SCALE * (cosine - MARGIN * F.one_hot(LABELS, CLASSES).to(cosine.dtype))
    labels = LABELS
    if columns is not None:
        logits, labels = logits[:, columns], torch.searchsorted(columns, LABELS)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), embeddings.grad, head.weight.grad


def _step(head: ShardedMarginHead, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    embeddings = embeddings.clone().requires_grad_()
    loss = head(embeddings, labels)
    loss.backward()
    return {"loss": loss.detach(), "embedding_grad": embeddings.grad, "weight_grad": head.weight.grad.clone(),
            "kept": head.last_kept.clone()}


def _rank_worker(rank: int, folder: str) -> None:
    """Everything the tests need from a world of 2, written to folder/rank<r>.pt."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    rows = RANK_ROWS[rank]
    embeddings, weight = _problem()
    out: dict[str, object] = {}
    for margin_type in MARGIN_TYPES:
        head = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, margin_type).double()
        head.load_full_weight(weight)
        out[margin_type] = _step(head, embeddings[rows], LABELS[rows])
        out["bounds"] = (head.class_start, head.class_end)

    # The lead's wiring: backbone in DDP, head outside it with ddp_backbone=True.
    backbone = DistributedDataParallel(_backbone())
    head = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, ddp_backbone=True).double()
    head.load_full_weight(weight)
    head(backbone(_inputs()[rows]), LABELS[rows]).backward()
    out["ddp"] = {"backbone_grad": backbone.module.weight.grad.clone(), "bias_grad": backbone.module.bias.grad.clone(),
                  "weight_grad": head.weight.grad.clone()}

    sampled = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, sample_rate=0.5, seed=3).double()
    sampled.load_full_weight(weight)
    out["sampled"] = _step(sampled, embeddings[rows], LABELS[rows])
    out["sampled_later_steps"] = [_step(sampled, embeddings[rows], LABELS[rows])["kept"] for _ in range(3)]
    again = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, sample_rate=0.5, seed=3).double()
    again.load_full_weight(weight)
    out["sampled_again"] = _step(again, embeddings[rows], LABELS[rows])["kept"]
    sampled.eval()
    out["sampled_eval"] = _step(sampled, embeddings[rows], LABELS[rows])["kept"]

    # Rank 1 without samples (all its faces unlabelled, say): the loss of rank 0's samples alone.
    empty_rows = slice(0, 7) if rank == 0 else slice(0, 0)
    plain = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN).double()
    plain.load_full_weight(weight)
    out["one_rank_empty"] = _step(plain, embeddings[empty_rows], LABELS[empty_rows])

    out["fresh_full_weight"] = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, seed=5).full_weight()
    out["round_trip"] = head.full_weight()
    out["predict"] = head.predict(embeddings[rows])

    bad = LABELS[rows].clone()
    if rank == 1:
        bad[0] = CLASSES
    try:
        head(embeddings[rows], bad)
        out["bad_label_error"] = ""
    except FactoryError as error:
        out["bad_label_error"] = str(error)
    torch.save(out, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What rank 0 and rank 1 computed in one two-process gloo run."""
    folder = tmp_path_factory.mktemp("partial_fc")
    mp.spawn(_rank_worker, args=(str(folder),), nprocs=2, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("margin_type", MARGIN_TYPES)
def test_two_ranks_match_the_unsharded_head(ranks: list[dict], margin_type: str) -> None:
    embeddings, weight = _problem()
    loss, embedding_grad, weight_grad = _reference(margin_type, embeddings, weight)
    assert [r["bounds"] for r in ranks] == [(0, 19), (19, 37)]
    for rank, rows in zip(ranks, RANK_ROWS, strict=True):
        start, end = rank["bounds"]
        torch.testing.assert_close(rank[margin_type]["loss"], loss, **TOL)
        torch.testing.assert_close(rank[margin_type]["embedding_grad"], embedding_grad[rows], **TOL)
        torch.testing.assert_close(rank[margin_type]["weight_grad"], weight_grad[start:end], **TOL)


def test_backbone_in_ddp_gets_the_unsharded_gradient(ranks: list[dict]) -> None:
    backbone = _backbone()
    embeddings = backbone(_inputs())
    head = ArcFaceHead(DIM, CLASSES, SCALE, MARGIN).double()
    head.weight.data.copy_(_problem()[1])
    F.cross_entropy(head(embeddings, LABELS), LABELS).backward()
    for rank in ranks:
        start, end = rank["bounds"]
        torch.testing.assert_close(rank["ddp"]["backbone_grad"], backbone.weight.grad, **TOL)
        torch.testing.assert_close(rank["ddp"]["bias_grad"], backbone.bias.grad, **TOL)
        torch.testing.assert_close(rank["ddp"]["weight_grad"], head.weight.grad[start:end], **TOL)


def test_sampling_keeps_positives_and_half_the_centres(ranks: list[dict]) -> None:
    embeddings, weight = _problem()
    kept = [rank["sampled"]["kept"] for rank in ranks]
    for rank_kept, (start, end) in zip(kept, [rank["bounds"] for rank in ranks], strict=True):
        positives = {int(label) for label in LABELS if start <= label < end}
        assert positives <= set(rank_kept.tolist())
        assert len(rank_kept) == int(0.5 * (end - start)) == len(set(rank_kept.tolist()))
        assert rank_kept.tolist() == sorted(rank_kept.tolist())
    # The sampled loss is the unsharded softmax restricted to the centres kept on either rank.
    columns = torch.cat(kept)
    loss, embedding_grad, weight_grad = _reference("arcface", embeddings, weight, columns)
    for rank, rows in zip(ranks, RANK_ROWS, strict=True):
        start, end = rank["bounds"]
        assert torch.isfinite(rank["sampled"]["loss"])
        torch.testing.assert_close(rank["sampled"]["loss"], loss, **TOL)
        torch.testing.assert_close(rank["sampled"]["embedding_grad"], embedding_grad[rows], **TOL)
        grad = rank["sampled"]["weight_grad"]
        local_kept = rank["sampled"]["kept"] - start
        unused = torch.ones(end - start, dtype=torch.bool)
        unused[local_kept] = False
        assert bool((grad[unused] == 0).all())
        assert bool((grad[local_kept].abs().sum(dim=1) > 0).all())
        torch.testing.assert_close(grad, weight_grad[start:end], **TOL)


def test_sampling_is_reproducible_and_varies_by_step(ranks: list[dict]) -> None:
    for rank in ranks:
        assert torch.equal(rank["sampled_again"], rank["sampled"]["kept"])
        steps = [rank["sampled"]["kept"], *rank["sampled_later_steps"]]
        assert len({tuple(step.tolist()) for step in steps}) > 1
        start, end = rank["bounds"]
        assert torch.equal(rank["sampled_eval"], torch.arange(start, end))  # eval mode: every centre


def test_full_weight_round_trip_from_two_ranks_to_one(ranks: list[dict]) -> None:
    _, weight = _problem()
    for rank in ranks:
        torch.testing.assert_close(rank["round_trip"], weight, rtol=0, atol=0)
    # Saved by rank 0 of two, resumed in one process.
    single = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN).double()
    single.load_full_weight(ranks[0]["round_trip"])
    torch.testing.assert_close(single.weight.detach(), weight, rtol=0, atol=0)
    # The initial centres do not depend on the world size.
    fresh = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, seed=5)
    for rank in ranks:
        torch.testing.assert_close(rank["fresh_full_weight"], fresh.weight.detach(), rtol=0, atol=0)
    assert not torch.equal(fresh.weight, ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, seed=6).weight)


def test_a_rank_without_samples(ranks: list[dict]) -> None:
    embeddings, weight = _problem()
    head = ArcFaceHead(DIM, CLASSES, SCALE, MARGIN).double()
    head.weight.data.copy_(weight)
    rows = embeddings[:7].clone().requires_grad_()
    loss = F.cross_entropy(head(rows, LABELS[:7]), LABELS[:7])
    loss.backward()
    for rank in ranks:
        torch.testing.assert_close(rank["one_rank_empty"]["loss"], loss.detach(), **TOL)
    torch.testing.assert_close(ranks[0]["one_rank_empty"]["embedding_grad"], rows.grad, **TOL)
    assert ranks[1]["one_rank_empty"]["embedding_grad"].shape == (0, DIM)
    # Rank 1's centres still get their gradient from rank 0's samples.
    for rank in ranks:
        start, end = rank["bounds"]
        torch.testing.assert_close(rank["one_rank_empty"]["weight_grad"], head.weight.grad[start:end], **TOL)


def test_an_empty_global_batch_has_zero_loss() -> None:
    head = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN)
    embeddings = torch.zeros(0, DIM, requires_grad=True)
    loss = head(embeddings, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0
    assert float(head.weight.grad.abs().sum()) == 0.0


def test_predict_is_the_unsharded_argmax(ranks: list[dict]) -> None:
    embeddings, weight = _problem()
    head = ArcFaceHead(DIM, CLASSES, SCALE, MARGIN).double()
    head.weight.data.copy_(weight)
    assert torch.cat([rank["predict"] for rank in ranks]).tolist() == head.scores(embeddings).argmax(1).tolist()


def test_a_bad_label_on_one_rank_fails_every_rank(ranks: list[dict]) -> None:
    for rank in ranks:
        assert f"label {CLASSES} is outside [0, {CLASSES})" in rank["bad_label_error"]


@pytest.mark.parametrize("margin_type", MARGIN_TYPES)
def test_one_process_is_the_unsharded_head(margin_type: str) -> None:
    embeddings, weight = _problem()
    head = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, margin_type).double()
    head.load_full_weight(weight)
    assert (head.class_start, head.class_end) == (0, CLASSES)
    result = _step(head, embeddings, LABELS)
    loss, embedding_grad, weight_grad = _reference(margin_type, embeddings, weight)
    torch.testing.assert_close(result["loss"], loss, **TOL)
    torch.testing.assert_close(result["embedding_grad"], embedding_grad, **TOL)
    torch.testing.assert_close(result["weight_grad"], weight_grad, **TOL)
    reference = ArcFaceHead(DIM, CLASSES, SCALE, MARGIN).double()
    reference.weight.data.copy_(weight)
    torch.testing.assert_close(head.scores(embeddings), reference.scores(embeddings), **TOL)
    assert torch.equal(head.full_weight(), head.weight.detach())


def test_arcface_fallback_rows_are_beyond_pi_minus_m() -> None:
    """Guards the problem above: without these rows the fallback branch would go untested."""
    embeddings, weight = _problem()
    cosine = F.cosine_similarity(embeddings, weight[LABELS])
    assert bool((cosine[[1, 9]] < math.cos(math.pi - MARGIN)).all())
    assert bool((cosine[[0, 2, 3]] > math.cos(math.pi - MARGIN)).all())


def test_one_process_sampling_counts() -> None:
    embeddings, weight = _problem()
    head = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, sample_rate=0.3, seed=1).double()
    head.load_full_weight(weight)
    result = _step(head, embeddings, LABELS)
    positives = sorted(set(LABELS.tolist()))
    assert len(positives) == 9 < int(0.3 * CLASSES) == len(result["kept"])
    assert set(positives) <= set(result["kept"].tolist())
    assert torch.isfinite(result["loss"])
    # More positives than the sampled share: exactly the positives.
    few = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, sample_rate=0.1).double()
    assert _step(few, embeddings, LABELS)["kept"].tolist() == positives


@pytest.mark.parametrize(("embeddings", "labels", "message"), [
    (torch.zeros(4, DIM + 1), torch.zeros(4, dtype=torch.long), "head for 16-d embeddings"),
    (torch.zeros(4, DIM), torch.zeros(3, dtype=torch.long), "labels for 4 embeddings"),
    (torch.zeros(4, DIM), torch.tensor([0, 1, -1, 2]), "label -1 is outside [0, 37)"),
    (torch.zeros(4, DIM), torch.tensor([0, 1, 37, 2]), "label 37 is outside [0, 37)"),
])
def test_bad_batches_are_named(embeddings: torch.Tensor, labels: torch.Tensor, message: str) -> None:
    head = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN)
    with pytest.raises(FactoryError, match=re.escape(message)):
        head(embeddings, labels)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="not one of arcface, cosface"):
        ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, margin_type="sphereface")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN, sample_rate=0.0)
    head = ShardedMarginHead(DIM, CLASSES, SCALE, MARGIN)
    with pytest.raises(FactoryError, match=r"needs \(37, 16\)"):
        head.load_full_weight(torch.zeros(CLASSES - 1, DIM))
