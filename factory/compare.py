"""Side-by-side comparison of finished builds: a width sweep or a model-against-model table.

`python -m factory compare reports/a reports/b ... --out reports/<name>` reads each build's `report.json` (the
contract `factory.build` writes) and writes `report.md`, `report.json` and `tradeoff.png` to `--out`. Nothing is
re-measured here: every number is the build's own, so a comparison is only as fresh as the builds it reads, and
it records each build's creation time and weights checksum so a stale table can be told apart.

The layout follows the papers' own comparison tables (e.g. Fast-FaceNet's width sweep: parameters, multiply-adds,
latency and LFW accuracy per width): one row per build, and per deployed artifact its size, accuracy and host
latency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factory.errors import FactoryError
from factory.io import atomic_path, write_text_atomic
from factory.report import percent
from factory.report_schema import Artifact, BuildReport, ReportSchemaError, read_report
from factory.results import cpu_of

# Host latency is compared at one thread: the phone runners' default and the least noisy setting here.
LATENCY_KEY = "1_thread"


def load_build_report(folder: Path) -> BuildReport:
    """A finished build's `report.json`; the error says how to make one."""
    path = folder / "report.json" if folder.is_dir() or folder.suffix != ".json" else folder
    if not path.is_file():
        raise FactoryError(
            f"{path} does not exist; build it first with `python -m factory build recipes/<recipe>.yaml` "
            f"(its report folder is reports/<recipe>/)"
        )
    try:
        return read_report(path)
    except ReportSchemaError as error:
        raise FactoryError(f"{path} is not a factory build report ({error}); rebuild its recipe") from None


def artifact_kind(artifact: Artifact) -> str:
    """Column name of an artifact across builds: format and precision (file names differ per recipe)."""
    return artifact.label


