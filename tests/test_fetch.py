"""The downloader against a local HTTP server on 127.0.0.1: resume, corruption, cache, safe unpacking."""

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from helpers import Server

from factory.errors import FactoryError
from factory.fetch import RemoteFile, download, extract

PAYLOAD = bytes(range(256)) * 4000  # about 1 MB


def remote(name: str, data: bytes) -> RemoteFile:
    return RemoteFile(name, ("http://unused.invalid/",), hashlib.md5(data).hexdigest())


def test_download_verifies_and_caches(server: Server, tmp_path: Path) -> None:
    server.files["lfw.tgz"] = PAYLOAD
    path = download(remote("lfw.tgz", PAYLOAD), tmp_path, mirror=server.url)
    assert path.read_bytes() == PAYLOAD
    download(remote("lfw.tgz", PAYLOAD), tmp_path, mirror=server.url)
    assert len(server.requests) == 1, "a verified cached file is not fetched again"


def test_truncated_transfer_resumes_with_a_range_request(server: Server, tmp_path: Path) -> None:
    server.files["lfw.tgz"] = PAYLOAD
    server.cut_once.add("lfw.tgz")
    path = download(remote("lfw.tgz", PAYLOAD), tmp_path, mirror=server.url)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[0] == ("lfw.tgz", None)
    assert server.requests[1] == ("lfw.tgz", f"bytes={len(PAYLOAD) // 2}-")
    assert not (tmp_path / "lfw.tgz.part").exists()


def test_corrupted_archive_is_refused_and_removed(server: Server, tmp_path: Path) -> None:
    server.files["lfw.tgz"] = PAYLOAD[:-1] + b"\x00"
    with pytest.raises(FactoryError, match="checksum mismatch"):
        download(remote("lfw.tgz", PAYLOAD), tmp_path, mirror=server.url)
    assert not list(tmp_path.iterdir()), "nothing half-written stays in the cache"


def test_missing_file_on_the_server_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    with pytest.raises(FactoryError, match=r"could not fetch a verified pairs\.txt"):
        download(remote("pairs.txt", b"x"), tmp_path, mirror=server.url, attempts=1)


def test_unpacking_refuses_paths_outside_the_folder(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(FactoryError, match="could not be unpacked safely"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()



def lfw_mirror(server: Server, faces_root: Path, count: int) -> tuple[tuple[RemoteFile, ...], list[Path], bytes]:
    """Serve a small LFW-shaped archive of real photos; the pairs file tests only the first two identities."""
    photos = sorted((faces_root / "raw-samples" / "lfw").glob("*/*.jpg"))[:count]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for photo in photos:
            tar.add(photo, arcname=f"lfw/{photo.parent.name}/{photo.name}")
    first, second = photos[0].parent.name, photos[1].parent.name
    pairs = f"1\t1\n{first}\t1\t1\n{first}\t1\t{second}\t1\n".encode()
    server.files.update({"lfw.tgz": buffer.getvalue(), "pairs.txt": pairs})
    return (remote("lfw.tgz", buffer.getvalue()), remote("pairs.txt", pairs)), photos, pairs


@pytest.mark.data
def test_fetch_lfw_end_to_end_from_a_local_mirror(server: Server, tmp_path: Path, faces_root: Path) -> None:
    from factory.fetch import fetch_lfw

    files, photos, pairs = lfw_mirror(server, faces_root, 3)
    lfw = fetch_lfw(tmp_path / "data", mirror=server.url, files=files, cache=tmp_path / "cache")
    assert (lfw / "pairs.txt").read_bytes() == pairs
    aligned = sorted((lfw / "aligned").glob("*/*.jpg"))
    assert [p.name for p in aligned] == sorted(p.name for p in photos)
    split = [line.split("\t") for line in (lfw / "train.txt").read_text().splitlines()]
    assert [label for _, label in split] == [f"lfw:{p.parent.name}" for p in photos[2:]], "test identities excluded"
    assert all((lfw.parent / path).is_file() for path, _ in split)


@pytest.mark.data
def test_recipe_without_local_data_falls_back_to_fetched_lfw(
    server: Server, tmp_path: Path, faces_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml
    from helpers import recipe_dict

    from factory import fetch
    from factory.recipe import data_path, load_recipe

    files, photos, _ = lfw_mirror(server, faces_root, 3)
    monkeypatch.setattr(fetch, "LFW_FILES", files)
    monkeypatch.setenv("FACTORY_CACHE", str(tmp_path / "cache"))
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict(tmp_path / "no-such-faces")))

    server.files.pop("pairs.txt")
    monkeypatch.setenv("FACTORY_LFW_MIRROR", server.url)
    with pytest.raises(FactoryError, match=r"no face data at .*no-such-faces[\s\S]*--data-root[\s\S]*data fetch lfw"):
        load_recipe(recipe_file, if_no_data=fetch.use_lfw_if_no_data)
    assert not (tmp_path / "cache" / "faces" / "lfw" / "train.txt").exists()

    files, photos, _ = lfw_mirror(server, faces_root, 3)
    recipe = load_recipe(recipe_file, if_no_data=fetch.use_lfw_if_no_data)
    assert Path(recipe.data.root) == tmp_path / "cache" / "faces"
    assert data_path(recipe, recipe.data.evaluation.pairs).read_text().split()[2] == photos[0].parent.name
    calibration = data_path(recipe, recipe.data.calibration.split).read_text()
    assert photos[1].parent.name not in calibration and photos[2].parent.name in calibration
    served = len(server.requests)
    load_recipe(recipe_file, if_no_data=fetch.use_lfw_if_no_data)
    assert len(server.requests) == served, "a complete fetched copy is reused, not fetched again"
    with pytest.raises(FactoryError, match="no-such-faces"):
        load_recipe(recipe_file)
