import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import REPO, recipe_dict, synthetic_dataset

from factory.errors import FactoryError
from factory.pipelines import PipelineKind, PipelineOutput, TrainableStage, register_pipeline, unregister_pipeline
from factory.recipe import RecipeError, WeightsConfig, load_recipe


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    return synthetic_dataset(tmp_path / "faces")


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    return caught.value.problems


def test_valid_recipe_loads_with_defaults(tmp_path: Path, data_root: Path) -> None:
    recipe = load_recipe(write(tmp_path, recipe_dict(data_root)))
    assert recipe.model.input.size == 112
    assert recipe.gates["fp32"].cosine_mean_min == 0.9999
    assert recipe.gates["int8"].lfw_accuracy_drop_max == 0.005
    assert recipe.resolve(recipe.weights.path) == tmp_path / "w.safetensors"


def test_every_problem_is_reported_at_once_with_its_yaml_path(tmp_path: Path, data_root: Path) -> None:
    data = recipe_dict(data_root)
    data["model"]["embeding_size"] = 64  # misspelt key
    data["model"]["input"] = {"size": "112"}  # wrong type
    data["targets"].append({"format": "coreml", "precisions": ["fp32"]})  # Core ML builds fp16/w8/int8
    data["targets"].append({"format": "onnx", "precisions": ["fp32"]})  # unknown format
    problems = problems_of(write(tmp_path, data))
    joined = "\n".join(problems)
    assert "model.embeding_size: unknown key" in joined
    assert "model.input.size: expected int" in joined
    assert "targets[2].format: 'onnx' is not one of" in joined
    assert len(problems) == 3  # rules that need a parsed recipe run once the structure is right


def test_cross_field_rules_name_the_key_and_the_fix(tmp_path: Path, data_root: Path) -> None:
    data = recipe_dict(data_root)
    data["targets"].append({"format": "coreml", "precisions": ["fp32"]})
    data["data"]["calibration"] = {"split": "splits/train.txt", "count": 100}
    data["data"]["evaluation"]["pairs"] = "missing_pairs.txt"
    data["gates"] = {"int8": {"cosine_mean_min": 1.5}}
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert "targets[1].precisions[0]: coreml cannot produce 'fp32'; supported: fp16, w8, int8" in joined
    assert "data.calibration.count: 100 is fewer than 300" in joined
    assert "data.evaluation.pairs: file not found" in joined
    assert "gates.int8.cosine_mean_min: a cosine lies in [-1, 1]" in joined


