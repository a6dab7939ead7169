"""Pack one training run into a self-contained folder, to train it on another machine (a GPU box).

`python -m factory pack RECIPE OUT` copies what `python -m factory train` reads for the recipe's recogniser
and nothing else: the faces of the training split (and of any `train.distill.unlabelled` split), the weights
training starts from, the teachers' weight files, and the evaluation pairs that training scores after every
epoch (the fold-balanced held-out share, 1,200 pairs by default) with their images. It writes
`OUT/recipe.yaml`, the same recipe pointing at these copies, and `OUT/manifest.json` (every file with its
size and sha256, and where it came from). With this repository's `factory/` on the other machine:

    FACTORY_MODELS=OUT/models python -m factory train OUT/recipe.yaml --device cuda

trains exactly as the recipe would at home, writing `OUT/weights/`. The score in its training log is on
the packed pairs (the log names how many); the whole protocol is scored by `factory build` at home.
`--max-mib` refuses a pack larger than a transfer limit before anything is written, and a pack is written
to a temporary folder and renamed, so a failed pack leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from factory.benchmarks import read_pairs
from factory.data import Pair, read_split
from factory.errors import FactoryError
from factory.evaluation import balanced_pair_indices
from factory.face_data import sniff_format
from factory.fetch import file_digest
from factory.io import atomic_path
from factory.recipe import Recipe, data_path, load_recipe, read_recipe_mapping
from factory.teachers import teacher_entry

FACES = "faces"
MODELS = "models"
WEIGHTS = "weights"
PAIRS = "held_out_pairs.txt"
PAIR_IMAGES = "pair_images"
MIB = 1 << 20


@dataclass(frozen=True)
class Packed:
    """One file of a pack: where it goes (relative to the pack) and where it comes from."""

    target: str
    source: Path


def pack(
    recipe_path: Path, out: Path, pairs: int = 1200, max_mib: float | None = None, data_root: str | None = None
) -> dict[str, Any]:
    """Write the pack of `recipe_path`'s recogniser training into `out` (which must not exist yet).

    Returns the manifest written to `out/manifest.json`.

    Raises:
        FactoryError: no `train` section, a split format that is not a list of faces, a missing file, an
            evaluation pair file that cannot be subset, `out` already there, or a pack over `max_mib`.
    """
    recipe = load_recipe(recipe_path, data_root=data_root)
    if recipe.train is None:
        raise FactoryError(f"{recipe_path}: the recipe has no `train` section, so there is no training to pack")
    if recipe.weights is None:
        raise FactoryError(
            f"{recipe_path}: {recipe.model.architecture} is imported with its pretrained weights; "
            "there is nothing to train"
        )
    if out.exists():
        raise FactoryError(f"{out} already exists; name a new folder for the pack (or delete that one)")
    if pairs < 1:
        raise FactoryError(f"--pairs {pairs}: pack at least one evaluation pair of each kind per fold")

    files = _training_files(recipe)
    held_out, pair_files, pair_text = _held_out_pairs(recipe, pairs)
    files += pair_files
    files += _teacher_files(recipe)
    init = None
    if recipe.train.init_from is not None:
        init = f"{WEIGHTS}/init_{recipe.resolve(recipe.train.init_from).name}"
        files.append(Packed(init, recipe.resolve(recipe.train.init_from)))
    files = list({item.target: item for item in files}.values())  # a face in both the split and the pairs

    total = sum(item.source.stat().st_size for item in files)
    if max_mib is not None and total > max_mib * MIB:
        raise FactoryError(
            f"the pack of {recipe_path} would hold {total / MIB:.1f} MiB, over --max-mib {max_mib:g}; "
            f"pack fewer evaluation pairs (--pairs, now {pairs}) or carry the faces another way"
        )

    packed_recipe = _packed_recipe(recipe_path, recipe, init, len(pair_files))
    manifest: dict[str, Any] = {
        "recipe": str(recipe_path),
        "command": f"FACTORY_MODELS={out}/{MODELS} python -m factory train {out}/recipe.yaml --device cuda",
        "held_out_pairs": len(held_out),
        "bytes": total,
        "files": [],
    }
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for item in files:
            target = tmp / item.target
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.source, target)
            manifest["files"].append(
                {
                    "path": item.target,
                    "bytes": target.stat().st_size,
                    "sha256": file_digest(target, "sha256"),
                    "from": str(item.source),
                }
            )
        (tmp / FACES / PAIRS).write_text(pair_text)
        for extra, text in _split_copies(recipe).items():
            (tmp / FACES / extra).parent.mkdir(parents=True, exist_ok=True)
            (tmp / FACES / extra).write_text(text)
        header = (
            f"# Packed from {recipe_path} by `python -m factory pack` (manifest.json lists every file).\n"
            f"# {manifest['command']}\n"
        )
        (tmp / "recipe.yaml").write_text(header + yaml.safe_dump(packed_recipe, sort_keys=False))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        load_recipe(tmp / "recipe.yaml")  # the packed recipe must validate where it lies
    return manifest


def _training_files(recipe: Recipe) -> list[Packed]:
    """The faces of the training split and of the unlabelled splits, at their paths under the data root."""
    assert recipe.train is not None
    split = recipe.train.split
    pattern = any(char in split for char in "{*?[")
    fmt = recipe.train.format or ("webdataset" if pattern else sniff_format(data_path(recipe, split)))
    if fmt != "list":
        raise FactoryError(
            f"train.split {split!r} is {fmt} data read while training; `pack` copies a list of faces "
            "(path<TAB>label): copy those shards to the other machine as they are"
        )
    root = recipe.resolve(recipe.data.root)
    splits = [split, *(recipe.train.distill.unlabelled if recipe.train.distill else [])]
    files = []
    for name in splits:
        for path, _ in _split_rows(data_path(recipe, name), root):
            files.append(Packed(f"{FACES}/{_under(path, root, name)}", path))
    return files


def _split_rows(split_file: Path, root: Path) -> list[tuple[Path, str]]:
    """A split's rows; an unlabelled split may leave out the label."""
    text = split_file.read_text() if split_file.is_file() else None
    if text is not None and all("\t" not in line for line in text.splitlines() if line.strip()):
        return [(root / line.strip(), "") for line in text.splitlines() if line.strip()]
    return read_split(split_file, root)


