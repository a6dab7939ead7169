"""Build reports: `report.json` (a contract read by the harness and users' scripts) and `report.md`."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from factory.errors import FactoryError
from factory.io import write_text_atomic
from factory.pipelines import pipeline_kind
from factory.report_schema import (
    AblationRow,
    Artifact,
    BuildReport,
    EvaluationInfo,
    Gate,
    LatencyStats,
    ModelInfo,
    from_data,
    to_data,
)


def fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def latency_cell(rows: dict[str, LatencyStats] | None, key: str) -> str:
    if not rows or key not in rows:
        return "—"
    return f"{rows[key].median_ms:.2f} / {rows[key].p90_ms:.2f}"


def render_markdown(report: BuildReport, figures: dict[str, str] | None = None) -> str:
    """The human-readable model card of a build."""
    model, ref, ev = report.model, report.reference, report.evaluation
    artifacts = report.artifacts
    thread_keys = sorted({k for a in artifacts if a.latency_ms for k in a.latency_ms}
                         | {k for rows in report.peers.values() for k in rows}, key=lambda k: int(k.split("_")[0]))
    paper = model.paper_numbers
    paper_at = model.paper_numbers_at
    at = " at " + ", ".join(f"{k}={v}" for k, v in paper_at.items()) if paper_at else ""
    lines = [
        f"# {report.recipe} — model card",
        "",
        f"Verdict: **{report.verdict.upper()}**. Built {report.created} with `{report.command}` "
        f"on {report.host.platform} ({report.host.threads} threads). Every number below was "
        "measured in that run.",
        "",
        "## The model",
        "",
        f"- Architecture: `{model.architecture}` ({model.paper}).",
        f"- Parameters: {model.params / 1e6:.3f} M (paper {paper.get('params_m', '—')} M); "
        f"multiply-adds: {model.macs / 1e6:.1f} M (paper {paper.get('macs_m', '—')} M){at}.",
        *render_weights_lines(model),
        *_training_lines(model.training),
        "",
        "## Input and output (all artifacts)",
        "",
        f"- Input: an aligned {model.input.color_order} face (5-point similarity transform onto the ArcFace "
        f"{model.input.size}x{model.input.size} template), float32 pixel values in [0, 255]. "
        f"Normalisation `{_normalisation(model)}` runs inside the model; "
        "the layout per artifact is in the table below.",
        "- Output: float32 embedding, L2-normalised: the dot product of two embeddings is their cosine "
        f"similarity. Same person when the similarity exceeds the threshold (reference: {fmt(ref.threshold)}).",
        "- int8 artifacts keep float32 inputs and outputs: apps need no quantisation maths.",
        "",
        "| artifact | format | precision | input (layout, shape) | output | quantisation |",
        "|---|---|---|---|---|---|",
    ]
    for a in artifacts:
        io = a.io
        lines.append(
            f"| `{a.file}` | {a.format} | {a.precision} | `{io.input.name}` {io.input.layout} "
            f"{io.input.shape} {io.input.dtype} | `{io.output.name}` {io.output.shape} | "
            f"{a.quantization} |"
        )
    lines += [
        "",
        "## Parity with the PyTorch fp32 reference",
        "",
        f"Held-out faces: {ev.parity_images} images of {ev.pairs} pairs from `{ev.pairs_file}` "
        f"({_held_out_note(model)}); calibration used {ev.calibration_faces} other "
        f"faces{_observer_note(ev)}. Verification protocol: {ev.protocol}.",
        "",
        f"Reference ({ref.framework}): LFW accuracy **{percent(ref.lfw_accuracy)}** ± "
        f"{percent(ref.lfw_accuracy_std)}; TAR@FAR=1e-3 {percent(ref.tar_at_far_1e_03)} "
        "(FAR 1e-4 needs at least 10,000 impostor pairs and is shown only where measurable).",
        "",
        "| artifact | size | verified by | cosine mean / min / p1 | LFW acc. | drop | TAR@FAR=1e-3 | flips "
        "| own threshold | gates |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in artifacts:
        p = a.parity
        size = f"{a.bytes / 1e6:.2f} MB"
        if p is None:
            lines.append(f"| `{a.file}` | {size} | — | {a.status} | — | — | — | — | — | — |")
            continue
        subset = a.parity_set
        scope = ("" if subset is None or subset.pairs >= ev.pairs else
                 f" — on {subset.pairs} of the pairs ({subset.images} faces; reference there "
                 f"{percent(subset.reference_accuracy)})")
        for row in (a, *(a.other_runtimes or [])):  # other runtimes: e.g. Core ML's GPU and Neural Engine on macOS
            p = row.parity
            gates = gates_cell(row.gates)
            lines.append(
                f"| `{a.file}` | {size} | {row.verified_by}{scope} | {fmt(p['cosine_mean'], 5)} / "
                f"{fmt(p['cosine_min'], 5)} / {fmt(p['cosine_p1'], 5)} | {percent(p['lfw_accuracy'])} | "
                f"{100 * p['lfw_accuracy_drop']:+.2f} pt | {percent(p['tar_at_far_1e-03'])} | {p['flips']} "
                f"({percent(p['flip_rate'])}) | {fmt(p['threshold'])} | {gates} |"
            )
    for caption, file in (figures or {}).items():
        lines += ["", f"![{caption}]({file})"]
    lines += _ablation_lines(report)
    lines += _benchmark_lines(report)
    lines += _coreml_app_lines(artifacts)
    lines += [
        "",
        "## Host latency per face (batch 1, ms: median / p90)",
        "",
        f"{report.latency_settings.runs} timed runs after {report.latency_settings.warmup} warm-up runs, "
        "each artifact in its own runtime on this host; peers are the same fp32 deployed graph in PyTorch eager "
        "and ONNX Runtime. Phones are measured by `mobile_harness`.",
        "",
        "| runtime | " + " | ".join(k.replace("_", " ") for k in thread_keys) + " |",
        "|---|" + "---|" * len(thread_keys),
    ]
    for a in artifacts:
        if a.latency_ms:
            cells = " | ".join(latency_cell(a.latency_ms, k) for k in thread_keys)
            lines.append(f"| `{a.file}` | {cells} |")
        else:
            note = "not timed: emulated on this host" if a.verified_by else "not run on this host"
            lines.append(f"| `{a.file}` | " + " | ".join(note for _ in thread_keys) + " |")
    for name, rows in report.peers.items():
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(latency_cell(rows, k) for k in thread_keys) + " |")
    split = [a for a in artifacts if (a.details or {}).get("xnnpack_partitions", 1) > 1]
    if split:
        lines += ["", *(f"`{a.file}` runs in {a.details['xnnpack_partitions']} XNNPACK partitions, not one: "
                        "the ops between them run on LiteRT's built-in kernels, which slows it down." for a in split)]
    lines += triage_lines(artifacts)
    lines += op_profile_lines(artifacts)
    if report.pipeline is not None:
        if "kind" not in report.pipeline:
            raise FactoryError(f"report of {report.recipe}: its pipeline section names no kind (written before "
                               "pipeline kinds existed); rebuild the recipe")
        lines += pipeline_kind(report.pipeline["kind"]).card_lines(report.pipeline)
    lines += _inputs_lines(report.inputs)
    lines += ["", "## Build stages", ""]
    if report.wall_seconds is not None:
        lines += [f"Wall time {report.wall_seconds:.0f} s to the report. Stages marked *worker* ran in the compile "
                  "worker while the build verified the artifacts before them, so the stages add up to more.", ""]
    lines += ["| stage | subject | seconds |", "|---|---|---|"]
    lines += [f"| {r.stage} | {r.subject}{' (*worker*)' if r.worker else ''} | {r.seconds} |" for r in report.stages]
    return "\n".join(lines) + "\n"


# Apple's coremltools performance guide ("Quantization overview: impact on latency and compute unit
# considerations"): weight-only compression is decompressed at load time (fp16 speed, smaller app);
# activation quantisation pays off only on the Neural Engine, where A17 Pro / M4 add int8-int8 compute,
# and can be slower than fp16 on the CPU and GPU.
_COREML_ADVICE = {
    "fp16": "`.all` (default): runs on the Neural Engine where available; the fastest choice on pre-A17 devices.",
    "w8": "`.all`: weights are decompressed to fp16 when the model loads, so it runs like fp16 with half the "
          "download and app size.",
    "int8": "`.cpuAndNeuralEngine` on A17 Pro / M4 and later, whose Neural Engine computes int8 x int8; on "
            "older devices or on the CPU/GPU quantised activations can be slower than fp16: ship `w8` there.",
}


def _coreml_app_lines(artifacts: list[Artifact]) -> list[str]:
    """What an app developer needs for each Core ML artifact: OS, I/O as Xcode shows it, compute units."""
    coreml = [a for a in artifacts if a.format == "coreml"]
    if not coreml:
        return []
    lines = [
        "", "## Core ML in an app", "",
        "Xcode generates a class per `.mlpackage`; inputs and outputs are `MLMultiArray`s (not an image "
        "input, so no Core ML resizing or colour conversion happens behind the app's back): fill the input "
        "with the aligned face's RGB values 0-255, channel-major, and read the unit-length embedding.", "",
        "| artifact | minimum OS | input | output | compute units |", "|---|---|---|---|---|",
    ]
    for a in coreml:
        io, os_version = a.io, str((a.details or {}).get("deployment_target", "—"))
        lines.append(
            f"| `{a.file}` | {os_version.replace('iOS', 'iOS ')} / macOS {_macos_for(os_version)} | "
            f"`{io.input.name}`: MLMultiArray Float32 {io.input.shape} | "
            f"`{io.output.name}`: MLMultiArray Float32 {io.output.shape} | "
            f"{_COREML_ADVICE.get(a.precision, '`.all`')} |"
        )
    example = coreml[0].io
    lines += [
        "", "```swift",
        "let config = MLModelConfiguration()",
        "config.computeUnits = .all",
        "let model = try MLModel(contentsOf: compiledModelURL, configuration: config)  // Xcode compiles the package",
        f"let input = try MLMultiArray(shape: {example.input.shape}, dataType: .float32)  "
        "// R plane, then G, then B; values 0-255",
        f"let output = try model.prediction(from: MLDictionaryFeatureProvider(dictionary: "
        f"[\"{example.input.name}\": input]))",
        f"let embedding = output.featureValue(for: \"{example.output.name}\")!.multiArrayValue!  "
        "// dot product = cosine",
        "```",
    ]
    return lines


def op_profile_lines(artifacts: list[Artifact]) -> list[str]:
    """The ten slowest operator kinds of each artifact whose runtime has a per-operator tracer."""
    profiled = [a for a in artifacts if a.op_profile is not None]
    if not profiled:
        return []
    first = profiled[0].op_profile
    lines = ["", "## Per-op profile", "",
             f"One inference at batch 1, {first.threads} thread, median of {first.runs} runs per operator, from "
             f"{first.tool}. `Convert` ops are int8 <-> float conversions around float-only operators. LiteRT's "
             "Python interpreter has no per-operator tracer; on a phone, `benchmark_model "
             "--enable_op_profiling=true` gives the .tflite's."]
    for artifact in profiled:
        profile = artifact.op_profile
        lines += ["", f"`{artifact.file}`: {profile.total_ms:.3f} ms, {profile.ops} operators "
                  f"({profile.outside_ops_ms:.3f} ms in the runtime around them)", "",
                  "| operator | count | ms | share |", "|---|---|---|---|"]
        lines += [f"| {op.op}{'' if op.delegated else ' (not delegated)'} | {op.count} | {op.ms:.3f} | "
                  f"{op.share:.1%} |" for op in profile.top]
    return lines


def triage_lines(artifacts: list[Artifact]) -> list[str]:
    """The model card's account of quantisation triage (`factory.triage`), for artifacts that went through it."""
    triaged = [a for a in artifacts if a.triage is not None]
    if not triaged:
        return []
    lines = ["", "## Quantisation triage", "",
             "An int8 artifact that missed its gates was compiled again with each other activation observer, "
             "then with its most sensitive layers kept in float, one more at a time (`triage` in the recipe; "
             "`factory/triage.py`)."]
    for a in triaged:
        t = a.triage
        kept = ", ".join(f"`{name}`" for name in t.float_layers) or "none"
        outcome = "passes its gates" if t.passed else f"still misses its gates after {len(t.attempts)} attempts"
        cost = "; ".join(f"{k.replace('_', ' ')} {v:+.3f} ms" for k, v in (t.latency_cost_ms or {}).items())
        lines += ["", f"### `{a.file}`", "",
                  f"Shipped: observer `{t.observer}`, layers kept in float: {kept} (at most {t.max_float_layers}); "
                  f"it {outcome}." + (f" Latency cost of the float layers (median, against all-int8): {cost}."
                                      if cost else ""),
                  "", "| attempt | observer | float layers | cosine mean | gates |", "|---|---|---|---|---|"]
        for index, attempt in enumerate(t.attempts):
            lines.append(f"| {index + 1} | {attempt.observer} | {len(attempt.float_layers)} | "
                         f"{fmt(attempt.parity.get('cosine_mean'), 5)} | {gates_cell(attempt.gates)} |")
        if t.sensitivity:
            lines += ["", f"Most sensitive of {t.layers} quantised layers (output cosine to float with only that "
                          f"layer quantised, on {t.sensitivity_faces} calibration faces; all layers: "
                          f"{fmt(t.emulated_cosine_mean, 5)}):", "",
                      "| layer | ops | cosine mean |", "|---|---|---|"]
            lines += [f"| `{row.layer}` | {', '.join(row.ops)} | {fmt(row.cosine_mean, 5)} |" for row in t.sensitivity]
    return lines


