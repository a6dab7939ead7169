"""Training batches of decoded faces for one rank of a (possibly distributed) run, decoded in DataLoader workers.

Map-style sources (list, folder, RecordIO): epoch `e` visits `numpy.random.default_rng(seed + e).permutation(n)`
cut into global batches of `batch_size` (the last partial one dropped); rank r of `world` takes the slice
[r * batch_size // world, (r + 1) * batch_size // world) of every global batch, so the ranks together see
exactly the batches of a single process. A bad record is skipped, so its batch is one face short.

WebDataset shards: shard order is shuffled per epoch and shards are dealt round-robin to the `world x workers`
readers; each reader shuffles its stream through a buffer. Every rank yields exactly `steps_per_epoch`
batches of `batch_size // world` faces (DDP ranks must step together), starting its shards over when they
run out, so the streaming order is NOT the single-process order; when `steps_per_epoch x batch_size` equals
the number of images and the shards hold equal shares, each face is seen once per epoch.

Bad records: counted per reason in `FaceBatches.stats`. The epoch raises FactoryError once the bad records
of this rank are over `max_bad_share` of what it reads in the epoch: as soon as the count alone makes that
certain, else at the end of the epoch. Under torchrun, the failing rank's exit stops the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from factory.errors import FactoryError
from factory.face_data.recordio import write_recordio
from factory.face_data.records import BadRecord, MapSource, ReadStats, read_faces
from factory.face_data.webdataset import WebDatasetSource, read_samples, write_webdataset

DEFAULT_MAX_BAD_SHARE = 0.01


def _as_is(batch: object) -> object:
    return batch


def _shuffled(faces: Iterable[tuple[np.ndarray, int]], size: int,
              rng: np.random.Generator) -> Iterator[tuple[np.ndarray, int]]:
    """`faces` through a shuffle buffer of `size` (WebDataset's usual shuffle for a stream)."""
    buffer: list[tuple[np.ndarray, int]] = []
    for face in faces:
        buffer.append(face)
        if len(buffer) >= size:
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    for pick in rng.permutation(len(buffer)):
        yield buffer[pick]


def _one_decoder_thread(_: int) -> None:
    cv2.setNumThreads(1)  # the workers are the parallelism; OpenCV's own threads would oversubscribe the cores


class _MapBatches(Dataset):
    def __init__(self, source: MapSource, batches: list[np.ndarray]) -> None:
        self.source, self.batches = source, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, ReadStats]:
        images, labels, stats = read_faces(self.source, self.batches[index])
        return torch.from_numpy(images), torch.from_numpy(labels), stats  # tensors travel in shared memory


class _StreamBatches(IterableDataset):
    """Batches from the shards of one (rank, worker); `steps` None reads every shard once (last batch partial)."""

    def __init__(self, source: WebDatasetSource, batch_size: int, steps: int | None, rank: int, world: int,
                 seed: int, shuffle_buffer: int) -> None:
        self.source, self.batch_size, self.steps = source, batch_size, steps
        self.rank, self.world, self.seed, self.shuffle_buffer = rank, world, seed, shuffle_buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, ReadStats]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world * workers
        order = np.random.default_rng(self.seed).permutation(len(self.source.shards))
        shards = [self.source.shards[i] for i in order[reader::readers]]
        quota = None if self.steps is None else self.steps // workers + (worker < self.steps % workers)
        if quota == 0:  # fewer steps than workers: this one has none
            return
        rng = np.random.default_rng([self.seed, reader])
        images: list[np.ndarray] = []
        labels: list[int] = []
        stats, start, made = ReadStats(), time.perf_counter(), 0  # stats: what was read since the last batch

        def batch() -> tuple[torch.Tensor, torch.Tensor, ReadStats]:
            taken = stats.take()  # records read since the last batch, some still in the shuffle buffer
            taken.decoded, taken.decode_seconds = len(images), time.perf_counter() - start
            size = self.source.size
            return (torch.from_numpy(np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)),
                    torch.tensor(labels, dtype=torch.int64), taken)

        def passes() -> Iterator[tuple[np.ndarray, int]]:
            while True:
                good = 0
                for face in _shuffled((face for shard in shards for face in self._faces(shard, stats)),
                                      self.shuffle_buffer, rng):
                    good += 1
                    yield face
                if quota is None or good == 0:
                    return  # one pass asked for, or nothing usable: stop rather than loop for ever

        for image, label in passes():
            images.append(image)
            labels.append(label)
            if len(images) == self.batch_size:
                yield batch()
                made += 1
                if made == quota:
                    return
                images, labels, start = [], [], time.perf_counter()
        if images or quota is not None:
            yield batch()  # the last, short batch of one pass; with a quota, a sign the shards ran dry

    def _faces(self, shard: Path, stats: ReadStats) -> Iterator[tuple[np.ndarray, int]]:
        samples = read_samples(shard)
        while True:
            try:
                key, files = next(samples)
            except StopIteration:
                return
            except BadRecord as bad:
                stats.records += 1
                stats.count_bad(bad.reason, str(shard))
                return
            stats.records += 1
            try:
                yield self.source.face(files)
            except BadRecord as bad:
                stats.count_bad(bad.reason, f"{shard.name}:{key}")


