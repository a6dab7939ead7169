"""What every face-data reader shares: bad-record accounting, decoding, and the list and folder sources."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from factory.data import list_identity_folder, load_image, read_split
from factory.errors import FactoryError

# Bad records worth an example in the summary, per reason (enough to find them, short enough to print).
EXAMPLES_PER_REASON = 3


class BadReason(StrEnum):
    """Why a record was skipped."""

    UNREADABLE = "unreadable"  # the file or shard could not be opened or read
    BAD_MAGIC = "bad_magic"  # a RecordIO record does not start with 0xced7230a (wrong offset or corrupt file)
    TRUNCATED = "truncated"  # the record or tar member ends before its stated length
    UNDECODABLE = "undecodable"  # the bytes are not an image OpenCV can decode
    MISSING_IMAGE = "missing_image"  # a WebDataset sample without an image file
    MISSING_LABEL = "missing_label"  # no label in the record (or a label that is not a number)
    LABEL_OUT_OF_RANGE = "label_out_of_range"  # a label outside 0..num_classes-1


class BadRecord(Exception):
    """Raised by a reader for one record it must skip; caught and counted, never shown to the user as is."""

    def __init__(self, reason: BadReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


@dataclass
class ReadStats:
    """Counts of one pass over face data: records read, decoded, skipped per reason, and decode time.

    `decode_seconds` adds up the time spent reading and decoding in every worker, so `decoded / decode_seconds`
    is the rate of one worker, whatever the number of workers.
    """

    records: int = 0
    decoded: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    decode_seconds: float = 0.0
    wall_seconds: float = 0.0  # of the whole pass, set by whoever reads it (not added up by merge)

    def count_bad(self, reason: BadReason, key: str) -> None:
        self.bad[reason.value] = self.bad.get(reason.value, 0) + 1
        examples = self.examples.setdefault(reason.value, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(key)

    def take(self) -> ReadStats:
        """These counts, handed over and reset here (a worker reporting what it read since its last batch)."""
        taken = ReadStats(self.records, self.decoded, dict(self.bad), {k: list(v) for k, v in self.examples.items()},
                          self.decode_seconds)
        self.records, self.decoded, self.decode_seconds = 0, 0, 0.0
        self.bad.clear()
        self.examples.clear()
        return taken

    def merge(self, other: ReadStats) -> None:
        """Add the counts of `other` (e.g. one batch from a worker) to these."""
        self.records += other.records
        self.decoded += other.decoded
        self.decode_seconds += other.decode_seconds
        for reason, count in other.bad.items():
            self.bad[reason] = self.bad.get(reason, 0) + count
            examples = self.examples.setdefault(reason, [])
            examples.extend(other.examples.get(reason, [])[: EXAMPLES_PER_REASON - len(examples)])

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def bad_share(self) -> float:
        return self.bad_total / self.records if self.records else 0.0

    @property
    def images_per_second_per_worker(self) -> float:
        return self.decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for the training log."""
        bad = "; ".join(f"{count} {reason} (e.g. {', '.join(self.examples.get(reason, []))})"
                        for reason, count in sorted(self.bad.items())) or "none"
        return (f"{self.records} records read, {self.decoded} decoded, {self.bad_total} bad "
                f"({100 * self.bad_share:.2f}%): {bad}; decode {self.images_per_second_per_worker:.0f} images/s "
                f"per worker" + (f", {self.decoded / self.wall_seconds:.0f} images/s overall" if self.wall_seconds
                                 else ""))

    def to_json(self) -> dict:
        return {"records": self.records, "decoded": self.decoded, "bad": dict(sorted(self.bad.items())),
                "bad_examples": dict(sorted(self.examples.items())), "bad_share": self.bad_share,
                "decode_seconds": self.decode_seconds, "wall_seconds": self.wall_seconds,
                "images_per_second_per_worker": self.images_per_second_per_worker}


