"""Build and verify the stages that run before the recogniser in a pipeline recipe (LEFV's face detector and
face normaliser).

Each stage is compiled to every target and precision of the recipe, like the recogniser, and each artifact is
run on the held-out raw photos and compared with the PyTorch stage:

  * detector: the artifact's detections against PyTorch's (agreement: share of PyTorch's faces it finds at
    IoU >= 0.5; box IoU of each matched pair; landmark distance over the inter-ocular distance), the raw output
    map's cosine, and its recall against MTCNN (the teacher) beside PyTorch's;
  * normaliser: the artifact's normalised faces against PyTorch's on held-out evaluation faces (pixel error, PSNR,
    and the cosine between the recogniser's embeddings of the two); PyTorch's normaliser is also scored on the
    whole evaluation set by how well it keeps identity and what it does to verification accuracy.

The end-to-end run then chains each runtime's artifacts on raw photos: detect, align, (normalise), embed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from factory.align.template import align_face
from factory.artifacts import Check, StageSpec, compile_and_verify, in_layout, nchw
from factory.data import load_images
from factory.evaluation import EvaluationSet, torch_embeddings
from factory.latency import latency_rows
from factory.lefv.detection import (
    DeployedDetector,
    Face,
    Photo,
    augment,
    decode,
    letterbox,
    load_photos,
    match,
    score_detector,
    to_photo,
    torch_runner,
)
from factory.lefv.detector_net import OUTPUT_CHANNELS, STRIDE, LEFVDetector
from factory.lefv.normalisation import PIXEL_MEAN, PIXEL_SCALE, DeployedNormaliser, identity_report, normalise_pixels
from factory.lefv.normaliser_net import Normaliser
from factory.lefv.schema import LEFVSection
from factory.models.mobilefacenet import MobileFaceNet
from factory.peers import torch_eager_call
from factory.pipelines import PipelineInputs, PipelineOutput
from factory.profile import count_macs, count_parameters
from factory.recipe import Recipe
from factory.report_schema import from_data
from factory.stages import Stage, StageLog
from factory.targets import CompiledArtifact, Runner, Target
from factory.weights import load_weights, sha256_of, training_summary

DETECTOR_MEAN = [127.5, 127.5, 127.5]
DETECTOR_STD = [128.0, 128.0, 128.0]
# Calibration canvases per training photo (seeded zooms and shifts, as in training).
CALIBRATION_VIEWS = 2


def _canvases(photos: list[Photo], size: int) -> tuple[np.ndarray, list[float]]:
    pairs = [letterbox(p.pixels, size) for p in photos]
    nchw = np.ascontiguousarray(np.stack([c for c, _ in pairs]).transpose(0, 3, 1, 2), dtype=np.float32)
    return nchw, [s for _, s in pairs]


def calibration_canvases(photos: list[Photo], size: int, seed: int = 0) -> np.ndarray:
    """Training photos only: each letterboxed, plus seeded random zooms of it, as NCHW float pixels."""
    rng = np.random.default_rng(seed)
    views = [letterbox(p.pixels, size)[0] for p in photos]
    views += [augment(p, size, rng)[0] for p in photos if p.faces for _ in range(CALIBRATION_VIEWS - 1)]
    return np.ascontiguousarray(np.stack(views).transpose(0, 3, 1, 2), dtype=np.float32)


def detection_parity(outputs: np.ndarray, reference: np.ndarray, scales: list[float],
                     photos: list[Photo]) -> dict[str, float]:
    """How an artifact's detections on held-out photos agree with PyTorch's."""
    flat, ref_flat = outputs.reshape(len(outputs), -1), reference.reshape(len(reference), -1)
    cosine = (flat * ref_flat).sum(1) / (np.linalg.norm(flat, axis=1) * np.linalg.norm(ref_flat, axis=1) + 1e-12)
    reference_faces = found_faces = agreed = 0
    ious, landmark_errors = [], []
    for output, ref_output, scale in zip(outputs, reference, scales, strict=True):
        mine: list[Face] = to_photo(decode(output), scale)
        theirs: list[Face] = to_photo(decode(ref_output), scale)
        reference_faces += len(theirs)
        found_faces += len(mine)
        pairs = match(mine, theirs)
        agreed += len(pairs)
        for i, j, iou in pairs:
            ious.append(iou)
            ocular = max(float(np.linalg.norm(theirs[j].landmarks[0] - theirs[j].landmarks[1])), 1.0)
            landmark_errors.append(float(np.linalg.norm(mine[i].landmarks - theirs[j].landmarks, axis=1).mean())
                                   / ocular)
    ious_a, errors = np.asarray(ious or [0.0]), np.asarray(landmark_errors or [np.inf])
    return {
        "map_cosine_mean": float(cosine.mean()), "map_cosine_min": float(cosine.min()),
        "reference_detections": reference_faces, "detections": found_faces,
        "agreement": agreed / max(reference_faces, 1),
        "extra_detections": found_faces - agreed,
        "box_iou_mean": float(ious_a.mean()), "box_iou_min": float(ious_a.min()),
        "landmark_error_mean": float(errors.mean()), "landmark_error_max": float(errors.max()),
    }


def build_detector(recipe: Recipe, out: Path, log: StageLog, printer: Callable[[str], None],
                   photos: tuple[list[Photo], list[Photo]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compile the recipe's detector to every target and verify each artifact (see the module docstring).

    Returns the report section and, by "format precision", a function loading each artifact's detector runner
    (for `end_to_end`; a runner is loaded right before use, see the ExecuTorch target's threadpool note).
    """
    cfg = recipe.pipeline.detector
    size = cfg.input_size
    weights_path = recipe.resolve(cfg.weights.path)
    train_photos, held_out = photos
    with log.stage(Stage.LOAD, "LEFV detector weights"):
        network = load_weights(LEFVDetector(), weights_path, cfg.weights.sha256)
        calibration = calibration_canvases(train_photos, size, cfg.train.seed)
        canvases, scales = _canvases(held_out, size)
    printer(f"  detector: {len(held_out)} held-out photos, {len(calibration)} calibration canvases "
            f"from {len(train_photos)} training photos")
    deployed = DeployedDetector(network).eval()
    with log.stage(Stage.VERIFY, "PyTorch fp32 detector"):
        reference = torch_runner(deployed)(canvases)
        reference_score = score_detector(torch_runner(deployed), held_out, size).summary()
    printer(f"  detector reference: recall {reference_score['recall']:.3f} of MTCNN's faces, "
            f"IoU {reference_score['iou_mean']:.3f}")
    cells = size // STRIDE
    runners: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]] = {
        "PyTorch fp32": lambda: torch_runner(deployed)}

    def check(runner: Runner, artifact: CompiledArtifact, _target: Target) -> Check:
        outputs = runner(in_layout(canvases, artifact.input_layout))
        parity = detection_parity(outputs, reference, scales, held_out)
        teacher = score_detector(nchw(runner, artifact.input_layout), held_out, size).summary()
        parity["recall_drop"] = reference_score["recall"] - teacher["recall"]
        return Check(parity, {"teacher": teacher})

    stage = StageSpec(
        stem=f"{recipe.name}_detector", network=network, graph=DeployedDetector, mean=DETECTOR_MEAN,
        std=DETECTOR_STD, calibration=calibration, latency_input=canvases, check=check, gates=cfg.gates,
        what=lambda _target: f"{len(held_out)} held-out photos", output_name="detections",
        output_shape=[1, OUTPUT_CHANNELS, cells, cells], observer=cfg.observer or recipe.data.calibration.observer,
        description="Face detector (LEFV stage 1) built by the mobile face-model factory: score, box and 5 "
                    "landmarks per 16-pixel cell")
    artifacts = _compile(stage, recipe, out, log, printer, runners)
    torch_latency = pytorch_latency(deployed, canvases[:1], recipe)
    return {
        "architecture": "lefv_detector",
        "weights_sha256": sha256_of(weights_path),
        "training": training_summary(weights_path),
        "params": count_parameters(network),
        "macs": count_macs(network, (1, 3, size, size)),
        "input": {"size": size, "letterbox": "longer side scaled to the input size, top-left, black padding",
                  "mean": DETECTOR_MEAN, "std": DETECTOR_STD},
        "held_out_photos": len(held_out),
        "calibration_canvases": len(calibration),
        "reference": reference_score,
        "pytorch_latency_ms": torch_latency,
        "artifacts": artifacts,
    }, runners


