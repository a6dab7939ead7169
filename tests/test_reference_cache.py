"""The reference-embedding cache: a hit is exactly the cold run's array; anything the numbers depend on changes
the key; a file that does not read back is an error naming it; it can be turned off."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.deploy import Embedder
from factory.errors import FactoryError
from factory.evaluation import torch_embeddings
from factory.reference_cache import cache_key, reference_embeddings


@pytest.fixture()
def embedder(tiny_backbone) -> Embedder:
    return Embedder(copy.deepcopy(tiny_backbone), [127.5] * 3, [128.0] * 3, 32).eval()


def _pixels(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, 3, 112, 112)).astype(np.float32)


def test_a_hit_is_the_cold_array_and_needs_no_forward_pass(embedder, tmp_path: Path, monkeypatch) -> None:
    pixels = _pixels(70, 0)  # more than one batch of 64
    cold, cached = reference_embeddings(embedder, pixels, tmp_path)
    assert not cached and np.array_equal(cold, torch_embeddings(embedder, pixels))
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit ran the network")

    monkeypatch.setattr(embedder, "forward", refuse)
    warm, cached = reference_embeddings(embedder, pixels, tmp_path)
    assert cached and warm.dtype == cold.dtype and np.array_equal(warm, cold)


def test_weights_faces_and_normalisation_change_the_key(embedder) -> None:
    pixels = _pixels(4, 1)
    key = cache_key(embedder, pixels)
    assert cache_key(embedder, pixels.copy()) == key
    changed = pixels.copy()
    changed[3, 0, 5, 5] += 1.0
    assert cache_key(embedder, changed) != key, "one pixel of one face"
    assert cache_key(embedder, pixels[:3]) != key
    other = copy.deepcopy(embedder)
    with torch.no_grad():
        next(other.backbone.parameters()).view(-1)[0] += 1e-3
    assert cache_key(other, pixels) != key, "one weight"
    bgr = Embedder(embedder.backbone, [127.5, 127.5, 127.0], [128.0] * 3, 32).eval()
    assert cache_key(bgr, pixels) != key, "the normalisation"


def test_unreadable_cache_file_is_an_error_naming_it_and_off_computes(embedder, tmp_path: Path,
                                                                     monkeypatch) -> None:
    pixels = _pixels(3, 2)
    reference_embeddings(embedder, pixels, tmp_path)
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(b"not an array")
    with pytest.raises(FactoryError, match=f"{path.name}.*does not read back.*delete it"):
        reference_embeddings(embedder, pixels, tmp_path)
    monkeypatch.setenv("FACTORY_REFERENCE_CACHE", "off")
    embeddings, cached = reference_embeddings(embedder, pixels, tmp_path)
    assert not cached and np.array_equal(embeddings, torch_embeddings(embedder, pixels))
    assert path.read_bytes() == b"not an array", "off: the cache is neither read nor written"