def decode_face(data: bytes | np.ndarray, size: int) -> np.ndarray:
    """Encoded image bytes to an RGB uint8 `size` x `size` x 3 array, decoded as `factory.data.load_image` does.

    Raises:
        BadRecord: The bytes are not a decodable image.
    """
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray | memoryview) else data
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    if image is None:
        raise BadRecord(BadReason.UNDECODABLE, f"{buffer.size} bytes")
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_image(image: bytes | np.ndarray, quality: int = 95) -> bytes:
    """Encoded bytes as they are; an RGB uint8 array as JPEG."""
    if isinstance(image, bytes):
        return image
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise FactoryError(f"cannot encode an image of shape {image.shape} as JPEG; expected H x W x 3 uint8")
    return data.tobytes()


def check_label(label: float, num_classes: int) -> int:
    """`label` as a class index, or BadRecord when it is not an integer in 0..num_classes-1."""
    if not np.isfinite(label) or label != int(label):
        raise BadRecord(BadReason.MISSING_LABEL, f"label {label!r} is not an integer")
    if not 0 <= int(label) < num_classes:
        raise BadRecord(BadReason.LABEL_OUT_OF_RANGE, f"label {int(label)} outside 0..{num_classes - 1}")
    return int(label)


class MapSource(Protocol):
    """Face data with random access by index (list, folder, RecordIO)."""

    size: int
    identities: list[str]  # label i is identities[i]

    def __len__(self) -> int: ...

    def key(self, index: int) -> str:
        """A name for record `index` in bad-record examples (path, or record index)."""
        ...

    def encoded(self, index: int) -> tuple[bytes, int]:
        """The record's encoded image bytes and label; BadRecord when it cannot be used."""
        ...

    def face(self, index: int) -> tuple[np.ndarray, int]:
        """The decoded `size` x `size` RGB face and its label; BadRecord when it cannot be used."""
        ...


def read_faces(source: MapSource, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, ReadStats]:
    """Decode records `indices` of `source`, skipping and counting bad ones: (images NHWC, labels int64, stats)."""
    stats = ReadStats()
    images, labels = [], []
    start = time.perf_counter()
    for index in indices:
        stats.records += 1
        try:
            image, label = source.face(int(index))
        except BadRecord as bad:
            stats.count_bad(bad.reason, source.key(int(index)))
            continue
        images.append(image)
        labels.append(label)
    stats.decoded = len(images)
    stats.decode_seconds = time.perf_counter() - start
    size = source.size
    batch = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return batch, np.asarray(labels, np.int64), stats


class _PathsSource:
    """A source of image files with text identities; labels number the sorted identities from 0."""

    def __init__(self, items: list[tuple[Path, str]], size: int) -> None:
        self.size = size
        self.paths = [path for path, _ in items]
        self.identities = sorted({identity for _, identity in items})
        index = {identity: i for i, identity in enumerate(self.identities)}
        self.labels = np.array([index[identity] for _, identity in items], np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, index: int) -> str:
        return str(self.paths[index])

    def encoded(self, index: int) -> tuple[bytes, int]:
        try:
            data = self.paths[index].read_bytes()
        except OSError as error:
            raise BadRecord(BadReason.UNREADABLE, str(error)) from None
        decode_face(data, self.size)  # a file that does not decode is not converted
        return data, int(self.labels[index])

    def face(self, index: int) -> tuple[np.ndarray, int]:
        path = self.paths[index]
        if not path.is_file():
            raise BadRecord(BadReason.UNREADABLE, f"{path} is missing")
        try:
            return load_image(path, self.size), int(self.labels[index])
        except FactoryError:
            raise BadRecord(BadReason.UNDECODABLE, str(path)) from None


class ListSource(_PathsSource):
    """The `path<TAB>label` split format of `factory.data.read_split`; paths are relative to `root`."""

    def __init__(self, split_file: Path, root: Path, size: int = 112) -> None:
        super().__init__(read_split(split_file, root), size)
        if not self.paths:
            raise FactoryError(f"training split {split_file} lists no images; add 'path<TAB>label' lines")


class FolderSource(_PathsSource):
    """An image-folder tree `root/<identity>/<image>` (`factory.data.list_identity_folder`)."""

    def __init__(self, root: Path, size: int = 112) -> None:
        super().__init__(list_identity_folder(root), size)
