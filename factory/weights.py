"""Model weights as safetensors: the only weight format the factory reads (never pickles)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from factory.errors import FactoryError
from factory.io import atomic_path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, or of every file in a directory bundle (sorted by relative path)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save a model's state dict to a safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(model: nn.Module, path: Path, expected_sha256: str | None = None) -> nn.Module:
    """Load safetensors weights into `model`, checking checksum and that every tensor matches.

    Raises:
        FactoryError: the file is missing, corrupt, has another checksum, or does not fit the model.
    """
    if not path.is_file():
        raise FactoryError(f"weights file not found: {path} — train it with `python -m factory train RECIPE` "
                           "or fix weights.path in the recipe")
    if expected_sha256 and sha256_of(path) != expected_sha256:
        raise FactoryError(f"weights file {path} has sha256 {sha256_of(path)}, the recipe expects "
                           f"{expected_sha256}: the file is corrupt or not the one the recipe names")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise FactoryError(f"weights file {path} is not a valid safetensors file ({error}); "
                           "re-train or restore it") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise FactoryError(
            f"weights file {path} does not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape "
            f"(e.g. {wrong[:3]}); check model.architecture and embedding_size in the recipe"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return model.eval()


def store_float16(path: Path) -> tuple[int, int]:
    """Rewrite a safetensors weights file with its float32 tensors stored as float16, atomically.

    For weights that would otherwise be too large to keep in the repository; `load_weights` casts them back to
    the model's float32. Metadata (how the weights were trained) is kept. Returns the sizes before and after.
    """
    from safetensors import safe_open

    before = path.stat().st_size
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise FactoryError(f"weights file {path} is not a valid safetensors file ({error}); "
                           "re-train or restore it") from None
    halved = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(halved, str(tmp), metadata=metadata)
    return before, path.stat().st_size


def training_summary(path: Path) -> dict | None:
    """How the weights were trained (loss, epochs, wall time, hardware), from `factory train`'s metadata.

    None for weights made elsewhere (no such metadata) — a report then says nothing about training.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            text = (handle.metadata() or {}).get("training")
        summary = json.loads(text) if text else None
    except (SafetensorError, OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    keep = ("device", "images", "identities", "epochs", "train_config", "wall_time_s", "evaluation",
            "teacher", "teachers", "init_from_sha256", "photos", "faces")
    return {key: summary[key] for key in keep if key in summary}


def state_dict_equal(a: nn.Module, b: nn.Module) -> bool:
    """True when two models hold exactly the same tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
