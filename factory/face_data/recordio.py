"""insightface's MXNet RecordIO face sets (`train.rec` + `train.idx`), read and written without mxnet.

The binary layout is dmlc-core's RecordIO (`src/recordio.cc`): each record starts with the magic 0xced7230a
and a uint32 whose upper 3 bits are a continuation flag and lower 29 bits a length; the payload follows,
padded to 4 bytes. A payload holding the magic at a 4-byte boundary is stored as several parts (flag 1 =
first, 2 = middle, 3 = last) with that magic left out, and put back on reading. The payload is MXNet's
`recordio.pack`: an IRHeader `<IfQQ` (flag, label, id, id2), then `flag` float32 labels when flag > 0,
then the encoded image. The `.idx` file maps record keys to byte offsets, one `key<TAB>offset` per line.

insightface's sets (MS1M, Glint360K, WebFace) put a header record at key 0 with flag 2 and label
[first identity record, end of identity records]: images are keys 1 .. label[0]-1, and keys label[0] ..
label[1]-1 hold one record per identity whose label is that identity's [first, end) image keys. Plain
`im2rec` files have no header record: every key is an image.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np

from factory.errors import FactoryError
from factory.face_data.records import BadReason, BadRecord, check_label, decode_face, encode_image
from factory.io import atomic_path

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_HEADER = struct.Struct("<IfQQ")
LENGTH_BITS = 29
# Header and identity labels are float32: indices above 2**24 would be rounded.
MAX_FLOAT_INDEX = 2**24


def _part(cflag: int, data: bytes) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << LENGTH_BITS) | len(data)) + data


def pack_record(payload: bytes) -> bytes:
    """One RecordIO record (split into parts where the payload holds the magic at a 4-byte boundary)."""
    if len(payload) >= 1 << LENGTH_BITS:
        raise FactoryError(f"a RecordIO record holds at most {(1 << LENGTH_BITS) - 1} bytes, got {len(payload)}")
    parts, start, search = [], 0, 0
    while (found := payload.find(MAGIC_BYTES, search)) != -1:
        if found % 4 == 0:
            parts.append(_part(1 if start == 0 else 2, payload[start:found]))
            start = found + 4
        search = found + 1
    parts.append(_part(3 if start else 0, payload[start:]))
    return b"".join(parts) + b"\0" * (-len(payload) % 4)


def pack_payload(labels: Sequence[float], image: bytes, record_id: int = 0) -> bytes:
    """MXNet's `recordio.pack`: one label in the header (flag 0), several after it (flag = their count)."""
    if len(labels) == 1:
        return IR_HEADER.pack(0, float(labels[0]), record_id, 0) + image
    return IR_HEADER.pack(len(labels), 0.0, record_id, 0) + np.asarray(labels, "<f4").tobytes() + image


def read_record(handle: BinaryIO, offset: int) -> bytes:
    """The payload of the record at byte `offset` of an open `.rec` file; BadRecord if it is damaged."""
    handle.seek(offset)
    parts = []
    while True:
        head = handle.read(8)
        if len(head) < 8:
            raise BadRecord(BadReason.TRUNCATED, f"record at byte {offset} ends inside its header")
        magic, lrecord = struct.unpack("<II", head)
        if magic != MAGIC:
            raise BadRecord(BadReason.BAD_MAGIC, f"0x{magic:08x} at byte {offset}")
        cflag, length = lrecord >> LENGTH_BITS, lrecord & ((1 << LENGTH_BITS) - 1)
        data = handle.read(length)
        if len(data) < length:
            raise BadRecord(BadReason.TRUNCATED, f"record at byte {offset}: {len(data)} of {length} bytes")
        parts.append(data)
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts)
        handle.seek(-length % 4, os.SEEK_CUR)