def _inputs_lines(inputs: dict[str, Any] | None) -> list[str]:
    """What determined this build's artifacts: a rebuild with the same inputs writes the same bytes."""
    if not inputs:
        return []
    faces = [f"{name.replace('_', ' ')}: {inputs[key]['count']} (names `{inputs[key]['list_sha256'][:12]}…`, "
             f"pixels `{inputs[key]['pixels_sha256'][:12]}…`)"
             for key, name in (("calibration_faces", "calibration faces"), ("evaluation_faces", "evaluation faces"))]
    weights = f"`{inputs['weights_sha256'][:12]}…`" if inputs.get("weights_sha256") else "imported"
    tools = ", ".join(f"{name} {version}" for name, version in inputs["tools"].items())
    threads = inputs.get("compile_threads")
    cpu = f"- CPU: {inputs['cpu']}" + (f"; compiles on {threads} intra-op thread(s)." if threads else ".")
    return ["", "## Build inputs", "",
            "A rebuild with the same inputs on the same CPU model writes byte-identical artifacts "
            "([docs/reproducibility.md](../../docs/reproducibility.md)); full digests in report.json and "
            "manifest.json.",
            "", f"- Recipe file `{inputs['recipe_file_sha256'][:12]}…`, resolved recipe "
            f"`{inputs['resolved_recipe_sha256'][:12]}…`; weights {weights}.",
            *(f"- {line}." for line in faces), f"- Tools: {tools}.", cpu]