def summarise(reports: list[BuildReport]) -> dict[str, Any]:
    """The comparison as data: one row per build, artifact columns in first-seen order."""
    kinds: list[str] = []
    rows = []
    for report in reports:
        model, ref = report.model, report.reference
        artifacts = {}
        for a in report.artifacts:
            kind = artifact_kind(a)
            if kind not in kinds:
                kinds.append(kind)
            parity = a.parity or {}
            latency = (a.latency_ms or {}).get(LATENCY_KEY)
            artifacts[kind] = {
                "file": a.file,
                "bytes": a.bytes,
                "status": a.status,
                "cosine_mean": parity.get("cosine_mean"),
                "lfw_accuracy": parity.get("lfw_accuracy"),
                "lfw_accuracy_drop": parity.get("lfw_accuracy_drop"),
                "pairs": (a.parity_set.pairs if a.parity_set else report.evaluation.pairs) if parity else None,
                "latency_median_ms": None if latency is None else latency.median_ms,
                "latency_p90_ms": None if latency is None else latency.p90_ms,
            }
        rows.append({
            "recipe": report.recipe,
            "verdict": report.verdict,
            "created": report.created,
            "cpu": cpu_of(report),
            "architecture": model.architecture,
            "paper": model.paper,
            "paper_numbers": model.paper_numbers,
            "paper_numbers_at": model.paper_numbers_at,
            "params": model.params,
            "macs": model.macs,
            "weights_sha256": model.weights_sha256,
            "lfw_accuracy": ref.lfw_accuracy,
            "lfw_accuracy_std": ref.lfw_accuracy_std,
            "tar_at_far_1e-03": ref.tar_at_far_1e_03,
            "pairs": report.evaluation.pairs,
            "training": model.training,
            "artifacts": artifacts,
        })
    return {"latency": f"batch 1, {LATENCY_KEY.replace('_', ' ')}", "kinds": kinds, "rows": rows}


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def render_markdown(title: str, summary: dict[str, Any], figure: str | None, sources: list[str]) -> str:
    """The comparison page."""
    rows, kinds = summary["rows"], summary["kinds"]
    lines = [
        f"# {title}",
        "",
        "Every number is read from the builds' own `report.json` (`python -m factory compare "
        + " ".join(sources) + "`); nothing is re-measured here. LFW: the official View-2 protocol, 6,000 pairs, "
        "10-fold (threshold on 9 folds, accuracy on the 10th).",
        "",
        "## Models",
        "",
        "| recipe | architecture | params | MACs (112x112) | paper params / MACs | LFW (PyTorch fp32) "
        "| TAR@FAR=1e-3 | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = r["paper_numbers"]
        at = " at " + ", ".join(f"{k}={v}" for k, v in r["paper_numbers_at"].items()) if r["paper_numbers_at"] else ""
        lines.append(
            f"| {r['recipe']} | `{r['architecture']}` ({r['paper']}) | {r['params'] / 1e6:.2f} M "
            f"| {r['macs'] / 1e6:.1f} M | {paper.get('params_m', '—')} M / {paper.get('macs_m', '—')} M{at} "
            f"| **{percent(r['lfw_accuracy'])}** ± {percent(r['lfw_accuracy_std'])} | {percent(r['tar_at_far_1e-03'])} "
            f"| {r['verdict']} |"
        )
    header = "| recipe | " + " | ".join(kinds) + " |"
    rule = "|---|" + "---|" * len(kinds)

    def table(caption: str, cell) -> list[str]:
        out = ["", f"## {caption}", "", header, rule]
        for r in rows:
            cells = [cell(r["artifacts"][k]) if k in r["artifacts"] else "not built" for k in kinds]
            out.append(f"| {r['recipe']} | " + " | ".join(cells) + " |")
        return out

    def accuracy(a: dict[str, Any]) -> str:
        if a["lfw_accuracy"] is None:
            return a["status"]
        scope = "" if a["pairs"] is None or a["pairs"] >= rows[0]["pairs"] else f" ({a['pairs']} pairs)"
        drop = f"{100 * a['lfw_accuracy_drop']:+.2f} pt"
        return f"{percent(a['lfw_accuracy'])} ({drop}, cos {a['cosine_mean']:.4f}){scope}"

    def latency(a: dict[str, Any]) -> str:
        if a["latency_median_ms"] is None:
            return "not timed here" if a["lfw_accuracy"] is not None else a["status"]
        return f"{_ms(a['latency_median_ms'])} / {_ms(a['latency_p90_ms'])}"

    lines += table("LFW accuracy of each deployed artifact (drop vs PyTorch, mean cosine to PyTorch)", accuracy)
    lines += table(f"Host latency per face ({summary['latency']}), ms median / p90", latency)
    cpus = sorted({r["cpu"] for r in rows})
    if len(cpus) > 1:
        lines += ["", "The builds' latencies were measured on different machines (" + ", ".join(
            f"{r['recipe']}: {r['cpu']}" for r in rows) + "); compare them only between builds of the same CPU."]
    lines += table("Artifact size", lambda a: f"{a['bytes'] / 1e6:.2f} MB")
    if figure:
        lines += ["", f"![accuracy against cost]({figure})"]
    lines += ["", "## Builds compared", "", "| recipe | built | CPU | weights sha256 | training |",
              "|---|---|---|---|---|"]
    for r in rows:
        weights = f"`{r['weights_sha256'][:16]}…`" if r["weights_sha256"] else "imported, pretrained"
        lines.append(f"| {r['recipe']} | {r['created']} | {r['cpu']} | {weights} | {_training(r['training'])} |")
    return "\n".join(lines) + "\n"


def _training(training: dict[str, Any] | None) -> str:
    if not training:
        return "—"
    cfg = training.get("train_config", {})
    distill = cfg.get("distill")
    taught = f" + distillation from {', '.join(distill['teachers'])}" if distill else ""
    start = ""
    if cfg.get("init_from"):  # a file's name at training time says less than its digest (names get reused)
        digest = training.get("init_from_sha256")
        name = f"`{Path(cfg['init_from']).name}`"
        start = f" from weights `{digest[:12]}…` (then named {name})" if digest else f" from {name}"
    return (f"{cfg.get('loss', 'arcface')}{taught}, {training.get('epochs')} epochs{start}, "
            f"{training.get('wall_time_s', 0) / 60:.0f} min on {training.get('device')}")


def plot_tradeoff(summary: dict[str, Any], path: Path, latency_kind: str | None) -> None:
    """LFW accuracy against multiply-adds and, where timed, against host latency of one artifact kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    panels = 2 if latency_kind else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), dpi=110, squeeze=False)
    accuracy = [100 * r["lfw_accuracy"] for r in rows]
    axes[0, 0].scatter([r["macs"] / 1e6 for r in rows], accuracy)
    axes[0, 0].set_xlabel("multiply-adds (M) at 112x112")
    if latency_kind:
        timed = [(r["artifacts"][latency_kind]["latency_median_ms"], 100 * r["lfw_accuracy"], r["recipe"])
                 for r in rows if (r["artifacts"].get(latency_kind) or {}).get("latency_median_ms") is not None]
        axes[0, 1].scatter([t[0] for t in timed], [t[1] for t in timed])
        for x, y, name in timed:
            axes[0, 1].annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axes[0, 1].set_xlabel(f"host latency, {latency_kind}, ms (median, 1 thread)")
    for x, y, name in zip([r["macs"] / 1e6 for r in rows], accuracy, [r["recipe"] for r in rows], strict=True):
        axes[0, 0].annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for axis in axes[0]:
        axis.set_ylabel("LFW accuracy, PyTorch fp32 (%)")
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def compare(folders: list[Path], out: Path, title: str) -> dict[str, Any]:
    """Read the builds in `folders`, write the comparison to `out`, return its data."""
    if len(folders) < 2:
        raise FactoryError("compare needs at least two build report folders, e.g. reports/a reports/b")
    reports = [load_build_report(folder) for folder in folders]
    names = [r.recipe for r in reports]
    if len(set(names)) != len(names):
        raise FactoryError(f"the same recipe is listed twice ({', '.join(names)}); list each build once")
    summary = summarise(reports)
    summary["title"] = title
    summary["sources"] = [str(folder) for folder in folders]
    # The latency panel uses the artifact kind every build has and timed (int8 .tflite, the usual phone choice).
    timed_everywhere = [k for k in summary["kinds"]
                        if all((r["artifacts"].get(k) or {}).get("latency_median_ms") is not None
                               for r in summary["rows"])]
    latency_kind = "tflite int8" if "tflite int8" in timed_everywhere else next(iter(timed_everywhere), None)
    out.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(summary, out / "tradeoff.png", latency_kind)
    write_text_atomic(out / "report.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "report.md", render_markdown(title, summary, "tradeoff.png", summary["sources"]))
    return summary
