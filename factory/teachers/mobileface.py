"""MobileFace Identification V2 (MIT licence): a 0.89 M-parameter MobileNetV2-style face embedding network.

Source: the public repository becauseofAI/MobileFace, folder `MobileFace_Identification/`, at a pinned
commit; two MXNet files (symbol JSON and `.params`), read here without MXNet (`factory.teachers.mxnet`).
Input: aligned 112x112 RGB, pixel values 0-255, NCHW (the (x - 127.5) / 128 scaling is inside the graph).
Output: 256-D, L2-normalised here. Published LFW 99.653%; its training data is not documented (likely an
MS-Celeb-1M derivative, which shares celebrities with LFW), so students it teaches are not LFW-identity-free.

The files are looked for, in order, in `$FACTORY_MODELS/mobileface_v2/`, in `../shared/models/mobileface_v2/`
next to this repository, and in the download cache (`python -m factory teacher fetch mobileface_v2`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.errors import FactoryError
from factory.fetch import RemoteFile, cache_dir, download, file_digest
from factory.teachers.mxnet import load_symbol_graph
from factory.teachers.registry import TeacherEntry, register_teacher

NAME = "mobileface_v2"
COMMIT = "128cea33b928dc9bb6d1963202b57a97f5661ccf"
_BASE = f"https://raw.githubusercontent.com/becauseofAI/MobileFace/{COMMIT}/MobileFace_Identification"
SYMBOL = RemoteFile("MobileFace_Identification_V2-symbol.json", (f"{_BASE}/MobileFace_Identification_V2-symbol.json",),
                    sha256="9d4f776ecb40772e3eb10338319e4a10a3cd68694dc6ef4e9042c8c4141e658f")
PARAMS = RemoteFile("MobileFace_Identification_V2-0000.params", (f"{_BASE}/MobileFace_Identification_V2-0000.params",),
                    sha256="750057619a1eef8acb320339aebf0bbcf191497e1396a361c8aaba517bbe825e")
FILES = (SYMBOL, PARAMS)
SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
FETCH_COMMAND = f"python -m factory teacher fetch {NAME}"


def candidate_folders() -> list[Path]:
    """Folders searched for the MobileFace V2 files, in order."""
    folders = [Path(os.environ["FACTORY_MODELS"]) / NAME] if os.environ.get("FACTORY_MODELS") else []
    return [*folders, SHARED_MODELS / NAME, cache_dir() / "models" / NAME]


def find_files() -> tuple[Path, Path]:
    """The verified symbol and params files, from the first folder that holds both.

    Raises:
        FactoryError: neither file pair is present, or a present file does not match its pinned sha256.
    """
    for folder in candidate_folders():
        paths = [folder / remote.name for remote in FILES]
        if not all(path.is_file() for path in paths):
            continue
        for remote, path in zip(FILES, paths, strict=True):
            digest = file_digest(path, "sha256")
            if digest != remote.sha256:
                raise FactoryError(
                    f"{path} is corrupt or not the pinned MobileFace V2 file (sha256 {digest}, expected "
                    f"{remote.sha256}); delete it and run `{FETCH_COMMAND}`, or copy the file from the "
                    f"public repository becauseofAI/MobileFace at commit {COMMIT}")
        return paths[0], paths[1]
    searched = ", ".join(str(folder) for folder in candidate_folders())
    raise FactoryError(f"MobileFace V2 weights not found (looked in {searched}); run `{FETCH_COMMAND}` (downloads "
                       f"the two files from becauseofAI/MobileFace at commit {COMMIT}, sha256-checked) or set "
                       f"FACTORY_MODELS to a folder holding {NAME}/")


def fetch(models: Path | None = None, mirror: str | None = None) -> Path:
    """Download both files (sha256-verified, resumable) into `models/mobileface_v2/` (default: the cache's).

    Returns the folder holding them; `FACTORY_MODELS=<models>` makes the factory use them.
    """
    folder = (models or cache_dir() / "models") / NAME
    for remote in FILES:
        download(remote, folder, mirror)
    return folder


def build_network() -> nn.Module:
    """The MobileFace V2 graph as a PyTorch module (input 0-255 RGB NCHW, output the raw 256-D embedding)."""
    symbol, params = find_files()
    return load_symbol_graph(symbol, params)


class MobileFaceTeacher:
    """MobileFace V2 as a `Teacher`: runs the converted graph in PyTorch on `device`."""

    name = NAME
    embedding_size = 256

    def __init__(self, device: str = "cpu") -> None:
        symbol, params = find_files()
        self.network = load_symbol_graph(symbol, params).to(device).eval()
        self.device = device
        self.digest = file_digest(params, "sha256")[:16] + file_digest(symbol, "sha256")[:16]

    @torch.no_grad()
    def embed_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings of float RGB 0-255 NCHW faces already on the teacher's device."""
        return F.normalize(self.network(pixels), dim=1)

    def embed(self, faces: np.ndarray, batch_size: int = 128) -> np.ndarray:
        out = []
        for start in range(0, len(faces), batch_size):
            batch = torch.from_numpy(faces[start : start + batch_size]).to(self.device)
            out.append(self.embed_tensor(batch.permute(0, 3, 1, 2).float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embedding_size), np.float32)


register_teacher(TeacherEntry(
    name=NAME,
    loader=MobileFaceTeacher,
    embedding_size=256,
    licence="MIT",
    provenance="not documented by its authors (likely an MS-Celeb-1M derivative, which shares celebrities with LFW)",
    lfw_identity_free=False,
    published_lfw=0.99653,
    source=f"github.com/becauseofAI/MobileFace at {COMMIT}, MobileFace_Identification/",
    files=lambda: list(find_files()),
    model_folder=NAME,
))
