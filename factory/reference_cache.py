"""The PyTorch fp32 reference's embeddings, computed once per (network, faces, code) and reused by later builds.

A build embeds every held-out face with the fp32 reference (MobileFaceNet: 7,701 LFW faces, about two minutes on
2 cores), the further benchmarks' faces, and each ablation row's weights. Rebuilding a recipe whose weights and
data did not change (a new quantiser setting, a new target) gives the same embeddings, so they are kept in
`<FACTORY_CACHE>/reference-embeddings/<key>.npy`. The key is the sha256 of everything the numbers depend on:

- the network's state (every parameter and buffer, bytes and names) and its class's source file;
- the deployed graph's source (`factory/deploy.py`) and its normalisation constants;
- the faces themselves (sha256 of the pixel array the reference runs on, so a changed image, crop or
  colour order misses the cache);
- the batch size, memory layout and threading (`factory.parallel`: one intra-op thread per batch, so the core
  count does not matter) and torch's version (kernels may round differently).

A hit returns exactly the array a cold run computed with the same inputs (tests check it against a cold run).
A cache file that does not read back is an error naming it. `FACTORY_REFERENCE_CACHE=off` turns the cache off.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import numpy as np
import torch

from factory.deploy import Embedder
from factory.errors import FactoryError
from factory.evaluation import REFERENCE_BATCH, REFERENCE_LAYOUT, torch_embeddings
from factory.io import array_buffer, atomic_path


def enabled() -> bool:
    return os.environ.get("FACTORY_REFERENCE_CACHE", "on").lower() not in ("off", "0", "false", "no")


def default_dir() -> Path:
    from factory.fetch import cache_dir

    return cache_dir() / "reference-embeddings"


def _source(obj: object) -> bytes:
    try:
        return Path(inspect.getsourcefile(obj)).read_bytes()
    except (TypeError, OSError):
        return repr(obj).encode()


def cache_key(model: Embedder, pixels: np.ndarray) -> str:
    """sha256 of what the reference embeddings of `pixels` depend on (see the module docstring)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    backbone = getattr(model, "backbone", model)
    for obj in (type(backbone), Embedder):
        digest.update(_source(obj))
    digest.update(array_buffer(pixels))
    digest.update(f"{pixels.shape} {pixels.dtype} {REFERENCE_BATCH} {REFERENCE_LAYOUT} {torch.__version__}".encode())
    return digest.hexdigest()


def reference_embeddings(model: Embedder, pixels_nchw: np.ndarray,
                         folder: Path | None = None) -> tuple[np.ndarray, bool]:
    """The reference's embeddings of `pixels_nchw` and whether they came from the cache."""
    if not enabled():
        return torch_embeddings(model, pixels_nchw), False
    path = (folder or default_dir()) / f"{cache_key(model, pixels_nchw)}.npy"
    if path.exists():
        try:
            cached = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise FactoryError(f"reference embedding cache file {path} does not read back ({error}); delete it and "
                               "the build computes it again") from None
        if cached.shape[0] != len(pixels_nchw):
            raise FactoryError(f"reference embedding cache file {path} holds {cached.shape[0]} embeddings for "
                               f"{len(pixels_nchw)} faces; delete it and the build computes it again")
        return cached, True
    embeddings = torch_embeddings(model, pixels_nchw)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, embeddings, allow_pickle=False)
    return embeddings, False
