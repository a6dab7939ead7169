"""Recipe schema: typed dataclasses, strict parsing, and one error that lists every problem.

A recipe is a YAML file. Every key is known; a misspelt key, a wrong type, a missing file or an
impossible combination is reported with its YAML path (e.g. `targets[1].precisions[0]`).
Relative paths are resolved against the folder holding the recipe file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import yaml

from factory.errors import FactoryError
from factory.pipelines import pipeline_kind, pipeline_kinds


@dataclass(frozen=True)
class OneOf:
    """Marks a string that must name an entry of a registry; the registry is asked when a recipe is checked,
    so the names are stated once, by the code that implements them."""

    names: Callable[[], list[str]]


def _target_names() -> list[str]:
    from factory.targets import target_names

    return target_names()


def _precision_names() -> list[str]:
    from factory.targets import precision_names

    return precision_names()


def _observer_names() -> list[str]:
    from factory.observers import observer_names

    return observer_names()


Format = Annotated[str, OneOf(_target_names)]
Precision = Annotated[str, OneOf(_precision_names)]
Loss = Literal["arcface", "softmax", "triplet"]
Augmentation = Literal["basic", "strong"]
TeacherOutputs = Literal["online", "cached"]
TrainPrecision = Literal["fp32", "bf16", "fp16"]
DataFormat = Literal["list", "folder", "recordio", "webdataset"]
# How int8 activation ranges are chosen from the calibration faces (factory/observers.py).
ActivationObserver = Annotated[str, OneOf(_observer_names)]

# int8 activation ranges from fewer real faces are unstable; recipes must opt in to go below this.
MIN_CALIBRATION_FACES = 300


class RecipeError(FactoryError):
    """A recipe with one or more problems; the message lists each with its YAML path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the recipe\n{lines}")