def unpack_payload(payload: bytes) -> tuple[np.ndarray, bytes]:
    """(labels float32, image bytes) of a record payload; BadRecord when it is shorter than its header says."""
    if len(payload) < IR_HEADER.size:
        raise BadRecord(BadReason.TRUNCATED, f"payload of {len(payload)} bytes has no IRHeader")
    flag, label, _, _ = IR_HEADER.unpack_from(payload)
    if flag == 0:
        return np.array([label], np.float32), payload[IR_HEADER.size :]
    end = IR_HEADER.size + 4 * flag
    if len(payload) < end:
        raise BadRecord(BadReason.TRUNCATED, f"header promises {flag} labels, payload has {len(payload)} bytes")
    return np.frombuffer(payload, "<f4", flag, IR_HEADER.size).astype(np.float32), payload[end:]


def index_path(path_rec: Path) -> Path:
    return path_rec.with_suffix(".idx")


def names_path(path_rec: Path) -> Path:
    """Identity names, one per line (line i names label i): ours, insightface ships none."""
    return path_rec.with_suffix(".identities.txt")


def _read_index(path_idx: Path) -> dict[int, int]:
    offsets = {}
    for number, line in enumerate(path_idx.read_text().splitlines(), 1):
        fields = line.split("\t")
        try:
            offsets[int(fields[0])] = int(fields[1])
        except (IndexError, ValueError):
            raise FactoryError(f"{path_idx}:{number}: expected 'key<TAB>byte offset', got {line!r} — the index "
                               "is damaged; copy it again from the dataset") from None
    if not offsets:
        raise FactoryError(f"RecordIO index {path_idx} is empty; copy it again from the dataset")
    return offsets


