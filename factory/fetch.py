"""`factory data fetch lfw`: the real LFW archive and pairs file, checksum-verified, resumable, cached.

For users without local face data. Downloads go to a cache (`$FACTORY_CACHE`, default
`~/.cache/mobile-face-factory`) as `<name>.part` and are renamed only once their MD5 matches the
digest published for the official file, so a cached file is always a verified one. An interrupted
download resumes with an HTTP Range request. The archive is unpacked with tarfile's "data" filter
(no absolute paths, no links out of the folder) and its photos are detected and aligned by
`factory.align.prepare`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from factory.errors import FactoryError
from factory.io import write_text_atomic

CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    """A published file: its name, where it is served, and its digest (the published MD5, or a pinned sha256)."""

    name: str
    urls: tuple[str, ...]
    md5: str = ""
    sha256: str = ""

    def digest_of(self, path: Path) -> tuple[str, str]:
        """(algorithm, hex digest) of `path` by this file's pinned algorithm."""
        if self.sha256:
            return "sha256", file_digest(path, "sha256")
        return "md5", md5_of(path)

    @property
    def expected(self) -> str:
        return self.sha256 or self.md5


# Official LFW hosting (University of Massachusetts) and the MD5 digests published for it.
LFW_FILES = (
    RemoteFile("lfw.tgz", ("http://vis-www.cs.umass.edu/lfw/lfw.tgz",), "a17d05bd522c52d84eca14327a23d494"),
    RemoteFile("pairs.txt", ("http://vis-www.cs.umass.edu/lfw/pairs.txt",), "9f1ba174e4e1c508ff7cdf10ac338a7d"),
)


def cache_dir() -> Path:
    return Path(os.environ.get("FACTORY_CACHE", Path.home() / ".cache" / "mobile-face-factory"))


def fetched_root() -> Path:
    """Where `data fetch lfw` puts LFW by default, and where the build's fallback looks for it."""
    return cache_dir() / "faces"


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def md5_of(path: Path) -> str:
    return file_digest(path, "md5")