@dataclass
class InputSpec:
    """What the model expects: a square RGB/BGR image, normalised as (pixel - mean) / std.

    The tensor layout is not a recipe setting: each target chooses its artifact's (TFLite NHWC, the others
    NCHW) and records it in the report and the manifest."""

    size: int = 112
    color_order: Literal["RGB", "BGR"] = "RGB"
    mean: list[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    std: list[float] = field(default_factory=lambda: [128.0, 128.0, 128.0])


@dataclass
class ModelConfig:
    """Which registered architecture to build and with what shape."""

    architecture: str
    embedding_size: int = 128
    input: InputSpec = field(default_factory=InputSpec)

    def builder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the registry builder."""
        return {"embedding_size": self.embedding_size, "input_size": self.input.size}


@dataclass
class WeightsConfig:
    """Where trained weights live (safetensors) and their expected checksum."""

    path: str
    sha256: str | None = None


@dataclass
class DistillConfig:
    """Knowledge distillation from pretrained teachers (`factory.teachers`), added to the label loss.

    Per step, on the same augmented views the student sees: `cosine_weight` x (1 - cosine between a learned
    linear projection of the student embedding and each teacher's embedding, averaged over the teachers),
    `relational_weight` x the mean squared difference of the batch's pairwise cosine matrices (student
    against the teachers' mean), and `label_weight` x the recipe's label loss (`train.loss`).
    `teacher_outputs`: `online` runs the teachers on every view; `cached` draws each face's views from
    `cached_views` fixed strong views whose teacher embeddings are computed once into `cache_dir`
    (default `$FACTORY_CACHE/teacher-embeddings`) and reused across runs and recipes.
    `unlabelled`: further split files (a face path per line, relative to data.root, any label ignored)
    whose faces join only the distillation losses; no face of an evaluation identity is accepted.
    `center_teachers`: subtract each teacher's mean embedding over the training faces from its targets and
    re-normalise them. A teacher whose embeddings all sit in a narrow cone (dlib's: unrelated faces at cosine
    0.84 +- 0.04) otherwise makes the cosine loss reward the cone's axis and the relational loss pull unrelated
    faces together, against the label loss (docs/distillation.md).
    """

    teachers: list[str]
    cosine_weight: float = 1.0
    relational_weight: float = 1.0
    label_weight: float = 1.0
    teacher_outputs: TeacherOutputs = "online"
    cached_views: int = 8
    cache_dir: str | None = None
    unlabelled: list[str] = field(default_factory=list)
    center_teachers: bool = False


@dataclass
class TrainConfig:
    """How to train the model on a `path<TAB>label` split.

    `loss` picks the objective: an ArcFace head (`arcface_*` settings), a plain softmax classifier, or the
    triplet loss with margin `triplet_margin` on batches of batch_size / 2 identities x 2 images.
    """

    split: str
    # `split`'s format (docs/training.md): `list` (`path<TAB>label`, loaded into memory), or read while training:
    # `folder` (identity/image tree), `recordio` (insightface train.rec + train.idx), `webdataset` (tar shards,
    # streamed). None: judged from the path. `loader_workers` decode the streamed formats; an epoch with more than
    # `max_bad_share` undecodable or unlabelled records stops the run.
    format: DataFormat | None = None
    loader_workers: int = 4
    max_bad_share: float = 0.01
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 5e-4
    arcface_scale: float = 64.0
    arcface_margin: float = 0.5
    max_shift: int = 4
    seed: int = 0
    # Train on this seeded share of the split's identities (all their images); < 1 for learning curves.
    identity_fraction: float = 1.0
    loss: Loss = "arcface"
    triplet_margin: float = 0.2
    # `basic`: flip + shift by up to max_shift pixels; `strong`: see factory.augment (meant for distillation).
    augmentation: Augmentation = "basic"
    # Start from these weights (safetensors, relative to the recipe) instead of a random initialisation.
    init_from: str | None = None
    distill: DistillConfig | None = None
    # Speed settings (`docs/training.md`): autocast precision of the forward pass (fp16 adds a gradient scaler and
    # needs a GPU), `torch.compile` of the model, synchronised batch norm across ranks (GPU only), and a
    # checkpoint every this many steps besides the one after each epoch (0: after each epoch only).
    precision: TrainPrecision = "fp32"
    compile: bool = False
    sync_batchnorm: bool = False
    checkpoint_every: int = 0
    # Run the model's forward pass on chunks of this many faces (0: the whole batch at once); the losses still see
    # the whole batch. Batch norm then normalises each chunk by its own statistics ("ghost" batch norm). On CPUs a
    # chunk whose activations stay in cache trains wide networks about 2x faster (docs/training.md).
    micro_batch: int = 0
    # ArcFace centres split across the training processes (partial FC, `factory.partial_fc`), for identity counts
    # whose classifier does not fit one GPU; `head_sample_rate` < 1 uses that share of each rank's centres per step
    # (every class in the batch plus random negatives).
    sharded_head: bool = False
    head_sample_rate: float = 1.0


@dataclass
class CalibrationConfig:
    """Real faces used to calibrate int8 activation ranges."""

    split: str
    count: int = 500
    seed: int = 0
    allow_fewer_than_300: bool = False
    observer: ActivationObserver = "default"


@dataclass
class EvaluationConfig:
    """Held-out faces for parity: an LFW-format pairs file and the folder it indexes."""

    pairs: str
    images: str
    min_parity_images: int = 1000
    max_pairs: int | None = None
    # Artifacts this host can only emulate (Core ML off macOS: ~10x slower than a runtime) are verified on
    # a fold-balanced subset of this many pairs, against the reference on the same subset. None: all pairs.
    emulated_max_pairs: int | None = None


@dataclass
class BenchmarkConfig:
    """A further pair set scored for the reference and every artifact (accuracy, drop, flips), not gated.

    `note` is printed beside the numbers, e.g. that the set's identities were seen in training.
    """

    name: str
    pairs: str
    images: str
    note: str = ""
    max_pairs: int | None = None


@dataclass
class DataConfig:
    """Real face data; `root` is the base of the other data paths."""

    root: str
    calibration: CalibrationConfig
    evaluation: EvaluationConfig
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)


@dataclass
class TargetConfig:
    """One mobile runtime and the precisions to produce for it.

    `w8_keep_float16_up_to`: w8 (weight-only int8) leaves weight tensors of at most this many elements in
    float16 (coremltools' `weight_threshold`); 0 stores every weight as int8. Small tensors (3x3 depthwise
    kernels, narrow 1x1 convolutions) cost little to keep, and batch norm folded into them can make their
    per-channel int8 steps coarse.
    """

    format: Format
    precisions: list[Precision]
    w8_keep_float16_up_to: int = 0


@dataclass
class GateConfig:
    """Parity gates of one precision against the fp32 PyTorch reference (None = not gated)."""

    cosine_mean_min: float | None = None
    cosine_min_min: float | None = None
    lfw_accuracy_drop_max: float | None = None
    flip_rate_max: float | None = None


def _default_gates() -> dict[str, GateConfig]:
    return {
        "fp32": GateConfig(cosine_mean_min=0.9999),
        "fp16": GateConfig(cosine_mean_min=0.999, lfw_accuracy_drop_max=0.005),
        "w8": GateConfig(cosine_mean_min=0.999, lfw_accuracy_drop_max=0.005),
        "int8": GateConfig(cosine_mean_min=0.99, lfw_accuracy_drop_max=0.005),
    }


@dataclass
class TriageConfig:
    """Quantisation triage (`factory.triage`): what the build does when an int8 artifact misses its gates.

    It compiles the artifact with each other activation observer, measures every layer's int8 sensitivity on
    `faces` calibration faces (at most all of them), then keeps the most sensitive layers in float one at a
    time, at most `max_float_layers`, until the gates pass. `enabled: false` leaves a failing artifact as it is.
    """

    enabled: bool = True
    max_float_layers: int = 6
    faces: int = 64


@dataclass
class LatencyConfig:
    """Host latency measurement settings."""

    warmup: int = 10
    runs: int = 50


@dataclass
class AblationRun:
    """Another weights file of the recipe's architecture, scored by the build on the same evaluation pairs.

    The model card tabulates these next to the built weights, with how each was trained (read from the
    file's own training metadata): e.g. labels only, each teacher, both teachers.
    """

    label: str
    weights: WeightsConfig


@dataclass
class Recipe:
    """A whole recipe. `path` is the recipe file (set by the loader, not written in YAML).

    `weights` is required, except for an architecture imported with its pretrained weights (the registry's
    `ImportedWeights`), which takes none.
    """

    name: str
    model: ModelConfig
    data: DataConfig
    targets: list[TargetConfig]
    weights: WeightsConfig | None = None
    train: TrainConfig | None = None
    gates: dict[Precision, GateConfig] = field(default_factory=_default_gates)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    triage: TriageConfig = field(default_factory=TriageConfig)
    # Stages before the recogniser: read into the config type of the kind it names (`factory.pipelines`).
    pipeline: Any = field(default=None, metadata={"plugin": True})
    ablation: list[AblationRun] = field(default_factory=list)
    path: Path = field(default=Path("."), metadata={"internal": True})

    def resolve(self, relative: str) -> Path:
        """A recipe path resolved against the recipe's folder."""
        candidate = Path(relative).expanduser()
        return candidate if candidate.is_absolute() else (self.path.parent / candidate).resolve()

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data (for the manifest)."""
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data


def _one_of(tp: Any) -> OneOf | None:
    if get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, OneOf)), None)
    return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if (choice := _one_of(tp)) is not None:
        return " | ".join(repr(name) for name in choice.names())
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against type `tp`, collecting problems; returns the converted value."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [a for a in options if a is not type(None)]
        return _convert(value, inner, where, problems)
    if (choice := _one_of(tp)) is not None:
        if value not in choice.names():
            problems.append(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a {_type_name(tp)}, got {type(value).__name__} {value!r}")
            return []
        return [_convert(item, get_args(tp)[0], f"{where}[{i}]", problems) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a {_type_name(tp)}, got {type(value).__name__}")
            return {}
        key_type, value_type = get_args(tp)
        return {
            _convert(k, key_type, f"{where}.{k}", problems): _convert(v, value_type, f"{where}.{k}", problems)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, where, problems)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build_dataclass(cls: type, value: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{where or 'recipe'}: expected a mapping with keys {_field_names(cls)}, got {value!r}")
        return None
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, item in value.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            problems.append(f"{path}: unknown key; known keys here: {_field_names(cls)}")
            continue
        kwargs[key] = (_pipeline_section(item, path, problems) if fields[key].metadata.get("plugin")
                       else _convert(item, hints[key], path, problems))
    for name, spec in fields.items():
        if name not in value and spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            problems.append(f"{where + '.' if where else ''}{name}: required key is missing")
    if any(v is None and not (_allows_none(hints[k]) or fields[k].metadata.get("plugin")) for k, v in kwargs.items()):
        return None
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def _pipeline_section(value: Any, where: str, problems: list[str]) -> Any:
    """A `pipeline:` mapping read into the config type of the pipeline kind its `kind` key names."""
    if value is None:
        return None
    kinds = pipeline_kinds()
    known = ", ".join(sorted(kinds)) or "none"
    if not isinstance(value, dict) or "kind" not in value:
        problems.append(f"{where}.kind: required key is missing; name the pipeline kind, one of: {known}")
        return None
    if value["kind"] not in kinds:
        problems.append(f"{where}.kind: {value['kind']!r} is not a registered pipeline kind; registered: {known}")
        return None
    return _convert(value, kinds[value["kind"]].config, where, problems)


def _allows_none(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal"))


def _check_rules(recipe: Recipe, problems: list[str]) -> None:
    """Cross-field rules and file existence."""
    from factory.models import model_names

    if recipe.model.architecture not in model_names():
        problems.append(f"model.architecture: {recipe.model.architecture!r} is not registered; "
                        f"registered: {', '.join(model_names())}")
    else:
        _check_weights_source(recipe, problems)
    spec = recipe.model.input
    for key, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) != 3:
            problems.append(f"model.input.{key}: needs 3 values (one per colour channel), got {len(values)}")
    if any(s <= 0 for s in spec.std):
        problems.append("model.input.std: every value must be positive")
    if spec.size <= 0 or spec.size % 16:
        problems.append(f"model.input.size: must be a positive multiple of 16, got {spec.size}")
    if recipe.model.embedding_size <= 0:
        problems.append("model.embedding_size: must be positive")
    if recipe.triage.max_float_layers < 1:
        problems.append("triage.max_float_layers: must be at least 1 (turn triage off with triage.enabled: false)")
    if recipe.triage.faces < 1:
        problems.append(f"triage.faces: must be at least 1, got {recipe.triage.faces}")
    if not recipe.targets:
        problems.append("targets: list at least one target")
    seen: set[str] = set()
    for index, target in enumerate(recipe.targets):
        if target.format in seen:
            problems.append(f"targets[{index}].format: {target.format!r} is listed twice; merge the precisions")
        seen.add(target.format)
        if target.format not in _target_names():
            continue  # the schema check reported it
        from factory.targets import get_target

        supported = get_target(target.format).precisions
        for p_index, precision in enumerate(target.precisions):
            if precision in supported or precision not in _precision_names():
                continue
            problems.append(f"targets[{index}].precisions[{p_index}]: {target.format} cannot produce "
                            f"{precision!r}; supported: {', '.join(supported)}")
        if not target.precisions:
            problems.append(f"targets[{index}].precisions: list at least one precision")
        if target.w8_keep_float16_up_to < 0 or (target.w8_keep_float16_up_to and "w8" not in target.precisions):
            problems.append(f"targets[{index}].w8_keep_float16_up_to: a count of 0 or more, for a target that "
                            f"builds w8; got {target.w8_keep_float16_up_to} with precisions {target.precisions}")
    calibration = recipe.data.calibration
    if calibration.count < MIN_CALIBRATION_FACES and not calibration.allow_fewer_than_300:
        problems.append(f"data.calibration.count: {calibration.count} is fewer than {MIN_CALIBRATION_FACES} real "
                        "faces; int8 needs at least that many for stable ranges (set allow_fewer_than_300: true "
                        "only for tests)")
    evaluation = recipe.data.evaluation
    if evaluation.min_parity_images < 1:
        problems.append("data.evaluation.min_parity_images: must be at least 1")
    if evaluation.max_pairs is not None and evaluation.max_pairs < 20:
        problems.append("data.evaluation.max_pairs: at least 20 (one same and one different pair per fold)")
    if recipe.latency.runs < 50 or recipe.latency.warmup < 1:
        problems.append("latency: runs must be at least 50 and warmup at least 1 for stable medians")
    for precision, gate in recipe.gates.items():
        for name in ("cosine_mean_min", "cosine_min_min"):
            value = getattr(gate, name)
            if value is not None and not -1.0 <= value <= 1.0:
                problems.append(f"gates.{precision}.{name}: a cosine lies in [-1, 1], got {value}")
        for name in ("lfw_accuracy_drop_max", "flip_rate_max"):
            value = getattr(gate, name)
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"gates.{precision}.{name}: a fraction in [0, 1], got {value}")
    if recipe.train is not None:
        for name in ("epochs", "batch_size"):
            if getattr(recipe.train, name) <= 0:
                problems.append(f"train.{name}: must be positive")
        if recipe.train.sharded_head and recipe.train.loss != "arcface":
            problems.append(f"train.sharded_head: the sharded head is an ArcFace head; set train.loss: arcface "
                            f"(got {recipe.train.loss!r}) or sharded_head: false")
        if not 0.0 < recipe.train.head_sample_rate <= 1.0:
            problems.append(f"train.head_sample_rate: a fraction in (0, 1], got {recipe.train.head_sample_rate}")
        elif recipe.train.head_sample_rate < 1.0 and not recipe.train.sharded_head:
            problems.append("train.head_sample_rate: sampling centres is part of the sharded head; set "
                            "train.sharded_head: true")
        if recipe.train.loader_workers < 0:
            problems.append(f"train.loader_workers: 0 (decode in the training process) or more, got "
                            f"{recipe.train.loader_workers}")
        if not 0.0 <= recipe.train.max_bad_share < 1.0:
            problems.append(f"train.max_bad_share: a fraction in [0, 1), got {recipe.train.max_bad_share}")
        if recipe.train.micro_batch < 0 or recipe.train.micro_batch == 1:
            problems.append(f"train.micro_batch: 0 (the whole batch) or a chunk of at least 2 faces, got "
                            f"{recipe.train.micro_batch}")
        if recipe.train.checkpoint_every < 0:
            problems.append(f"train.checkpoint_every: 0 (after each epoch only) or a number of steps, got "
                            f"{recipe.train.checkpoint_every}")
        if not 0.0 < recipe.train.identity_fraction <= 1.0:
            problems.append(f"train.identity_fraction: a fraction in (0, 1], got {recipe.train.identity_fraction}")
        if recipe.train.triplet_margin <= 0.0:
            problems.append(f"train.triplet_margin: must be positive, got {recipe.train.triplet_margin}")
        _check_distill(recipe, problems)
        if recipe.train.loss == "triplet" and (recipe.train.batch_size < 4 or recipe.train.batch_size % 2):
            problems.append(f"train.batch_size: the triplet loss takes 2 images of each of batch_size / 2 "
                            f"identities, so it must be even and at least 4, got {recipe.train.batch_size}")
    checks = [
        ("data.root", recipe.data.root, "dir"),
        ("data.calibration.split", str(Path(recipe.data.root) / calibration.split), "file"),
        ("data.evaluation.pairs", str(Path(recipe.data.root) / recipe.data.evaluation.pairs), "file"),
    ]
    if not evaluation.pairs.endswith(".bin"):  # an insightface .bin file carries its own images
        checks.append(("data.evaluation.images", str(Path(recipe.data.root) / evaluation.images), "dir"))
    if evaluation.emulated_max_pairs is not None and evaluation.emulated_max_pairs < 20:
        problems.append("data.evaluation.emulated_max_pairs: at least 20 (one same and one different pair per fold), "
                        f"got {evaluation.emulated_max_pairs}")
    names = [benchmark.name for benchmark in recipe.data.benchmarks]
    for index, benchmark in enumerate(recipe.data.benchmarks):
        if names.count(benchmark.name) > 1:
            problems.append(f"data.benchmarks[{index}].name: {benchmark.name!r} is used twice; names must be unique")
        checks.append((f"data.benchmarks[{index}].pairs", str(Path(recipe.data.root) / benchmark.pairs), "file"))
        if not benchmark.pairs.endswith(".bin"):
            checks.append((f"data.benchmarks[{index}].images", str(Path(recipe.data.root) / benchmark.images), "dir"))
    if recipe.train is not None:
        split = recipe.train.split
        if not any(char in split for char in "{*?["):  # a WebDataset shard range or glob is checked when read
            checks.append(("train.split", str(Path(recipe.data.root) / split), "path"))
        if recipe.train.init_from is not None:
            checks.append(("train.init_from", recipe.train.init_from, "file"))
        for index, split in enumerate(recipe.train.distill.unlabelled if recipe.train.distill else []):
            checks.append((f"train.distill.unlabelled[{index}]", str(Path(recipe.data.root) / split), "file"))
    labels = [run.label for run in recipe.ablation]
    for index, run in enumerate(recipe.ablation):
        if labels.count(run.label) > 1:
            problems.append(f"ablation[{index}].label: {run.label!r} is used twice; labels must be unique")
        checks.append((f"ablation[{index}].weights.path", run.weights.path, "file"))
    for key, relative, kind in checks:
        resolved = recipe.resolve(relative)
        exists = {"dir": resolved.is_dir, "file": resolved.is_file, "path": resolved.exists}[kind]()
        if not exists:
            problems.append(f"{key}: {kind} not found: {resolved}")
    if recipe.pipeline is not None:
        pipeline_kind(recipe.pipeline.kind).check(recipe, problems)
    weights = recipe.resolve(recipe.weights.path) if recipe.weights is not None else None
    if weights is not None and not weights.is_file() and recipe.train is None:
        problems.append(f"weights.path: file not found: {weights}, and there is no 'train' section to make it")


def _check_weights_source(recipe: Recipe, problems: list[str]) -> None:
    """Trained architectures need `weights`; imported ones bring theirs and need their source files."""
    from factory.models import model_entry

    architecture = recipe.model.architecture
    imported = model_entry(architecture).imported
    if imported is None:
        if recipe.weights is None:
            problems.append("weights: required key is missing (only architectures imported with their pretrained "
                            "weights take none)")
        return
    for key, section in (("weights", recipe.weights), ("train", recipe.train)):
        if section is not None:
            problems.append(f"{key}: {architecture} is imported with its pretrained weights ({imported.source}), "
                            f"so it is neither trained nor loaded from a file here; remove the {key} section")
    spec = recipe.model.input
    if imported.input_normalisation is not None and (any(spec.mean) or any(s != 1 for s in spec.std)):
        problems.append(f"model.input: {architecture} normalises its input itself ({imported.input_normalisation}); "
                        "set mean: [0, 0, 0] and std: [1, 1, 1] so that no pixel is normalised twice")
    try:
        imported.files()
    except FactoryError as error:
        problems.append(f"model.architecture: {error}")


def _check_distill(recipe: Recipe, problems: list[str]) -> None:
    distill = recipe.train.distill if recipe.train is not None else None
    if distill is None:
        return
    from factory.teachers import teacher_names

    if not distill.teachers:
        problems.append("train.distill.teachers: name at least one teacher; registered: " + ", ".join(teacher_names()))
    for index, name in enumerate(distill.teachers):
        if name not in teacher_names():
            problems.append(f"train.distill.teachers[{index}]: {name!r} is not a registered teacher; "
                            f"registered: {', '.join(teacher_names())}")
    if len(set(distill.teachers)) != len(distill.teachers):
        problems.append("train.distill.teachers: a teacher is listed twice")
    for name in ("cosine_weight", "relational_weight", "label_weight"):
        if getattr(distill, name) < 0:
            problems.append(f"train.distill.{name}: must be 0 or more, got {getattr(distill, name)}")
    if distill.cosine_weight == 0 and distill.relational_weight == 0:
        problems.append("train.distill: cosine_weight and relational_weight are both 0, so nothing is distilled; "
                        "remove the distill section or give one a weight")
    if distill.teacher_outputs == "cached" and recipe.train.augmentation != "strong":
        problems.append("train.distill.teacher_outputs: 'cached' keeps teacher outputs of fixed strong views; set "
                        "train.augmentation: strong, or use teacher_outputs: online")
    if distill.cached_views < 1:
        problems.append(f"train.distill.cached_views: at least 1, got {distill.cached_views}")
    if recipe.train.loss == "triplet":
        problems.append("train.distill: distillation is implemented with the classifier losses (arcface, softmax); "
                        "set train.loss to one of them")


def parse_recipe(data: Any, path: Path) -> Recipe:
    """Build a `Recipe` from parsed YAML, raising one `RecipeError` listing every problem."""
    problems: list[str] = []
    recipe = _build_dataclass(Recipe, data, "", problems)
    if recipe is not None and not problems:
        recipe.path = path.resolve()
        _check_rules(recipe, problems)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(str(path), [f"not valid YAML: {error}"]) from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` on top: mappings merge key by key; any other value (a list, a scalar, null)
    replaces the base's."""
    merged = dict(base)
    for key, value in override.items():
        both_mappings = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = deep_merge(merged[key], value) if both_mappings else value
    return merged


def _with_base(data: Any, path: Path, chain: tuple[Path, ...]) -> Any:
    """The recipe mapping with its `base:` (a file relative to this one, itself possibly extending another)
    merged under it. The merged mapping is one recipe: its relative paths are read from the loaded recipe's
    folder, so a base should name no files (data.root, weights) of its own."""
    if not isinstance(data, dict) or "base" not in data:
        return data
    data = dict(data)
    reference = data.pop("base")
    if not isinstance(reference, str) or not reference:
        raise RecipeError(str(path), [f"base: expected the path of a base recipe (relative to {path.name}), "
                                      f"got {reference!r}"])
    base_path = (path.parent / reference).resolve()
    if not base_path.is_file():
        raise RecipeError(str(path), [f"base: file not found: {base_path}; fix the path (relative to {path.name})"])
    if base_path in chain:
        cycle = " -> ".join(p.name for p in (*chain, base_path))
        raise RecipeError(str(path), [f"base: recipes extend each other in a cycle ({cycle}); remove one base"])
    base = _with_base(_read_yaml(base_path), base_path, (*chain, base_path))
    if not isinstance(base, dict):
        raise RecipeError(str(path), [f"base: {base_path} is not a mapping of recipe keys"])
    return deep_merge(base, data)


def read_recipe_mapping(path: Path) -> dict[str, Any]:
    """The recipe file's plain mapping with its `base:` merged in, before validation (to write a changed copy)."""
    data = _with_base(_read_yaml(path), path, (path.resolve(),))
    if not isinstance(data, dict):
        raise RecipeError(str(path), ["expected a mapping of recipe keys"])
    return data


def load_recipe(path: str | Path, data_root: str | None = None,
                if_no_data: Callable[[dict[str, Any], Path], None] | None = None) -> Recipe:
    """Read, validate and resolve a recipe file.

    Args:
        path: The YAML recipe; a `base:` key names a recipe file it extends (deep merge, see `deep_merge`).
        data_root: Overrides `data.root` (e.g. a user's own face folder), before validation.
        if_no_data: Called with the parsed mapping and the recipe's path before validation; it may point a
            recipe whose data root is missing at other data (the CLI passes `factory.fetch.use_lfw_if_no_data`).
    """
    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"recipe file not found: {path} — pass a recipes/*.yaml file")
    data = _with_base(_read_yaml(path), path, (path.resolve(),))
    if data_root is not None and isinstance(data, dict) and isinstance(data.get("data"), dict):
        data["data"]["root"] = str(Path(data_root).resolve())
    if if_no_data is not None:
        if_no_data(data, path)
    return parse_recipe(data, path)


def data_path(recipe: Recipe, relative: str) -> Path:
    """A path under the recipe's data root."""
    return recipe.resolve(recipe.data.root) / relative
