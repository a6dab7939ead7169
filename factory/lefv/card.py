"""LEFV's sections of the model card (report.md), rendered from the `pipeline` section of report.json."""

from __future__ import annotations

from typing import Any

from factory.lefv.schema import DetectorSection, EndToEnd, LEFVSection, NormaliserSection
from factory.report import fmt, gates_cell, latency_cell, percent
from factory.report_schema import Artifact, from_data


def card_lines(data: dict[str, Any]) -> list[str]:
    """The detector, normaliser and end-to-end sections, in pipeline order."""
    section = from_data(LEFVSection, data, "report pipeline")
    return (detector_lines(section.detector) + normaliser_lines(section.normaliser)
            + end_to_end_lines(section.end_to_end))


def summary(data: dict[str, Any]) -> str:
    """One line for `python -m factory list`: the detector's recall, the normaliser's identity keeping."""
    section = from_data(LEFVSection, data, "report pipeline")
    parts = [f"detector recall {100 * section.detector.reference.recall:.1f}% of MTCNN's faces"]
    if normaliser := section.normaliser:
        parts.append(f"normaliser: identity cosine {normaliser.identity.identity_cosine_mean:.3f}, "
                     f"LFW {100 * normaliser.identity.accuracy_with:.2f}% normalised")
    return "; ".join(parts)


def _stage_latency_cell(artifact: Artifact) -> str:
    """A pipeline stage artifact's 1-thread host latency, or "emulated" where it is not timed on this host."""
    return latency_cell(artifact.latency_ms, "1_thread") if artifact.latency_ms else "emulated"


def _pytorch_latency(section: DetectorSection | NormaliserSection) -> str:
    return latency_cell(section.pytorch_latency_ms, "1_thread")


