"""WebDataset-style tar shards of faces, read as a stream (the data need not fit on a local disk).

A sample is the tar members that share a key (the member path up to the first dot of its file name, as
WebDataset groups them): `KEY.jpg` or `KEY.png` (any of IMAGE_EXTENSIONS) and `KEY.cls` holding the integer
label, or `KEY.json` with a "label" field. A stream cannot be counted before it is read, so the number of
classes and images comes from METADATA_NAME next to the shards: {"num_classes": K, "num_images": N} and,
optionally, "identities" (the names of labels 0..K-1).
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from factory.errors import FactoryError
from factory.face_data.records import BadReason, BadRecord, check_label, decode_face, encode_image
from factory.io import atomic_path

METADATA_NAME = "dataset.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from `shard-{000000..000123}.tar` ranges, globs, or a list of either."""
    if isinstance(spec, str | Path):
        spec = [spec]
    paths: list[Path] = []
    for pattern in map(str, spec):
        expanded = [pattern]
        while (match := _BRACES.search(expanded[0])) is not None:
            low, high = match.group(1), match.group(2)
            width = len(low) if low.startswith("0") else 0
            expanded = [text[: match.start()] + str(number).zfill(width) + text[match.end() :]
                        for text in expanded for number in range(int(low), int(high) + 1)]
        for text in expanded:
            if glob.has_magic(text):
                matched = sorted(glob.glob(text))
                if not matched:
                    raise FactoryError(f"no WebDataset shard matches {text!r}; check the path")
                paths.extend(Path(path) for path in matched)
            else:
                paths.append(Path(text))
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise FactoryError(f"{len(missing)} WebDataset shard(s) not found, e.g. {missing[0]}; check the shard "
                           "pattern (e.g. data/shard-{000000..000099}.tar)")
    if not paths:
        raise FactoryError(f"no WebDataset shards in {spec!r}")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def read_samples(shard: Path | BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of one tar shard, streamed; a damaged tail ends the shard.

    Raises:
        BadRecord: (after the samples read so far) the shard cannot be opened or ends mid-member.
    """
    name = str(shard) if isinstance(shard, Path) else getattr(shard, "name", "stream")
    key, files = None, {}
    try:
        with (tarfile.open(shard, "r|*") if isinstance(shard, Path) else tarfile.open(fileobj=shard, mode="r|*")) \
                as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = _split_name(member.name)
                if member_key != key and key is not None:
                    yield key, files
                    files = {}
                key = member_key
                files[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        reason = BadReason.UNREADABLE if key is None else BadReason.TRUNCATED
        raise BadRecord(reason, f"{name} after key {key}: {error}") from None
    if key is not None:
        yield key, files


def read_metadata(path: Path) -> dict:
    """The `dataset.json` of a shard folder, checked."""
    if not path.is_file():
        raise FactoryError(f"WebDataset metadata not found: {path} — a stream cannot be counted before it is read; "
                           'write {"num_classes": K, "num_images": N} there (`python -m factory data convert` '
                           "writes it) or pass its path as metadata")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FactoryError(f"{path} is not valid JSON ({error}); rewrite it") from None
    for key in ("num_classes", "num_images"):
        if not isinstance(meta.get(key), int) or meta[key] < 1:
            raise FactoryError(f"{path}: {key!r} must be a positive integer, got {meta.get(key)!r}")
    names = meta.get("identities")
    if names is not None and len(names) != meta["num_classes"]:
        raise FactoryError(f"{path}: 'identities' has {len(names)} names for {meta['num_classes']} classes")
    return meta


class WebDatasetSource:
    """Faces streamed from WebDataset tar shards; sizes from the `dataset.json` next to the first shard."""

    def __init__(self, shards: str | Path | Sequence[str | Path], size: int = 112,
                 metadata: Path | None = None) -> None:
        self.shards = expand_shards(shards)
        self.size = size
        self.metadata_path = Path(metadata) if metadata is not None else self.shards[0].parent / METADATA_NAME
        meta = read_metadata(self.metadata_path)
        self.num_classes, self.num_images = meta["num_classes"], meta["num_images"]
        self.identities: list[str] = meta.get("identities") or [str(i) for i in range(self.num_classes)]

    def encoded(self, files: dict[str, bytes]) -> tuple[bytes, int]:
        """A sample's image bytes (checked to decode) and label; BadRecord when it cannot be used."""
        image, label = self._parts(files)
        decode_face(image, self.size)
        return image, label

    def face(self, files: dict[str, bytes]) -> tuple[np.ndarray, int]:
        image, label = self._parts(files)
        return decode_face(image, self.size), label

    def _parts(self, files: dict[str, bytes]) -> tuple[bytes, int]:
        image = next((files[extension] for extension in IMAGE_EXTENSIONS if extension in files), None)
        if image is None:
            raise BadRecord(BadReason.MISSING_IMAGE, f"files {sorted(files)}")
        try:
            if "cls" in files:
                label = float(files["cls"].decode().strip())
            elif "json" in files:
                label = float(json.loads(files["json"])["label"])
            else:
                raise BadRecord(BadReason.MISSING_LABEL, f"no .cls or .json among {sorted(files)}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise BadRecord(BadReason.MISSING_LABEL, "the label is not a number") from None
        return image, check_label(label, self.num_classes)


def _extension(image: bytes) -> str:
    if image.startswith(b"\x89PNG"):
        return "png"
    if image.startswith(b"BM"):
        return "bmp"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def write_webdataset(out_dir: Path, items: Iterable[tuple[bytes | np.ndarray, int]], shard_size: int = 10000,
                     identities: Sequence[str] | None = None) -> list[Path]:
    """Write faces as tar shards `shard-000000.tar`, ... plus `dataset.json`, in `out_dir` (replaced whole).

    Args:
        out_dir: The shard folder; it appears only when every shard and the metadata are written.
        items: (encoded image bytes or RGB uint8 array, label 0..K-1) per face; arrays are stored as JPEG.
        shard_size: Faces per shard.
        identities: Names of labels 0..K-1, kept in `dataset.json`.

    Returns:
        The shard paths.
    """
    if shard_size < 1:
        raise FactoryError(f"shard_size must be at least 1, got {shard_size}")
    out_dir = Path(out_dir)
    names: list[str] = []
    images, max_label = 0, -1
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        tar = None
        for image, label in items:
            if int(label) != label or label < 0:
                raise FactoryError(f"face {images}: label {label!r} is not a class index 0..K-1")
            if images % shard_size == 0:
                if tar is not None:
                    tar.close()
                names.append(f"shard-{len(names):06d}.tar")
                tar = tarfile.open(tmp / names[-1], "w")
            data = encode_image(image)
            key = f"{images:09d}"
            for name, content in ((f"{key}.{_extension(data)}", data), (f"{key}.cls", str(int(label)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            images += 1
            max_label = max(max_label, int(label))
        if tar is not None:
            tar.close()
        if images == 0:
            raise FactoryError(f"no faces to write to {out_dir}")
        num_classes = max(len(identities or ()), max_label + 1)
        meta = {"format": "webdataset faces", "num_classes": num_classes, "num_images": images, "shards": names,
                "identities": list(identities) if identities is not None else None}
        (tmp / METADATA_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return [out_dir / name for name in names]