def _split_copies(recipe: Recipe) -> dict[str, str]:
    """The split files themselves (their rows are relative to the data root, which the pack keeps)."""
    assert recipe.train is not None
    names = [recipe.train.split, *(recipe.train.distill.unlabelled if recipe.train.distill else [])]
    return {name: data_path(recipe, name).read_text() for name in names}


def _under(path: Path, root: Path, split: str) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        raise FactoryError(
            f"{split} names {path}, outside the data root {root}; `pack` keeps paths relative to the data root"
        ) from None


def _held_out_pairs(recipe: Recipe, count: int) -> tuple[list[Pair], list[Packed], str]:
    """The first `count` evaluation pairs, fold-balanced (the share training scores after each epoch), their
    images, and an LFW-format pairs file of them."""
    cfg = recipe.data.evaluation
    pairs_file = data_path(recipe, cfg.pairs)
    if pairs_file.suffix == ".bin":
        raise FactoryError(f"{pairs_file}: `pack` subsets LFW-format or simple pair lists, not insightface .bin files")
    pairs = read_pairs(pairs_file, data_path(recipe, cfg.images))
    chosen = np.sort(balanced_pair_indices(np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]), count))
    held_out = [pairs[i] for i in chosen]
    folds = sorted({p.fold for p in held_out})
    per_fold = [
        (sum(p.same for p in held_out if p.fold == f), sum(not p.same for p in held_out if p.fold == f)) for f in folds
    ]
    if len(set(per_fold)) != 1 or per_fold[0][0] != per_fold[0][1]:
        raise FactoryError(
            f"{pairs_file}: its folds hold too few pairs for {count} fold-balanced ones; pack fewer (--pairs)"
        )
    images = {path for pair in held_out for path in (pair.path_a, pair.path_b)}
    files = [Packed(f"{FACES}/{PAIR_IMAGES}/{path.parent.name}/{path.name}", path) for path in sorted(images)]
    lines = [f"{len(folds)}\t{per_fold[0][0]}"]
    for pair in held_out:  # in fold order, each fold's same pairs first, as LFW's pairs.txt
        a, b = _lfw_name(pair.path_a), _lfw_name(pair.path_b)
        lines.append(f"{a[0]}\t{a[1]}\t{b[1]}" if pair.same else f"{a[0]}\t{a[1]}\t{b[0]}\t{b[1]}")
    return held_out, files, "\n".join(lines) + "\n"


def _lfw_name(path: Path) -> tuple[str, int]:
    """(identity, number) of an LFW-layout image `<identity>/<identity>_<NNNN>.jpg`."""
    stem, _, number = path.stem.rpartition("_")
    if stem != path.parent.name or not number.isdigit() or path.suffix != ".jpg":
        raise FactoryError(
            f"{path}: `pack` writes the held-out pairs in LFW's layout "
            "(<identity>/<identity>_<NNNN>.jpg), which this image does not follow"
        )
    return stem, int(number)


def _teacher_files(recipe: Recipe) -> list[Packed]:
    """Each distillation teacher's weight files, under `models/<its folder>/`."""
    assert recipe.train is not None
    files = []
    for name in recipe.train.distill.teachers if recipe.train.distill else []:
        entry = teacher_entry(name)
        files += [Packed(f"{MODELS}/{entry.model_folder}/{path.name}", path) for path in entry.files()]
    return files


def _packed_recipe(recipe_path: Path, recipe: Recipe, init: str | None, pair_images: int) -> dict[str, Any]:
    """The recipe's mapping pointing at the pack: faces, starting weights, output, held-out pairs only."""
    data = read_recipe_mapping(recipe_path)
    weights_name = recipe.resolve(recipe.weights.path).name if recipe.weights else "weights.safetensors"
    data["weights"] = {"path": f"{WEIGHTS}/{weights_name}"}
    data["data"]["root"] = FACES
    data["data"]["calibration"]["split"] = recipe.train.split if recipe.train else data["data"]["calibration"]["split"]
    evaluation = data["data"]["evaluation"]
    evaluation.update(
        pairs=PAIRS, images=PAIR_IMAGES, min_parity_images=min(recipe.data.evaluation.min_parity_images, pair_images)
    )
    evaluation.pop("max_pairs", None)
    for key in ("benchmarks",):
        data["data"].pop(key, None)
    for key in ("ablation", "pipeline"):
        data.pop(key, None)
    train = data["train"]
    if init is not None:
        train["init_from"] = init
    if isinstance(train.get("distill"), dict):
        train["distill"].pop("cache_dir", None)  # the other machine's default teacher cache
    return data
