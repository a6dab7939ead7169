"""Command line: `python -m factory {validate,list,train,curve,eval,data,teacher,build,compare,results} ...`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from factory.errors import FactoryError

if TYPE_CHECKING:
    from factory.recipe import Recipe


def _load_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe named on the command line; without --data-root, a missing data root falls back to fetched LFW."""
    from factory.fetch import use_lfw_if_no_data
    from factory.recipe import load_recipe

    return load_recipe(args.recipe, data_root=args.data_root,
                       if_no_data=use_lfw_if_no_data if args.data_root is None else None)


def _validate(args: argparse.Namespace) -> int:
    from factory.recipe import RecipeError, load_recipe

    failed = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path)
        except RecipeError as error:
            print(error, file=sys.stderr)
            failed += 1
            continue
        except FactoryError as error:
            print(f"{path}: {error}", file=sys.stderr)
            failed += 1
            continue
        formats = ", ".join(f"{t.format} {'/'.join(t.precisions)}" for t in recipe.targets)
        print(f"{path}: ok ({recipe.model.architecture}; {formats})")
    return 2 if failed else 0


def _recipe_lines(recipes_dir: Path, reports_dir: Path) -> list[str]:
    """One line per recipe: its model, whether its weights exist, LFW fp32 and int8, teacher, the paper's LFW."""
    from factory.models import model_entry
    from factory.pipelines import pipeline_kind
    from factory.recipe import load_recipe
    from factory.report_schema import read_report
    from factory.results import int8_accuracy_range, teachers_of

    lines = []
    for path in sorted(recipes_dir.glob("*.yaml")):
        try:
            recipe = load_recipe(path)
        except FactoryError as error:
            lines.append(f"  {path.stem:<22} invalid: {str(error).splitlines()[0]}")
            continue
        entry = model_entry(recipe.model.architecture)
        paper = entry.paper_numbers.get("lfw_accuracy")
        files = [recipe.weights.path] if recipe.weights is not None else []
        kind = pipeline_kind(recipe.pipeline.kind) if recipe.pipeline is not None else None
        if kind is not None:
            files += [weights.path for weights in kind.weights(recipe.pipeline)]
        present = all(recipe.resolve(f).is_file() for f in files)  # an imported model's files: checked by load
        weights = ("imported" if entry.imported is not None else "weights ok") if present else "NO WEIGHTS"
        report = reports_dir / recipe.name / "report.json"
        if report.is_file():
            built = read_report(report)
            accuracy = built.reference.lfw_accuracy
            measured = f"LFW {100 * accuracy:.2f}% ({built.verdict}, {built.created[:10]})"
            int8 = int8_accuracy_range(built)
            if int8 is not None:
                low, high = int8
                measured += f"; int8 {100 * low:.2f}%" + (f"-{100 * high:.2f}%" if high > low else "")
            if built.pipeline is not None and "kind" in built.pipeline:
                measured += f"; {pipeline_kind(built.pipeline['kind']).summary(built.pipeline)}"
            teacher = teachers_of(built)[0]
        else:
            measured, teacher = "not built", "—"
        paper_text = "—" if paper is None else f"{100 * paper:.2f}%"
        lines.append(f"  {recipe.name:<22} {recipe.model.architecture:<22} {weights:<11} built: {measured:<52} "
                     f"teacher: {teacher:<24} paper LFW: {paper_text}")
    return lines


def _list(args: argparse.Namespace) -> int:
    from factory.models import model_entry, model_names
    from factory.targets import get_target, target_names

    recipes_dir = Path(args.recipes)
    if recipes_dir.is_dir():
        print(f"recipes ({recipes_dir}; measured numbers from {args.reports}/<recipe>/report.json):")
        for line in _recipe_lines(recipes_dir, Path(args.reports)):
            print(line)
    print("models:")
    for name in model_names():
        entry = model_entry(name)
        numbers = ", ".join(f"{k}={v}" for k, v in entry.paper_numbers.items()) or "none quoted"
        if entry.paper_kwargs:  # the paper's figures describe another build than the default one
            numbers += " (at " + ", ".join(f"{k}={v}" for k, v in entry.paper_kwargs.items()) + ")"
        print(f"  {name:<22} {entry.paper:<20} paper: {numbers}")
        if entry.imported is not None:
            imported = entry.imported
            print(f"  {'':<22} imported with pretrained weights ({imported.licence}) from {imported.source}")
    print("targets:")
    for name in target_names():
        target = get_target(name)
        print(f"  {name:<16} {target.suffix:<12} precisions: {', '.join(target.precisions):<14} "
              f"verified here by {target.runtime_name}")
    return 0


