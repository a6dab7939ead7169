"""Command line: `python -m factory {validate,list,train,curve,eval,data,build,compare} ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from factory.errors import FactoryError


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
    """One line per recipe: its model, whether its weights exist, the built LFW accuracy and the paper's."""
    import json

    from factory.models import model_entry
    from factory.recipe import load_recipe

    lines = []
    for path in sorted(recipes_dir.glob("*.yaml")):
        try:
            recipe = load_recipe(path)
        except FactoryError as error:
            lines.append(f"  {path.stem:<22} invalid: {str(error).splitlines()[0]}")
            continue
        paper = model_entry(recipe.model.architecture).paper_numbers.get("lfw_accuracy")
        files = [recipe.weights.path]
        if recipe.pipeline is not None:
            files.append(recipe.pipeline.detector.weights.path)
            if recipe.pipeline.normaliser is not None:
                files.append(recipe.pipeline.normaliser.weights.path)
        weights = "weights ok" if all(recipe.resolve(f).is_file() for f in files) else "NO WEIGHTS"
        report = reports_dir / recipe.name / "report.json"
        if report.is_file():
            built = json.loads(report.read_text())
            accuracy = built["reference"]["lfw_accuracy"]
            measured = f"LFW {100 * accuracy:.2f}% ({built['verdict']}, {built['created'][:10]})"
            detector = built.get("pipeline", {}).get("detector")
            if detector:
                measured += f"; detector recall {100 * detector['reference']['recall']:.1f}% of MTCNN's faces"
            normaliser = built.get("pipeline", {}).get("normaliser")
            if normaliser:
                measured += (f"; normaliser: identity cosine {normaliser['identity']['identity_cosine_mean']:.3f}, "
                             f"LFW {100 * normaliser['identity']['accuracy_with']:.2f}% normalised")
        else:
            measured = "not built"
        paper_text = "—" if paper is None else f"{100 * paper:.2f}%"
        lines.append(f"  {recipe.name:<22} {recipe.model.architecture:<22} {weights:<11} built: {measured:<36} "
                     f"paper LFW: {paper_text}")
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
    print("targets:")
    for name in target_names():
        target = get_target(name)
        note = target.host_support() or "runs on this host"
        print(f"  {name:<16} {target.suffix:<12} precisions: {', '.join(target.precisions):<12} {note}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from factory.curve import pair_scorer
    from factory.evaluation import load_evaluation_set
    from factory.recipe import load_recipe
    from factory.train import train

    recipe = load_recipe(args.recipe, data_root=args.data_root, fallback_to_lfw=args.data_root is None)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "detector":
        from factory.detection import train_detector_stage

        if recipe.pipeline is None:
            raise FactoryError(f"{args.recipe} has no 'pipeline.detector' section; only pipeline recipes "
                               "(e.g. recipes/lefv.yaml) have a detector to train")
        output = Path(args.output) if args.output else recipe.resolve(recipe.pipeline.detector.weights.path)
        summary = train_detector_stage(recipe, output)
        print(f"detector weights written to {output} ({summary['wall_time_s'] / 60:.1f} min on {summary['device']})")
        return 0
    if args.stage == "normaliser":
        from factory.normalisation import train_normaliser_stage

        if recipe.pipeline is None or recipe.pipeline.normaliser is None:
            raise FactoryError(f"{args.recipe} has no 'pipeline.normaliser' section; only pipeline recipes "
                               "(e.g. recipes/lefv.yaml) have a normaliser to train")
        output = Path(args.output) if args.output else recipe.resolve(recipe.pipeline.normaliser.weights.path)
        summary = train_normaliser_stage(recipe, output)
        print(f"normaliser weights written to {output} ({summary['wall_time_s'] / 60:.1f} min on "
              f"{summary['device']})")
        return 0
    output = Path(args.output) if args.output else recipe.resolve(recipe.weights.path)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return pair_scorer(recipe, load_evaluation_set(recipe))(model)

    summary = train(recipe, output, device=args.device, evaluate=evaluate)
    print(f"weights written to {output} ({summary['wall_time_s'] / 60:.1f} min on {summary['device']})")
    return 0


def _curve(args: argparse.Namespace) -> int:
    import torch

    from factory.curve import learning_curve
    from factory.recipe import load_recipe

    recipe = load_recipe(args.recipe, data_root=args.data_root, fallback_to_lfw=args.data_root is None)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else Path("reports") / recipe.name
    learning_curve(recipe, args.fractions, args.epochs, out_dir, device=args.device,
                   pairs_per_epoch=args.pairs_per_epoch or None)
    print(f"learning curve written to {out_dir / 'learning_curve.md'}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from factory.build import build
    from factory.recipe import load_recipe

    recipe = load_recipe(args.recipe, data_root=args.data_root, fallback_to_lfw=args.data_root is None)
    result = build(recipe, Path(args.out) if args.out else None)
    print(f"\n{result.report['verdict'].upper()}: report in {result.out_dir / 'report.md'}")
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
    from factory.recipe import load_recipe

    recipe = load_recipe(args.recipe, data_root=args.data_root, fallback_to_lfw=args.data_root is None)
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


def _data_fetch(args: argparse.Namespace) -> int:
    from factory.fetch import fetch_lfw, fetched_root

    destination = Path(args.dest) if args.dest else fetched_root()
    lfw = fetch_lfw(destination, mirror=args.mirror)
    print(f"LFW ready in {lfw} (aligned/, pairs.txt, train.txt of non-test identities); builds whose data.root "
          f"is missing use it{'' if args.dest is None else f' if it is in {fetched_root()}'}, or pass "
          f"--data-root {destination}")
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
    train.add_argument("--stage", default="recogniser", choices=("recogniser", "detector", "normaliser"),
                       help="which model of a pipeline recipe to train (default: the recogniser, `model`)")
    train.set_defaults(handler=_train)

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

    data = commands.add_parser("data", help="face data: detect and align raw photos")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="raw photos -> aligned 112x112 faces (MTCNN + 5 points)")
    prepare.add_argument("source", help="folder of photos: one sub-folder per identity, or flat")
    prepare.add_argument("destination")
    prepare.add_argument("--select", choices=("largest", "central"), default="largest",
                         help="which face when a photo has several (central: LFW-style crops)")
    prepare.add_argument("--size", type=int, default=112)
    prepare.add_argument("--reference-landmarks", help="CSV of reference landmarks to score ours against")
    prepare.set_defaults(handler=_data_prepare)

    fetch = data_commands.add_parser("fetch", help="download, verify and align a public benchmark")
    fetch.add_argument("dataset", choices=("lfw",))
    fetch.add_argument("--dest", help="where the aligned set goes (default: $FACTORY_CACHE/faces, where builds "
                                      "without local data look)")
    fetch.add_argument("--mirror", help="base URL of a mirror serving the same file names")
    fetch.set_defaults(handler=_data_fetch)

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