def normaliser_parity(outputs: np.ndarray, reference: np.ndarray, reference_embeddings: np.ndarray,
                      recogniser: nn.Module) -> dict[str, float]:
    """How an artifact's normalised faces (NCHW pixels) agree with PyTorch's: pixel differences in 0-255 levels
    and the cosine between the recogniser's (PyTorch) embeddings of the two."""
    difference = np.abs(outputs.astype(np.float64) - reference)
    mse = float((difference**2).mean())
    embeddings = torch_embeddings(recogniser, np.ascontiguousarray(outputs, dtype=np.float32))
    cosine = (embeddings * reference_embeddings).sum(1) / (
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference_embeddings, axis=1) + 1e-12)
    return {
        "faces": len(outputs),
        "pixel_error_mean": float(difference.mean()), "pixel_error_max": float(difference.max()),
        "psnr_db": float(10.0 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf"),
        "embedding_cosine_mean": float(cosine.mean()), "embedding_cosine_min": float(cosine.min()),
    }


def build_normaliser(recipe: Recipe, out: Path, log: StageLog, printer: Callable[[str], None],
                     evaluation: EvaluationSet, calibration: np.ndarray, recogniser: nn.Module,
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compile the recipe's face normaliser to every target and verify each artifact on held-out faces; score
    how well PyTorch's normaliser keeps identity on the whole evaluation set (`identity_report`).

    Returns the report section and, by "format precision", a function loading each artifact's runner (NCHW pixels
    in and out).
    """
    cfg = recipe.pipeline.normaliser
    weights_path = recipe.resolve(cfg.weights.path)
    with log.stage(Stage.LOAD, "LEFV normaliser weights"):
        network = load_weights(Normaliser(MobileFaceNet()), weights_path, cfg.weights.sha256)
    deployed = DeployedNormaliser(network).eval()
    original = evaluation.pixels("NCHW")
    faces = original[: cfg.parity_faces]
    with log.stage(Stage.VERIFY, f"PyTorch fp32 normaliser on {len(original)} evaluation faces"):
        normalised = normalise_pixels(deployed, original)
        identity = identity_report(normalised, original, recogniser, evaluation)
        reference = normalised[: cfg.parity_faces]
        reference_embeddings = torch_embeddings(recogniser, np.ascontiguousarray(reference))
    printer(f"  normaliser: identity cosine {identity['identity_cosine_mean']:.4f}; LFW "
            f"{identity['accuracy_without']:.4f} without, {identity['accuracy_with']:.4f} with normalisation")
    runners: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]] = {
        "PyTorch fp32": lambda: lambda batch: normalise_pixels(deployed, batch)}

    def check(runner: Runner, artifact: CompiledArtifact, _target: Target) -> Check:
        outputs = nchw(runner, artifact.input_layout)(faces)
        return Check(normaliser_parity(outputs, reference, reference_embeddings, recogniser))

    size = recipe.model.input.size
    stage = StageSpec(
        stem=f"{recipe.name}_normaliser", network=network, graph=DeployedNormaliser, mean=[PIXEL_MEAN] * 3,
        std=[PIXEL_SCALE] * 3, calibration=calibration, latency_input=faces, check=check, gates=cfg.gates,
        what=lambda _target: f"{len(faces)} held-out faces", output_name="normalised",
        output_shape=[1, 3, size, size], observer=cfg.observer or recipe.data.calibration.observer,
        description="Face normaliser (LEFV stage 2) built by the mobile face-model factory: an aligned face's RGB "
                    "pixels in, the normalised face's pixels out (NCHW, 0-255)")
    artifacts = _compile(stage, recipe, out, log, printer, runners)
    return {
        "architecture": "lefv_normaliser",
        "weights_sha256": sha256_of(weights_path),
        "training": training_summary(weights_path),
        # The deployed graph holds the encoder's feature layers (not its embedding head) and the decoder.
        "params": count_parameters(network) + sum(p.numel() for p in network.encoder.features.parameters()),
        "decoder_params": count_parameters(network),
        "macs": count_macs(network, (1, 3, size, size)),
        "parity_faces": len(faces),
        "identity": identity,
        "pytorch_latency_ms": pytorch_latency(deployed, faces[:1], recipe),
        "artifacts": artifacts,
    }, runners


def _compile(stage: StageSpec, recipe: Recipe, out: Path, log: StageLog, printer: Callable[[str], None],
             runners: dict[str, Callable[[], Runner]]) -> list[dict[str, Any]]:
    """`compile_and_verify` of a pipeline stage with the recipe's targets; adds, by "format precision", a function
    loading each artifact's NCHW runner to `runners` (loaded right before use, see the ExecuTorch target's
    threadpool note). Returns the artifacts' report entries."""
    results = compile_and_verify(stage, [(t.format, t.precisions) for t in recipe.targets], out, log, printer,
                                 (recipe.latency.warmup, recipe.latency.runs))
    for result in results:
        runners[f"{result.format} {result.precision}"] = result.nchw_runner
    return [result.to_dict() for result in results]


