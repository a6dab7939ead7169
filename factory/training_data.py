"""The faces `factory train` learns from, step by step, for one process or each rank of a torchrun group.

Two ways in, by `train.format` (judged from `train.split` when unset):
- `list` (`path<TAB>label`): the split is decoded into memory once, as the seed recipes always trained. Only
  this way has every face at hand by index, which distillation (teacher outputs per face), triplet batches
  (P identities x 2 images) and `identity_fraction` need. Every rank draws the epoch's order and augmentation
  for the whole global batch from the same seed and takes its own slice: N ranks compute the one-process step.
- `folder`, `recordio`, `webdataset`: read while training (`factory.face_data.FaceBatches`), decoded in
  DataLoader workers, bad records counted and skipped, for data that does not fit in memory or on a disk.
  Augmentation (`basic` only) is drawn per rank and step from (seed, epoch, step, rank).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factory import distributed
from factory.augment import apply_basic, draw_basic, face_keys, strong_views
from factory.data import load_images, read_split
from factory.distributed import Ranks
from factory.errors import FactoryError
from factory.face_data import FaceBatches, WebDatasetSource, open_source, sniff_format
from factory.face_data.records import read_faces
from factory.losses import identity_pair_batches, triplet_steps_per_epoch
from factory.recipe import Recipe, TrainConfig, data_path
from factory.teachers.cache import face_digests

MONITOR_IMAGES = 512


@dataclass
class Step:
    """One training step's faces on this rank."""

    batch: np.ndarray  # augmented NHWC uint8
    labels: np.ndarray  # identity per face, -1 for unlabelled (distillation-only) faces
    labelled_total: int  # labelled faces of the global batch, every rank's together
    index: np.ndarray | None = None  # the faces' positions in the split (in-memory data only)
    views: np.ndarray | None = None  # strong view numbers (in-memory data only)


def _draw(cfg: TrainConfig, rng: np.random.Generator, count: int, cached_views: int | None):
    """The epoch generator's draws for one global batch of `count` faces (replayed to resume mid-epoch)."""
    if cfg.augmentation == "strong":
        return rng.integers(0, cached_views or 1 << 62, size=count)
    return draw_basic(rng, count, cfg.max_shift)


