"""The build pipeline: recipe in, verified mobile artifacts and a report out.

Stages (see `factory.stages.Stage`): load -> torch.export -> quantise -> lower -> serialise ->
verify -> report. The old manifest is removed first and the new one is written last, so a build
that stops half way is visible as "no manifest", never as a manifest describing wrong artifacts.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factory.ablation import ablation_rows
from factory.artifacts import Check, StageSpec, compile_and_verify
from factory.compile_lane import COMPILE_THREADS
from factory.data import load_images, read_split, sample_paths
from factory.deploy import Embedder
from factory.errors import FactoryError
from factory.evaluation import EvaluationSet, load_evaluation_set, load_pair_set
from factory.golden import write_golden
from factory.io import array_buffer, display_path, write_text_atomic
from factory.latency import all_threads, latency_rows
from factory.metrics import cosine_rows, cosine_summary, flip_rate
from factory.models import load_backbone, model_entry, weights_provenance
from factory.peers import onnx_runtime_call, onnx_workdir, torch_eager_call
from factory.pipelines import PipelineInputs, PipelineOutput, pipeline_kind
from factory.plots import plot_cosine_histograms, plot_roc
from factory.profile import count_macs, count_parameters
from factory.recipe import MIN_CALIBRATION_FACES, Recipe, data_path
from factory.reference_cache import reference_embeddings
from factory.report import write_reports
from factory.report_schema import BuildReport, from_data
from factory.stages import Stage, StageLog, console_printer, output_to
from factory.targets import CompiledArtifact, Runner, Target, verification_runner
from factory.weights import sha256_of

TOOL_PACKAGES = ("torch", "executorch", "litert-torch", "ai-edge-litert", "coremltools", "onnxruntime", "numpy")


@dataclass
class BuildResult:
    """What a build produced; report.json is `to_data(report)`."""

    out_dir: Path
    report: BuildReport
    stages: list[dict[str, object]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed


def tool_versions() -> dict[str, str]:
    """Installed versions of the toolchain, for the manifest."""
    versions = {"python": platform.python_version()}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def load_calibration(recipe: Recipe, excluded: set[Path]) -> tuple[np.ndarray, list[Path]]:
    """Calibration faces as NCHW float32 pixels; refuses too few faces or overlap with evaluation."""
    cfg = recipe.data.calibration
    items = read_split(data_path(recipe, cfg.split), recipe.resolve(recipe.data.root))
    paths = sample_paths([path for path, _ in items], cfg.count, cfg.seed)
    overlap = excluded.intersection(p.resolve() for p in paths)
    if overlap:
        raise FactoryError(
            f"{len(overlap)} calibration image(s) are also evaluation images (e.g. {sorted(overlap)[0]}); "
            "calibrate on a split that shares no image with data.evaluation"
        )
    if len(paths) < cfg.count:
        raise FactoryError(
            f"data.calibration.split {cfg.split} lists {len(paths)} faces but data.calibration.count asks for "
            f"{cfg.count}; use a larger split or a smaller count (int8 needs at least {MIN_CALIBRATION_FACES})"
        )
    pixels = load_images(paths, recipe.model.input.size)
    if recipe.model.input.color_order == "BGR":
        pixels = pixels[..., ::-1]
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2).astype(np.float32)), paths


def _parity(
    embeddings: np.ndarray, reference: np.ndarray, evaluation: EvaluationSet, ref_verification: dict[str, Any]
) -> tuple[dict[str, float], np.ndarray]:
    """Parity metrics of an artifact's embeddings, and its pair similarities."""
    verification = evaluation.verification(embeddings)
    rate, flips = flip_rate(ref_verification["similarities"], verification["similarities"],
                            ref_verification["threshold"])
    return {
        **cosine_summary(embeddings, reference),
        "lfw_accuracy": verification["accuracy"],
        "lfw_accuracy_std": verification["accuracy_std"],
        "lfw_accuracy_drop": ref_verification["accuracy"] - verification["accuracy"],
        "flip_rate": rate,
        "flips": flips,
        "threshold": verification["threshold"],
        "tar_at_far_1e-03": verification["tar_at_far_1e-03"],
        "tar_at_far_1e-04": verification["tar_at_far_1e-04"],
    }, verification["similarities"]


