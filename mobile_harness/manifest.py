"""Reading and checking a build folder: the contract between the factory and the device lab."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class BuildFolderError(Exception):
    """A build folder that is missing, half-written, or whose artifacts do not match the manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def load_manifest(build_dir: Path) -> dict[str, Any]:
    """The manifest of a finished build, with every listed artifact checked by size and sha256."""
    manifest_path = build_dir / "manifest.json"
    if not manifest_path.is_file():
        raise BuildFolderError(f"{build_dir} has no manifest.json: the build did not finish; "
                               "run `python -m factory build RECIPE` again")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise BuildFolderError(f"{manifest_path} is not valid JSON ({error}); rebuild") from None
    for artifact in manifest.get("artifacts", []):
        path = build_dir / artifact["file"]
        if not path.exists():
            raise BuildFolderError(f"{path} is listed in the manifest but missing; rebuild")
        if _sha256(path) != artifact["sha256"]:
            raise BuildFolderError(f"{path} does not match its sha256 in the manifest (changed or corrupt); rebuild")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m mobile_harness BUILD_DIR   (device runs are not implemented yet)", file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(Path(args[0]))
    except BuildFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for artifact in manifest["artifacts"]:
        print(f"{artifact['file']}: {artifact['format']} {artifact['precision']}, {artifact['bytes']} bytes, sha256 ok")
    print("device runs over adb are not implemented yet (issue: the device lab)")
    return 0