def pytorch_latency(deployed: nn.Module, example: np.ndarray, recipe: Recipe) -> dict[str, dict[str, float]]:
    """Host latency of a stage's PyTorch eager graph on one input, at 1 and all threads."""
    return latency_rows(lambda threads: torch_eager_call(deployed, example, threads), recipe.latency.warmup,
                        recipe.latency.runs)


# ------------------------------------------------------------------------------------------------ end to end


@dataclass
class StageRunners:
    """One way of running the pipeline: a detector runner (NCHW canvases) and a recogniser runner."""

    name: str
    detect: Callable[[np.ndarray], np.ndarray]
    embed: Callable[[np.ndarray], np.ndarray]
    embed_layout: str = "NCHW"
    normalise: Callable[[np.ndarray], np.ndarray] | None = None  # NCHW pixels in and out; None: no normaliser


def largest_face(faces: list[Face]) -> Face | None:
    """The face an app would pick from a photo: the largest detection."""
    return max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])), default=None)


def end_to_end(runners: StageRunners, photos: list[Photo], size: int, face_size: int,
               reference: dict[Path, np.ndarray], threshold: float) -> dict[str, Any]:
    """Raw photo in, embedding out: detect, take the largest face, align it by its 5 predicted landmarks onto the
    ArcFace template, embed; compared with the PyTorch recogniser's embedding of the shared data's own aligned crop
    of that face (MTCNN landmarks). `threshold` is the recogniser's verification threshold on LFW: a cosine above it
    means the pipeline's face would verify as the same person as the reference crop. With a normaliser the aligned
    face is normalised before it is embedded (and `reference` should hold normalised crops' embeddings)."""
    cosines, missed, timings = [], [], []
    for photo in photos:
        if photo.aligned_reference is None:
            continue
        started = time.perf_counter()
        canvas, scale = letterbox(photo.pixels, size)
        faces = to_photo(decode(runners.detect(np.ascontiguousarray(canvas.transpose(2, 0, 1)[None],
                                                                    dtype=np.float32))[0]), scale)
        face = largest_face(faces)
        if face is None:
            missed.append(photo.path.name)
            continue
        crop = align_face(photo.pixels, face.landmarks, face_size).astype(np.float32)[None].transpose(0, 3, 1, 2)
        if runners.normalise is not None:
            crop = runners.normalise(np.ascontiguousarray(crop))
        crop = crop.transpose(0, 2, 3, 1) if runners.embed_layout == "NHWC" else crop
        embedding = runners.embed(np.ascontiguousarray(crop))[0]
        timings.append((time.perf_counter() - started) * 1000.0)
        cosines.append(float(embedding @ reference[photo.aligned_reference]))
    values = np.asarray(cosines or [0.0])
    counted = len(cosines) + len(missed)
    return {
        "runtime": runners.name, "photos": counted, "faces_found": len(cosines),
        "found_rate": len(cosines) / max(counted, 1),
        "cosine_mean": float(values.mean()), "cosine_median": float(np.median(values)),
        "cosine_p10": float(np.percentile(values, 10)),
        "same_person_rate": float((values > threshold).sum() / max(counted, 1)),
        "threshold": threshold,
        "host_ms_per_photo_median": float(np.median(timings)) if timings else None,
        "missed": missed[:10],
    }