def detector_lines(detector: DetectorSection | None) -> list[str]:
    """The pipeline's face detector: how it was taught, its recall against MTCNN, each artifact's parity."""
    if not detector:
        return []
    ref, training = detector.reference, detector.training or {}
    lines = [
        "", "## Stage 1: face detector", "",
        f"- `{detector.architecture}`: {detector.params / 1e6:.3f} M parameters, "
        f"{detector.macs / 1e6:.1f} M multiply-adds at {detector.input.size}x{detector.input.size}. "
        f"Input: the photo letterboxed ({detector.input.letterbox}), float32 RGB pixels in [0, 255]; "
        "output: one score, box and 5 landmarks per 16-pixel cell, decoded by `factory.lefv.detection.decode`.",
        f"- Weights sha256 `{detector.weights_sha256}`.",
    ]
    if training:
        photos = training.get("photos", {})
        lines.append(f"- Taught by {training.get('teacher')}: {photos.get('train')} raw photos "
                     f"({photos.get('train_faces')} teacher faces), {training['train_config'].get('steps')} steps, "
                     f"{training.get('wall_time_s', 0) / 60:.0f} min on {training.get('device')}. "
                     "There is no WIDER FACE here: MTCNN's detections are the labels, so the numbers below measure "
                     "agreement with MTCNN, not accuracy against human annotation.")
    lines += [
        f"- Against MTCNN on {detector.held_out_photos} held-out photos (PyTorch fp32): recall "
        f"**{percent(ref.recall)}** of {ref.teacher_faces} faces at IoU >= 0.5 (the shared data's reference "
        f"face of each photo: {percent(ref.reference_recall)}), mean IoU {fmt(ref.iou_mean, 3)}, landmark "
        f"error {fmt(ref.landmark_nme_mean, 3)} of the inter-ocular distance, "
        f"{ref.unconfirmed_detections} detections MTCNN did not make.",
        "",
        "| artifact | size | verified by | MTCNN recall | agreement with PyTorch | box IoU mean / min "
        "| landmark error mean / max | map cosine | 1-thread latency | gates |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in detector.artifacts:
        p, t = a.parity, a.teacher
        gates, latency = gates_cell(a.gates), _stage_latency_cell(a)
        lines.append(
            f"| `{a.file}` | {a.bytes / 1e6:.2f} MB | {a.verified_by} | {percent(t['recall'])} | "
            f"{percent(p['agreement'])} of {p['reference_detections']} (+{p['extra_detections']}) | "
            f"{fmt(p['box_iou_mean'], 4)} / {fmt(p['box_iou_min'], 4)} | {fmt(p['landmark_error_mean'], 4)} / "
            f"{fmt(p['landmark_error_max'], 4)} | {fmt(p['map_cosine_mean'], 5)} | {latency} | {gates} |"
        )
    lines.append(f"| PyTorch eager fp32 | — | — | {percent(ref.recall)} | — | — | — | — | "
                 f"{_pytorch_latency(detector)} | — |")
    return lines


def normaliser_lines(normaliser: NormaliserSection | None) -> list[str]:
    """The pipeline's face normaliser: how it was trained, how well it keeps identity, each artifact's parity."""
    if not normaliser:
        return []
    ident, training = normaliser.identity, normaliser.training or {}
    lines = [
        "", "## Stage 2: face normaliser", "",
        f"- `{normaliser.architecture}`: {normaliser.params / 1e6:.3f} M parameters in the deployed graph "
        f"(frozen MobileFaceNet encoder layers + a {normaliser.decoder_params / 1e6:.3f} M decoder), "
        f"{normaliser.macs / 1e6:.1f} M multiply-adds. Input and output: an aligned face's float32 RGB pixels in "
        "[0, 255], NCHW.",
        f"- Weights sha256 `{normaliser.weights_sha256}`.",
    ]
    if training:
        cfg, faces = training.get("train_config", {}), training.get("faces", {})
        lines.append(
            f"- Trained here as a GAN (adversarial x{cfg.get('adversarial_weight')}, identity x"
            f"{cfg.get('identity_weight')}, pixel x{cfg.get('pixel_weight')}, symmetry x{cfg.get('symmetry_weight')}; "
            f"`factory.lefv.normalisation`): {cfg.get('steps')} steps of {cfg.get('batch_size')} on "
            f"{faces.get('train')} aligned training faces, the {faces.get('frontal_real')} most frontal (|yaw| <= "
            f"{fmt(faces.get('frontal_max_abs_yaw'), 3)}) as the discriminator's real faces; "
            f"{training.get('wall_time_s', 0) / 60:.0f} min on {training.get('device')}.")
    lines += [
        f"- On the {ident.faces} held-out evaluation faces, scored by this recipe's recogniser (PyTorch; the "
        f"identity loss used MobileFaceNet): embedding cosine between each face and its normalised version mean "
        f"**{fmt(ident.identity_cosine_mean, 4)}** (median {fmt(ident.identity_cosine_median, 4)}, p10 "
        f"{fmt(ident.identity_cosine_p10, 4)}); LFW accuracy **{percent(ident.accuracy_with)}** with both faces "
        f"of each pair normalised, {percent(ident.accuracy_without)} without; mirror asymmetry "
        f"{fmt(ident.symmetry_error_before, 1)} -> {fmt(ident.symmetry_error_after, 1)} grey levels.",
        "",
        f"Parity on {normaliser.parity_faces} held-out faces: each artifact's output against PyTorch's.",
        "",
        "| artifact | size | verified by | pixel error mean / max | PSNR | embedding cosine mean / min "
        "| 1-thread latency | gates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in normaliser.artifacts:
        p = a.parity
        gates, latency = gates_cell(a.gates), _stage_latency_cell(a)
        lines.append(
            f"| `{a.file}` | {a.bytes / 1e6:.2f} MB | {a.verified_by} | {fmt(p['pixel_error_mean'], 3)} / "
            f"{fmt(p['pixel_error_max'], 1)} | {fmt(p['psnr_db'], 1)} dB | {fmt(p['embedding_cosine_mean'], 5)} / "
            f"{fmt(p['embedding_cosine_min'], 5)} | {latency} | {gates} |")
    lines.append(f"| PyTorch eager fp32 | — | — | — | — | — | "
                 f"{_pytorch_latency(normaliser)} | — |")
    return lines


def end_to_end_lines(section: EndToEnd | None) -> list[str]:
    """Raw photo to embedding through the pipeline's stages, per runtime."""
    if not section:
        return []
    lines = [
        "", "## End to end on raw photos", "",
        "Each raw photo: detect, take the largest face, align it by the detector's 5 landmarks onto the ArcFace "
        "template, embed. Compared with the PyTorch recogniser's embedding of the shared data's own aligned crop of "
        "that face (aligned by MTCNN's landmarks): the cosine, and the share of photos whose pipeline embedding "
        "verifies as the same person at the recogniser's LFW threshold. Each runtime runs its own detector and "
        "recogniser artifacts of that precision; host time covers decoding, alignment and the models. Rows marked "
        "normalised run that runtime's normaliser artifact between alignment and embedding and are compared with "
        "the PyTorch-normalised reference crop, at the recogniser's LFW threshold on normalised faces.",
        "",
        "| runtime | normaliser | photos | face found | cosine mean / median / p10 | same person | host ms per photo |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in section.rows:
        ms = f"{row.host_ms_per_photo_median:.1f}" if row.host_ms_per_photo_median is not None else "—"
        lines.append(f"| {row.runtime} | {'yes' if row.normalised else '—'} | {row.photos} "
                     f"({row.photos_set}) | {percent(row.found_rate)} | "
                     f"{fmt(row.cosine_mean, 4)} / {fmt(row.cosine_median, 4)} / {fmt(row.cosine_p10, 4)} "
                     f"| {percent(row.same_person_rate)} | {ms} |")
    return lines