class RecordIOSource:
    """Faces of an insightface or im2rec RecordIO file, read by random access through its `.idx`.

    With a header record, image labels are the identity numbers 0..K-1 (K identity records). Without one,
    or when the header lists no identity records, the labels are read from every record once on opening
    and numbered in sorted order.
    """

    def __init__(self, path_rec: Path, size: int = 112, path_idx: Path | None = None) -> None:
        self.path_rec, self.size = Path(path_rec), size
        self.path_idx = Path(path_idx) if path_idx is not None else index_path(self.path_rec)
        if not self.path_rec.is_file():
            raise FactoryError(f"RecordIO file not found: {self.path_rec} — point at the dataset's train.rec")
        if not self.path_idx.is_file():
            raise FactoryError(f"RecordIO index not found: {self.path_idx} — the reader needs the .idx written "
                               f"with {self.path_rec.name} for random access; copy it from the dataset next to it")
        self._handle = None
        self._pid = -1
        offsets = _read_index(self.path_idx)
        header = self._header_label(offsets)
        self.has_header = header is not None
        if header is not None:
            self.keys = [key for key in sorted(offsets) if 1 <= key < header[0]]
        else:
            self.keys = sorted(offsets)
        self.offsets = [offsets[key] for key in self.keys]
        # raw label -> class index; None when the header says the labels already are 0..K-1
        self._classes: dict[int, int] | None = None
        if header is not None and header[1] > header[0]:
            num_classes = header[1] - header[0]
        else:
            self._classes = {raw: i for i, raw in enumerate(sorted(set(self._scan_labels()) - {None}))}
            num_classes = len(self._classes)
        if num_classes == 0:
            raise FactoryError(f"no labelled image record in {self.path_rec}; is it a face RecordIO file?")
        names_file = names_path(self.path_rec)
        names = names_file.read_text().splitlines() if names_file.is_file() else []
        if len(names) == num_classes:
            self.identities = names
        elif self._classes is not None:
            self.identities = [str(raw) for raw in self._classes]
        else:
            self.identities = [str(i) for i in range(num_classes)]

    def __getstate__(self) -> dict:  # workers open their own file handle
        return {**self.__dict__, "_handle": None, "_pid": -1}

    def _file(self) -> BinaryIO:
        if self._handle is None or self._pid != os.getpid():
            self._handle = self.path_rec.open("rb")
            self._pid = os.getpid()
        return self._handle

    def _header_label(self, offsets: dict[int, int]) -> tuple[int, int] | None:
        """[first identity record, end) of an insightface header record at key 0, else None."""
        if 0 not in offsets:
            return None
        try:
            labels, image = unpack_payload(read_record(self._file(), offsets[0]))
        except BadRecord:
            return None  # then an image record, counted as bad when read
        if len(labels) != 2 or image or not 1 <= labels[0] <= labels[1]:
            return None
        return int(labels[0]), int(labels[1])

    def _scan_labels(self) -> list[int | None]:
        raw = []
        for offset in self.offsets:
            try:
                label = float(unpack_payload(read_record(self._file(), offset))[0][0])
                raw.append(int(label) if np.isfinite(label) and label == int(label) else None)
            except BadRecord:
                raw.append(None)  # counted with its reason when read
        return raw

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, index: int) -> str:
        return f"{self.path_rec.name}#{self.keys[index]}"

    def encoded(self, index: int) -> tuple[bytes, int]:
        image, label = self._record(index)
        decode_face(image, self.size)  # an image that does not decode is not converted
        return image, label

    def face(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self._record(index)
        return decode_face(image, self.size), label

    def _record(self, index: int) -> tuple[bytes, int]:
        labels, image = unpack_payload(read_record(self._file(), self.offsets[index]))
        if not len(labels):
            raise BadRecord(BadReason.MISSING_LABEL, "record has no label")
        label = float(labels[0])
        if self._classes is not None:
            label = self._classes.get(int(label), -1) if np.isfinite(label) and label == int(label) else label
        return image, check_label(label, len(self.identities))


def write_recordio(path_rec: Path, items: Iterable[tuple[bytes | np.ndarray, int]],
                   identities: Sequence[str] | None = None, header: bool = True) -> int:
    """Write faces as `path_rec` + its `.idx` (+ identity names), as insightface lays them out.

    Args:
        path_rec: The `.rec` file; the index goes next to it with suffix `.idx`.
        items: (encoded image bytes or RGB uint8 array, label 0..K-1) per face; arrays are stored as JPEG.
        identities: Names of labels 0..K-1, written to `<stem>.identities.txt`.
        header: Write insightface's header record at key 0 (images then start at key 1) and, when every
            identity's faces come together, one identity record per label. False: a plain im2rec file.

    Returns:
        The number of faces written. Nothing appears under the final names unless all went well.
    """
    path_rec = Path(path_rec)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    count: dict[int, int] = {}
    index_lines = []
    with ExitStack() as stack:
        tmp_rec = stack.enter_context(atomic_path(path_rec))
        tmp_idx = stack.enter_context(atomic_path(index_path(path_rec)))
        tmp_names = stack.enter_context(atomic_path(names_path(path_rec)))
        rec = stack.enter_context(tmp_rec.open("wb"))
        key = 0
        if header:  # rewritten at the end, when the counts are known; always 40 bytes
            index_lines.append("0\t0")
            rec.write(pack_record(pack_payload([0.0, 0.0], b"")))
            key = 1
        for image, label in items:
            if int(label) != label or label < 0:
                raise FactoryError(f"face {key}: label {label!r} is not a class index 0..K-1")
            label = int(label)
            first.setdefault(label, key)
            last[label] = key
            count[label] = count.get(label, 0) + 1
            index_lines.append(f"{key}\t{rec.tell()}")
            rec.write(pack_record(pack_payload([float(label)], encode_image(image), key)))
            key += 1
        images = sum(count.values())
        num_classes = max(len(identities or ()), max(count, default=-1) + 1)
        if header:
            if key + num_classes >= MAX_FLOAT_INDEX:
                raise FactoryError(f"{images} faces and {num_classes} identities overflow the float32 header of "
                                   f"{path_rec.name}; split the data into several files or write WebDataset shards")
            grouped = all(last[label] - first[label] + 1 == count[label] for label in count)
            identity_end = key + num_classes if grouped else key
            if grouped:
                for label in range(num_classes):
                    span = [float(first[label]), float(last[label] + 1)] if label in count else [0.0, 0.0]
                    index_lines.append(f"{key}\t{rec.tell()}")
                    rec.write(pack_record(pack_payload(span, b"", key)))
                    key += 1
            rec.seek(0)
            rec.write(pack_record(pack_payload([float(images + 1), float(identity_end)], b"")))
        rec.close()
        tmp_idx.write_text("".join(f"{line}\n" for line in index_lines))
        # Always written, so names of an earlier file under this name never label this one.
        tmp_names.write_text("".join(f"{name}\n" for name in identities or [str(i) for i in range(num_classes)]))
    return images
