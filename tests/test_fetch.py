"""The downloader against a local HTTP server on 127.0.0.1: resume, corruption, cache, safe unpacking."""

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from factory.errors import FactoryError
from factory.fetch import RemoteFile, download, extract

PAYLOAD = bytes(range(256)) * 4000  # about 1 MB


class Server:
    """Serves `files`; `cut_once` names files whose first response stops half way."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[name], 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture()
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


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


@pytest.mark.data
def test_fetch_lfw_end_to_end_from_a_local_mirror(server: Server, tmp_path: Path, faces_root: Path) -> None:
    from factory.fetch import fetch_lfw

    photos = sorted((faces_root / "raw-samples" / "lfw").glob("*/*.jpg"))[:4]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for photo in photos:
            tar.add(photo, arcname=f"lfw/{photo.parent.name}/{photo.name}")
    pairs = b"1\t1\n" + f"{photos[0].parent.name}\t1\t1\n".encode()
    server.files.update({"lfw.tgz": buffer.getvalue(), "pairs.txt": pairs})
    files = (remote("lfw.tgz", buffer.getvalue()), remote("pairs.txt", pairs))
    lfw = fetch_lfw(tmp_path / "data", mirror=server.url, files=files, cache=tmp_path / "cache")
    assert (lfw / "pairs.txt").read_bytes() == pairs
    aligned = sorted((lfw / "aligned").glob("*/*.jpg"))
    assert [p.name for p in aligned] == sorted(p.name for p in photos)