def gates_cell(gates: list[Gate]) -> str:
    return ", ".join(("pass" if g.passed else "**FAIL**") + f" {g.name}" for g in gates) or "none"


def render_weights_lines(model: ModelInfo) -> list[str]:
    """Which weights were built: the trained file's sha256, or where imported pretrained weights came from."""
    imported = model.imported
    if imported is None:
        return [f"- Weights sha256: `{model.weights_sha256}`."]
    files = ", ".join(f"`{name}` sha256 `{digest}`" for name, digest in imported.files.items())
    return [f"- Weights: imported with the architecture from {imported.source} ({imported.licence} licence), "
            f"converted from the source files at build time (not stored here): {files}.",
            f"- Training data: {imported.training_data}. Not trained here; the LFW numbers below may be "
            "flattered by identities the network saw in training."]


def _held_out_note(model: ModelInfo) -> str:
    if model.imported is not None:
        return ("identities absent from the calibration faces; the imported weights' own training data is not "
                "held out by this factory")
    return "identities absent from training and calibration"


def _normalisation(model: ModelInfo) -> str:
    imported = model.imported
    if imported is not None and imported.input_normalisation:
        return imported.input_normalisation
    return f"(pixel - {model.input.mean}) / {model.input.std}"


def _training_lines(training: dict[str, Any] | None) -> list[str]:
    """One line on how the weights were trained, from `factory train`'s metadata in the weights file."""
    if not training:
        return []
    cfg = training.get("train_config", {})
    loss = cfg.get("loss", "arcface")
    detail = {"arcface": f"ArcFace (s={cfg.get('arcface_scale')}, m={cfg.get('arcface_margin')})",
              "triplet": f"triplet loss (margin {cfg.get('triplet_margin')}, online semi-hard selection)",
              }.get(loss, loss)
    used = " (triplet batches draw on its identities with two or more images)" if loss == "triplet" else ""
    lines = [f"- Trained here with {detail}: {training.get('epochs')} epochs on `{cfg.get('split')}`, "
             f"{training.get('images')} images of {training.get('identities')} identities{used}; "
             f"{training.get('wall_time_s', 0) / 60:.0f} min on {training.get('device')}."]
    if cfg.get("init_from"):
        digest = training.get("init_from_sha256")
        which = f"sha256 `{digest[:16]}…` (then named " if digest else "("
        lines.append(f"- Started from the weights {which}`{Path(cfg['init_from']).name}`), not from a random "
                     "initialisation (their own training log sits next to them).")
    return lines + _distillation_lines(cfg.get("distill"), training.get("teachers") or {})


