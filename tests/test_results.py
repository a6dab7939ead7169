"""The results page is generated from the committed reports and must match them."""

from pathlib import Path

from factory.results import render_results, results_rows

REPO = Path(__file__).resolve().parents[1]


def test_committed_results_page_matches_the_committed_reports() -> None:
    rows = results_rows(REPO / "recipes", REPO / "reports")
    assert {row["recipe"].split("]")[0].lstrip("[") for row in rows} >= {"mobilefacenet", "seesawfacenet"}
    expected = render_results(rows)
    page = REPO / "docs" / "results.md"
    assert page.is_file() and page.read_text() == expected, (
        "docs/results.md is stale: run `python -m factory results` and commit it")


def test_results_rows_name_teachers_and_lfw_exposure(tmp_path: Path) -> None:
    from helpers import synthetic_artifact, synthetic_report, write_report

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "student.yaml").write_text("name: student\n")
    report = synthetic_report(
        "student", 0.975, [synthetic_artifact("tflite", "int8", 0.9731, median=1.234),
                           synthetic_artifact("coreml", "int8", 0.97, drop=0.0033, median=None, pairs=1200)],
        architecture="mobilefacenet", params=1_000_000, macs=221_000_000, paper_numbers={"lfw_accuracy": 0.9955},
        training={"train_config": {"distill": {"teachers": ["dlib_resnet_v1"]}},
                  "teachers": {"dlib_resnet_v1": {"lfw_identity_free": True}}})
    write_report(tmp_path / "reports" / "student", report)
    (row,) = results_rows(tmp_path / "recipes", tmp_path / "reports")
    assert row["LFW fp32"] == "97.50%" and row["int8 .tflite"] == "97.31%, 1.23 ms"
    assert row["Core ML int8"] == "97.00% (1,200 pairs; reference 97.33%)"
    assert row["teachers"] == "dlib_resnet_v1" and row["LFW-identity-free"] == "yes"
    assert row["int8 .pte"] == "—" and row["paper LFW"] == "99.55%"


def test_every_committed_model_card_is_what_the_renderer_makes_of_its_report_json() -> None:
    """report.md is rendered from report.json; a change to the renderer that alters a committed card shows here
    (commit the regenerated cards deliberately, or fix the renderer)."""
    import json

    from factory.report import render_markdown
    from factory.report_schema import read_report

    reports = Path(__file__).resolve().parents[1] / "reports"
    checked = []
    for folder in sorted(p for p in reports.iterdir() if (p / "report.json").is_file()):
        if "model" not in json.loads((folder / "report.json").read_text()):  # a comparison across builds
            continue
        figures = {"ROC curves": "roc.png", "Cosine histograms": "cosine_histogram.png"}
        assert render_markdown(read_report(folder), figures) == (folder / "report.md").read_text(), folder.name
        checked.append(folder.name)
    assert {"mobilefacenet", "lefv", "fastfacenet_1_0"} <= set(checked)