def end_to_end_rows(recipe: Recipe, log: StageLog, photos: tuple[list[Photo], list[Photo]],
                    detectors: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]],
                    recognisers: dict[str, tuple[Callable[[], Callable[[np.ndarray], np.ndarray]], str]],
                    reference_model: nn.Module, threshold: float,
                    normalisers: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]] | None = None,
                    normalised_threshold: float | None = None) -> dict[str, Any]:
    """`end_to_end` for PyTorch on every raw photo, and for each format and precision (its detector artifact with
    its recogniser artifact) on the detector's held-out photos; each without and, where the recipe has one, with
    the normaliser artifact of that format and precision between alignment and embedding (then compared with the
    PyTorch recogniser's embedding of the PyTorch-normalised reference crop, at the recogniser's LFW threshold on
    normalised faces)."""
    train_photos, held_out = photos
    everything = sorted(train_photos + held_out, key=lambda p: str(p.path))
    size, face_size = recipe.pipeline.detector.input_size, recipe.model.input.size
    crops = [p.aligned_reference for p in everything if p.aligned_reference is not None]
    normalisers = normalisers or {}
    with log.stage(Stage.VERIFY, f"end to end: PyTorch reference embeddings of {len(crops)} aligned crops"):
        pixels = np.ascontiguousarray(load_images(crops, face_size).transpose(0, 3, 1, 2), dtype=np.float32)
        references = {False: (dict(zip(crops, torch_embeddings(reference_model, pixels), strict=True)), threshold)}
        if "PyTorch fp32" in normalisers:
            normalised = normalisers["PyTorch fp32"]()(pixels)
            references[True] = (dict(zip(crops, torch_embeddings(reference_model, normalised), strict=True)),
                                normalised_threshold)
    rows = []
    torch_embed = (lambda: lambda batch: torch_embeddings(reference_model, batch), "NCHW")
    for name, load_detector in detectors.items():
        load_embedder, layout = torch_embed if name == "PyTorch fp32" else recognisers.get(name, (None, ""))
        if load_embedder is None:
            continue
        for with_normaliser in (False, True) if name in normalisers and True in references else (False,):
            detect, embed = load_detector(), load_embedder()
            normalise = normalisers[name]() if with_normaliser else None
            reference, row_threshold = references[with_normaliser]
            runners = StageRunners(name, detect, embed, layout, normalise)
            label = f"{name}{', normalised' if with_normaliser else ''}"
            sets = [("held-out", held_out)]
            if name == "PyTorch fp32":
                sets.append(("all (4 in 5 trained the detector)", everything))
            for set_name, chosen in sets:
                with log.stage(Stage.VERIFY, f"end to end, {label}: {len(chosen)} {set_name} raw photos"):
                    rows.append({"photos_set": set_name, "normalised": with_normaliser,
                                 **end_to_end(runners, chosen, size, face_size, reference, row_threshold)})
    return {"photos": len(everything), "held_out": len(held_out), "rows": rows}


