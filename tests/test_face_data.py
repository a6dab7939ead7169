"""Face-data readers: RecordIO, WebDataset, folder and list sources; bad records; rank batches; the data CLI."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from factory.cli import main
from factory.errors import FactoryError
from factory.face_data import (
    FaceBatches,
    FolderSource,
    ListSource,
    RecordIOSource,
    WebDatasetSource,
    convert,
    expand_shards,
    open_source,
    scan,
    write_recordio,
    write_webdataset,
)
from factory.face_data.recordio import MAGIC, MAGIC_BYTES, pack_payload, pack_record, read_record
from factory.face_data.webdataset import read_samples

SIZE = 112


def synthetic_face(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth RGB pattern unique to `seed` (JPEG keeps it within a few levels)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = seed * 0.37
    channels = [np.sin(2 * np.pi * (x + phase)), np.cos(2 * np.pi * (y * 1.5 + phase)), np.sin(np.pi * (x + y) + phase)]
    return np.stack([(127.5 + 100 * c).astype(np.uint8) for c in channels], axis=-1)


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def faces(count: int, classes: int) -> list[tuple[np.ndarray, int]]:
    return [(synthetic_face(i), i * classes // count) for i in range(count)]


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.mark.parametrize("header", [True, False])
def test_recordio_round_trip(tmp_path: Path, header: bool) -> None:
    items = faces(12, 4)
    path = tmp_path / "train.rec"
    assert write_recordio(path, items, identities=["ann", "bob", "cy", "dee"], header=header) == 12
    source = RecordIOSource(path)
    assert source.has_header is header
    assert len(source) == 12
    assert source.identities == ["ann", "bob", "cy", "dee"]
    for index, (image, label) in enumerate(items):
        face, read_label = source.face(index)
        assert read_label == label
        assert face.shape == (SIZE, SIZE, 3) and face.dtype == np.uint8
        assert mean_abs_error(face, image) < 2.0
    with path.open("rb") as handle:
        first = read_record(handle, 0)
    flag, label = struct.unpack_from("<If", first)
    if header:  # insightface's layout: [first identity record, end) = [13, 17), then 4 identity spans
        assert flag == 2 and first[24:] == np.array([13, 17], "<f4").tobytes()
        lines = dict(line.split("\t") for line in path.with_suffix(".idx").read_text().splitlines())
        assert len(lines) == 1 + 12 + 4
        with path.open("rb") as handle:
            span = read_record(handle, int(lines["13"]))
        assert np.frombuffer(span, "<f4", 2, 24).tolist() == [1.0, 4.0]  # identity 0: images 1..3
    else:
        assert flag == 0 and label == 0.0


def test_recordio_splits_a_payload_that_holds_the_magic(tmp_path: Path) -> None:
    image = jpeg(synthetic_face(1))
    image += b"\0" * (-len(image) % 4) + MAGIC_BYTES + b"tail" + MAGIC_BYTES  # JPEG decoders ignore trailing bytes
    record = pack_record(pack_payload([3.0], image))
    flags = [lrecord >> 29 for magic, lrecord in struct.iter_unpack("<II", record[:8])]
    assert flags == [1], "the first part of a split record has flag 1"
    path = tmp_path / "train.rec"
    write_recordio(path, [(image, 0), (jpeg(synthetic_face(2)), 1)], header=False)
    source = RecordIOSource(path)
    assert source.encoded(0) == (image, 0)
    assert mean_abs_error(source.face(0)[0], synthetic_face(1)) < 2.0


def write_hand_made_rec(path: Path, records: dict[int, bytes]) -> None:
    """`records` (key -> raw bytes) laid out in key order, with their .idx."""
    offsets, data = {}, b""
    for key, raw in records.items():
        offsets[key] = len(data)
        data += raw
    path.write_bytes(data)
    path.with_suffix(".idx").write_text("".join(f"{key}\t{offset}\n" for key, offset in offsets.items()))


def corrupt_rec(path: Path) -> None:
    """An insightface-layout file of 7 image records, 5 of them bad in different ways, and 2 identities."""
    good = [pack_record(pack_payload([float(label)], jpeg(synthetic_face(label)))) for label in (0, 1)]
    truncated = struct.pack("<II", MAGIC, 5000) + pack_payload([0.0], b"\xff\xd8")[:40]
    write_hand_made_rec(path, {
        0: pack_record(pack_payload([8.0, 10.0], b"")),
        1: good[0],
        2: good[1],
        3: b"\x00" * 8 + good[0][8:],  # bad magic
        4: pack_record(pack_payload([0.0], b"this is not a JPEG")),
        5: pack_record(pack_payload([5.0], jpeg(synthetic_face(5)))),  # only labels 0 and 1 exist
        6: pack_record(pack_payload([float("nan")], jpeg(synthetic_face(6)))),
        8: pack_record(pack_payload([1.0, 2.0], b"")),
        9: pack_record(pack_payload([2.0, 3.0], b"")),
        7: truncated,  # last in the file, so it runs past the end
    })


def test_corrupt_records_are_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "train.rec"
    corrupt_rec(path)
    source = RecordIOSource(path)
    assert (len(source), len(source.identities)) == (7, 2)
    stats = scan(source)
    assert (stats.records, stats.decoded) == (7, 2)
    assert stats.bad == {"bad_magic": 1, "undecodable": 1, "label_out_of_range": 1, "missing_label": 1,
                         "truncated": 1}
    assert stats.examples["bad_magic"] == ["train.rec#3"]
    assert "5 bad" in stats.summary()

    tolerant = FaceBatches(source, 7, max_bad_share=1.0)
    [(images, labels)] = list(tolerant.epoch(0))
    assert sorted(labels.tolist()) == [0, 1] and images.shape == (2, SIZE, SIZE, 3)
    strict = FaceBatches(source, 7, max_bad_share=0.01)
    with pytest.raises(FactoryError, match=r"too many bad face records on rank 0: 5 of 7"):
        list(strict.epoch(0))


def test_webdataset_round_trip(tmp_path: Path) -> None:
    items = faces(10, 5)
    shards = write_webdataset(tmp_path / "shards", items, shard_size=4, identities=list("abcde"))
    assert [shard.name for shard in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    source = open_source(str(tmp_path / "shards" / "shard-{000000..000002}.tar"))
    assert isinstance(source, WebDatasetSource)
    assert (source.num_images, source.num_classes, source.identities) == (10, 5, list("abcde"))
    with tarfile.open(shards[0]) as tar:
        assert tar.getnames()[:2] == ["000000000.jpg", "000000000.cls"]
    read = []
    for shard in source.shards:
        with tarfile.open(shard, "r|*") as tar:
            files: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, extension = member.name.split(".")
                files.setdefault(key, {})[extension] = tar.extractfile(member).read()
        read += [source.face(sample) for sample in files.values()]
    assert [label for _, label in read] == [label for _, label in items]
    assert max(mean_abs_error(face, image) for (face, _), (image, _) in zip(read, items, strict=True)) < 2.0
    stats = scan(source, workers=2)
    assert (stats.records, stats.decoded, stats.bad_total) == (10, 10, 0)
    with shards[2].open("rb") as stream:  # a file object (a pipe, a download) streams the same way
        assert [key for key, _ in read_samples(stream)] == ["000000008", "000000009"]


def rank_labels(source: WebDatasetSource, steps: int) -> list[list[list[int]]]:
    """Per rank of 2 (2 workers each), the labels of every batch of epoch 0."""
    ranks = []
    for rank in range(2):
        batches = FaceBatches(source, 8, rank=rank, world=2, workers=2, steps_per_epoch=steps, shuffle_buffer=3)
        ranks.append([labels.tolist() for _, labels in batches.epoch(0)])
        assert batches.stats.decoded == steps * 4
    return ranks


def test_webdataset_streams_over_two_ranks_and_two_workers(tmp_path: Path) -> None:
    items = [(synthetic_face(i), i) for i in range(32)]  # label = sample, to see which ones came
    write_webdataset(tmp_path / "shards", items, shard_size=8)
    source = open_source(tmp_path / "shards")
    one_pass = rank_labels(source, steps=4)
    assert [len(batches) for batches in one_pass] == [4, 4]
    assert all(len(batch) == 4 for batches in one_pass for batch in batches)
    assert sorted(label for batches in one_pass for batch in batches for label in batch) == list(range(32))

    assert [len(batches) for batches in rank_labels(source, steps=1)] == [1, 1]  # a worker with no step

    longer = rank_labels(source, steps=6)  # past one pass: every rank still takes exactly 6 steps
    assert [len(batches) for batches in longer] == [6, 6]
    seen = [label for batches in longer for batch in batches for label in batch]
    assert len(seen) == 48 and set(seen) == set(range(32))


def test_webdataset_truncated_shard_and_bad_samples(tmp_path: Path) -> None:
    shards = write_webdataset(tmp_path / "shards", faces(8, 2), shard_size=4)
    with tarfile.open(shards[1]) as tar:
        second_image = tar.getmembers()[2].offset_data
    shards[1].write_bytes(shards[1].read_bytes()[: second_image + 100])  # the first sample, then cut
    with tarfile.open(shards[0], "a") as tar:  # a sample without label, one without image
        for name, content in (("extra1.jpg", jpeg(synthetic_face(9))), ("extra2.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    stats = scan(open_source(tmp_path / "shards"))
    assert stats.bad == {"missing_label": 1, "missing_image": 1, "truncated": 1}
    assert stats.decoded == 4 + 1
    assert stats.examples["truncated"] == [str(shards[1])]


def test_webdataset_without_a_usable_face_stops_with_an_error(tmp_path: Path) -> None:
    shards = write_webdataset(tmp_path / "shards", faces(4, 2), shard_size=4)
    with tarfile.open(shards[0], "w") as tar:  # images only: no sample has a label
        for number in range(4):
            content = jpeg(synthetic_face(number))
            info = tarfile.TarInfo(f"{number}.jpg")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    batches = FaceBatches(open_source(tmp_path / "shards"), 2, max_bad_share=1.0)
    with pytest.raises(FactoryError, match="hold no usable face"):
        list(batches.epoch(0))
    assert batches.stats.bad == {"missing_label": 4}


def make_folder(root: Path) -> list[tuple[str, np.ndarray]]:
    made = []
    for number, identity in enumerate(["zoe", "al", "max"]):
        (root / identity).mkdir(parents=True)
        for shot in range(2):
            image = synthetic_face(10 * number + shot, size=100)
            cv2.imwrite(str(root / identity / f"{shot}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            made.append((identity, image))
    return made


def test_folder_and_list_sources(tmp_path: Path) -> None:
    made = make_folder(tmp_path / "faces")
    (tmp_path / "faces" / "al" / "broken.jpg").write_bytes(b"not an image")
    folder = FolderSource(tmp_path / "faces", size=SIZE)
    assert folder.identities == ["al", "max", "zoe"]
    assert len(folder) == 7
    split = tmp_path / "split.txt"
    split.write_text("".join(f"{identity}/{shot}.png\t{identity}\n" for identity in ("zoe", "max")
                             for shot in range(2)))
    listed = open_source(split, root=tmp_path / "faces")
    assert isinstance(listed, ListSource) and listed.identities == ["max", "zoe"]
    face, label = listed.face(0)
    assert face.shape == (SIZE, SIZE, 3) and label == 1  # zoe, resized from 100 x 100
    expected = cv2.resize(made[0][1], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert np.array_equal(face, expected)  # PNG is lossless: the list gives exactly the resized file
    stats = scan(folder)
    assert (stats.decoded, stats.bad) == (6, {"undecodable": 1})
    assert stats.examples["undecodable"][0].endswith("broken.jpg")


def test_rank_slices_equal_single_process_batches(tmp_path: Path) -> None:
    write_recordio(tmp_path / "train.rec", faces(40, 5))
    source = open_source(tmp_path)
    single = list(FaceBatches(source, 8, seed=3).epoch(2))
    assert len(single) == 5
    ranks = [list(FaceBatches(source, 8, rank=rank, world=2, workers=1, seed=3).epoch(2)) for rank in range(2)]
    for step, (images, labels) in enumerate(single):
        assert np.array_equal(np.concatenate([ranks[0][step][0], ranks[1][step][0]]), images)
        assert np.array_equal(np.concatenate([ranks[0][step][1], ranks[1][step][1]]), labels)
    other_epoch = list(FaceBatches(source, 8, seed=3).epoch(3))
    assert not np.array_equal(other_epoch[0][1], single[0][1]) or not np.array_equal(other_epoch[1][1], single[1][1])
    with pytest.raises(FactoryError, match="does not divide into 4 ranks"):
        FaceBatches(source, 6, rank=0, world=4)


def test_error_messages_name_the_problem_and_the_fix(tmp_path: Path) -> None:
    write_recordio(tmp_path / "train.rec", faces(4, 2))
    (tmp_path / "train.idx").unlink()
    with pytest.raises(FactoryError, match=r"RecordIO index not found: .*train\.idx .*copy it from the dataset"):
        open_source(tmp_path / "train.rec")
    write_webdataset(tmp_path / "shards", faces(4, 2), shard_size=2)
    (tmp_path / "shards" / "dataset.json").unlink()
    with pytest.raises(FactoryError, match=r"dataset\.json .*num_classes.*num_images"):
        open_source(tmp_path / "shards" / "shard-000000.tar")
    with pytest.raises(FactoryError, match="unknown face-data format 'lmdb'; supported: list, folder, recordio, "
                                           "webdataset"):
        open_source(tmp_path, format="lmdb")
    with pytest.raises(FactoryError, match=r"shard\(s\) not found"):
        expand_shards(str(tmp_path / "shards" / "shard-{000000..000005}.tar"))
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(FactoryError, match=r"cannot tell the format .*one of list, folder, recordio, webdataset"):
        open_source(tmp_path / "notes.md")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def items():
        yield synthetic_face(0), 0
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_recordio(tmp_path / "train.rec", items())
    with pytest.raises(RuntimeError):
        write_webdataset(tmp_path / "shards", items())
    assert list(tmp_path.iterdir()) == []


def test_data_cli_converts_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_folder(tmp_path / "faces")
    assert main(["data", "convert", str(tmp_path / "faces"), "--to", "recordio", str(tmp_path / "rec")]) == 0
    assert main(["data", "convert", str(tmp_path / "rec"), "--to", "webdataset", str(tmp_path / "wds"),
                 "--shard-size", "4"]) == 0
    assert json.loads((tmp_path / "wds" / "dataset.json").read_text())["identities"] == ["al", "max", "zoe"]
    capsys.readouterr()
    assert main(["data", "stats", str(tmp_path / "wds")]) == 0
    out = capsys.readouterr().out
    assert "webdataset" in out and "6 images" in out and "3 identities" in out and "0 bad" in out
    assert main(["data", "stats", str(tmp_path / "faces"), "--format", "parquet"]) == 2


@pytest.mark.data
def test_real_faces_survive_recordio_and_webdataset(faces_root: Path, tmp_path: Path) -> None:
    split = tmp_path / "first300.txt"
    split.write_text("".join((faces_root / "splits" / "train.txt").read_text().splitlines(keepends=True)[:300]))
    listed = ListSource(split, faces_root)
    started = time.perf_counter()
    stats = convert(listed, "recordio", tmp_path / "rec" / "train.rec")
    assert (stats.decoded, stats.bad_total) == (300, 0)
    records = RecordIOSource(tmp_path / "rec" / "train.rec")
    assert records.identities == listed.identities and len(records) == 300
    convert(records, "webdataset", tmp_path / "wds", shard_size=64)
    expected = sorted((label, hashlib.sha256(face.tobytes()).hexdigest())
                      for face, label in (listed.face(index) for index in range(300)))
    for source in (listed, records, open_source(tmp_path / "wds")):
        # one reader for the shards: split over workers, their unequal shards would not give one exact pass
        batches = FaceBatches(source, 100, workers=0 if isinstance(source, WebDatasetSource) else 2)
        read = sorted((int(label), hashlib.sha256(image.tobytes()).hexdigest())
                      for images, labels in batches.epoch(0) for image, label in zip(images, labels, strict=True))
        # the encoded bytes travel unchanged, so every format gives the list source's pixels exactly
        assert read == expected, type(source).__name__
        print(f"{type(source).__name__} ({batches.workers} workers): {batches.stats.summary()}")
    print(f"real faces: list -> RecordIO -> WebDataset, each read once: {time.perf_counter() - started:.1f} s")
