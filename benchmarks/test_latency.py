"""Batch-1 latency of every artifact a host runtime runs natively, and of the same fp32 network in PyTorch eager
and ONNX Runtime, at 1 and 2 threads. Warm-up and rounds are fixed here, so saved runs compare."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, build_folder, read_manifest

WARMUP_ROUNDS = 10
ROUNDS = 50
THREADS = (1, 2)
PEERS = ("pytorch_eager_fp32", "onnxruntime_fp32")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "artifact" in metafunc.fixturenames:
        from factory.targets import target_for_path

        manifest = read_manifest(metafunc.config)
        files = [a["file"] for a in manifest["artifacts"] if target_for_path(Path(a["file"])).host_latency]
        metafunc.parametrize("artifact", files)
    if "peer" in metafunc.fixturenames:
        metafunc.parametrize("peer", PEERS)
    if "threads" in metafunc.fixturenames:
        metafunc.parametrize("threads", THREADS, ids=lambda t: f"{t}thread")


@pytest.fixture(scope="module")
def example(request: pytest.FixtureRequest) -> np.ndarray:
    """One golden face (NCHW, pixels 0-255) of the build."""
    manifest = read_manifest(request.config)
    entry = manifest["golden"]["inputs"]["NCHW"]
    pixels = np.fromfile(build_folder(request.config) / entry["file"], dtype="<f4").reshape(entry["shape"])
    return np.ascontiguousarray(pixels[:1])


def test_artifact(benchmark, artifact: str, threads: int, example: np.ndarray, request) -> None:
    from factory.artifacts import artifact_call, in_layout
    from factory.targets import target_for_path

    path = build_folder(request.config) / artifact
    if not path.exists():
        pytest.fail(f"{path} is listed in the manifest but missing: rebuild the recipe", pytrace=False)
    target = target_for_path(path)
    entry = next(a for a in read_manifest(request.config)["artifacts"] if a["file"] == artifact)
    call = artifact_call(target, path, in_layout(example, entry["io"]["input"]["layout"]))(threads)
    benchmark.extra_info.update({"artifact": artifact, "precision": entry["precision"], "threads": threads,
                                 "sha256": entry["sha256"], "runtime": entry["runtime"]})
    output = benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    assert np.isfinite(np.asarray(output)).all()


@pytest.fixture(scope="module")
def reference_model(request: pytest.FixtureRequest):
    """The build's fp32 network as deployed (normalisation and L2 norm inside), from its recipe and weights."""
    from factory.deploy import Embedder
    from factory.models import load_backbone
    from factory.recipe import load_recipe

    name = request.config.getoption("--bench-recipe")
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    spec = recipe.model.input
    return Embedder(load_backbone(recipe), spec.mean, spec.std, recipe.model.embedding_size).eval()


@pytest.fixture(scope="module")
def onnx_folder():
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as folder:
        yield Path(folder)


def test_peer(benchmark, peer: str, threads: int, example: np.ndarray, reference_model, onnx_folder) -> None:
    from factory.peers import onnx_runtime_call, torch_eager_call

    if peer == "pytorch_eager_fp32":
        call = torch_eager_call(reference_model, example, threads)
    else:
        call = onnx_runtime_call(reference_model, example, threads, onnx_folder)
    benchmark.extra_info.update({"peer": peer, "threads": threads})
    output = benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    assert np.isfinite(np.asarray(output[0] if isinstance(output, list) else output)).all()