def _distillation_lines(distill: dict[str, Any] | None, teachers: dict[str, Any]) -> list[str]:
    """Which teachers taught the model, their licences and training data, and what that means for LFW."""
    if not distill:
        return []
    centred = "; targets centred on each teacher's training mean" if distill.get("center_teachers") else ""
    lines = [f"- Distilled from {', '.join(distill['teachers'])} (loss: {distill.get('label_weight')} x label + "
             f"{distill.get('cosine_weight')} x projected cosine + {distill.get('relational_weight')} x relational; "
             f"teacher outputs {distill.get('teacher_outputs')}{centred}):"]
    for name in distill["teachers"]:
        card = teachers.get(name) or {}
        lines.append(f"  - {name}: {card.get('licence', '?')} licence, weights sha256 {str(card.get('digest'))[:16]}…; "
                     f"trained on {card.get('provenance', 'unknown data')}; source {card.get('source', '?')}.")
    free = all((teachers.get(name) or {}).get("lfw_identity_free") for name in distill["teachers"])
    lines.append("  - LFW exposure: " + (
        "none: every teacher was trained on data chosen to exclude LFW identities, and the student's own training "
        "split holds no LFW test identity, so the LFW score is a clean held-out number." if free else
        "possible: a teacher's training data may include LFW identities, so the LFW score may be optimistic; "
        "a dlib-only student gives the clean number."))
    return lines


