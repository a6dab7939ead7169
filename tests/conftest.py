"""Shared fixtures. Tests that need real faces fail (never skip) with a clear message without them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FACES, ReducedBuild, Server, TinyFaceNet, reduced_recipe, run_build, settle_batchnorm


@pytest.fixture(scope="session")
def faces_root() -> Path:
    """The real aligned faces; a clear failure when the shared data folder is missing."""
    if not (FACES / "lfw" / "pairs.txt").is_file() or not (FACES / "splits" / "train.txt").is_file():
        pytest.fail(
            f"real face data not found at {FACES}: this test needs ../shared/data/faces next to the repository "
            "(see ../shared/data/faces/README.md)",
            pytrace=False,
        )
    return FACES


@pytest.fixture(scope="session")
def tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return settle_batchnorm(TinyFaceNet(), torch.randn(32, 3, 112, 112))


@pytest.fixture()
def server() -> Iterator[Server]:
    """An HTTP server on 127.0.0.1 serving `server.files` (downloads are tested against it, never the internet)."""
    running = Server()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


@pytest.fixture(scope="session")
def reduced_build(tmp_path_factory: pytest.TempPathFactory, faces_root: Path) -> ReducedBuild:
    """One reduced real-face build of the shipped MobileFaceNet (about 3 minutes), shared by the tests that
    check the build itself and those that run its artifacts elsewhere (the arm64 device lab)."""
    folder = tmp_path_factory.mktemp("reduced")
    recipe = reduced_recipe(folder, faces_root)
    result = run_build(recipe, folder / "build")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return ReducedBuild(folder / "build", recipe, result)