# Pairs of the evaluation set scored after every training epoch (fold-balanced; the full set after training).
HELD_OUT_PAIRS = 1200


def _train_pipeline_stage(args: argparse.Namespace, recipe: Recipe) -> int:
    """`train --stage NAME`: a stage of the recipe's pipeline kind (`factory.pipelines`)."""
    from factory.pipelines import pipeline_kind

    stages = pipeline_kind(recipe.pipeline.kind).stages if recipe.pipeline is not None else {}
    # Stages the recipe has: a kind's stage whose weights entry the recipe leaves out is not one of them.
    present = {name: stage for name, stage in stages.items() if stage.weights(recipe.pipeline) is not None}
    if args.stage not in present:
        offered = ", ".join(["recogniser", *present])
        raise FactoryError(f"{args.recipe} has no pipeline stage {args.stage!r} to train; its stages: {offered}")
    stage = present[args.stage]
    weights = stage.weights(recipe.pipeline)
    output = Path(args.output) if args.output else recipe.resolve(weights.path)
    summary = stage.train(recipe, output)
    print(f"{args.stage} weights written to {output} ({summary['wall_time_s'] / 60:.1f} min on {summary['device']})")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from factory.curve import pair_scorer
    from factory.evaluation import load_evaluation_set
    from factory.train import train

    recipe = _load_recipe(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage != "recogniser":
        return _train_pipeline_stage(args, recipe)
    if recipe.weights is None:
        raise FactoryError(f"{args.recipe}: {recipe.model.architecture} is imported with its pretrained weights, so "
                           "there is nothing to train; build it with `python -m factory build`")
    output = Path(args.output) if args.output else recipe.resolve(recipe.weights.path)

    if os.environ.get("RANK", "0") != "0":  # a torchrun rank other than 0: it trains; rank 0 scores and writes
        train(recipe, output, device=args.device)
        return 0
    evaluation = load_evaluation_set(recipe)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return pair_scorer(recipe, evaluation)(model)

    held_out, _ = evaluation.subset(HELD_OUT_PAIRS)  # scored after every epoch
    summary = train(recipe, output, device=args.device, evaluate=evaluate, held_out=held_out)
    print(f"weights written to {output} ({summary['wall_time_s'] / 60:.1f} min on {summary['device']})")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from factory.pack import pack

    out = Path(args.out)
    manifest = pack(Path(args.recipe), out, pairs=args.pairs, max_mib=args.max_mib, data_root=args.data_root)
    print(f"packed {len(manifest['files'])} files, {manifest['bytes'] / (1 << 20):.1f} MiB, into {out} "
          f"({manifest['held_out_pairs']} evaluation pairs); on the other machine, with this repository's factory/:")
    print(f"  {manifest['command']}")
    return 0


def _curve(args: argparse.Namespace) -> int:
    import torch

    from factory.curve import learning_curve

    recipe = _load_recipe(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else Path("reports") / recipe.name
    learning_curve(recipe, args.fractions, args.epochs, out_dir, device=args.device,
                   pairs_per_epoch=args.pairs_per_epoch or None)
    print(f"learning curve written to {out_dir / 'learning_curve.md'}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from factory.build import build

    recipe = _load_recipe(args)
    result = build(recipe, Path(args.out) if args.out else None)
    print(f"\n{result.report.verdict.upper()}: report in {result.out_dir / 'report.md'}")
    return 0 if result.passed else 1


def _float16(args: argparse.Namespace) -> int:
    from factory.weights import store_float16

    path = Path(args.weights)
    if not path.is_file():
        raise FactoryError(f"weights file not found: {path}")
    before, after = store_float16(path)
    print(f"{path}: float32 tensors stored as float16, {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB; "
          "update weights.sha256 in its recipe")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from factory.compare import compare

    out = Path(args.out)
    summary = compare([Path(folder) for folder in args.reports], out, args.title)
    print(f"compared {len(summary['rows'])} builds: {out / 'report.md'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from factory.evaluation import evaluate

    recipe = _load_recipe(args)
    if args.pairs:
        recipe.data.evaluation.pairs = str(Path(args.pairs).resolve())
        recipe.data.evaluation.images = str(Path(args.images or Path(args.pairs).parent).resolve())
        recipe.data.evaluation.min_parity_images = 1
    result = evaluate(recipe, Path(args.artifact) if args.artifact else None, flip=args.flip)
    tar = result["tar_at_far_1e-03"]
    print(f"{result['subject']}: accuracy {100 * result['accuracy']:.2f}% ± {100 * result['accuracy_std']:.2f} "
          f"on {result['pairs']} pairs (10-fold); TAR@FAR=1e-3 "
          f"{'n/a' if tar is None else f'{100 * tar:.2f}%'}; threshold {result['threshold']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from factory.align.prepare import prepare

    reference = Path(args.reference_landmarks) if args.reference_landmarks else None
    summary = prepare(Path(args.source), Path(args.destination), select=args.select, size=args.size,
                      reference_landmarks=reference)
    skipped = ", ".join(f"{len(files)} {reason}" for reason, files in summary.skipped.items()) or "none"
    print(f"aligned {summary.kept} faces into {args.destination}; skipped: {skipped} "
          f"(details in {Path(args.destination) / 'summary.json'})")
    if summary.landmark_error:
        error = summary.landmark_error
        print(f"landmarks vs reference on {error['faces']} faces: normalised mean error {error['nme_mean']:.4f} "
              f"(median {error['nme_median']:.4f}, p95 {error['nme_p95']:.4f}, max {error['nme_max']:.4f})")
    return 0


def _face_data(args: argparse.Namespace) -> tuple[object, str]:
    """The source named by `data convert/stats` and its format name."""
    from factory.face_data import open_source, sniff_format

    kind = args.format or sniff_format(args.source)
    return open_source(args.source, kind, size=args.size, root=Path(args.root) if args.root else None), kind


def _data_convert(args: argparse.Namespace) -> int:
    from factory.face_data import convert

    source, kind = _face_data(args)
    out = Path(args.out)
    if args.to == "recordio" and out.suffix != ".rec":
        out = out / "train.rec"
    options = {"header": not args.no_header} if args.to == "recordio" else {"shard_size": args.shard_size}
    stats = convert(source, args.to, out, limit=args.limit, **options)
    print(f"{kind} -> {args.to}: {stats.decoded} faces of {len(source.identities)} identities written to {out}")
    print(stats.summary())
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    import json

    from factory.face_data import WebDatasetSource, scan

    source, kind = _face_data(args)
    images = source.num_images if isinstance(source, WebDatasetSource) else len(source)
    print(f"{args.source}: {kind}, {images} images, {len(source.identities)} identities")
    stats = scan(source, workers=args.workers, limit=args.limit)
    print(stats.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(stats.to_json(), indent=2) + "\n")
    return 0


def _data_fetch(args: argparse.Namespace) -> int:
    from factory.fetch import fetch_lfw, fetched_root

    destination = Path(args.dest) if args.dest else fetched_root()
    lfw = fetch_lfw(destination, mirror=args.mirror)
    print(f"LFW ready in {lfw} (aligned/, pairs.txt, train.txt of non-test identities); builds whose data.root "
          f"is missing use it{'' if args.dest is None else f' if it is in {fetched_root()}'}, or pass "
          f"--data-root {destination}")
    return 0


def _teacher_list(args: argparse.Namespace) -> int:
    from factory.teachers import teacher_entry, teacher_names

    for name in teacher_names():
        entry = teacher_entry(name)
        print(f"  {name:<22} {entry.embedding_size}-D  published LFW {100 * entry.published_lfw:.2f}%  "
              f"LFW-identity-free: {'yes' if entry.lfw_identity_free else 'no'}  licence: {entry.licence}")
    return 0


def _teacher_eval(args: argparse.Namespace) -> int:
    import json

    from factory.teacher_eval import DEFAULT_PAIRS, evaluate_teacher
    from factory.teachers import load_teacher

    pairs = Path(args.pairs) if args.pairs else DEFAULT_PAIRS
    result = evaluate_teacher(load_teacher(args.name, device=args.device), pairs,
                              Path(args.images) if args.images else None, args.max_pairs)
    tar = result.tar_at_far_1e_3
    print(f"{result.teacher}: accuracy {100 * result.accuracy:.2f}% ± {100 * result.accuracy_std:.2f} on "
          f"{result.pairs} pairs of {pairs} (10-fold); TAR@FAR=1e-3 {'n/a' if tar is None else f'{100 * tar:.2f}%'}; "
          f"threshold {result.threshold:.4f}; {1000 * result.seconds_per_face:.0f} ms per face")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0


def _teacher_fit_dlib_chip(args: argparse.Namespace) -> int:
    import numpy as np

    from factory.teacher_eval import SHARED_FACES
    from factory.teachers.dlib_chip import CROP_TO_CHIP, raw_sample_alignments, summarise_fit
    from factory.teachers.dlib_resnet import chip_agreement, load

    alignments, skipped = raw_sample_alignments(Path(args.data_root) if args.data_root else SHARED_FACES, args.limit)
    fit = summarise_fit(alignments, skipped)
    print(f"fitted on {fit.photos} photos (skipped: "
          f"{', '.join(f'{len(paths)} {reason}' for reason, paths in fit.skipped.items()) or 'none'})")
    print("crop -> chip affine:", np.array2string(fit.matrix, precision=4, suppress_small=True, separator=", "))
    print(f"residual over the crop grid: RMS {fit.grid_rms:.2f} chip px (per-photo RMS p95 {fit.grid_rms_p95:.2f}); "
          f"dlib's landmarks: mean error {fit.landmark_error_mean:.2f} chip px (p95 {fit.landmark_error_p95:.2f})")
    print(f"moves crop points by up to {fit.displacement_from:.2f} chip px from the CROP_TO_CHIP in use:",
          np.array2string(CROP_TO_CHIP, precision=4, suppress_small=True, separator=", "))
    teacher = load()
    for label, matrix in (("fitted", fit.matrix), ("in use", CROP_TO_CHIP)):
        cosine = chip_agreement(teacher, alignments, matrix)
        print(f"embedding of the warped reference crop against dlib's own chip, {label}: mean cosine "
              f"{cosine.mean():.4f} (p5 {np.percentile(cosine, 5):.4f}, {len(cosine)} photos)")
    return 0


def _teacher_fetch(args: argparse.Namespace) -> int:
    from factory.teachers import mobileface

    folder = mobileface.fetch(Path(args.dest) if args.dest else None, mirror=args.mirror)
    where = "the factory finds them there" if args.dest is None else f"set FACTORY_MODELS={folder.parent} to use them"
    print(f"MobileFace V2 files verified in {folder}; {where}")
    return 0


def _results(args: argparse.Namespace) -> int:
    from factory.io import write_text_atomic
    from factory.results import render_results, results_rows

    out = Path(args.out)
    write_text_atomic(out, render_results(results_rows(Path(args.recipes), Path(args.reports))))
    print(f"results table written to {out}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m factory", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check recipes without running them")
    validate.add_argument("recipes", nargs="+")
    validate.set_defaults(handler=_validate)

    listing = commands.add_parser("list", help="registered models and targets")
    listing.add_argument("--recipes", default="recipes", help="recipe folder to list (default: recipes)")
    listing.add_argument("--reports", default="reports", help="where their builds' reports are (default: reports)")
    listing.set_defaults(handler=_list)

    train = commands.add_parser("train", help="train the recipe's model and save safetensors weights")
    train.add_argument("recipe")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    train.add_argument("--output", help="weights file (default: weights.path of the recipe)")
    train.add_argument("--threads", type=int, help="CPU threads for training")
    train.add_argument("--data-root", help="use this face folder instead of data.root")
    train.add_argument("--stage", default="recogniser",
                       help="which model to train: the recogniser (`model`, the default) or a stage of the recipe's "
                            "pipeline (e.g. detector)")
    train.set_defaults(handler=_train)

    pack = commands.add_parser("pack", help="copy a recipe's training run (faces, teachers, starting weights) into "
                                            "one folder, to train it on another machine")
    pack.add_argument("recipe")
    pack.add_argument("out", help="the pack's folder (must not exist yet)")
    pack.add_argument("--pairs", type=int, default=HELD_OUT_PAIRS,
                      help=f"evaluation pairs to pack, fold-balanced (default {HELD_OUT_PAIRS}: the pairs training "
                           "scores after each epoch)")
    pack.add_argument("--max-mib", type=float, help="refuse a pack larger than this (a transfer limit)")
    pack.add_argument("--data-root", help="use this face folder instead of data.root")
    pack.set_defaults(handler=_pack)

    curve = commands.add_parser("curve", help="held-out accuracy against training identities and epochs")
    curve.add_argument("recipe")
    curve.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                       help="shares of the training identities, one training run each")
    curve.add_argument("--epochs", type=int, default=4, help="epochs per run (accuracy is scored after each)")
    curve.add_argument("--pairs-per-epoch", type=int, default=1200,
                       help="score epochs on this many evaluation pairs (0: all); final models use all pairs")
    curve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    curve.add_argument("--threads", type=int, help="CPU threads for training")
    curve.add_argument("--data-root", help="use this face folder instead of data.root")
    curve.add_argument("--out", help="folder for learning_curve.* (default: reports/<recipe>)")
    curve.set_defaults(handler=_curve)

    evaluation = commands.add_parser("eval", help="verification accuracy of the model or of a built artifact")
    evaluation.add_argument("recipe")
    evaluation.add_argument("--artifact", help="a built .tflite / .pte / .mlpackage (default: the PyTorch model)")
    evaluation.add_argument("--pairs", help="another pair list: LFW pairs.txt, 'path_a path_b same' lines, or .bin")
    evaluation.add_argument("--images", help="image root of --pairs (default: its folder)")
    evaluation.add_argument("--flip", action="store_true", help="flip test: add the mirrored image's embedding")
    evaluation.add_argument("--json", help="also write the result as JSON here")
    evaluation.add_argument("--data-root", help="use this face folder instead of data.root")
    evaluation.set_defaults(handler=_eval)

    data = commands.add_parser("data", help="face data: align raw photos, convert and check training sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="raw photos -> aligned 112x112 faces (MTCNN + 5 points)")
    prepare.add_argument("source", help="folder of photos: one sub-folder per identity, or flat")
    prepare.add_argument("destination")
    prepare.add_argument("--select", choices=("largest", "central"), default="largest",
                         help="which face when a photo has several (central: LFW-style crops)")
    prepare.add_argument("--size", type=int, default=112)
    prepare.add_argument("--reference-landmarks", help="CSV of reference landmarks to score ours against")
    prepare.set_defaults(handler=_data_prepare)

    def face_data_source(command: argparse.ArgumentParser) -> None:
        command.add_argument("source", help="split file, identity folder, train.rec (or its folder), or WebDataset "
                                            "shards (folder, .tar, shard-{000000..000099}.tar)")
        command.add_argument("--format", help="list, folder, recordio or webdataset (default: judged by the path)")
        command.add_argument("--root", help="list format: folder the split's paths are relative to (default: the "
                                            "split file's folder)")
        command.add_argument("--size", type=int, default=112, help="side of the decoded square faces")
        command.add_argument("--limit", type=int, help="only the first N records (list, folder, RecordIO)")

    data_convert = data_commands.add_parser("convert", help="copy training faces into RecordIO or WebDataset shards "
                                                            "(image bytes unchanged, bad records left out)")
    face_data_source(data_convert)
    data_convert.add_argument("--to", required=True, help="recordio or webdataset")
    data_convert.add_argument("out", help="the .rec file (or a folder for train.rec), or the shard folder")
    data_convert.add_argument("--shard-size", type=int, default=10000, help="webdataset: faces per shard")
    data_convert.add_argument("--no-header", action="store_true",
                              help="recordio: a plain im2rec file, without insightface's header record")
    data_convert.set_defaults(handler=_data_convert)
    data_stats = data_commands.add_parser("stats", help="read every face once: counts, identities, bad records, "
                                                        "decode images/s")
    face_data_source(data_stats)
    data_stats.add_argument("--workers", type=int, default=0, help="DataLoader decode workers (0: this process)")
    data_stats.add_argument("--json", help="also write the counts as JSON here")
    data_stats.set_defaults(handler=_data_stats)

    fetch = data_commands.add_parser("fetch", help="download, verify and align a public benchmark")
    fetch.add_argument("dataset", choices=("lfw",))
    fetch.add_argument("--dest", help="where the aligned set goes (default: $FACTORY_CACHE/faces, where builds "
                                      "without local data look)")
    fetch.add_argument("--mirror", help="base URL of a mirror serving the same file names")
    fetch.set_defaults(handler=_data_fetch)

    teacher = commands.add_parser("teacher", help="pretrained teacher networks: list, evaluate, align")
    teacher_commands = teacher.add_subparsers(dest="teacher_command", required=True)
    teacher_list = teacher_commands.add_parser("list", help="registered teachers")
    teacher_list.set_defaults(handler=_teacher_list)
    teacher_eval = teacher_commands.add_parser("eval", help="10-fold verification accuracy of a teacher")
    teacher_eval.add_argument("name", help="registered teacher (see `teacher list`)")
    teacher_eval.add_argument("--pairs", help="pair list: LFW pairs.txt, 'path_a path_b same' lines, or .bin "
                                              "(default: ../shared/data/faces/lfw/pairs.txt)")
    teacher_eval.add_argument("--images",
                              help="image root of --pairs (default: its folder's aligned/, else its folder)")
    teacher_eval.add_argument("--max-pairs", type=int, help="a fold-balanced subset of about this many pairs")
    teacher_eval.add_argument("--device", default="cpu", help="where a PyTorch teacher runs (default: cpu)")
    teacher_eval.add_argument("--json", help="also write the result as JSON here")
    teacher_eval.set_defaults(handler=_teacher_eval)
    fit_chip = teacher_commands.add_parser(
        "fit-dlib-chip", help="fit the 112 crop -> dlib 150 chip affine on raw photos (dlib detector + 5 points)")
    fit_chip.add_argument("--data-root", help="face folder holding raw-samples/ (default: ../shared/data/faces)")
    fit_chip.add_argument("--limit", type=int, help="use only the first N photos")
    fit_chip.set_defaults(handler=_teacher_fit_dlib_chip)
    teacher_fetch = teacher_commands.add_parser(
        "fetch", help="download MobileFace V2's files from its public repository (pinned commit, sha256-checked)")
    teacher_fetch.add_argument("name", choices=("mobileface_v2",))
    teacher_fetch.add_argument("--dest", help="models folder; the files go to DEST/mobileface_v2/ (default: the "
                                              "download cache, where the factory looks without further setting)")
    teacher_fetch.add_argument("--mirror", help="base URL of a mirror serving the same file names")
    teacher_fetch.set_defaults(handler=_teacher_fetch)

    results = commands.add_parser("results", help="write the results table of the shipped recipes from their reports")
    results.add_argument("--recipes", default="recipes", help="folder of recipe files (default: recipes)")
    results.add_argument("--reports", default="reports", help="folder of build reports (default: reports)")
    results.add_argument("--out", default="docs/results.md", help="where the table goes (default: docs/results.md)")
    results.set_defaults(handler=_results)

    half = commands.add_parser("weights-float16", help="store a weights file's float32 tensors as float16 (half size)")
    half.add_argument("weights", help="a safetensors weights file, rewritten in place")
    half.set_defaults(handler=_float16)

    comparison = commands.add_parser("compare", help="side-by-side table of finished builds (e.g. a width sweep)")
    comparison.add_argument("reports", nargs="+", help="build report folders (reports/<recipe>/)")
    comparison.add_argument("--out", required=True, help="folder for report.md, report.json and tradeoff.png")
    comparison.add_argument("--title", default="Comparison of builds", help="heading of report.md")
    comparison.set_defaults(handler=_compare)

    build = commands.add_parser("build", help="compile, verify and report all targets of a recipe")
    build.add_argument("recipe")
    build.add_argument("--out", help="output folder (default: reports/<recipe name>)")
    build.add_argument("--data-root", help="use this face folder instead of data.root")
    build.set_defaults(handler=_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FactoryError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