def _ablation_lines(report: BuildReport) -> list[str]:
    """The training ablation: the built weights and the recipe's `ablation` weights on the same pairs."""
    from factory.ablation import training_row

    rows = report.ablation or []
    if not rows:
        return []
    built = from_data(AblationRow, {
        "label": "**built**", "weights": report.model.weights_file or "", "sha256": report.model.weights_sha256,
        **training_row(report.model.training), "lfw_accuracy": report.reference.lfw_accuracy,
        "lfw_accuracy_std": report.reference.lfw_accuracy_std,
        "tar_at_far_1e-03": report.reference.tar_at_far_1e_03})
    lines = ["", "## Training ablation", "",
             f"The same architecture trained other ways, each scored by this build on the same "
             f"{report.evaluation.pairs} "
             "pairs (fp32 PyTorch reference); how each was trained is read from its weights file's training "
             "metadata.",
             "", "| run | weights (sha256) | teachers | teacher outputs | augmentation | started from | epochs "
             "| training | LFW acc. | TAR@FAR=1e-3 | LFW-identity-free |", "|---" * 11 + "|"]
    labels = {row.sha256: row.label for row in (*rows, built)}
    for row in (*rows, built):
        teachers = ", ".join(row.teachers) or "none (labels only)"
        start = row.started_from or "random"
        if row.started_from_sha256:  # name the run it continued, else the file and its sha256
            start = labels.get(row.started_from_sha256, f"`{start}` ({row.started_from_sha256[:12]}…)")
        time = f"{row.train_minutes:.0f} min, {row.device}" if row.train_minutes else "—"
        lines.append(f"| {row.label} | `{Path(row.weights).name}` ({row.sha256[:12]}…) | {teachers} | "
                     f"{row.teacher_outputs or '—'} | {row.augmentation} | "
                     f"{start} | {row.epochs or '—'} | {time} | "
                     f"{percent(row.lfw_accuracy)} ± {percent(row.lfw_accuracy_std)} | "
                     f"{percent(row.tar_at_far_1e_03)} | {'yes' if row.lfw_identity_free else 'no'} |")
    return lines


