"""`factory pack`: one training run copied into a folder that trains the same on another machine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, recipe_dict, synthetic_dataset

from factory.benchmarks import read_pairs
from factory.errors import FactoryError
from factory.evaluation import subsample_pairs
from factory.fetch import file_digest
from factory.models import create_model
from factory.pack import pack
from factory.recipe import data_path, load_recipe
from factory.teachers import dlib_files, register_teacher, teacher_entry
from factory.teachers.registry import _REGISTRY
from factory.weights import load_weights, save_weights


def tiny_recipe(tmp_path: Path, **train: object) -> Path:
    """A synthetic face folder (4 identities, 2 folds of 3+3 pairs) and a recipe training on it from saved
    weights; the recipe sits in its own folder, away from the faces."""
    data = recipe_dict(synthetic_dataset(tmp_path / "faces"), weights="trained.safetensors")
    save_weights(create_model("mobilefacenet"), tmp_path / "recipes" / "start.safetensors")
    data["train"].update(init_from="start.safetensors", **train)
    path = tmp_path / "recipes" / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def pair_names(recipe_path: Path, count: int) -> list[tuple[str, str, bool, int]]:
    recipe = load_recipe(recipe_path)
    evaluation = recipe.data.evaluation
    pairs = read_pairs(data_path(recipe, evaluation.pairs), data_path(recipe, evaluation.images))
    return [(p.path_a.name, p.path_b.name, p.same, p.fold) for p in subsample_pairs(pairs, count)]


def test_pack_copies_the_run_and_trains_where_it_lies(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "elsewhere" / "pack"
    manifest = pack(recipe, out, pairs=8)

    # Every face of the split, the starting weights and the held-out pairs' images, each as its source.
    assert manifest["held_out_pairs"] == 8
    paths = {entry["path"] for entry in manifest["files"]}
    assert sum(p.startswith("faces/aligned/") for p in paths) == 24
    assert "weights/init_start.safetensors" in paths
    for entry in manifest["files"]:
        source = file_digest(Path(entry["from"]), "sha256")
        assert file_digest(out / entry["path"], "sha256") == entry["sha256"] == source
    assert manifest["bytes"] == sum(entry["bytes"] for entry in manifest["files"])

    # The packed recipe names nothing outside the pack, and its held-out pairs are the home recipe's.
    packed = load_recipe(out / "recipe.yaml")
    assert packed.resolve(packed.data.root) == (out / "faces").resolve()
    assert packed.resolve(packed.train.init_from) == (out / "weights" / "init_start.safetensors").resolve()
    assert pair_names(out / "recipe.yaml", 1200) == pair_names(recipe, 8)
    assert len(pair_names(out / "recipe.yaml", 1200)) == 8

    # The home folder can go: training reads the pack alone.
    (tmp_path / "faces").rename(tmp_path / "faces-gone")
    result = subprocess.run(
        [sys.executable, "-m", "factory", "train", str(out / "recipe.yaml"), "--device", "cpu", "--threads", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "weights" / "trained.train.json").read_text())
    assert summary["images"] == 24 and summary["evaluation"]["pairs"] == 8
    load_weights(create_model("mobilefacenet"), out / "weights" / "trained.safetensors")


def test_pack_refuses_too_large_an_existing_folder_and_streamed_data(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "pack"
    with pytest.raises(FactoryError, match="over --max-mib"):
        pack(recipe, out, pairs=8, max_mib=0.1)
    assert not out.exists() and not list(tmp_path.glob(".pack*"))  # nothing half-written

    out.mkdir()
    with pytest.raises(FactoryError, match="already exists"):
        pack(recipe, out, pairs=8)

    shards = tiny_recipe(tmp_path / "streamed", split="shards-{000..001}.tar")
    with pytest.raises(FactoryError, match="webdataset data read while training"):
        pack(shards, tmp_path / "pack2")


def test_pack_carries_the_teachers_files_where_factory_models_finds_them(tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "teacher" / "net.params"
    weights.parent.mkdir()
    weights.write_bytes(b"teacher weights")
    entry = teacher_entry("mobileface_v2")
    from dataclasses import replace

    register_teacher(replace(entry, name="packed_teacher", files=lambda: [weights], model_folder="packed"))
    try:
        recipe = tiny_recipe(tmp_path, distill={"teachers": ["packed_teacher"]})
        manifest = pack(recipe, tmp_path / "pack", pairs=8)
    finally:
        del _REGISTRY["packed_teacher"]
    assert {
        "path": "models/packed/net.params",
        "bytes": 15,
        "sha256": file_digest(weights, "sha256"),
        "from": str(weights),
    } in manifest["files"]
    assert "FACTORY_MODELS=" in manifest["command"]


def test_dlib_model_files_are_read_from_factory_models_and_checked(tmp_path: Path, monkeypatch) -> None:
    model = dlib_files.ModelFile("net.dat", 5, file_digest_of(b"12345"))
    placed = tmp_path / "models" / dlib_files.MODEL_FOLDER / "net.dat"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"12345")
    monkeypatch.setenv("FACTORY_MODELS", str(tmp_path / "models"))
    assert dlib_files.model_file(model, extracted_root=tmp_path / "nothing") == placed
    placed.write_bytes(b"54321")
    with pytest.raises(FactoryError, match=r"net\.dat has sha256"):
        dlib_files.model_file(model, extracted_root=tmp_path / "nothing")


def file_digest_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