# ------------------------------------------------------------------------------------------------ the whole kind


def build_pipeline(inputs: PipelineInputs) -> PipelineOutput:
    """The `lefv` kind's build step: the detector, the normaliser (where the recipe has one), then the end-to-end
    rows of every runtime; returns the report section (`kind`, `detector`, `normaliser`, `end_to_end`)."""
    recipe, log, printer = inputs.recipe, inputs.log, inputs.printer
    with log.stage(Stage.LOAD, "raw photos and their MTCNN (teacher) faces"):
        photos = load_photos(recipe, log=lambda _line: None)
    section: dict[str, Any] = {"kind": recipe.pipeline.kind}
    section["detector"], detectors = build_detector(recipe, inputs.out, log, printer, photos)
    normalisers, normalised_threshold = None, None
    if recipe.pipeline.normaliser is not None:
        section["normaliser"], normalisers = build_normaliser(recipe, inputs.out, log, printer, inputs.evaluation,
                                                              inputs.calibration, inputs.reference_model)
        normalised_threshold = section["normaliser"]["identity"]["threshold_with"]
    section["end_to_end"] = end_to_end_rows(recipe, log, photos, detectors, inputs.recognisers,
                                            inputs.reference_model, inputs.reference_threshold, normalisers,
                                            normalised_threshold)
    for row in section["end_to_end"]["rows"]:
        label = f"{row['runtime']}{', normalised' if row.get('normalised') else ''}"
        printer(f"  end to end, {label} on {row['photos_set']} photos: found {row['found_rate']:.3f}, "
                f"cosine to the reference crop {row['cosine_mean']:.4f}, same person {row['same_person_rate']:.3f}")
    from_data(LEFVSection, section, "pipeline")  # the section's own types: a key or type amiss fails the build here
    artifacts = [a for stage in ("detector", "normaliser") for a in section.get(stage, {}).get("artifacts", [])]
    return PipelineOutput(section, artifacts)
