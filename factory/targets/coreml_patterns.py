"""CoreMLQuantizer without the pattern exports that cannot match the network it annotates.

coremltools' CoreMLQuantizer (as ExecuTorch packages it) annotates a network by matching 405 small pattern
graphs against it: convolutions in 1, 2 and 3 dimensions and linear layers, each with and without batch norm and
followed by each of 15 activations (in place and not), and add / mul / matmul followed by each activation. It
builds every pattern with `torch.export` on every `annotate`, whether or not the network could contain it: about
0.1 s each, 40 s of a MobileFaceNet build's Core ML int8 compile (`docs/build-time.md`).

A pattern graph can only match if every ATen op in it is somewhere in the network's graph (the matcher compares
each pattern node's op with a network node's). Each pattern is a composition of named parts (the weighted op,
batch norm, the binary op, the activation), each exported into the composite as it is alone. So this module
exports each part once per process, keeps the set of ATen ops it produced, and skips a composite pattern when a
part's ops are missing from the network: that pattern's annotation pass would have matched nothing. Every other
pattern is exported and matched exactly as before, so the annotations, and the artifact's bytes, are the
same (`tests/test_coreml_patterns.py` compares the prepared graphs with and without pruning).

The parts are read from the arguments of the quantiser's private pattern builders (ExecuTorch 1.5's
`_coreml_quantizer_utils`); where those are missing (another ExecuTorch version) the quantiser runs unpruned.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx

_UTILS = "executorch.backends.apple.coreml.quantizer._coreml_quantizer_utils"
# The pattern builders whose arguments name the parts, and the annotation passes that take their graphs.
_BUILDERS = ("_get_weighted_mod_pattern", "_get_weighted_mod_bn_pattern", "get_binary_op_act_pattern")
_PASSES = ("annotate_weighted_mod_pattern", "annotate_binary_op_act_pattern")

_UNMATCHABLE = object()  # what a skipped builder returns; the wrapped passes answer it with no partitions


@functools.cache
def _helpers() -> tuple[Any, dict[str, Callable[..., Any]]] | None:
    """ExecuTorch's CoreMLQuantizer helper module and its own builders and passes (None where it lacks them).

    Read once, before any pruning replaces them, so the part probes below always call the originals.
    """
    import importlib

    module = importlib.import_module(_UTILS)
    originals = {name: getattr(module, name, None) for name in (*_BUILDERS, *_PASSES)}
    return (module, originals) if all(callable(f) for f in originals.values()) else None


def _ops(graph_module: fx.GraphModule) -> frozenset[object]:
    return frozenset(node.target for node in graph_module.graph.nodes if node.op == "call_function")


@functools.cache
def _part_ops(builder: str, fn: Callable[..., Any], in_place: bool, shapes: tuple[tuple[int, ...], ...]
              ) -> frozenset[object]:
    """The ATen ops one part of a pattern brings into its exported graph, or a subset of them.

    Parts are exported with the quantiser's own builders: the weighted op (with its batch norm, for the `_bn`
    builder) or the binary op without an activation, exactly as the quantiser builds those patterns; an
    activation as `add -> activation` less the add's ops (in each composite it acts on an intermediate too).
    """
    _, originals = _helpers()
    if builder == "act":
        with_act = _ops(originals["get_binary_op_act_pattern"](operator.add, fn, in_place))
        return with_act - _part_ops("get_binary_op_act_pattern", operator.add, False, ())
    if builder == "get_binary_op_act_pattern":
        return _ops(originals[builder](fn, None))
    return _ops(originals[builder](fn, tuple(torch.randn(shape) for shape in shapes), None))


def _parts(builder: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The parts (`_part_ops` arguments) of the pattern one builder call makes, the most shared first."""
    if builder == "get_binary_op_act_pattern":
        bound = dict(zip(("binary_op", "act_fn", "act_in_place"), args, strict=False)) | kwargs
        parts = [(builder, bound["binary_op"], False, ())]
    else:
        bound = dict(zip(("mod_fn", "example_inputs", "act_fn", "act_in_place"), args, strict=False)) | kwargs
        shapes = tuple(tuple(tensor.shape) for tensor in bound["example_inputs"])
        parts = [(builder, bound["mod_fn"], False, shapes)]
    if bound.get("act_fn") is not None:
        parts.append(("act", bound["act_fn"], bool(bound.get("act_in_place", False)), ()))
    return parts


@contextlib.contextmanager
def _pruned(model: fx.GraphModule) -> Iterator[None]:
    """While annotating `model`: pattern builders return `_UNMATCHABLE` for patterns with an op `model` lacks."""
    helpers = _helpers()
    if helpers is None:
        yield
        return
    utils, originals = helpers
    present = _ops(model)

    def builder(name: str) -> Callable[..., Any]:
        def build(*args: Any, **kwargs: Any) -> Any:
            for kind, fn, in_place, shapes in _parts(name, args, kwargs):
                if not _part_ops(kind, fn, in_place, shapes) <= present:
                    return _UNMATCHABLE
            return originals[name](*args, **kwargs)
        return build

    def annotation_pass(name: str) -> Callable[..., Any]:
        def annotate(model: fx.GraphModule, pattern_gm: Any, *args: Any, **kwargs: Any) -> Any:
            return [] if pattern_gm is _UNMATCHABLE else originals[name](model, pattern_gm, *args, **kwargs)
        return annotate

    try:
        for name in _BUILDERS:
            setattr(utils, name, builder(name))
        for name in _PASSES:
            setattr(utils, name, annotation_pass(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(utils, name, original)


def pruned_coreml_quantizer(config: object) -> object:
    """ExecuTorch's CoreMLQuantizer for `config`, annotating with only the patterns the network can match."""
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer

    class PrunedCoreMLQuantizer(CoreMLQuantizer):
        def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
            with _pruned(model):
                return super().annotate(model)

    return PrunedCoreMLQuantizer(config)
