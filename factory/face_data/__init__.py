"""Readers for the face-data formats users bring, and batches of decoded faces for (distributed) training.

Formats (FORMATS is the list): `list` (`path<TAB>label` lines, `factory.data.read_split`), `folder`
(`root/<identity>/<image>`), `recordio` (insightface's `train.rec` + `train.idx`, read without mxnet) and
`webdataset` (tar shards read as a stream, sizes from `dataset.json`). Every source gives RGB uint8 faces
resized to a square `size` and labels 0..K-1 naming `source.identities`. Bad records are skipped and counted
(`ReadStats`); `FaceBatches` gives each rank its batches, decoded in DataLoader workers. docs/training.md
describes the formats for users.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from factory.errors import FactoryError
from factory.face_data.batches import DEFAULT_MAX_BAD_SHARE, FaceBatches, convert, scan
from factory.face_data.recordio import RecordIOSource, write_recordio
from factory.face_data.records import BadReason, FolderSource, ListSource, MapSource, ReadStats, decode_face
from factory.face_data.webdataset import METADATA_NAME, WebDatasetSource, expand_shards, write_webdataset

__all__ = [
    "DEFAULT_MAX_BAD_SHARE", "FORMATS", "METADATA_NAME", "BadReason", "FaceBatches", "FolderSource", "ListSource",
    "MapSource", "ReadStats", "RecordIOSource", "WebDatasetSource", "convert", "decode_face", "expand_shards",
    "open_source", "scan", "sniff_format", "write_recordio", "write_webdataset",
]

Source = MapSource | WebDatasetSource
LIST_SUFFIXES = (".txt", ".tsv", ".lst")


def _open_list(path: Path, size: int, root: Path | None) -> Source:
    return ListSource(path, root if root is not None else path.parent, size)


def _open_folder(path: Path, size: int, root: Path | None) -> Source:
    return FolderSource(path, size)


def _open_recordio(path: Path, size: int, root: Path | None) -> Source:
    if path.is_dir():
        path = path / "train.rec"
    return RecordIOSource(path.with_suffix(".rec") if path.suffix == ".idx" else path, size)


def _open_webdataset(path: str | Path, size: int, root: Path | None) -> Source:
    text = str(path)
    if "{" in text or any(char in text for char in "*?["):
        return WebDatasetSource(text, size)
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix == ".tar":
        return WebDatasetSource(path, size)
    metadata = folder / METADATA_NAME
    listed = json.loads(metadata.read_text()).get("shards") if metadata.is_file() else None
    shards = [folder / name for name in listed] if listed else sorted(folder.glob("*.tar"))
    if not shards:
        raise FactoryError(f"no .tar shards in {folder}; pass the shards, e.g. {folder}/shard-{{000000..000009}}.tar")
    return WebDatasetSource(shards, size, metadata)


# name -> opener(path, size, root): the one list of supported formats
FORMATS: dict[str, Callable[..., Source]] = {
    "list": _open_list, "folder": _open_folder, "recordio": _open_recordio, "webdataset": _open_webdataset,
}


def sniff_format(path: str | Path) -> str:
    """The format of `path` judged by its name and contents."""
    text = str(path)
    if "{" in text or any(char in text for char in "*?["):
        return "webdataset"
    path = Path(path)
    if path.is_dir():
        if (path / "train.rec").is_file():
            return "recordio"
        if (path / METADATA_NAME).is_file() or any(path.glob("*.tar")):
            return "webdataset"
        return "folder"
    if not path.exists():
        raise FactoryError(f"face data not found: {path} — check the path")
    if path.suffix in (".rec", ".idx"):
        return "recordio"
    if path.suffix == ".tar" or path.name == METADATA_NAME:
        return "webdataset"
    if path.suffix in LIST_SUFFIXES:
        return "list"
    raise FactoryError(f"cannot tell the format of {path}; name it: one of {', '.join(FORMATS)}")


def open_source(path: str | Path, format: str | None = None, size: int = 112, root: Path | None = None) -> Source:
    """The reader for the face data at `path`.

    Args:
        path: A split file, identity folder, `.rec` file (or its folder), or WebDataset shards (a folder,
            one `.tar`, a `{000000..000099}` range or a glob).
        format: One of FORMATS; None to judge by the path.
        size: Side of the square faces the source gives.
        root: `list` only: the folder the split's paths are relative to (default: the split file's folder).
    """
    if format is None:
        format = sniff_format(path)
    if format not in FORMATS:
        raise FactoryError(f"unknown face-data format {format!r}; supported: {', '.join(FORMATS)}")
    if format != "webdataset" and not Path(path).exists():
        raise FactoryError(f"face data not found: {path} — check the path")
    return FORMATS[format](path if format == "webdataset" else Path(path), size, root)