def test_missing_required_keys_and_malformed_yaml(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, {"name": "x"}))
    assert {"model: required key is missing", "targets: required key is missing"} <= set(problems)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert "not valid YAML" in problems_of(bad)[0]
    with pytest.raises(FactoryError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_validate_exits_2_and_lists_problems(tmp_path: Path, data_root: Path) -> None:
    data = recipe_dict(data_root)
    data["targets"] = [{"format": "tflite", "precisions": ["fp16"]}]
    path = write(tmp_path, data)
    result = subprocess.run([sys.executable, "-m", "factory", "validate", str(path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "targets[0].precisions[0]: tflite cannot produce 'fp16'" in result.stderr


def test_shipped_and_candidate_recipes_validate() -> None:
    folder = REPO / "recipes"
    shipped, candidates = sorted(folder.glob("*.yaml")), sorted(folder.glob("candidates/*.yaml"))
    recipes = [str(p) for p in shipped + candidates]
    result = subprocess.run([sys.executable, "-m", "factory", "validate", *recipes],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "mobilefacenet.yaml: ok" in result.stdout
    assert "seesawfacenet.yaml: ok" in result.stdout
    assert "seesawfacenet_dw.yaml: ok" in result.stdout
    assert "mobileface_v2.yaml: ok" in result.stdout
    assert load_recipe(folder / "seesawfacenet_dw.yaml").data.calibration.observer == "mean_min_max"


def imported_recipe(data_root: Path) -> dict:
    """The small recipe for MobileFace V2, which is imported with its pretrained weights."""
    data = recipe_dict(data_root)
    del data["weights"], data["train"]
    data["model"] = {"architecture": "mobileface_v2", "embedding_size": 256,
                     "input": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}
    return data


def test_imported_architecture_needs_no_weights_and_refuses_weights_train_and_double_normalisation(
        tmp_path: Path, data_root: Path) -> None:
    recipe = load_recipe(write(tmp_path, imported_recipe(data_root)))
    assert recipe.weights is None and recipe.train is None
    data = {**recipe_dict(data_root), "model": imported_recipe(data_root)["model"]}
    data["model"]["input"] = {"mean": [127.5] * 3, "std": [128.0] * 3}
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert "weights: mobileface_v2 is imported with its pretrained weights" in joined
    assert "remove the weights section" in joined and "remove the train section" in joined
    assert "model.input: mobileface_v2 normalises its input itself ((pixel - 127.5) / 128)" in joined
    trained = recipe_dict(data_root)
    del trained["weights"]
    assert "weights: required key is missing (only architectures imported" in "\n".join(
        problems_of(write(tmp_path, trained)))


def test_w8_float16_threshold_needs_a_w8_target_and_a_count(tmp_path: Path, data_root: Path) -> None:
    data = recipe_dict(data_root)
    data["targets"] = [{"format": "coreml", "precisions": ["w8"], "w8_keep_float16_up_to": 4096}]
    assert load_recipe(write(tmp_path, data)).targets[0].w8_keep_float16_up_to == 4096
    data["targets"] = [{"format": "coreml", "precisions": ["fp16"], "w8_keep_float16_up_to": 4096},
                       {"format": "tflite", "precisions": ["fp32"], "w8_keep_float16_up_to": -1}]
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert "targets[0].w8_keep_float16_up_to: a count of 0 or more, for a target that builds w8" in joined
    assert "targets[1].w8_keep_float16_up_to" in joined


def test_imported_architecture_without_its_source_files_names_where_to_get_them(
        tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from factory.teachers import mobileface

    monkeypatch.setenv("FACTORY_MODELS", str(tmp_path / "nothing"))
    monkeypatch.setenv("FACTORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mobileface, "SHARED_MODELS", tmp_path / "no-shared")
    joined = "\n".join(problems_of(write(tmp_path, imported_recipe(data_root))))
    assert "model.architecture: MobileFace V2 weights not found" in joined and "FACTORY_MODELS" in joined


def test_calibration_observer_defaults_and_is_checked(tmp_path: Path, data_root: Path) -> None:
    data = recipe_dict(data_root)
    assert load_recipe(write(tmp_path, data)).data.calibration.observer == "default"
    data["data"]["calibration"] = {"split": "splits/train.txt", "observer": "percentile"}
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert "data.calibration.observer: 'percentile' is not one of 'default' | 'min_max' | 'mean_min_max'" in joined


def test_formats_precisions_and_observers_are_asked_of_their_registries(tmp_path: Path, data_root: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A target or observer registered in code is accepted by the validator with no edit to recipe.py."""
    from factory import observers
    from factory.targets import base, get_target

    monkeypatch.setitem(base._TARGETS, "demo", type("Demo", (), {"format": "demo", "precisions": ("fp32", "int4")})())
    monkeypatch.setitem(observers.DESCRIPTIONS, "percentile", "activation ranges: a percentile (test only)")
    data = recipe_dict(data_root)
    data["targets"] = [{"format": "demo", "precisions": ["int4"]}, {"format": "tflite", "precisions": ["int4"]}]
    data["data"]["calibration"] = {"split": "splits/train.txt", "observer": "percentile"}
    data["gates"] = {"int4": {"cosine_mean_min": 0.95}}
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert joined.startswith("targets[1].precisions[0]: tflite cannot produce 'int4'; supported: fp32, int8")
    assert "\n" not in joined, "only the tflite row is wrong; demo, int4 and percentile come from the registries"
    assert get_target("tflite").precisions == ("fp32", "int8")


def test_pipeline_detector_settings_are_checked(tmp_path: Path, data_root: Path) -> None:
    data = recipe_dict(data_root)
    data["pipeline"] = {"kind": "lefv", "detector": {"weights": {"path": "d.safetensors"}, "photos": "no_such.csv",
                                     "input_size": 100, "held_out_every": 1, "train": {"steps": 0}}}
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert "pipeline.detector.input_size: must be a positive multiple of 16, got 100" in joined
    assert "pipeline.detector.held_out_every: at least 2" in joined
    assert "pipeline.detector.train.steps: must be positive" in joined
    assert "pipeline.detector.photos: file not found" in joined and "no_such.csv" in joined


def test_pipeline_normaliser_settings_are_checked(tmp_path: Path, data_root: Path) -> None:
    data = recipe_dict(data_root)
    (data_root / "photos.csv").write_text("raw_image,aligned_reference,landmarks_xy_source_pixels\n")
    data["pipeline"] = {"kind": "lefv", "detector": {"weights": {"path": "d.safetensors"}, "photos": "photos.csv"},
                        "normaliser": {"weights": {"path": "n.safetensors"}, "encoder": {"path": "no_encoder.st"},
                                       "parity_faces": 0,
                                       "train": {"steps": 0, "frontal_fraction": 1.5, "pixel_weight": -1,
                                                 "gan_weight": 1}}}
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert "pipeline.normaliser.train.gan_weight: unknown key" in joined
    data["pipeline"]["normaliser"]["train"].pop("gan_weight")
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert "pipeline.normaliser.train.steps: must be positive" in joined
    assert "pipeline.normaliser.parity_faces: must be positive" in joined
    assert "pipeline.normaliser.train.frontal_fraction: a fraction in (0, 1], got 1.5" in joined
    assert "pipeline.normaliser.train.pixel_weight: must be 0 or more" in joined
    assert "pipeline.normaliser.encoder.path: file not found" in joined and "no_encoder.st" in joined
    assert "pipeline.detector" not in joined


def test_pipeline_stage_observer_overrides_the_recipe_observer_and_is_checked(tmp_path: Path,
                                                                                data_root: Path) -> None:
    data = recipe_dict(data_root)
    (data_root / "photos.csv").write_text("raw_image,aligned_reference,landmarks_xy_source_pixels\n")
    (tmp_path / "encoder.st").write_bytes(b"")
    data["pipeline"] = {"kind": "lefv", "detector": {"weights": {"path": "d.safetensors"}, "photos": "photos.csv"},
                        "normaliser": {"weights": {"path": "n.safetensors"}, "encoder": {"path": "encoder.st"},
                                       "observer": "mean_min_max"}}
    recipe = load_recipe(write(tmp_path, data))
    assert recipe.data.calibration.observer == "default"
    assert recipe.pipeline.detector.observer is None and recipe.pipeline.normaliser.observer == "mean_min_max"
    data["pipeline"]["detector"]["observer"] = "histogram"
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert "pipeline.detector.observer: 'histogram' is not one of" in joined


@pytest.mark.parametrize("stage", ["detector", "normaliser"])
def test_training_a_pipeline_stage_needs_a_pipeline_recipe(tmp_path: Path, data_root: Path, stage: str) -> None:
    path = write(tmp_path, recipe_dict(data_root))
    result = subprocess.run([sys.executable, "-m", "factory", "train", str(path), "--stage", stage],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    assert f"has no pipeline stage {stage!r} to train; its stages: recogniser" in result.stderr
    assert not list(tmp_path.glob("*.safetensors"))


@dataclass
class _StandInStage:
    weights: WeightsConfig
    frames: int = 4


@dataclass
class _StandInPipeline:
    kind: str
    tracker: _StandInStage


def _stand_in_check(recipe, problems: list[str]) -> None:
    if recipe.pipeline.tracker.frames < 1:
        problems.append(f"pipeline.tracker.frames: at least 1, got {recipe.pipeline.tracker.frames}")


@pytest.fixture()
def stand_in_kind():
    """A pipeline kind registered by hand: what a plug-in gives the generic recipe reader."""
    kind = register_pipeline(PipelineKind(
        name="stand_in", description="test kind", config=_StandInPipeline, check=_stand_in_check,
        build=lambda inputs: PipelineOutput({"kind": "stand_in"}, []), card_lines=lambda section: [],
        summary=lambda section: "", stages={"tracker": TrainableStage(lambda cfg: cfg.tracker.weights, None)}))
    yield kind
    unregister_pipeline(kind.name)


def test_a_pipeline_section_is_read_into_the_config_of_the_kind_it_names(tmp_path: Path, data_root: Path,
                                                                          stand_in_kind: PipelineKind) -> None:
    data = recipe_dict(data_root)
    data["pipeline"] = {"kind": "stand_in", "tracker": {"weights": {"path": "t.safetensors"}, "frames": 8}}
    recipe = load_recipe(write(tmp_path, data))
    assert isinstance(recipe.pipeline, _StandInPipeline) and recipe.pipeline.tracker.frames == 8
    assert recipe.to_dict()["pipeline"] == {"kind": "stand_in", "tracker": {"weights": {"path": "t.safetensors",
                                                                                         "sha256": None}, "frames": 8}}
    assert [w.path for w in stand_in_kind.weights(recipe.pipeline)] == ["t.safetensors"]
    # The kind's schema and its own rules are reported like any recipe key.
    data["pipeline"]["tracker"] = {"weights": {"path": "t.safetensors"}, "frames": 0, "fps": 30}
    joined = "\n".join(problems_of(write(tmp_path, data)))
    assert "pipeline.tracker.fps: unknown key; known keys here: weights, frames" in joined
    data["pipeline"]["tracker"].pop("fps")
    assert problems_of(write(tmp_path, data)) == ["pipeline.tracker.frames: at least 1, got 0"]


def test_a_pipeline_section_must_name_a_registered_kind(tmp_path: Path, data_root: Path,
                                                        stand_in_kind: PipelineKind) -> None:
    data = recipe_dict(data_root)
    data["pipeline"] = {"tracker": {"weights": {"path": "t.safetensors"}}}
    (problem,) = problems_of(write(tmp_path, data))
    assert problem.startswith("pipeline.kind: required key is missing") and "lefv" in problem and "stand_in" in problem
    data["pipeline"]["kind"] = "tracking"
    (problem,) = problems_of(write(tmp_path, data))
    assert problem.startswith("pipeline.kind: 'tracking' is not a registered pipeline kind; registered: lefv")


def test_a_recipe_extends_its_base_by_deep_merge(tmp_path: Path, data_root: Path) -> None:
    full = recipe_dict(data_root)
    (tmp_path / "bases").mkdir()
    grand = {"latency": {"warmup": 3, "runs": 60}, "gates": {"int8": {"cosine_mean_min": 0.98}}}
    base = {k: v for k, v in full.items() if k not in ("name", "weights")}
    base["base"] = "grand.yaml"
    base["gates"] = {"int8": {"lfw_accuracy_drop_max": 0.02}, "fp32": {"cosine_mean_min": 0.99999}}
    (tmp_path / "bases" / "grand.yaml").write_text(yaml.safe_dump(grand))
    (tmp_path / "bases" / "base.yaml").write_text(yaml.safe_dump(base))
    child = {"base": "bases/base.yaml", "name": "child", "weights": full["weights"],
             "latency": {"warmup": 5}, "targets": [{"format": "executorch", "precisions": ["int8"]}]}
    recipe = load_recipe(write(tmp_path, child))
    assert recipe.name == "child"
    assert (recipe.latency.warmup, recipe.latency.runs) == (5, 60), "a mapping merges key by key, through two bases"
    assert [(t.format, t.precisions) for t in recipe.targets] == [("executorch", ["int8"])], "a list replaces"
    assert (recipe.gates["int8"].cosine_mean_min, recipe.gates["int8"].lfw_accuracy_drop_max) == (0.98, 0.02)
    assert recipe.gates["fp32"].cosine_mean_min == 0.99999
    assert recipe.resolve(recipe.weights.path) == tmp_path / "w.safetensors", "paths read from the loaded recipe"


def test_a_missing_or_circular_base_is_one_clear_error(tmp_path: Path, data_root: Path) -> None:
    data = recipe_dict(data_root)
    data["base"] = "nowhere.yaml"
    assert problems_of(write(tmp_path, data)) == [
        f"base: file not found: {tmp_path / 'nowhere.yaml'}; fix the path (relative to recipe.yaml)"]
    (tmp_path / "a.yaml").write_text("base: recipe.yaml\n")
    data["base"] = "a.yaml"
    (problem,) = problems_of(write(tmp_path, data))
    assert problem == ("base: recipes extend each other in a cycle (recipe.yaml -> a.yaml -> recipe.yaml); "
                       "remove one base")


def test_the_fast_facenet_sweep_shares_one_base() -> None:
    sweep = sorted((REPO / "recipes").glob("fastfacenet_*.yaml"))
    assert [p.stem for p in sweep] == ["fastfacenet_0_25", "fastfacenet_0_5", "fastfacenet_0_75", "fastfacenet_1_0"]
    for path in sweep:
        assert yaml.safe_load(path.read_text())["base"] == "base/fastfacenet.yaml"
        recipe = load_recipe(path)
        assert recipe.model.architecture == path.stem and recipe.data.calibration.count == 500
        assert recipe.gates["int8"].cosine_mean_min == 0.99
    distilled = load_recipe(REPO / "recipes" / "fastfacenet_0_5.yaml")
    assert (distilled.train.loss, distilled.train.distill.teachers, distilled.gates["w8"].lfw_accuracy_drop_max,
            distilled.gates["w8"].cosine_mean_min) == ("arcface", ["mobileface_v2"], 0.005, 0.999)
    # A mapping key set to null in the recipe replaces the base's value: all pairs instead of the base's 1,200.
    assert distilled.data.evaluation.emulated_max_pairs is None
    assert load_recipe(REPO / "recipes" / "fastfacenet_1_0.yaml").data.evaluation.emulated_max_pairs == 1200
    labels_only = load_recipe(REPO / "recipes" / "candidates" / "fastfacenet_0_5_labels.yaml")
    assert (labels_only.train.loss, labels_only.train.distill, labels_only.gates["w8"].lfw_accuracy_drop_max,
            labels_only.gates["w8"].cosine_mean_min) == ("triplet", None, 0.01, 0.999)
    assert load_recipe(REPO / "recipes" / "fastfacenet_0_25.yaml").targets[2].w8_keep_float16_up_to == 4096


def test_every_shipped_training_start_is_a_row_of_its_model_cards_ablation() -> None:
    """A staged recipe's card scores the weights its training starts from, and those are the committed bytes."""
    staged = 0
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        if recipe.train is None or recipe.train.init_from is None:
            continue
        staged += 1
        start = recipe.resolve(recipe.train.init_from)
        rows = [row for row in recipe.ablation if recipe.resolve(row.weights.path) == start]
        assert len(rows) == 1, f"{path.name}: no ablation row scores {start.name}, where its training starts"
        assert rows[0].weights.sha256 == hashlib.sha256(start.read_bytes()).hexdigest(), path.name
    assert staged >= 8