def _macos_for(ios: str) -> str:
    return {"iOS16": "13", "iOS17": "14", "iOS18": "15"}.get(ios, "—")


def _benchmark_lines(report: BuildReport) -> list[str]:
    """A table of further benchmarks: reference accuracy, then each artifact's accuracy, drop and flips."""
    benchmarks = report.benchmarks
    if not benchmarks:
        return []
    lines = ["", "## Further benchmarks (not gated)", ""]
    for bench in benchmarks:
        lines.append(f"- **{bench.name}**: {bench.pairs} pairs over {bench.images} images of "
                     f"`{bench.pairs_file}`. {bench.note}".rstrip())
    verified = [a for a in report.artifacts if a.benchmarks]
    lines += ["", "| benchmark | reference | " + " | ".join(f"`{a.file}`" for a in verified) + " |",
              "|---|---|" + "---|" * len(verified)]
    for bench in benchmarks:
        ref = bench.reference
        cells = []
        for a in verified:
            b = a.benchmarks[bench.name]
            cells.append(f"{percent(b.accuracy)} ({100 * b.accuracy_drop:+.2f} pt, {b.flips} flips)")
        lines.append(f"| {bench.name} | {percent(ref.accuracy)} ± {percent(ref.accuracy_std)} | "
                     + " | ".join(cells) + " |")
    return lines


def render_html(markdown_text: str, out: Path, figures: dict[str, str]) -> str:
    """A self-contained HTML page of the model card, figures embedded as data URIs."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    for file in figures.values():
        encoded = base64.b64encode((out / file).read_bytes()).decode()
        body = body.replace(f'src="{file}"', f'src="data:image/png;base64,{encoded}"')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{body}</body></html>\n"


def write_reports(out: Path, report: BuildReport, figures: dict[str, str] | None = None) -> None:
    """Write report.json, report.md and report.html (figures already in `out`) atomically."""
    figures = figures or {}
    text = render_markdown(report, figures)
    write_text_atomic(out / "report.json", json.dumps(to_data(report), indent=2) + "\n")
    write_text_atomic(out / "report.md", text)
    write_text_atomic(out / "report.html", render_html(text, out, figures))


def _observer_note(evaluation: EvaluationInfo) -> str:
    """How int8 activation ranges were chosen, where the recipe replaced each target's own observer."""
    from factory.observers import DESCRIPTIONS

    observer = evaluation.calibration_observer
    return f" ({DESCRIPTIONS[observer]}, for every int8 target)" if observer in DESCRIPTIONS else ""