def _benchmark_parity(
    embeddings: np.ndarray, pair_set: EvaluationSet, reference: dict[str, Any]
) -> dict[str, float | int]:
    """An artifact's accuracy on a further benchmark, its drop and decision flips against the reference."""
    verification = pair_set.verification(embeddings)
    rate, flips = flip_rate(reference["similarities"], verification["similarities"], reference["threshold"])
    return {"accuracy": verification["accuracy"], "accuracy_drop": reference["accuracy"] - verification["accuracy"],
            "flip_rate": rate, "flips": flips}


def build(recipe: Recipe, out_dir: Path | None = None, printer: Callable[[str], None] | None = None) -> BuildResult:
    """Run the whole pipeline for `recipe`; see the module docstring for the stages.

    Tool output goes to `<out>/build.log`; stage lines go to `printer` (default: the console).
    """
    out = (out_dir or Path("reports") / recipe.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    log_path = out / "build.log"
    log_path.unlink(missing_ok=True)
    printer = printer or console_printer()
    started = time.perf_counter()
    with output_to(log_path):
        return _build(recipe, out, StageLog(printer, log_path), printer, started)


def _build(recipe: Recipe, out: Path, log: StageLog, printer: Callable[[str], None], started: float) -> BuildResult:
    manifest_path = out / "manifest.json"
    spec = recipe.model.input

    with log.stage(Stage.LOAD, f"{recipe.model.architecture} weights, evaluation pairs, calibration faces"):
        backbone = load_backbone(recipe)
        reference_model = Embedder(backbone, spec.mean, spec.std, recipe.model.embedding_size).eval()
        evaluation = load_evaluation_set(recipe)
        calibration, calibration_paths = load_calibration(recipe, {p.resolve() for p in evaluation.paths})
        benchmarks = {cfg.name: load_pair_set(recipe, cfg.pairs, cfg.images, cfg.max_pairs)
                      for cfg in recipe.data.benchmarks}
    printer(f"  {len(evaluation.pairs)} pairs over {len(evaluation.paths)} held-out images; "
            f"{len(calibration_paths)} calibration faces")

    with log.stage(Stage.VERIFY, "PyTorch fp32 reference"):
        reference, cached = reference_embeddings(reference_model, evaluation.pixels("NCHW"))
        ref_verification = evaluation.verification(reference)
    printer(f"  reference LFW accuracy {ref_verification['accuracy']:.4f} ± {ref_verification['accuracy_std']:.4f}"
            + (" (embeddings from the reference cache)" if cached else ""))
    benchmark_reference = {}
    for name, pair_set in benchmarks.items():
        with log.stage(Stage.VERIFY, f"PyTorch fp32 reference on benchmark {name}"):
            embeddings, _ = reference_embeddings(reference_model, pair_set.pixels("NCHW"))
            benchmark_reference[name] = pair_set.verification(embeddings)
        printer(f"  reference {name} accuracy {benchmark_reference[name]['accuracy']:.4f}")
    ablation = []
    if recipe.ablation:
        with log.stage(Stage.VERIFY, f"PyTorch fp32 reference of {len(recipe.ablation)} ablation weights"):
            ablation = ablation_rows(recipe, evaluation)
        for row in ablation:
            printer(f"  ablation {row['label']}: LFW accuracy {row['lfw_accuracy']:.4f}")

    curves = {"PyTorch fp32 reference": (ref_verification["similarities"], evaluation.same)}
    cosines: dict[str, np.ndarray] = {}
    parity_sets: dict[bool, tuple[EvaluationSet, np.ndarray, dict[str, Any]]] = {}

    def parity_pairs(target: Target) -> tuple[EvaluationSet, np.ndarray, dict[str, Any]]:
        """The pairs an artifact is verified on: all of them, or (emulated runtimes) the recipe's subset."""
        emulated = not target.host_latency
        if emulated not in parity_sets:
            limit = recipe.data.evaluation.emulated_max_pairs
            if emulated and limit is not None and limit < len(evaluation.pairs):
                subset, images = evaluation.subset(limit)
                parity_sets[emulated] = (subset, reference[images], subset.verification(reference[images]))
            else:
                parity_sets[emulated] = (evaluation, reference, ref_verification)
        return parity_sets[emulated]

    def check(runner: Runner, artifact: CompiledArtifact, target: Target) -> Check:
        pairs_set, pairs_reference, pairs_verification = parity_pairs(target)
        embeddings = runner(pairs_set.pixels(artifact.input_layout))
        parity, similarities = _parity(embeddings, pairs_reference, pairs_set, pairs_verification)
        # The last check of an artifact is its own runtime's (`factory.artifacts`): it sets the plots.
        curves[artifact.path.name] = (similarities, pairs_set.same)
        cosines[artifact.path.name] = cosine_rows(embeddings, pairs_reference)
        return Check(parity, {"parity_set": {"pairs": len(pairs_set.pairs), "images": len(pairs_set.paths),
                                             "reference_accuracy": pairs_verification["accuracy"]}})

    def benchmark_parity(runner: Runner, artifact: CompiledArtifact, target: Target) -> dict[str, Any]:
        pairs_set = parity_pairs(target)[0]
        if pairs_set is not evaluation:
            printer(f"  {artifact.path.name}: emulated, so verified on {len(pairs_set.pairs)} of "
                    f"{len(evaluation.pairs)} pairs (data.evaluation.emulated_max_pairs); further benchmarks skipped")
            return {"benchmarks": {}}
        scores = {}
        for name, pair_set in benchmarks.items():
            with log.stage(Stage.VERIFY, f"{artifact.path.name} on benchmark {name}"):
                scores[name] = _benchmark_parity(runner(pair_set.pixels(artifact.input_layout)), pair_set,
                                                 benchmark_reference[name])
        return {"benchmarks": scores}

    example_nchw = evaluation.pixels("NCHW")[:1]
    recogniser = StageSpec(
        stem=recipe.name, network=backbone, mean=spec.mean, std=spec.std, calibration=calibration,
        latency_input=example_nchw, check=check, follow_up=benchmark_parity, gates=recipe.gates,
        what=lambda target: f"{len(parity_pairs(target)[0].paths)} faces",
        embedding_size=recipe.model.embedding_size, observer=recipe.data.calibration.observer,
        w8_keep_float16_up_to={t.format: t.w8_keep_float16_up_to for t in recipe.targets}, triage=recipe.triage,
    )
    results = compile_and_verify(recogniser, [(t.format, t.precisions) for t in recipe.targets], out, log, printer,
                                 (recipe.latency.warmup, recipe.latency.runs))
    artifacts = [result.to_dict() for result in results]

    with log.stage(Stage.VERIFY, "peer runtimes latency (PyTorch eager, ONNX Runtime)"), onnx_workdir() as tmp:
        peers = {
            "pytorch_eager_fp32": latency_rows(
                lambda threads: torch_eager_call(reference_model, example_nchw, threads),
                recipe.latency.warmup, recipe.latency.runs),
            "onnxruntime_fp32": latency_rows(
                lambda threads: onnx_runtime_call(reference_model, example_nchw, threads, Path(tmp)),
                recipe.latency.warmup, recipe.latency.runs),
        }

    pipeline: PipelineOutput | None = None
    if recipe.pipeline is not None:
        recognisers = {f"{r.format} {r.precision}": (lambda r=r: verification_runner(r.target, r.path),
                                                     r.input_layout) for r in results}
        pipeline = pipeline_kind(recipe.pipeline.kind).build(PipelineInputs(
            recipe, out, log, printer, evaluation, calibration, reference_model, ref_verification["threshold"],
            recognisers))

    stage_artifacts = pipeline.artifacts if pipeline is not None else []
    all_gates = [g for a in artifacts + stage_artifacts for row in (a, *a["other_runtimes"]) for g in row["gates"]]
    verdict = "pass" if artifacts and all(g["passed"] for g in all_gates) else "fail"
    entry_info = model_entry(recipe.model.architecture)
    report = {
        "recipe": recipe.name,
        "verdict": verdict,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python -m factory build {display_path(recipe.path)}",
        "host": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                 "threads": all_threads()},
        "model": {
            "architecture": recipe.model.architecture, "paper": entry_info.paper,
            "paper_numbers": entry_info.paper_numbers,
            # Builder settings the paper's figures hold for, where they differ from this build's defaults.
            "paper_numbers_at": entry_info.paper_kwargs,
            "params": count_parameters(backbone),
            "macs": count_macs(backbone, (1, 3, spec.size, spec.size)),
            **weights_provenance(recipe),
            "input": {"size": spec.size, "color_order": spec.color_order, "mean": spec.mean, "std": spec.std},
        },
        "evaluation": {
            "pairs_file": recipe.data.evaluation.pairs, "pairs": len(evaluation.pairs),
            "parity_images": len(evaluation.paths), "calibration_faces": len(calibration_paths),
            "calibration_observer": recipe.data.calibration.observer,
            "protocol": "10-fold: threshold chosen on 9 folds, accuracy on the 10th; mean ± std",
        },
        "reference": {
            "framework": f"PyTorch {torch.__version__} eager fp32",
            "lfw_accuracy": ref_verification["accuracy"],
            "lfw_accuracy_std": ref_verification["accuracy_std"],
            "threshold": ref_verification["threshold"],
            "tar_at_far_1e-03": ref_verification["tar_at_far_1e-03"],
            "tar_at_far_1e-04": ref_verification["tar_at_far_1e-04"],
        },
        "benchmarks": [
            {"name": cfg.name, "pairs_file": cfg.pairs, "pairs": len(benchmarks[cfg.name].pairs),
             "images": len(benchmarks[cfg.name].paths), "note": cfg.note,
             "reference": {key: benchmark_reference[cfg.name][key]
                           for key in ("accuracy", "accuracy_std", "threshold", "tar_at_far_1e-03")}}
            for cfg in recipe.data.benchmarks
        ],
        "latency_settings": {"batch": 1, "warmup": recipe.latency.warmup, "runs": recipe.latency.runs},
        "peers": peers,
        "artifacts": artifacts,
        **({"pipeline": pipeline.section} if pipeline is not None else {}),
        **({"ablation": ablation} if ablation else {}),
        "inputs": build_inputs(recipe, calibration, calibration_paths, evaluation),
        "stages": log.records,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    with log.stage(Stage.REPORT, str(out)):
        title = f"{recipe.name}: {len(evaluation.pairs)} pairs, {len(evaluation.paths)} held-out faces"
        plot_roc(curves, out / "roc.png", f"ROC, {title}")
        plot_cosine_histograms(cosines, out / "cosine_histogram.png", f"Parity with the fp32 reference, {title}")
        # The report is checked against its types before anything is written: report.json always reads back.
        typed = from_data(BuildReport, report)
        write_reports(out, typed, figures={"ROC curves": "roc.png", "Cosine histograms": "cosine_histogram.png"})
        manifest = _manifest(recipe, report)
        # Inputs and reference embeddings for on-device parity (mobile_harness).
        manifest["golden"] = write_golden(out, evaluation, reference, ref_verification["threshold"])
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return BuildResult(out, typed, log.records)


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _face_list(paths: list[Path], root: Path) -> str:
    """sha256 of the faces' names, one per line in the order used, relative to the data root where they lie in it."""
    def name(path: Path) -> str:
        resolved = path.resolve()
        return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else resolved.as_posix()

    return _sha256("\n".join(name(p) for p in paths).encode())


def build_inputs(recipe: Recipe, calibration: np.ndarray, calibration_paths: list[Path],
                 evaluation: EvaluationSet) -> dict[str, Any]:
    """What determines the artifacts' bytes and numbers, so two builds can be compared (`docs/reproducibility.md`).

    The recipe is hashed twice: the file as written, and its resolved form (every default filled in, the
    checkout-dependent path left out). Faces are hashed by their names in order and by the exact pixel array
    the quantisers and verifiers saw (a re-encoded or re-aligned image changes the latter only). The tool
    versions and the CPU model complete it: kernels are chosen by CPU features, so int8 calibration ranges
    may differ in their last bits on another CPU. Compiles run on one intra-op thread (`compile_threads`;
    builds before `factory.compile_lane` calibrated on every core, so their int8 bytes may differ).
    """
    resolved = {key: value for key, value in recipe.to_dict().items() if key != "path"}
    root = recipe.resolve(recipe.data.root)
    weights = recipe.resolve(recipe.weights.path) if recipe.weights is not None else None
    return {
        "recipe_file_sha256": sha256_of(recipe.path),
        "resolved_recipe_sha256": _sha256(json.dumps(resolved, sort_keys=True).encode()),
        "weights_sha256": sha256_of(weights) if weights is not None and weights.is_file() else None,
        "calibration_faces": {"count": len(calibration_paths), "list_sha256": _face_list(calibration_paths, root),
                              "pixels_sha256": _sha256(array_buffer(calibration))},
        "evaluation_faces": {"count": len(evaluation.paths), "list_sha256": _face_list(evaluation.paths, root),
                             "pixels_sha256": _sha256(array_buffer(evaluation.pixels("NCHW")))},
        "tools": tool_versions(),
        "cpu": cpu_model(),
        "compile_threads": COMPILE_THREADS,
    }


def cpu_model() -> str:
    """The CPU's model name and a digest of its feature flags (Linux: /proc/cpuinfo; virtual machines often
    report a vague name, and kernels are chosen by the flags), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    flags = fields.get("flags") or fields.get("Features")
    if name is None:
        return platform.processor() or platform.machine()
    return f"{name}; feature flags sha256 {_sha256(flags.encode())[:12]}" if flags else name


def _manifest(recipe: Recipe, report: dict[str, Any]) -> dict[str, Any]:
    spec = recipe.model.input
    imported = report["model"].get("imported")
    normalisation = (f"(pixel - {spec.mean}) / {spec.std}" if imported is None or not imported["input_normalisation"]
                     else imported["input_normalisation"])
    return {
        "schema_version": 1,
        "recipe": recipe.name,
        "verdict": report["verdict"],
        "created": report["created"],
        "command": report["command"],
        "preprocessing": {
            "face_alignment": "5-point similarity transform onto the ArcFace 112x112 template",
            "input_size": spec.size,
            "color_order": spec.color_order,
            "pixel_range": [0, 255],
            "normalisation_in_model": f"{normalisation}, applied inside every artifact",
            "mean": spec.mean,
            "std": spec.std,
        },
        "output": {
            "embedding_size": recipe.model.embedding_size,
            "l2_normalised": True,
            "compare": "dot product of two embeddings = cosine similarity",
            "reference_threshold": report["reference"]["threshold"],
        },
        "artifacts": [
            {key: a[key] for key in ("file", "format", "precision", "bytes", "sha256", "quantization", "runtime",
                                     "io", "verified_by", "status")}
            for a in report["artifacts"]
        ],
        "weights": ({"path": recipe.weights.path, "sha256": report["model"]["weights_sha256"]} if imported is None
                    else {"imported_from": imported["source"], "licence": imported["licence"],
                          "source_files_sha256": imported["files"]}),
        "tools": tool_versions(),
        "inputs": report["inputs"],
        "resolved_recipe": recipe.to_dict(),
    }
