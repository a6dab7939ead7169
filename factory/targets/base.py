"""What every mobile target provides, and the registry of targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from factory.deploy import Embedder
from factory.errors import FactoryError
from factory.stages import Stage, StageLog

# Runs a batch of preprocessed images (in the artifact's own layout) and returns embeddings.
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class CompileRequest:
    """Everything a target needs to compile one artifact.

    Attributes:
        backbone: The fp32 backbone in eval mode (normalised NCHW input, raw embedding output).
        mean: Per-channel mean of the recipe's input spec.
        std: Per-channel std of the recipe's input spec.
        embedding_size: Width of the embedding.
        precision: "fp32", "fp16" or "int8".
        calibration: Calibration faces as NCHW float32 pixel values in [0, 255] (int8 uses them).
        output: Where the artifact goes (a file, or a directory bundle for Core ML).
        stages: Where the target times its pipeline stages.
        graph: Builds the deployed graph around a (possibly quantised) backbone; None: the face embedder
            (`factory.deploy.Embedder`). Other pipeline stages (a detector) deploy other graphs.
        output_name: Name of the artifact's output, where the format names it (Core ML).
        output_shape: Shape of the artifact's output; None: (1, embedding_size).
        description: One line describing the model, where the format stores one (Core ML).
        observer: How int8 activation ranges are chosen from the calibration faces (`factory.observers`).
        w8_keep_float16_up_to: w8 (weight-only int8) keeps weight tensors of at most this many elements in float.
        float_layers: int8 leaves these layers (`factory.quant_layers`) in float: quantisation triage's choice.
    """

    backbone: nn.Module
    mean: list[float]
    std: list[float]
    embedding_size: int
    precision: str
    calibration: np.ndarray
    output: Path
    stages: StageLog = field(default_factory=StageLog)
    graph: Callable[[nn.Module], nn.Module] | None = None
    output_name: str = "embedding"
    output_shape: list[int] | None = None
    description: str = "Face embedding model built by the mobile face-model factory"
    observer: str = "default"
    w8_keep_float16_up_to: int = 0
    float_layers: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.output.name

    def describe_quantization(self, text: str) -> str:
        """A target's quantisation text, naming the activation observer where the recipe chose one and the layers
        quantisation triage kept in float."""
        from factory.observers import DESCRIPTIONS

        if self.precision != "int8":
            return text
        if self.observer in DESCRIPTIONS:
            text = f"{text}; {DESCRIPTIONS[self.observer]}"
        if self.float_layers:
            text += (f"; {len(self.float_layers)} layer(s) kept in float by quantisation triage: "
                     + ", ".join(self.float_layers))
        return text

    @property
    def artifact_output_shape(self) -> list[int]:
        return list(self.output_shape) if self.output_shape is not None else [1, self.embedding_size]

    def deployable(self, backbone: nn.Module | None = None) -> nn.Module:
        """The deployed graph around `backbone` (default: the fp32 backbone)."""
        inner = self.backbone if backbone is None else backbone
        if self.graph is not None:
            deployed = self.graph(inner)
        else:
            deployed = Embedder(inner, self.mean, self.std, self.embedding_size)
        # The backbone is already in eval mode; a quantised (exported) backbone refuses .eval().
        deployed.training = False
        return deployed

    def example_pixels(self) -> tuple[torch.Tensor]:
        """One calibration face as the deployed graph's example input."""
        return (torch.from_numpy(np.ascontiguousarray(self.calibration[:1])),)

    def normalised_calibration(self) -> np.ndarray:
        """The calibration faces as the backbone sees them (the recipe's normalisation applied)."""
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((self.calibration - mean) / std)

    def calibrated(self, quantizer: object, backbone: nn.Module | None = None) -> torch.fx.GraphModule:
        """The backbone (or a target's rewrite of it) prepared with a PT2E `quantizer`, the recipe's activation
        observer in place, calibrated on every calibration face (one at a time, in order)."""
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        from factory.observers import use_activation_observer

        normalised = self.normalised_calibration()
        example = (torch.from_numpy(normalised[:1]),)
        source = self.backbone if backbone is None else backbone
        prepared = prepare_pt2e(torch.export.export(source, example).module(), quantizer)
        use_activation_observer(prepared, self.observer)
        # Quantisers built for training (coremltools' inserts FakeQuantize modules) would quantise each
        # activation with the ranges seen so far while calibrating, so later layers' ranges would depend on
        # the order of the faces. Post-training calibration observes float activations only.
        fake_quantizers = [m for m in prepared.modules() if hasattr(m, "disable_fake_quant")]
        for module in fake_quantizers:
            module.disable_fake_quant()
        with torch.no_grad():
            for index in range(len(normalised)):
                prepared(torch.from_numpy(normalised[index : index + 1]))
        for module in fake_quantizers:
            module.enable_fake_quant()
        return prepared

    def quantized_backbone(self, quantizer: object, backbone: nn.Module | None = None, *,
                           fold_quantize: bool) -> nn.Module:
        """The backbone (or a target's rewrite of it) quantised with a PT2E `quantizer` (`calibrated`), leaving
        the request's `float_layers` in float (`factory.quant_layers.keep_float`).

        `fold_quantize` stores int8 weights directly (XNNPACK wants this); litert-torch instead
        wants float weights followed by an explicit quantise op, which it folds itself.

        Only the backbone is quantised; the deployed graph's float pre- and post-processing wrap it
        afterwards, which keeps the artifact's inputs and outputs float32.
        """
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        from factory.quant_layers import keep_float, quantised_layers

        what = f"{self.label}: {len(self.calibration)} calibration faces"
        if self.float_layers:
            what += f", {len(self.float_layers)} layer(s) kept in float"
        with self.stages.stage(Stage.QUANTIZE, what):
            prepared = self.calibrated(keep_float(quantizer, self.float_layers), backbone)
            still = sorted(set(self.float_layers) & set(quantised_layers(prepared)))
            if still:
                raise FactoryError(f"{self.label}: the quantiser quantised layer(s) {still} that were to stay in "
                                   "float; this target's quantiser does not support keeping layers in float")
            return convert_pt2e(prepared, fold_quantize=fold_quantize)


