"""`factory compare`: side-by-side tables read from build reports, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import synthetic_artifact, synthetic_report, write_report

from factory.cli import main
from factory.compare import compare


def _artifact(fmt: str, precision: str, size: int, accuracy: float, drop: float, median: float | None,
              pairs: int = 6000) -> dict:
    return synthetic_artifact(fmt, precision, accuracy, drop=drop, size=size, median=median, pairs=pairs)


def _report(folder: Path, recipe: str, macs: float, accuracy: float, artifacts: list[dict]) -> Path:
    return write_report(folder / recipe, synthetic_report(
        recipe, accuracy, artifacts, macs=int(macs), paper="doi:x", paper_numbers={"params_m": 1.0},
        paper_numbers_at={"input_size": 224},
        training={"epochs": 3, "wall_time_s": 600, "device": "cpu", "train_config": {"loss": "triplet"}}))


def test_compare_tabulates_each_build_and_artifact_from_the_reports(tmp_path: Path) -> None:
    small = _report(tmp_path, "net_0_25", 10.6e6, 0.70, [
        _artifact("tflite", "int8", 400_000, 0.69, 0.01, 1.5),
        _artifact("coreml", "fp16", 600_000, 0.70, 0.0, None, pairs=1000),
    ])
    large = _report(tmp_path, "net_1_0", 148e6, 0.80, [_artifact("tflite", "int8", 3_600_000, 0.795, 0.005, 9.0)])
    out = tmp_path / "sweep"
    summary = compare([small, large], out, "Width sweep")

    assert summary["kinds"] == ["tflite int8", "coreml fp16"]
    assert [r["recipe"] for r in summary["rows"]] == ["net_0_25", "net_1_0"]
    assert summary["rows"][1]["artifacts"]["tflite int8"]["latency_median_ms"] == 9.0
    text = (out / "report.md").read_text()
    assert "# Width sweep" in text
    assert "| net_0_25 | `net_0_25` (doi:x) | 1.00 M | 10.6 M | 1.0 M / — M at input_size=224 | **70.00%**" in text
    assert "69.00% (+1.00 pt, cos 0.9990)" in text          # artifact accuracy, drop and cosine
    assert "70.00% (+0.00 pt, cos 0.9990) (1000 pairs)" in text  # a subset is labelled as such
    assert "| net_1_0 | 79.50% (+0.50 pt, cos 0.9990) | not built |" in text
    assert "| net_0_25 | 1.50 / 1.65 | not timed here |" in text
    assert "| net_1_0 | 3.60 MB | not built |" in text
    assert "triplet, 3 epochs, 10 min on cpu" in text
    assert (out / "tradeoff.png").stat().st_size > 5000
    assert json.loads((out / "report.json").read_text())["rows"][0]["macs"] == 10.6e6


def test_compare_errors_name_the_missing_build_and_write_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    built = _report(tmp_path, "net_0_25", 10.6e6, 0.70, [])
    out = tmp_path / "sweep"
    assert main(["compare", str(built), str(tmp_path / "net_0_5"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "net_0_5/report.json does not exist" in err and "python -m factory build" in err
    assert not out.exists()

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text('{"recipe": "x"}')
    assert main(["compare", str(built), str(tmp_path / "broken"), "--out", str(out)]) == 2
    assert "not a factory build report" in capsys.readouterr().err

    assert main(["compare", str(built), str(built), "--out", str(out)]) == 2
    assert "listed twice" in capsys.readouterr().err
    assert main(["compare", str(built), "--out", str(out)]) == 2
    assert "at least two" in capsys.readouterr().err
    assert not out.exists()


def test_list_shows_each_recipe_with_its_built_int8_teacher_and_paper_accuracy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml
    from helpers import recipe_dict, synthetic_dataset

    data = synthetic_dataset(tmp_path / "faces")
    recipes, reports = tmp_path / "recipes", tmp_path / "reports"
    recipes.mkdir()
    built = recipe_dict(data, weights=str(tmp_path / "w.safetensors"))
    (tmp_path / "w.safetensors").write_bytes(b"placeholder")  # `list` checks presence, builds check content
    (recipes / "tiny.yaml").write_text(yaml.safe_dump(built))
    untrained = {**recipe_dict(data, weights="nowhere.safetensors"), "name": "untrained"}
    (recipes / "untrained.yaml").write_text(yaml.safe_dump(untrained))
    (recipes / "broken.yaml").write_text("name: [\n")
    _report(reports, "tiny", 1e6, 0.8123, [_artifact("tflite", "int8", 400_000, 0.8101, 0.002, 1.5),
                                            _artifact("executorch", "int8", 400_000, 0.8130, 0.0, 1.2),
                                            _artifact("tflite", "fp32", 900_000, 0.8123, 0.0, 2.0)])

    assert main(["list", "--recipes", str(recipes), "--reports", str(reports)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "weights ok" in lines["tiny"] and "LFW 81.23% (pass, 2026-11-23); int8 81.01%-81.30%" in lines["tiny"]
    assert "teacher: none (labels only)" in lines["tiny"]  # trained with labels alone (no distill block)
    assert "paper LFW: 99.55%" in lines["tiny"]  # MobileFaceNet's published figure
    assert "NO WEIGHTS" in lines["untrained"] and "not built" in lines["untrained"]
    assert "invalid:" in lines["broken"]


COMPARISONS = sorted(p.parent.name for p in (Path(__file__).resolve().parents[1] / "reports").glob("*/report.json")
                     if "sources" in json.loads(p.read_text()))


@pytest.mark.parametrize("name", COMPARISONS)
def test_committed_comparisons_are_the_comparison_of_the_committed_builds(tmp_path: Path, name: str) -> None:
    from helpers import REPO

    committed = json.loads((REPO / "reports" / name / "report.json").read_text())
    summary = compare([REPO / source for source in committed["sources"]], tmp_path, committed["title"])
    assert summary["rows"] == committed["rows"], "rerun the compare commands in README.md after rebuilding a recipe"
    assert all(r["verdict"] == "pass" for r in summary["rows"])


def test_committed_width_sweep_orders_the_four_widths() -> None:
    from helpers import REPO

    committed = json.loads((REPO / "reports" / "fastfacenet_sweep" / "report.json").read_text())
    widths = [r for r in committed["rows"] if r["architecture"].startswith("fastfacenet_")]
    assert [r["architecture"] for r in widths] == [f"fastfacenet_{w}" for w in ("0_25", "0_5", "0_75", "1_0")]
    assert [r["macs"] for r in widths] == sorted(r["macs"] for r in widths)