class FacesInMemory:
    """A `list` split decoded into memory (plus `train.distill.unlabelled` faces, label -1)."""

    streamed = False

    def __init__(self, recipe: Recipe, cfg: TrainConfig, ranks: Ranks, unlabelled: list[Path],
                 augment_threads: int = 1) -> None:
        self.cfg, self.ranks = cfg, ranks
        # Strong views drawn on threads when the model trains elsewhere (a GPU): on the CPU they would take
        # the cores training uses. The views are the same either way.
        self.pool = ThreadPoolExecutor(augment_threads) if augment_threads > 1 else None
        items = read_split(data_path(recipe, cfg.split), recipe.resolve(recipe.data.root))
        if cfg.identity_fraction < 1.0:
            identities = sorted({label for _, label in items})
            keep = round(cfg.identity_fraction * len(identities))
            chosen = set(np.random.default_rng(cfg.seed).permutation(identities)[:keep].tolist())
            items = [item for item in items if item[1] in chosen]
        self.identities = sorted({label for _, label in items})
        label_index = {label: i for i, label in enumerate(self.identities)}
        self.labelled_count, self.unlabelled_count = len(items), len(unlabelled)
        self.images = load_images([path for path, _ in items] + unlabelled, recipe.model.input.size)
        self.labels = np.array([label_index[label] for _, label in items] + [-1] * len(unlabelled), np.int64)
        if cfg.loss == "triplet":
            self.steps_per_epoch = triplet_steps_per_epoch(self.labels, cfg.batch_size // 2)
        else:
            self.steps_per_epoch = len(self.images) // cfg.batch_size
        self.view_keys: np.ndarray | None = None  # strong views: stable per-face keys, set by `use_view_keys`
        self.cached_views: int | None = None
        self.share = ranks.share(cfg.batch_size)  # triplet batches hold batch_size / 2 identities x 2 images too

    def use_view_keys(self, keys: np.ndarray | None, cached_views: int | None) -> None:
        """Strong augmentation: the faces' view keys (the distiller's, when distilling) and cached view count."""
        self.view_keys = keys if keys is not None else face_keys(face_digests(self.images))
        self.cached_views = cached_views

    def monitor(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A fixed sample of labelled training faces (unaugmented) and their labels."""
        labelled = np.flatnonzero(self.labels >= 0)
        sample = labelled[np.random.default_rng(seed).permutation(len(labelled))[:MONITOR_IMAGES]]
        return self.images[sample], self.labels[sample]

    def steps(self, epoch: int, first: int) -> Iterator[Step]:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed + epoch)
        if cfg.loss == "triplet":
            batches = identity_pair_batches(self.labels, cfg.batch_size // 2, rng)
        else:
            order = rng.permutation(len(self.images))
            batches = [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(self.steps_per_epoch)]
        for batch_index in range(first):  # the draws of the steps a mid-epoch checkpoint already took
            _draw(cfg, rng, len(batches[batch_index]), self.cached_views)
        for batch_index in range(first, self.steps_per_epoch):
            draws = _draw(cfg, rng, len(batches[batch_index]), self.cached_views)
            index = batches[batch_index][self.share]  # this rank's slice of the global batch, with its draws
            views = None
            if cfg.augmentation == "strong":
                views = draws[self.share]
                batch = strong_views(self.images[index], self.view_keys[index], views, cfg.seed, self.pool)
            else:
                batch = apply_basic(self.images[index], draws[self.share], cfg.max_shift)
            labelled_total = int((self.labels[batches[batch_index]] >= 0).sum())
            yield Step(batch, self.labels[index], labelled_total, index, views)

    def epoch_record(self) -> dict:
        return {}


class FacesStreamed:
    """A folder, RecordIO file or WebDataset shards, read and decoded while training."""

    streamed = True

    def __init__(self, recipe: Recipe, cfg: TrainConfig, ranks: Ranks, format: str, device: str,
                 log: Callable[[str], None]) -> None:
        unsupported = [reason for needed, reason in (
            (cfg.distill is not None, "distillation (train.distill) needs every face at hand by index"),
            (cfg.loss == "triplet", "triplet batches (P identities x 2 images) need every face at hand"),
            (cfg.identity_fraction < 1.0, "identity_fraction selects identities from the whole split"),
            (cfg.augmentation == "strong", "strong augmentation is meant for distillation"),
        ) if needed]
        if unsupported:
            raise FactoryError(f"train.split {cfg.split!r} is {format} data, read while training, but "
                               f"{'; '.join(unsupported)}: convert it to a list split (`python -m factory data "
                               "convert`) and train from memory, or change those settings")
        self.cfg, self.ranks, self.device = cfg, ranks, device
        self.source = open_source(data_path(recipe, cfg.split), format, recipe.model.input.size)
        self.identities = self.source.identities
        self.labelled_count = self.source.num_images if isinstance(self.source, WebDatasetSource) \
            else len(self.source)
        self.unlabelled_count = 0
        self.batches = FaceBatches(self.source, cfg.batch_size, rank=ranks.rank, world=ranks.world,
                                   workers=cfg.loader_workers, seed=cfg.seed, max_bad_share=cfg.max_bad_share)
        self.steps_per_epoch = len(self.batches)
        log(f"reading {format} data {cfg.split} while training: {cfg.loader_workers} decoding workers per process")

    def use_view_keys(self, keys: np.ndarray | None, cached_views: int | None) -> None:
        raise AssertionError("streamed data takes basic augmentation only (checked on opening)")

    def monitor(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A fixed sample of training faces: seeded records, or the first of the stream for WebDataset shards."""
        if isinstance(self.source, WebDatasetSource):
            count = min(MONITOR_IMAGES, self.source.num_images)
            first = FaceBatches(self.source, count, steps_per_epoch=1, seed=seed, max_bad_share=1.0)
            return next(iter(first.epoch(0)))
        sample = np.sort(np.random.default_rng(seed).permutation(len(self.source))[:MONITOR_IMAGES])
        images, labels, _ = read_faces(self.source, sample)
        return images, labels

    def steps(self, epoch: int, first: int) -> Iterator[Step]:
        for offset, (images, labels) in enumerate(self.batches.epoch(epoch, start=first)):
            rng = np.random.default_rng([self.cfg.seed, epoch, first + offset, self.ranks.rank])
            batch = apply_basic(images, draw_basic(rng, len(images), self.cfg.max_shift), self.cfg.max_shift)
            # a bad record makes its batch one face short: the loss is the mean over the faces every rank has
            total = distributed.sum_across(self.ranks, {"faces": float(len(labels))}, self.device)["faces"]
            yield Step(batch, labels, int(total))

    def epoch_record(self) -> dict:
        """What the readers did in the last epoch: records, bad ones by reason, decoding speed."""
        stats = self.batches.stats
        return {"loader": {"records": stats.records, "bad": dict(stats.bad),
                           "images_per_s_per_worker": round(stats.images_per_second_per_worker, 1)},
                "loader_summary": stats.summary()}


def training_faces(recipe: Recipe, cfg: TrainConfig, ranks: Ranks, unlabelled: list[Path], device: str,
                   log: Callable[[str], None]) -> FacesInMemory | FacesStreamed:
    """The faces of `train.split`, in memory (`list`) or read while training (the other formats)."""
    split = cfg.split
    pattern = any(char in split for char in "{*?[")
    format = cfg.format or ("webdataset" if pattern else sniff_format(data_path(recipe, split)))
    if format == "list":
        threads = min(8, os.cpu_count() or 1) if device.startswith("cuda") else 1
        return FacesInMemory(recipe, cfg, ranks, unlabelled, augment_threads=threads)
    if unlabelled:
        raise FactoryError("train.distill.unlabelled faces join a list split in memory; the split is "
                           f"{format} data read while training")
    return FacesStreamed(recipe, cfg, ranks, format, device, log)
