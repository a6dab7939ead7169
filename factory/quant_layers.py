"""Layers of a PT2E-quantised network: keeping some in float, and emulating int8 one layer at a time.

A *layer* is the innermost module that an annotated graph node was traced from (`nn_module_stack`): a
convolution (batch norm folded into it), a linear layer, or a block whose own `forward` adds, concatenates or
multiplies (its residual add, its channel split and shuffle). `keep_float` makes any PT2E quantiser leave a
set of layers unannotated: it marks their nodes as already annotated, with no quantisation spec, before the
quantiser's own `annotate` runs, and every pattern annotator of the quantisers used here (XNNPACK's,
litert-torch's, coremltools') skips a pattern any of whose nodes is already annotated. The layer then runs in
float between a dequantise of its input and a quantise of its output; the rest of the graph is unchanged.

`Emulation` turns the observers of a calibrated, prepared graph into switchable fake-quantise modules with the
ranges calibration chose: the same arithmetic as the converted graph's quantise/dequantise pairs, with any
subset of layers quantised, so the int8 error of one layer alone costs one float forward pass.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np
import torch
from torch import fx, nn

# A layer's name for nodes traced from no module (the network's own forward).
TOP_LEVEL = "(top level)"

_INT_DTYPES = {torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.int16, torch.int32}
_PER_CHANNEL = {torch.per_channel_affine, torch.per_channel_symmetric}


def layer_of(node: fx.Node) -> str:
    """The innermost module `node` was traced from (its fully qualified name), or `TOP_LEVEL`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return TOP_LEVEL
    return list(stack.values())[-1][0] or TOP_LEVEL


def _annotation(node: fx.Node) -> object | None:
    """The node's quantisation annotation, if it asks for any quantisation (input or output)."""
    annotation = node.meta.get("quantization_annotation")
    if annotation is None or (annotation.output_qspec is None and not annotation.input_qspec_map):
        return None
    return annotation


def keep_float(quantizer: object, layers: Collection[str]) -> object:
    """`quantizer`, made to leave every node of `layers` in float (see the module docstring); returns it."""
    if not layers:
        return quantizer
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    wanted = set(layers)
    inner = quantizer.annotate

    def annotate(model: fx.GraphModule) -> fx.GraphModule:
        for node in model.graph.nodes:
            if node.op == "call_function" and layer_of(node) in wanted:
                node.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
        return inner(model)

    quantizer.annotate = annotate
    return quantizer


def quantised_layers(prepared: fx.GraphModule) -> dict[str, list[str]]:
    """Each layer a prepared graph quantises, with the ops it quantises there (graph order)."""
    layers: dict[str, list[str]] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_function" and _annotation(node) is not None:
            op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            layers.setdefault(layer_of(node), []).append(op)
    return layers


class _FakeQuantize(nn.Module):
    """An observer's int8 grid, applied when `enabled` (identity otherwise)."""

    def __init__(self, observer: nn.Module) -> None:
        super().__init__()
        scale, zero_point = observer.calculate_qparams()
        self.register_buffer("scale", scale.detach().float().reshape(-1))
        self.register_buffer("zero_point", zero_point.detach().int().reshape(-1))
        self.per_channel = observer.qscheme in _PER_CHANNEL
        self.axis = int(getattr(observer, "ch_axis", 0))
        self.quant_min, self.quant_max = int(observer.quant_min), int(observer.quant_max)
        self.enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis,
                                                          self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale[0]), int(self.zero_point[0]),
                                                     self.quant_min, self.quant_max)


class Emulation:
    """A calibrated PT2E-prepared graph whose int8 quantisation can be switched on layer by layer.

    Build it from the graph right after calibration (it replaces the graph's observers in place).
    """

    def __init__(self, prepared: fx.GraphModule) -> None:
        self.graph = prepared
        self.layers = quantised_layers(prepared)
        self._switches: list[tuple[_FakeQuantize, set[str]]] = []
        for node in list(prepared.graph.nodes):
            if node.op != "call_module":
                continue
            observer = prepared.get_submodule(node.target)
            if not hasattr(observer, "calculate_qparams") or getattr(observer, "dtype", None) not in _INT_DTYPES:
                continue
            switch = _FakeQuantize(observer)
            prepared.add_submodule(f"{node.target}_emulated", switch)
            node.target = f"{node.target}_emulated"
            self._switches.append((switch, self._owners(node)))
        prepared.recompile()

    def _owners(self, observer_node: fx.Node) -> set[str]:
        """The layers whose quantisation put this observer here: its producer's (an output range) and its
        consumers' (an input range, or a weight)."""
        producer = observer_node.args[0]
        owners = set()
        if isinstance(producer, fx.Node) and producer.op == "call_function":
            annotation = _annotation(producer)
            if annotation is not None and annotation.output_qspec is not None:
                owners.add(layer_of(producer))
        for user in observer_node.users:
            annotation = _annotation(user)
            if annotation is not None and producer in annotation.input_qspec_map:
                owners.add(layer_of(user))
        if not owners:  # an observer the quantiser shares between edges: whoever reads or writes it
            owners = {layer_of(n) for n in (producer, *observer_node.users)
                      if isinstance(n, fx.Node) and n.op == "call_function"}
        return owners

    def quantise(self, layers: Iterable[str] | None) -> None:
        """Quantise exactly `layers` (None: every layer)."""
        chosen = None if layers is None else set(layers)
        for switch, owners in self._switches:
            switch.enabled = chosen is None or bool(owners & chosen)

    def embeddings(self, inputs: torch.Tensor, batch: int = 1) -> np.ndarray:
        """The graph's output for `inputs` (normalised NCHW), `batch` at a time, under the current switches."""
        with torch.no_grad():
            return torch.cat([self.graph(inputs[i : i + batch]) for i in range(0, len(inputs), batch)]).numpy()