def _fetch_into(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part` (Range request when part of it is there already)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        expected = int(length) + have if length is not None else None
        with part.open("ab" if have else "wb") as out, tqdm(
            total=expected, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], mininterval=1, leave=False
        ) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    if expected is not None and part.stat().st_size < expected:
        raise ConnectionError(f"connection closed after {part.stat().st_size} of {expected} bytes")


def download(remote: RemoteFile, directory: Path, mirror: str | None = None, attempts: int = 4,
             timeout: float = 60.0) -> Path:
    """A verified local copy of `remote` in `directory`, downloading (and resuming) only what is missing.

    Args:
        remote: The file and its digest.
        directory: Cache folder.
        mirror: Base URL serving the same file names, tried instead of the official hosts.
        attempts: Tries per URL; each retry resumes where the last one stopped.
        timeout: Seconds without data before a try is abandoned.

    Raises:
        FactoryError: no source served a file with the published checksum.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / remote.name
    if final.is_file() and remote.digest_of(final)[1] == remote.expected:
        return final
    final.unlink(missing_ok=True)
    part = directory / f"{remote.name}.part"
    urls = (f"{mirror.rstrip('/')}/{remote.name}",) if mirror else remote.urls
    problems = []
    for url in urls:
        for _ in range(attempts):
            try:
                _fetch_into(url, part, timeout)
                break
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
                problems.append(f"{url}: {error}")
        else:
            continue
        algorithm, digest = remote.digest_of(part)
        if digest == remote.expected:
            os.replace(part, final)
            return final
        part.unlink()
        problems.append(f"{url}: checksum mismatch ({algorithm} {digest}, expected {remote.expected}): corrupt or "
                        "not the official file")
    part.unlink(missing_ok=True)
    raise FactoryError(f"could not fetch a verified {remote.name}:\n  " + "\n  ".join(problems[-4:]))


def extract(archive: Path, destination: Path) -> Path:
    """Unpack a tar archive safely (tarfile's "data" filter) into a fresh `destination`."""
    if destination.exists():
        shutil.rmtree(destination)
    tmp = destination.with_name(destination.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FactoryError(f"{archive} could not be unpacked safely ({error}); delete it and fetch again") from None
    os.replace(tmp, destination)
    return destination


def fetch_lfw(destination: Path, mirror: str | None = None, files: tuple[RemoteFile, ...] = LFW_FILES,
              cache: Path | None = None) -> Path:
    """Download, verify, unpack and align LFW into `destination/lfw/{aligned,pairs.txt,train.txt}`.

    `train.txt` (written last, so its presence means the set is complete) lists every image of the
    identities that appear in no test pair: calibration and training faces disjoint from the test.
    """
    from factory.align.prepare import prepare

    cache = cache or cache_dir()
    paths = {remote.name: download(remote, cache, mirror) for remote in files}
    raw = extract(paths["lfw.tgz"], cache / "lfw-raw")
    photos = raw / "lfw" if (raw / "lfw").is_dir() else raw
    lfw = destination / "lfw"
    prepare(photos, lfw / "aligned", select="central")
    shutil.copyfile(paths["pairs.txt"], lfw / "pairs.txt")
    write_non_test_split(lfw)
    return lfw


def write_non_test_split(lfw: Path) -> Path:
    """Write `lfw/train.txt`: `path<TAB>label` for each aligned image of an identity in no test pair."""
    from factory.data import read_lfw_pairs

    tested = {path.parent.name for pair in read_lfw_pairs(lfw / "pairs.txt", lfw / "aligned")
              for path in (pair.path_a, pair.path_b)}
    lines = [f"lfw/aligned/{image.parent.name}/{image.name}\tlfw:{image.parent.name}"
             for image in sorted((lfw / "aligned").glob("*/*.jpg")) if image.parent.name not in tested]
    if not lines:
        raise FactoryError(f"{lfw}: every aligned identity appears in the test pairs; nothing is left for "
                           "calibration — fetch LFW again")
    split = lfw / "train.txt"
    write_text_atomic(split, "\n".join(lines) + "\n")
    return split


def lfw_fallback(missing_root: Path, log: Callable[[str], None] = print) -> Path:
    """A data root holding LFW, fetched now unless an earlier fetch completed; for builds without local data.

    The mirror in `$FACTORY_LFW_MIRROR`, if set, is used instead of the official hosting.
    """
    root = fetched_root()
    if (root / "lfw" / "train.txt").is_file():
        log(f"no face data at {missing_root}: using LFW fetched earlier into {root}")
        return root
    log(f"no face data at {missing_root}: falling back to LFW from its official hosting "
        f"(`python -m factory data fetch lfw`, about 180 MB, then detection and alignment) into {root}")
    try:
        fetch_lfw(root, mirror=os.environ.get("FACTORY_LFW_MIRROR"), files=LFW_FILES)
    except FactoryError as error:
        raise FactoryError(
            f"no face data at {missing_root} (the recipe's data.root), and fetching LFW as a fallback failed:\n"
            f"{error}\nFix: point data.root or --data-root at a folder of aligned faces, or run "
            "`python -m factory data fetch lfw` on a machine with internet access."
        ) from None
    return root


def use_lfw_if_no_data(data: Any, path: Path) -> None:
    """Point a recipe whose data root is missing at fetched LFW (fetching it if needed).

    LFW's own View-2 pairs become the evaluation set; calibration (and training, if the weights are
    missing) use the images of LFW identities that appear in no test pair.
    """
    section = data.get("data") if isinstance(data, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("root"), str):
        return  # the schema check reports it
    root = Path(section["root"]).expanduser()
    root = root if root.is_absolute() else path.parent / root
    if root.is_dir():
        return
    section["root"] = str(lfw_fallback(root.resolve()))
    if isinstance(section.get("calibration"), dict):
        section["calibration"]["split"] = "lfw/train.txt"
    section["evaluation"] = {**(section.get("evaluation") or {}), "pairs": "lfw/pairs.txt", "images": "lfw/aligned"}
    if isinstance(data.get("train"), dict):
        data["train"]["split"] = "lfw/train.txt"
    section.pop("benchmarks", None)  # they name files of the missing data root