class FaceBatches:
    """Batches `(images uint8 N x size x size x 3, labels int64 N)` of one rank, epoch by epoch.

    Args:
        source: A ListSource, FolderSource, RecordIOSource or WebDatasetSource.
        batch_size: The global batch (all ranks together); must divide by `world`.
        rank: This process's rank, 0..world-1.
        world: Number of ranks.
        workers: DataLoader worker processes decoding faces (0: decode in this process).
        seed: Epoch e shuffles with seed + e.
        steps_per_epoch: WebDataset only: batches per epoch on every rank (default: num_images // batch_size).
        max_bad_share: Largest share of bad records an epoch may have before it stops with FactoryError.
        shuffle_buffer: WebDataset only: faces held back to shuffle the stream of each reader.
    """

    def __init__(self, source: MapSource | WebDatasetSource, batch_size: int, *, rank: int = 0, world: int = 1,
                 workers: int = 0, seed: int = 0, steps_per_epoch: int | None = None,
                 max_bad_share: float = DEFAULT_MAX_BAD_SHARE, shuffle_buffer: int = 1000) -> None:
        if world < 1 or not 0 <= rank < world:
            raise FactoryError(f"rank {rank} is not one of the {world} ranks 0..{world - 1}")
        if batch_size < world or batch_size % world:
            raise FactoryError(f"batch size {batch_size} does not divide into {world} ranks; use a multiple of "
                               f"{world}")
        if workers < 0:
            raise FactoryError(f"workers must be 0 (decode in this process) or more, got {workers}")
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world
        self.workers, self.seed, self.max_bad_share, self.shuffle_buffer = workers, seed, max_bad_share, shuffle_buffer
        self.streaming = isinstance(source, WebDatasetSource)
        if self.streaming:
            readers = world * max(workers, 1)
            if len(source.shards) < readers:
                raise FactoryError(f"{len(source.shards)} shards cannot feed {world} ranks x {max(workers, 1)} "
                                   "workers; write at least one shard per reader (smaller shard size) or use "
                                   "fewer workers")
            self.steps = steps_per_epoch if steps_per_epoch is not None else source.num_images // batch_size
        else:
            if steps_per_epoch is not None:
                raise FactoryError("steps_per_epoch is for WebDataset shards; a list, folder or RecordIO epoch is "
                                   "every full batch of the data")
            self.steps = len(source) // batch_size
        if self.steps < 1:
            raise FactoryError(f"batch size {batch_size} leaves no full batch in an epoch; use a smaller batch")
        self.stats = ReadStats()

    def __len__(self) -> int:
        return self.steps

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """The record indices of this rank's batches in `epoch` (map-style sources)."""
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.source))
        low, high = self.rank * self.batch_size // self.world, (self.rank + 1) * self.batch_size // self.world
        return [order[step * self.batch_size + low : step * self.batch_size + high] for step in range(self.steps)]

    def _loader(self, epoch: int, start: int) -> DataLoader:
        if self.streaming:
            # A resumed epoch reads its remaining steps from a stream shuffled anew (a stream cannot seek).
            seed = self.seed + epoch
            if start:
                seed = int(np.random.SeedSequence([self.seed, epoch, start]).generate_state(1)[0])
            dataset = _StreamBatches(self.source, self.batch_size // self.world, self.steps - start, self.rank,
                                     self.world, seed, self.shuffle_buffer)
        else:
            dataset = _MapBatches(self.source, self.rank_batches(epoch)[start:])
        return _data_loader(dataset, self.workers)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's batches of `epoch` from step `start` on; `stats` counts them (complete once exhausted).

        From a list, folder or RecordIO source the batches are exactly those an uninterrupted epoch has from
        `start` on; from WebDataset shards, the remaining steps of a stream shuffled with `start` in its seed.
        """
        if not 0 <= start < self.steps:
            raise FactoryError(f"an epoch has steps 0..{self.steps - 1}; cannot start at step {start}")
        self.stats = stats = ReadStats()
        planned = (self.steps - start) * (self.batch_size // self.world)
        started = time.perf_counter()
        for images, labels, batch_stats in self._loader(epoch, start):
            stats.merge(batch_stats)
            # the fewest records this epoch can read: the planned ones, and for a stream also those it skipped
            least = planned + (stats.bad_total if self.streaming else 0)
            self._check(stats.bad_total, least)
            if self.streaming and len(images) < self.batch_size // self.world:
                raise FactoryError(f"the shards of rank {self.rank} hold no usable face ({stats.summary()}); "
                                   f"check {self.source.shards[0].parent}")
            yield images.numpy(), labels.numpy()
        stats.wall_seconds = time.perf_counter() - started
        self._check(stats.bad_total, stats.records)

    def _check(self, bad: int, records: int) -> None:
        if bad > self.max_bad_share * records:
            raise FactoryError(f"too many bad face records on rank {self.rank}: {bad} of {records} "
                               f"(over {100 * self.max_bad_share:g}%): {self.stats.summary()} — repair or remove "
                               "them (`python -m factory data stats` lists examples), or raise max_bad_share")


def _data_loader(dataset: Dataset, workers: int) -> DataLoader:
    # Workers start from a fresh interpreter (forkserver), not a fork of this process: a forked child inherits
    # OpenCV's thread pool without its threads and deadlocks in its first OpenCV call once the parent has used
    # OpenCV (decoding, augmentation) — seen as a hung epoch.
    return DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                      worker_init_fn=_one_decoder_thread if workers else None,
                      multiprocessing_context="forkserver" if workers else None)


def scan(source: MapSource | WebDatasetSource, workers: int = 0, limit: int | None = None,
         chunk: int = 256) -> ReadStats:
    """Read and decode every face of `source` once (or the first `limit` of a map-style source) and count."""
    started = time.perf_counter()
    stats = ReadStats()
    if isinstance(source, WebDatasetSource):
        readers = max(1, min(workers, len(source.shards)))
        dataset = _StreamBatches(source, chunk, None, 0, 1, 0, 0)
        loader = _data_loader(dataset, readers if workers else 0)
    else:
        count = len(source) if limit is None else min(limit, len(source))
        loader = _data_loader(_MapBatches(source, [np.arange(i, min(i + chunk, count))
                                                   for i in range(0, count, chunk)]), workers)
    for _, _, batch_stats in loader:
        stats.merge(batch_stats)
    stats.wall_seconds = time.perf_counter() - started
    return stats


def _counted(stats: ReadStats, key: str, read: Callable[[], tuple[bytes, int]]) -> tuple[bytes, int] | None:
    stats.records += 1
    start = time.perf_counter()
    try:
        record = read()
    except BadRecord as bad:
        stats.count_bad(bad.reason, key)
        return None
    finally:
        stats.decode_seconds += time.perf_counter() - start
    stats.decoded += 1
    return record


def _encoded_records(source: MapSource | WebDatasetSource, stats: ReadStats,
                     limit: int | None) -> Iterator[tuple[bytes, int]]:
    """(encoded image, label) of every good record (the first `limit` records), in order; bad ones counted."""
    if not isinstance(source, WebDatasetSource):
        for index in range(len(source) if limit is None else min(limit, len(source))):
            record = _counted(stats, source.key(index), lambda index=index: source.encoded(index))
            if record is not None:
                yield record
        return
    for shard in source.shards:
        try:
            for key, files in read_samples(shard):
                if limit is not None and stats.records >= limit:
                    return
                record = _counted(stats, f"{shard.name}:{key}", lambda files=files: source.encoded(files))
                if record is not None:
                    yield record
        except BadRecord as bad:  # the shard is unreadable or ends mid-sample
            stats.records += 1
            stats.count_bad(bad.reason, str(shard))


WRITERS: dict[str, Callable[..., object]] = {
    "recordio": lambda out, items, source, options: write_recordio(out, items, source.identities, **options),
    "webdataset": lambda out, items, source, options: write_webdataset(out, items, identities=source.identities,
                                                                       **options),
}


def convert(source: MapSource | WebDatasetSource, to: str, out: Path, limit: int | None = None,
            **options: object) -> ReadStats:
    """Copy the faces of `source` into format `to` at `out`, the encoded bytes unchanged; bad records left out.

    Args:
        source: Any source.
        to: "recordio" (`out` is the .rec file; option `header`) or "webdataset" (`out` is the shard folder;
            option `shard_size`).
        out: Where the converted data goes; it appears only when complete.
        limit: Convert only the first `limit` records.

    Returns:
        What was read: every face is decoded once to check it, so the decode rate is measured too.
    """
    if to not in WRITERS:
        raise FactoryError(f"cannot convert to {to!r}; supported: {', '.join(WRITERS)}")
    stats = ReadStats()
    started = time.perf_counter()
    items: Iterable[tuple[bytes, int]] = _encoded_records(source, stats, limit)
    WRITERS[to](Path(out), items, source, options)
    stats.wall_seconds = time.perf_counter() - started
    return stats