@dataclass
class CompiledArtifact:
    """What a target reports about an artifact it wrote."""

    path: Path
    format: str
    precision: str
    input_name: str
    input_layout: str
    input_shape: list[int]
    input_dtype: str
    output_name: str
    output_shape: list[int]
    output_dtype: str
    quantization: str
    details: dict[str, object] = field(default_factory=dict)


class Target(Protocol):
    """A mobile runtime the factory compiles to."""

    format: str
    suffix: str
    precisions: tuple[str, ...]
    runtime_name: str
    # False when this host's runner emulates the runtime: its timings would say nothing about the format.
    host_latency: bool

    def compile(self, request: CompileRequest) -> CompiledArtifact:
        """Write the artifact to `request.output` (atomically) and describe it."""

    def int8_quantizer(self, request: CompileRequest) -> tuple[object, nn.Module]:
        """For a target with int8: a fresh PT2E quantiser and the network it quantises (the request's backbone,
        or the target's rewrite of it); what `compile` quantises and quantisation triage analyses."""

    def load_runner(self, path: Path, threads: int | None = None) -> Runner:
        """A host runner for the artifact (every format runs on every host: Core ML off macOS in the interpreter)."""

    def extra_runners(self, path: Path) -> dict[str, Runner]:
        """Further runtimes on this host that also run the artifact, by name; each is verified as its own row."""


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target instance to the registry under its format name."""
    _TARGETS[target.format] = target
    return target


def target_names() -> list[str]:
    """Registered target formats, sorted."""
    return sorted(_TARGETS)


def precision_names() -> list[str]:
    """Every precision some registered target produces, sorted."""
    return sorted({precision for target in _TARGETS.values() for precision in target.precisions})


def get_target(name: str) -> Target:
    """The target for `name`; the error lists what is registered."""
    try:
        return _TARGETS[name]
    except KeyError:
        raise FactoryError(f"unknown target format {name!r}; registered: {', '.join(target_names())}") from None


def target_for_path(path: Path) -> Target:
    """The target whose artifacts end like `path` (.tflite, .pte, .mlpackage)."""
    for target in _TARGETS.values():
        if path.name.endswith(target.suffix):
            return target
    suffixes = ", ".join(t.suffix for t in _TARGETS.values())
    raise FactoryError(f"{path}: not a known artifact type; expected one of {suffixes}")


def verification_runner(target: Target, path: Path) -> Runner:
    """The runner that verifies an artifact on many faces, using every core this process may use.

    A target whose runtime lets go of Python's GIL while it runs (`verifies_side_by_side = True`: LiteRT) gets
    one single-threaded runner per core, each taking batches of faces side by side. One runner on every core
    runs each batch-1 inference across the cores and waits for all of them at every operator: on the 2-core
    build machine, MobileFaceNet's .tflite verified 1.2x (fp32) and 1.9x (int8) faster side by side, and more
    while the compile worker holds a core (a multi-threaded inference then waits on its descheduled thread).
    Each face is still one batch-1 inference on one thread, so the embeddings are the same on any core count.
    Other targets: one runner on every core (`load_runner(path, all_threads())`).
    """
    import queue

    from factory.latency import all_threads
    from factory.parallel import map_batches

    workers = all_threads()
    if workers == 1 or not getattr(target, "verifies_side_by_side", False):
        return target.load_runner(path, workers)
    idle: queue.SimpleQueue[Runner] = queue.SimpleQueue()
    for _ in range(workers):
        idle.put(target.load_runner(path, 1))

    def run_on_an_idle_runner(batch: np.ndarray) -> np.ndarray:
        runner = idle.get()
        try:
            return runner(batch)
        finally:
            idle.put(runner)

    return lambda pixels: map_batches(run_on_an_idle_runner, pixels, VERIFY_BATCH, workers)


# Faces per batch handed to a side-by-side verification runner (`verification_runner`).
VERIFY_BATCH = 32


def batched(runner_one: Callable[[np.ndarray], np.ndarray]) -> Runner:
    """Turn a batch-1 runner into one that takes a batch (mobile artifacts have batch 1)."""

    def run(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([runner_one(batch[i : i + 1]) for i in range(len(batch))], axis=0)

    return run
